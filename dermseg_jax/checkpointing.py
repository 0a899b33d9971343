"""Every Orbax call of the project: model directories (and, later, training-run checkpoints).

A model directory (converter output, export of a training run) is
    DIR/model_config.json   the model config (head, width, aspp_rates, dropout_rate,
                            bn_momentum, dtype; `encoder_only: true` for encoder weights only)
    DIR/variables/          an Orbax StandardCheckpointer checkpoint of {'params', 'batch_stats'}
`save_model` writes one, `load_model` reads it back, restoring against the shapes the config
implies so that a mismatch fails with a clear message.

A training run (`workdir`) is `workdir/config.json` and `workdir/checkpoints/<step>/`, written by
an `ocp.CheckpointManager` (`create_checkpoint_manager`) that keeps the last K steps plus the best
by a validation metric. A checkpoint is the plain pytree `{'step', 'params', 'batch_stats',
'opt_state', 'rng'}` (`rng` as raw key data); the data position follows from step and seed, so
a resumed run continues exactly.
"""

import json
import os
import weakref
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from dermseg_jax import checkpoint_errors as errors
from dermseg_jax.errors import UserError
from dermseg_jax.models import abstract_variables

MODEL_CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"


def _config_to_dict(model_cfg: Any) -> dict:
    if isinstance(model_cfg, ml_collections.ConfigDict):
        model_cfg = model_cfg.to_dict()
    if not isinstance(model_cfg, dict):
        raise TypeError(f"model_cfg must be a ConfigDict or dict, got {type(model_cfg).__name__}.")
    return json.loads(json.dumps(model_cfg))  # tuples -> lists, fails early on odd types.


def is_model_dir(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a model directory (has model_config.json)."""
    return os.path.isfile(os.path.join(directory, MODEL_CONFIG_FILE))


def save_model(
    directory: str | os.PathLike,
    variables: dict,
    model_cfg: Any,
    *,
    overwrite: bool = False,
) -> None:
    """Writes a model directory.

    Args:
        directory: the model directory; created if absent.
        variables: {'params', 'batch_stats'} (jax or numpy arrays).
        model_cfg: ConfigDict or dict of the model fields (docs/design.md); extra fields such
            as `encoder_only` are kept.
        overwrite: replace an existing model directory's contents.

    Raises:
        FileExistsError: if the directory already holds a model and not `overwrite`.
        ValueError: if `variables` lacks 'params' or 'batch_stats'.
    """
    directory = os.path.abspath(os.fspath(directory))
    missing = {"params", "batch_stats"} - set(variables)
    if missing:
        raise ValueError(f"variables lack the collection(s) {sorted(missing)}.")
    cfg = _config_to_dict(model_cfg)
    if is_model_dir(directory) and not overwrite:
        raise FileExistsError(f"{directory} already holds a model; pass overwrite=True.")
    os.makedirs(directory, exist_ok=True)
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, VARIABLES_DIR), state, force=overwrite)
    checkpointer.wait_until_finished()
    checkpointer.close()
    # The config goes last: its presence marks a complete model directory.
    with open(os.path.join(directory, MODEL_CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def load_model_config(directory: str | os.PathLike) -> ml_collections.ConfigDict:
    """Reads DIR/model_config.json (aspp_rates as a tuple).

    Raises:
        UserError: if the directory or its model_config.json is missing or not a JSON object.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise UserError(f"{directory}: no such model directory")
    path = os.path.join(directory, MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{directory} is not a model directory: {MODEL_CONFIG_FILE} is missing (a model "
            f"directory holds {MODEL_CONFIG_FILE} and {VARIABLES_DIR}/)"
        )
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise UserError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    if "aspp_rates" in cfg:
        cfg["aspp_rates"] = tuple(cfg["aspp_rates"])
    return ml_collections.ConfigDict(cfg)


def load_model(directory: str | os.PathLike) -> tuple[ml_collections.ConfigDict, dict]:
    """Reads a model directory written by `save_model`.

    Args:
        directory: the model directory.

    Returns:
        (model_cfg, variables): the config and {'params', 'batch_stats'} as jax arrays on the
        first local device. For `encoder_only` directories the variables hold only
        {'params': {'encoder': ...}, 'batch_stats': {'encoder': ...}}.

    Raises:
        UserError: for a missing directory, config or variables checkpoint, or stored
            variables that do not fit the config.
    """
    directory = os.path.abspath(os.fspath(directory))
    cfg = load_model_config(directory)
    variables_path = os.path.join(directory, VARIABLES_DIR)
    if not os.path.isdir(variables_path):
        raise UserError(f"{directory}: the variables checkpoint {VARIABLES_DIR}/ is missing")
    abstract = abstract_variables(cfg, encoder_only=bool(cfg.get("encoder_only", False)))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract
    )
    checkpointer = ocp.StandardCheckpointer()
    try:
        variables = checkpointer.restore(variables_path, target)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{variables_path} does not fit {MODEL_CONFIG_FILE} ({dict(cfg)}): {e}"
        ) from e
    finally:
        checkpointer.close()
    return cfg, variables


CHECKPOINT_SUBDIR = "checkpoints"
RUN_CONFIG_FILE = "config.json"


def create_checkpoint_manager(
    workdir: str | os.PathLike,
    *,
    keep: int = 2,
    keep_best: int = 1,
    best_metric: str = "jaccard/mean",
    best_mode: str = "max",
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """Creates the manager of a training run's `workdir/checkpoints`.

    Args:
        workdir: the training run's directory.
        keep: number of most recent checkpoints to keep.
        keep_best: number of best checkpoints (by `best_metric`) to keep besides.
        best_metric: key of the metrics dict passed to `save_train_state`.
        best_mode: 'max' or 'min'.
        read_only: open an existing run without writing.

    Returns:
        An `ocp.CheckpointManager`; call `close()` when done.
    """
    if best_mode not in ("max", "min"):
        raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")

    def metric_fn(metrics: Mapping[str, float]) -> float:
        return float(metrics[best_metric])

    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_best:
        policies.append(
            checkpoint_managers.BestN(
                get_metric_fn=metric_fn,
                # BestN keeps the last n after an ascending sort.
                reverse=best_mode == "min",
                n=keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=metric_fn,
        best_mode=best_mode,
        read_only=read_only,
        create=not read_only,
    )
    directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_SUBDIR)
    return ocp.CheckpointManager(directory, options=options)


def open_run_checkpoints(
    workdir: str | os.PathLike, config: ml_collections.ConfigDict
) -> ocp.CheckpointManager:
    """A read-only manager of a finished or running training run, ranked by its best metric."""
    ckpt = config.get("checkpoint", None) or {}
    return create_checkpoint_manager(
        workdir,
        best_metric=ckpt.get("best_metric", "jaccard/mean"),
        best_mode=ckpt.get("best_mode", "max"),
        read_only=True,
    )


def save_train_state(
    manager: ocp.CheckpointManager,
    step: int,
    state: Mapping[str, Any],
    *,
    metrics: Mapping[str, float] | None = None,
) -> bool:
    """Starts saving a training state pytree at `step` (asynchronous), unless already saved.

    Args:
        manager: from `create_checkpoint_manager`.
        step: the optimizer step the state has reached.
        state: `{'step', 'params', 'batch_stats', 'opt_state', 'rng'}` of `jax.Array`s.
        metrics: validation metrics of this state (used to keep the best), or None.

    Returns:
        True if a save was started.

    Raises:
        SaveFailed: if the save fails (full disk, say), naming the step.
    """
    if step in manager.all_steps():
        return False
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    # The save finishes in the background: `wait_for_saves` names this step if it fails.
    _SAVING[manager] = step
    try:
        return manager.save(
            step, args=ocp.args.StandardSave(dict(state)), metrics=metrics, force=True
        )
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types
        raise errors.SaveFailed(_step_dir(manager, step), step, e) from e


_SAVING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
    """Waits for the asynchronous saves; a failed one raises `SaveFailed` naming its step."""
    try:
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types
        step = _SAVING.get(manager)
        raise errors.SaveFailed(_step_dir(manager, step), step, e) from e


def restore_train_state(
    manager: ocp.CheckpointManager, abstract_state: Mapping[str, Any], step: int
) -> dict:
    """Restores a training state pytree onto the shardings of `abstract_state`.

    Args:
        manager: from `create_checkpoint_manager`.
        abstract_state: the state's structure as `jax.ShapeDtypeStruct`s with `sharding` set
            (from `jax.eval_shape`).
        step: the step to restore.

    Returns:
        The restored pytree, same structure as `abstract_state`.

    Raises:
        ConfigMismatch: if the checkpoint does not fit `abstract_state` (another width, say).
        CheckpointDamaged: if the checkpoint cannot be read.
    """
    check_fits(manager, step, abstract_state)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(dict(abstract_state)))
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types
        raise _damaged(manager, step, e) from e


def restore_variables(
    manager: ocp.CheckpointManager, step: int, abstract_variables: Mapping[str, Any]
) -> dict:
    """Restores only {'params', 'batch_stats'} of a training checkpoint (for inference).

    Args:
        manager: from `create_checkpoint_manager` (read-only is enough).
        step: the step to restore.
        abstract_variables: `models.abstract_variables(model_cfg)` of the run's model config.

    Returns:
        {'params', 'batch_stats'} as jax arrays on the first local device.

    Raises:
        ConfigMismatch: if the stored arrays do not fit `abstract_variables`.
        CheckpointDamaged: if the checkpoint cannot be read.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {
        col: jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
            abstract_variables[col],
        )
        for col in ("params", "batch_stats")
    }
    check_fits(manager, step, target)
    args = ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )
    try:
        return manager.restore(step, args=args)
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types
        raise _damaged(manager, step, e) from e


def check_fits(manager: ocp.CheckpointManager, step: int, abstract: Mapping[str, Any]) -> None:
    """Checks, from the checkpoint's metadata only, that its arrays fit `abstract`.

    `params` and `batch_stats` must match path by path; other entries (optimizer state) by
    their multiset of shapes, since optax's tuples are stored as lists.

    Raises:
        ConfigMismatch: naming the first differing array.
        CheckpointDamaged: if the metadata cannot be read.
    """
    item_dir = epath.Path(manager.directory) / str(step) / ocp.checkpoint_manager.DEFAULT_ITEM_NAME
    try:
        # The manager knows no handler before its first save or restore: read it directly.
        stored = ocp.StandardCheckpointHandler().metadata(item_dir).tree
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types
        raise _damaged(manager, step, e) from e
    errors.check_shapes(stored, abstract, _step_dir(manager, step), step)


def _step_dir(manager: ocp.CheckpointManager, step: int | None) -> str:
    return os.path.join(os.fspath(manager.directory), str(step))


def _damaged(manager: ocp.CheckpointManager, step: int, error: Exception) -> Exception:
    others = [s for s in manager.all_steps() if s != step]
    return errors.CheckpointDamaged(_step_dir(manager, step), step, others, error)


def save_run_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> str:
    """Writes `workdir/config.json` (references resolved) atomically; returns its path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + ".tmp", path)
    return path


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """Reads a training run's `workdir/config.json` back into a ConfigDict.

    Raises:
        UserError: if the file is missing or not a JSON object.
    """
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; not a training workdir") from None
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def is_training_workdir(path: str | os.PathLike) -> bool:
    """True if `path` holds a training run (config.json and a checkpoints/ directory)."""
    return os.path.isfile(os.path.join(path, RUN_CONFIG_FILE)) and os.path.isdir(
        os.path.join(path, CHECKPOINT_SUBDIR)
    )
