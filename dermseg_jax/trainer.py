"""Training: `TrainState`, `create_train_state`, the jitted data-parallel `train_step`, and the
`train_and_evaluate` loop (resume, periodic validation, checkpoints, logging, preemption).

The state is replicated over the ('data',) mesh and the batch is sharded along it; `jax.jit`
inserts the gradient all-reduce, so the same code runs on 1 device, N devices and N processes.
Resume order: a checkpoint in the workdir, then `config.init_from`, then scratch.
"""

import functools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax import lax

from dermseg_jax import checkpointing, losses, models, optim, sharding, xla_options


class TrainState(flax.struct.PyTreeNode):
    """Everything a training step reads and writes (all replicated over the mesh).

    Attributes:
        step: int32 scalar, optimizer steps taken.
        params: float32 parameters.
        batch_stats: BatchNorm running statistics.
        opt_state: optax state (no moments for frozen groups).
        rng: typed base key of the run; step keys are `fold_in(rng, step)`.
        apply_fn: the model's `apply` (static).
        tx: the optimizer (static).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


class TrainingInterrupted(Exception):
    """Raised after SIGTERM/SIGINT once a checkpoint of the current step is saved."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint saved")
        self.signum = signum
        self.step = step


def state_to_checkpoint(state: TrainState) -> dict:
    """The plain pytree saved by Orbax (no apply_fn/tx; the key as raw uint32 data)."""
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(state.rng),
    }


def state_from_checkpoint(state: TrainState, tree: Mapping[str, Any]) -> TrainState:
    """Fills `state` (or an abstract one) with the arrays of a restored checkpoint pytree."""
    return state.replace(
        step=tree["step"],
        params=tree["params"],
        batch_stats=tree["batch_stats"],
        opt_state=tree["opt_state"],
        rng=jax.random.wrap_key_data(tree["rng"]),
    )


def _merge_pretrained(target: Any, loaded: Any, source: str) -> tuple[Any, int]:
    """Replaces the leaves of `target` found in `loaded` (same path and shape)."""
    flat_loaded = {
        jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(loaded)
    }
    used = 0

    def pick(path, leaf):
        nonlocal used
        key = jax.tree_util.keystr(path)
        if key not in flat_loaded:
            return leaf
        value = flat_loaded.pop(key)
        if value.shape != leaf.shape:
            raise ValueError(f"{source}: {key} has shape {value.shape}, model needs {leaf.shape}")
        used += 1
        return jnp.asarray(value, leaf.dtype)

    merged = jax.tree_util.tree_map_with_path(pick, target)
    if flat_loaded:
        raise ValueError(f"{source}: variables not in the model: {sorted(flat_loaded)[:5]} ...")
    return merged, used


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The run's optimizer: `optim.create_optimizer` with the config's schedule lengths."""
    return optim.create_optimizer(
        config.optim,
        steps_per_epoch=int(config.train.steps_per_epoch),
        num_train_steps=int(config.train.num_train_steps),
    )


def initial_train_state(
    variables: Mapping[str, Any], rng: jax.Array, model: Any, tx: optax.GradientTransformation
) -> TrainState:
    """A step-0 `TrainState` of `variables` (params, optional batch_stats) with a fresh `tx`
    state (pure: build it inside a jitted function, with the shardings as its output's)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(variables["params"]),
        rng=rng,
        apply_fn=model.apply,
        tx=tx,
    )


def _make_init_fn(config: ml_collections.ConfigDict, model: Any) -> Callable:
    tx = create_optimizer(config)
    size = int(config.data.crop_size)

    def init_fn(rng):
        rng_params, rng_dropout, rng_train = jax.random.split(rng, 3)
        dummy = jnp.zeros((1, size, size, 3), jnp.float32)
        variables = model.init({"params": rng_params, "dropout": rng_dropout}, dummy, train=False)
        return initial_train_state(variables, rng_train, model, tx)

    return init_fn


def create_train_state(
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
    model: Any | None = None,
) -> TrainState:
    """Initialises the model and optimizer, directly replicated over the mesh.

    Args:
        config: the full training config.
        rng: typed key; split into the init keys and the run's training key.
        mesh: the data mesh.
        model: the Flax module; default `models.create_model(config.model)`.

    Returns:
        A replicated `TrainState` at step 0.
    """
    model = models.create_model(config.model) if model is None else model
    init_fn = _make_init_fn(config, model)
    return jax.jit(init_fn, out_shardings=sharding.replicated_sharding(mesh))(rng)


def restore_train_state(
    config: ml_collections.ConfigDict,
    manager: Any,
    mesh: jax.sharding.Mesh,
    model: Any | None = None,
    step: int | None = None,
) -> TrainState:
    """Restores a `TrainState` from a checkpoint, straight onto the replicated sharding.

    Args:
        config: the full training config (must match the checkpoint's).
        manager: `checkpointing.create_checkpoint_manager(workdir, ...)`.
        mesh: the data mesh.
        model: the Flax module; default `models.create_model(config.model)`.
        step: step to restore; None = the latest.

    Returns:
        The restored state.
    """
    model = models.create_model(config.model) if model is None else model
    init_fn = _make_init_fn(config, model)
    replicated = sharding.replicated_sharding(mesh)
    rng = jax.random.key(int(config.train.seed))
    # Shapes only: the restore target carries the shardings, so nothing is initialised.
    shapes = jax.eval_shape(lambda r: state_to_checkpoint(init_fn(r)), rng)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes
    )
    tree = checkpointing.restore_train_state(manager, target, step)
    abstract_state = jax.eval_shape(init_fn, rng)
    return state_from_checkpoint(abstract_state, tree)


def load_pretrained(state: TrainState, directory: str) -> TrainState:
    """Overwrites the parameters and BatchNorm statistics found in a model directory.

    Args:
        state: a freshly initialised state.
        directory: `checkpointing.save_model` output (converted encoder or full model).

    Returns:
        The state with the loaded variables (optimizer state untouched: Adam moments are zero).
    """
    _, variables = checkpointing.load_model(directory)
    params, n_params = _merge_pretrained(state.params, variables.get("params", {}), directory)
    stats, n_stats = _merge_pretrained(
        state.batch_stats, variables.get("batch_stats", {}), directory
    )
    logging.info(
        "Loaded %d parameter and %d statistics arrays from %s", n_params, n_stats, directory
    )
    replicated = jax.tree.map(lambda x: x.sharding, state.params)
    params = jax.device_put(params, replicated)
    stats = jax.device_put(stats, jax.tree.map(lambda x: x.sharding, state.batch_stats))
    return state.replace(params=params, batch_stats=stats)


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array | None = None,
    *,
    loss_cfg: ml_collections.ConfigDict,
    class_weights: jax.Array | None,
    update_batch_stats: bool = True,
    frozen_groups: tuple[str, ...] = (),
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch (pure; jit it with `donate_argnums=0`).

    Args:
        state: the current state.
        batch: `image` float32 [B, h, w, 3], `label` int32 [B, h, w], `structures` uint8
            [B, h, w, 5], `valid` float32 [B, h, w], sharded over 'data'.
        rng: base key for dropout; None = `state.rng`. The step's key is `fold_in(rng, step)`.
        loss_cfg: `config.loss`.
        class_weights: float32 [C] weights passed to the loss, or None.
        update_batch_stats: False keeps the BatchNorm running statistics unchanged (thesis
            defect 3 after the first validation).
        frozen_groups: parameter groups (`optim.frozen_groups`) held constant in the loss, so
            that no gradient is computed for them (their gradient is 0 and leaves `grad_norm`).

    Returns:
        (new state, {'loss', 'grad_norm', 'lr_scale'} scalars on device).
    """
    rng = state.rng if rng is None else rng
    rng_step = jax.random.fold_in(rng, state.step)

    groups = models.param_groups(state.params) if frozen_groups else None

    def loss_fn(params):
        if frozen_groups:
            # The forward pass still reads frozen groups; the backward pass stops at them.
            params = jax.tree.map(
                lambda p, g: lax.stop_gradient(p) if g in frozen_groups else p, params, groups
            )
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            rngs={"dropout": rng_step},
            mutable=["batch_stats"],
        )
        # The loss in float32 whatever the compute dtype.
        loss = losses.compute_loss(loss_cfg, logits.astype(jnp.float32), batch, class_weights)
        return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if not update_batch_stats:
        batch_stats = state.batch_stats
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics


def create_evaluate_fn(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, model: Any
) -> Callable[[TrainState], dict[str, float]]:
    """Periodic validation: `evaluator.Evaluator(...).run` on `config.eval.split`.

    Args:
        config: the full training config (`data`, `eval`).
        mesh: the data mesh.
        model: the Flax module.

    Returns:
        evaluate_fn(state) -> {'jaccard/<structure>', 'jaccard/mean', ...} floats.
    """
    from dermseg_jax import evaluator

    return evaluator.Evaluator(model, config.data, config.eval, mesh=mesh).run


class _MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool):
        self._enabled = enabled
        self._tb = None
        if enabled:
            # Imported here: TensorBoard pulls in TensorFlow, never at package import time.
            from flax.metrics import tensorboard

            self._tb = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tb.close()


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag checked between steps (main thread only)."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        try:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # Not the main thread: no handlers.
            pass
        return self

    def _handle(self, signum, frame):
        del frame
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _class_weights(config: ml_collections.ConfigDict) -> jax.Array | None:
    """`config.loss.class_weights`, or derived from the training split's pixel counts."""
    if config.loss.get("class_weights") is not None:
        return jnp.asarray(config.loss.class_weights, jnp.float32)
    if not config.loss.get("weights_from_data", False):
        return None
    from dermseg_jax.data import pipeline

    if config.model.head == "softmax":
        weights = np.asarray(pipeline.class_weights(config.data), np.float32)
    else:
        # BCE pos_weight: sqrt(negatives / positives) per structure, from the softmax counts
        # (exact where structures do not overlap), kept within [1, 100].
        inverse = np.asarray(pipeline.class_weights(config.data), np.float64)
        counts = 1.0 / inverse
        positives = counts[1:]
        ratio = (counts.sum() - positives) / positives
        weights = np.clip(np.sqrt(ratio), 1.0, 100.0).astype(np.float32)
    if jax.process_index() == 0:
        logging.info("Class weights from the training split: %s", weights.round(4).tolist())
    return jnp.asarray(weights)


def _restore_or_init(config, manager, mesh, model) -> TrainState:
    latest = manager.latest_step()
    if latest is not None:
        logging.info("Resuming from %s step %d", manager.directory, latest)
        return restore_train_state(config, manager, mesh, model, latest)
    state = create_train_state(config, jax.random.key(int(config.train.seed)), mesh, model)
    if config.get("init_from"):
        state = load_pretrained(state, os.path.expanduser(config.init_from))
    return state


def check_finite(host_metrics: list[Mapping[str, Any]], first_step: int) -> None:
    """Raises FloatingPointError naming the step if a fetched loss is NaN or infinite.

    Args:
        host_metrics: per-step metrics dicts (host values) of steps first_step, first_step + 1...
        first_step: the step number of `host_metrics[0]` (1-based: the step it completed).
    """
    losses_ = np.array([m["loss"] for m in host_metrics])
    if not np.all(np.isfinite(losses_)):
        bad = first_step + int(np.argmin(np.isfinite(losses_)))
        raise FloatingPointError(
            f"Non-finite loss at step {bad} (in steps {first_step}..{first_step + len(losses_) - 1})"
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    evaluate_fn: Callable[[TrainState], dict[str, float]] | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """Trains (resuming from `workdir` if it holds a checkpoint), validates and checkpoints.

    Args:
        config: the full training config.
        workdir: run directory (config.json, checkpoints/, metrics.jsonl, tensorboard/).
        evaluate_fn: validation `fn(state) -> metrics`; default `create_evaluate_fn`.

    Returns:
        (final state, last validation metrics with 'step').

    Raises:
        TrainingInterrupted: after SIGTERM/SIGINT, once the checkpoint is saved.
        FloatingPointError: on a non-finite loss, naming the step.
    """
    import tqdm

    workdir = os.path.abspath(os.path.expanduser(workdir))
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh()
    local_batch = sharding.check_batch_size(
        int(config.train.batch_size), mesh, "config.train.batch_size"
    )
    num_steps = int(config.train.num_train_steps)
    if is_main:
        checkpointing.save_run_config(workdir, config)
    model = models.create_model(config.model)
    ckpt_cfg = config.checkpoint
    manager = checkpointing.create_checkpoint_manager(
        workdir,
        keep=ckpt_cfg.keep,
        keep_best=ckpt_cfg.keep_best,
        best_metric=ckpt_cfg.best_metric,
        best_mode=ckpt_cfg.best_mode,
    )
    writer = _MetricWriter(workdir, is_main)
    from dermseg_jax.data import pipeline

    with jax.set_mesh(mesh), _StopFlag() as stop:
        state = _restore_or_init(config, manager, mesh, model)
        step = int(jax.device_get(state.step))
        eval_every = int(config.eval.every_steps or 0)
        evaluate_fn = evaluate_fn or create_evaluate_fn(config, mesh, model)
        step_fn = functools.partial(
            train_step,
            loss_cfg=config.loss,
            class_weights=_class_weights(config),
            frozen_groups=optim.frozen_groups(config.optim),
        )
        # Compiled once each; donation reuses the state's buffers for the new state.
        options = xla_options.train_step_options()
        train_step_fn = jax.jit(step_fn, donate_argnums=0, compiler_options=options)
        frozen_bn_step_fn = jax.jit(
            functools.partial(step_fn, update_batch_stats=False),
            donate_argnums=0,
            compiler_options=options,
        )
        freeze_bn = config.train.get("freeze_bn_stats_after_first_eval", False)
        bn_frozen = freeze_bn and eval_every > 0 and step >= eval_every
        train_iter: Iterator = pipeline.create_train_dataset(
            config.data,
            batch_size=local_batch,
            seed=int(config.train.seed),
            start_step=step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        progress = tqdm.tqdm(
            total=num_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True
        )
        pending, pending_from, t_log = [], step, time.time()
        eval_metrics: dict[str, float] = {}
        try:
            while step < num_steps:
                batch = sharding.shard_batch(next(train_iter), mesh)
                fn = frozen_bn_step_fn if bn_frozen else train_step_fn
                state, metrics = fn(state, batch)
                pending.append(metrics)
                if len(pending) > 1:
                    # At most two steps in flight: the progress bar shows finished steps and a
                    # stop signal is served within a step, at no cost to throughput.
                    jax.block_until_ready(pending[-2]["loss"])
                step += 1
                progress.update(1)
                last = step == num_steps
                if step % int(config.train.log_every_steps) == 0 or last or stop.signum:
                    host = jax.device_get(pending)
                    check_finite(host, pending_from + 1)
                    elapsed = time.time() - t_log
                    scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                    scalars["images_per_s"] = len(host) * int(config.train.batch_size) / elapsed
                    writer.write(step, {f"train/{k}": v for k, v in scalars.items()})
                    progress.set_postfix(
                        loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['images_per_s']:.1f}"
                    )
                    pending, pending_from, t_log = [], step, time.time()
                eval_now = last or (eval_every and step % eval_every == 0)
                metrics_for_ckpt = None
                if eval_now:
                    eval_metrics = evaluate_fn(state)
                    metrics_for_ckpt = eval_metrics
                    writer.write(step, {f"val/{k}": v for k, v in eval_metrics.items()})
                    if is_main:
                        logging.info("step %d validation: %s", step, _format(eval_metrics))
                    bn_frozen = bool(freeze_bn)
                    t_log = time.time()
                every = int(ckpt_cfg.every_steps or 0)
                if last or eval_now or (every and step % every == 0) or stop.signum:
                    checkpointing.save_train_state(
                        manager, step, state_to_checkpoint(state), metrics=metrics_for_ckpt
                    )
                if stop.signum and not last:
                    manager.wait_until_finished()
                    raise TrainingInterrupted(stop.signum, step)
        finally:
            progress.close()
            manager.wait_until_finished()
            manager.close()
            writer.close()
    return state, {"step": step, **eval_metrics}


def _format(metrics: Mapping[str, float]) -> str:
    # The per-structure Jaccard; everything else goes to metrics.jsonl and TensorBoard.
    keys = sorted(k for k in metrics if k.startswith("jaccard/")) or sorted(metrics)
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys)
