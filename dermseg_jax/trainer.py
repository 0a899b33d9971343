"""The training state and step: `TrainState`, `create_train_state` (fresh),
`resume_train_state` (from a checkpoint), `load_pretrained` (`init_from`) and the jitted
data-parallel `train_step`. The loop that drives them is `dermseg_jax.train_loop`.

The state is replicated over the ('data',) mesh and the batch is sharded along it; `jax.jit`
inserts the gradient all-reduce, so the same code runs on 1 device, N devices and N processes.
A resume compares the checkpoint with the config before restoring anything, and restores the
newest readable checkpoint.
"""

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax import lax

from dermseg_jax import (
    checkpoint_errors,
    checkpointing,
    losses,
    models,
    optim,
    presence,
    sharding,
)
from dermseg_jax.errors import UserError


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


def run_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
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
    tx = run_optimizer(config)
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


def resume_train_state(
    config: ml_collections.ConfigDict,
    manager: Any,
    mesh: jax.sharding.Mesh,
    model: Any | None = None,
) -> TrainState:
    """Restores the newest readable checkpoint, straight onto the replicated sharding.

    The checkpoint's metadata is compared with `config` first: a model or optimizer that does
    not fit is one `UserError` naming the changed `config.model` fields. Damaged steps newer
    than the restored one are moved to `workdir/damaged_checkpoints/` (a warning says so),
    so that training saves those steps again.

    Args:
        config: the full training config.
        manager: `checkpointing.create_checkpoint_manager(workdir, ...)`.
        mesh: the data mesh.
        model: the Flax module; default `models.create_model(config.model)`.

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
    steps = sorted(manager.all_steps(), reverse=True)
    try:
        step, tree = checkpoint_errors.restore_newest_readable(
            steps, lambda s: checkpointing.restore_train_state(manager, target, s)
        )
    except checkpoint_errors.ConfigMismatch as e:
        changed = _model_changes(os.path.dirname(os.fspath(manager.directory)), config)
        raise UserError(f"{changed}{e}", hint=e.hint) from e
    logging.info("Resuming from %s step %d", manager.directory, step)
    _set_aside_damaged(manager, [s for s in steps if s > step])
    return state_from_checkpoint(jax.eval_shape(init_fn, rng), tree)


def _model_changes(workdir: str, config: ml_collections.ConfigDict) -> str:
    """'model.width 0.0625 -> 0.125: ' for the model fields that differ from config.json."""
    try:
        stored = checkpointing.load_run_config(workdir).get("model", {}).to_dict()
    except UserError:
        return ""
    new = json.loads(config.model.to_json_best_effort())
    keys = sorted(k for k in set(stored) | set(new) if stored.get(k) != new.get(k))
    return "".join(f"model.{k} {stored.get(k)} -> {new.get(k)}: " for k in keys)


def _set_aside_damaged(manager: Any, steps: list[int]) -> None:
    """Moves damaged checkpoint steps out of `checkpoints/` (kept, never deleted)."""
    if not steps:
        return
    if jax.process_count() > 1:
        raise UserError(
            f"{manager.directory}: damaged checkpoint step(s) {steps}",
            hint="remove them and rerun (multi-process runs do not move them aside)",
        )
    aside = os.path.join(os.path.dirname(os.fspath(manager.directory)), "damaged_checkpoints")
    os.makedirs(aside, exist_ok=True)
    for step in steps:
        target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.rename(os.path.join(os.fspath(manager.directory), str(step)), target)
        logging.warning(
            "Moved the damaged checkpoint step %d to %s (remove it when done)", step, target
        )
    manager.reload()


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
        loss_cfg: `config.loss` (with `model.presence_head`, `presence_weight` x the presence
            BCE is added: `presence.presence_loss`).
        class_weights: float32 [C] weights passed to the loss, or None.
        update_batch_stats: False keeps the BatchNorm running statistics unchanged (thesis
            defect 3 after the first validation).
        frozen_groups: parameter groups (`optim.frozen_groups`) held constant in the loss, so
            that no gradient is computed for them (their gradient is 0 and leaves `grad_norm`).

    Returns:
        (new state, {'loss', 'grad_norm'} scalars on device).
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
        outputs, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            rngs={"dropout": rng_step},
            mutable=["batch_stats"],
        )
        logits, presence_logits = models.split_outputs(outputs)
        # The loss in float32 whatever the compute dtype.
        loss = losses.compute_loss(loss_cfg, logits.astype(jnp.float32), batch, class_weights)
        if presence_logits is not None:
            weight = float(loss_cfg.get("presence_weight", 1.0))
            loss = loss + weight * presence.presence_loss(presence_logits, batch)
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
