"""The training run: `train_and_evaluate` (start-up checks, resume or init, the loop of train
steps, logging, checkpoints, validation, preemption). The state and step are `trainer`'s.

Nothing is lost on failure: every input is checked before anything is written
(`check_start`); a non-finite state is never saved (one fused on-device check, fetched at
save and validation steps only), so the newest checkpoint on disk is always finite; a
validation step's checkpoint is saved even when its validation fails; SIGTERM/SIGINT save the
current step and exit.
"""

import functools
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dermseg_jax import checkpointing, models, optim, reports, run_checks, sharding, xla_options
from dermseg_jax.errors import UserError
from dermseg_jax.trainer import (
    TrainState,
    create_train_state,
    load_pretrained,
    resume_train_state,
    state_to_checkpoint,
    train_step,
)


class TrainingInterrupted(Exception):
    """Raised after SIGTERM/SIGINT once a checkpoint of the current step is saved."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint saved")
        self.signum = signum
        self.step = step


class TrainingDiverged(UserError):
    """A non-finite loss or parameter; raised before such a state is saved."""


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


def _class_weights(config: ml_collections.ConfigDict, data_cfg) -> jax.Array | None:
    """`config.loss.class_weights`, or derived from the prepared training split's pixel counts.

    `data_cfg` is `config.data` with `data_dir` resolved (`run_checks.resolve_data`), so that
    nothing is generated here.
    """
    if config.loss.get("class_weights") is not None:
        return jnp.asarray(config.loss.class_weights, jnp.float32)
    if not config.loss.get("weights_from_data", False):
        return None
    from dermseg_jax.data import pipeline

    if config.model.head == "softmax":
        weights = np.asarray(pipeline.class_weights(data_cfg), np.float32)
    else:
        # BCE pos_weight: sqrt(negatives / positives) per structure, from the softmax counts
        # (exact where structures do not overlap), kept within [1, 100].
        inverse = np.asarray(pipeline.class_weights(data_cfg), np.float64)
        counts = 1.0 / inverse
        positives = counts[1:]
        ratio = (counts.sum() - positives) / positives
        weights = np.clip(np.sqrt(ratio), 1.0, 100.0).astype(np.float32)
    if jax.process_index() == 0:
        logging.info("Class weights from the training split: %s", weights.round(4).tolist())
    return jnp.asarray(weights)


def create_evaluate_fn(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    model: Any,
    data_cfg: ml_collections.ConfigDict | None = None,
) -> Callable[[TrainState], dict[str, float]]:
    """Periodic validation: `evaluator.Evaluator(...).run` on `config.eval.split`.

    Args:
        config: the full training config (`data`, `eval`).
        mesh: the data mesh.
        model: the Flax module.
        data_cfg: `config.data` with `data_dir` resolved (`check_start`); default config.data.

    Returns:
        evaluate_fn(state) -> {'jaccard/<structure>', 'jaccard/mean', ...} floats.
    """
    from dermseg_jax import evaluator

    data_cfg = config.data if data_cfg is None else data_cfg
    return evaluator.Evaluator(model, data_cfg, config.eval, mesh=mesh).run


def check_start(
    config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh
) -> ml_collections.ConfigDict:
    """Checks everything the run will need before anything is written.

    Returns:
        A copy of `config.data` whose `data_dir` is the checked prepared directory.

    Raises:
        UserError: the workdir is a file, the batch does not split over the devices, the data
            or a split the run reads (train, `config.eval.split`) is missing or empty, or
            `init_from` is not a model directory.
    """
    run_checks.check_workdir(workdir)
    run_checks.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.data_dir = run_checks.resolve_data(data_cfg, {"train", config.eval.split})
    init_from = config.get("init_from")
    if init_from and not checkpointing.is_model_dir(os.path.expanduser(init_from)):
        raise UserError(
            f"--config.init_from={init_from}: not a model directory (model_config.json + "
            "variables/)",
            hint="convert weights with `python -m dermseg_jax.convert`",
        )
    return data_cfg


def _restore_or_init(config, manager, mesh, model) -> TrainState:
    if manager.all_steps():
        return resume_train_state(config, manager, mesh, model)
    state = create_train_state(config, jax.random.key(int(config.train.seed)), mesh, model)
    if config.get("init_from"):
        state = load_pretrained(state, os.path.expanduser(config.init_from))
    return state


def check_finite(host_metrics: list[Mapping[str, Any]], first_step: int) -> None:
    """Raises `TrainingDiverged` naming the step if a fetched loss is NaN or infinite.

    Args:
        host_metrics: per-step metrics dicts (host values) of steps first_step, first_step + 1...
        first_step: the step number of `host_metrics[0]` (1-based: the step it completed).
    """
    losses_ = np.array([m["loss"] for m in host_metrics])
    if not np.all(np.isfinite(losses_)):
        bad = first_step + int(np.argmin(np.isfinite(losses_)))
        last = first_step + len(losses_) - 1
        raise TrainingDiverged(
            f"Non-finite loss at step {bad} (in steps {first_step}..{last}); nothing saved "
            "after it",
            hint=_DIVERGED_HINT,
        )


_DIVERGED_HINT = (
    "lower the learning rates (--config.optim.lr_*) or clip (--config.optim.grad_clip_norm); "
    "a rerun resumes from the newest checkpoint, which is finite"
)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    """One fused on-device reduction: every leaf of `tree` finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


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
        TrainingDiverged: on a non-finite loss or parameter, naming the step; never saved.
        UserError: for inputs that do not fit (see `check_start`, `resume_train_state`).
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if optim.apply_encoder_lr_without_init(config):
        logging.info(
            "No init_from: the encoder trains from scratch at optim.encoder_lr_without_init=%s",
            config.optim.encoder_lr_without_init,
        )
    mesh = sharding.make_mesh()
    data_cfg = check_start(config, workdir, mesh)
    model = models.create_model(config.model)
    ckpt_cfg = config.checkpoint
    manager = checkpointing.create_checkpoint_manager(
        workdir,
        keep=ckpt_cfg.keep,
        keep_best=ckpt_cfg.keep_best,
        best_metric=ckpt_cfg.best_metric,
        best_mode=ckpt_cfg.best_mode,
    )
    try:
        with jax.set_mesh(mesh), _StopFlag() as stop:
            state = _restore_or_init(config, manager, mesh, model)
            # Replaced only now: a rerun whose config does not fit keeps the stored one.
            if jax.process_index() == 0:
                checkpointing.save_run_config(workdir, config)
            evaluate_fn = evaluate_fn or create_evaluate_fn(config, mesh, model, data_cfg)
            loop = _Loop(config, data_cfg, workdir, mesh, manager, stop)
            state, final = loop.run(state, evaluate_fn)
            if config.eval.get("fit_thresholds", False):
                fit_final_thresholds(config, data_cfg, model, mesh, state, workdir)
            return state, final
    finally:
        manager.close()


def fit_final_thresholds(config, data_cfg, model, mesh, state: TrainState, workdir: str) -> None:
    """`eval.fit_thresholds`: fits the sigmoid thresholds (and presence cut-offs) of the final
    state on the validation split and writes `workdir/thresholds.json`, as `evaluate
    --fit-thresholds` would for that step; `evaluate` and `predict` then use them."""
    from dermseg_jax import evaluator, thresholds

    step = int(jax.device_get(state.step))
    if config.model.head != "sigmoid":
        logging.warning("eval.fit_thresholds: the %s head has no thresholds", config.model.head)
        return
    ev = evaluator.Evaluator(model, data_cfg, config.eval, split="validation", mesh=mesh)
    fitted = ev.fit_thresholds(state)
    if jax.process_index() == 0:
        path = thresholds.save(workdir, fitted, step=step)
        logging.info(
            "Fitted thresholds %s (presence %s) at step %d on validation: official %.4f "
            "(%.4f at 0.5); wrote %s",
            [round(t, 4) for t in fitted.thresholds],
            fitted.presence_thresholds,
            step,
            fitted.score,
            fitted.score_at_half,
            path,
        )


class _Loop:
    """The training loop's steps: train, log, check, save, validate (one run of it)."""

    def __init__(self, config, data_cfg, workdir, mesh, manager, stop):
        self.config, self.data_cfg, self.mesh = config, data_cfg, mesh
        self.manager, self.stop = manager, stop
        self.is_main = jax.process_index() == 0
        self.writer = reports.MetricWriter(workdir, self.is_main)
        self.eval_every = int(config.eval.every_steps or 0)
        self.save_every = int(config.checkpoint.every_steps or 0)
        self.num_steps = int(config.train.num_train_steps)

    def _step_fns(self):
        """(step, step with frozen BatchNorm statistics), each compiled once."""
        step_fn = functools.partial(
            train_step,
            loss_cfg=self.config.loss,
            class_weights=_class_weights(self.config, self.data_cfg),
            frozen_groups=optim.frozen_groups(self.config.optim),
        )
        # Donation reuses the state's buffers for the new state.
        options = xla_options.train_step_options()
        return (
            jax.jit(step_fn, donate_argnums=0, compiler_options=options),
            jax.jit(
                functools.partial(step_fn, update_batch_stats=False),
                donate_argnums=0,
                compiler_options=options,
            ),
        )

    def run(self, state: TrainState, evaluate_fn: Callable) -> tuple[TrainState, dict]:
        import tqdm

        step = self.checked = int(jax.device_get(state.step))
        train_fn, frozen_bn_fn = self._step_fns()
        freeze_bn = self.config.train.get("freeze_bn_stats_after_first_eval", False)
        bn_frozen = freeze_bn and self.eval_every > 0 and step >= self.eval_every
        train_iter = self._train_iter(step)
        progress = tqdm.tqdm(
            total=self.num_steps, initial=step, disable=not self.is_main, desc="train",
            dynamic_ncols=True,
        )  # fmt: skip
        self.pending, self.pending_from, self.t_log = [], step, time.time()
        eval_metrics: dict[str, float] = {}
        try:
            while step < self.num_steps:
                batch = sharding.shard_batch(next(train_iter), self.mesh)
                state, metrics = (frozen_bn_fn if bn_frozen else train_fn)(state, batch)
                self.pending.append(metrics)
                if len(self.pending) > 1:
                    # At most two steps in flight: the progress bar shows finished steps and a
                    # stop signal is served within a step, at no cost to throughput.
                    jax.block_until_ready(self.pending[-2]["loss"])
                step += 1
                progress.update(1)
                last = step == self.num_steps
                if step % int(self.config.train.log_every_steps) == 0 or last or self.stop.signum:
                    self._log(step, progress)
                eval_now = last or (self.eval_every and step % self.eval_every == 0)
                save_now = self.save_every and step % self.save_every == 0
                if eval_now or save_now or self.stop.signum:
                    self._check_finite(state, metrics, step)
                    validated = self._save_and_evaluate(state, step, evaluate_fn, eval_now)
                    eval_metrics = validated or eval_metrics
                    bn_frozen = bn_frozen or bool(eval_now and freeze_bn)
                if self.stop.signum and not last:
                    checkpointing.wait_for_saves(self.manager)
                    raise TrainingInterrupted(self.stop.signum, step)
        finally:
            progress.close()
            try:
                checkpointing.wait_for_saves(self.manager)
            finally:
                self.writer.close()
        return state, {"step": step, **eval_metrics}

    def _train_iter(self, step: int) -> Iterator:
        from dermseg_jax.data import pipeline

        local_batch = run_checks.check_batch_size(
            self.config.train.batch_size, self.mesh, "config.train.batch_size"
        )
        return pipeline.create_train_dataset(
            self.data_cfg,
            batch_size=local_batch,
            seed=int(self.config.train.seed),
            start_step=step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def _log(self, step: int, progress) -> None:
        host = jax.device_get(self.pending)
        check_finite(host, self.pending_from + 1)
        elapsed = time.time() - self.t_log
        scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        scalars["images_per_s"] = len(host) * int(self.config.train.batch_size) / elapsed
        self.writer.write(step, {f"train/{k}": v for k, v in scalars.items()})
        progress.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['images_per_s']:.1f}")
        self.pending, self.pending_from, self.t_log = [], step, time.time()

    def _check_finite(self, state: TrainState, metrics: Mapping, step: int) -> None:
        """Stops before saving or validating a non-finite state (one fetched boolean)."""
        if not bool(_all_finite((metrics["loss"], state.params, state.batch_stats))):
            saved = self.manager.latest_step()
            raise TrainingDiverged(
                f"Non-finite loss or parameters at step {step} (first in steps "
                f"{self.checked + 1}..{step}); not saved, the newest checkpoint is step {saved}",
                hint=_DIVERGED_HINT,
            )
        self.checked = step

    def _save_and_evaluate(self, state, step: int, evaluate_fn, eval_now: bool) -> dict:
        """Saves the step, with its validation metrics when it is a validation step.

        Orbax takes a checkpoint's metrics at save time, so the save follows the validation;
        if the validation fails, the step is saved without metrics before the error goes on.
        """
        if not eval_now:
            checkpointing.save_train_state(self.manager, step, state_to_checkpoint(state))
            return {}
        try:
            eval_metrics = evaluate_fn(state)
        except BaseException:
            checkpointing.save_train_state(self.manager, step, state_to_checkpoint(state))
            raise
        checkpointing.save_train_state(
            self.manager, step, state_to_checkpoint(state), metrics=eval_metrics
        )
        self.writer.write(step, {f"val/{k}": v for k, v in eval_metrics.items()})
        if self.is_main:
            logging.info("step %d validation: %s", step, _format(eval_metrics))
        self.t_log = time.time()
        return eval_metrics


def _format(metrics: Mapping[str, float]) -> str:
    # The per-structure Jaccard; everything else goes to metrics.jsonl and TensorBoard.
    keys = sorted(k for k in metrics if k.startswith("jaccard/")) or sorted(metrics)
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys)
