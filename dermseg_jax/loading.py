"""The one way to load a model for inference, from a training workdir or a model directory.

`dermseg_jax.load_checkpoint`, `evaluate` and `predict` all call `load_run`, so the choice of
step (`best | latest | N`), the fallback past a damaged checkpoint and the error messages live
in one place. A training checkpoint is restored partially: `{'params', 'batch_stats'}` only,
shaped by the run's stored model config (never the optimizer state, never a `TrainState`).

A model directory has no data/eval settings of its own; they come from `--config`, else from
the package's `dermseg_jax/configs/default.py` (read by file path, like any `--config` file).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from collections.abc import Sequence

import flax.linen as nn
import ml_collections
from absl import logging

from dermseg_jax import checkpoint_errors, checkpointing, models, thresholds
from dermseg_jax.errors import UserError

DEFAULT_CONFIG_FILE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"
)
CHECKPOINT_CHOICES = "'best', 'latest' or a step number"


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A model ready for inference, with the config that says how to feed and post-process it.

    Attributes:
        model: the Linen module.
        variables: {'params', 'batch_stats'}.
        config: ConfigDict with at least `model`, `data` and `eval` sections.
        step: the checkpoint's training step, or None for a model directory.
        path: the training workdir or model directory it came from.
    """

    model: nn.Module
    variables: dict
    config: ml_collections.ConfigDict
    step: int | None
    path: str


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Calls `get_config()` of a config file (e.g. `dermseg_jax/configs/thesis.py`).

    Raises:
        UserError: if the file does not exist or has no `get_config()`.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: config file not found", hint="check --config")
    spec = importlib.util.spec_from_file_location(f"_dermseg_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise UserError(f"{path}: not a Python config file", hint="check --config")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"{path}: config file has no get_config()", hint="check --config")
    return module.get_config()


def parse_checkpoint(checkpoint: str | int) -> str | int:
    """'best', 'latest' or a step number (int or digits) -> 'best' | 'latest' | int."""
    if isinstance(checkpoint, int) or (isinstance(checkpoint, str) and checkpoint.isdigit()):
        return int(checkpoint)
    if checkpoint in ("best", "latest"):
        return checkpoint
    raise UserError(
        f"--checkpoint={checkpoint}: expected {CHECKPOINT_CHOICES}", hint="--checkpoint=latest"
    )


def load_run(
    path: str | os.PathLike,
    *,
    checkpoint: str | int = "best",
    config_path: str | None = None,
    overrides: Sequence[str] = (),
) -> LoadedRun:
    """Loads a training workdir's checkpoint or a model directory for inference.

    Args:
        path: training workdir (`config.json` + `checkpoints/`) or model directory
            (`model_config.json` + `variables/`).
        checkpoint: for a workdir: 'best' (the latest when none was evaluated), 'latest' or a
            step number (int or digits). 'best' and 'latest' fall back to the newest readable
            checkpoint when the chosen one is damaged (a warning says so); a step number never
            falls back.
        config_path: config file whose `data` and `eval` sections replace the run's (a model
            directory has none of its own: `dermseg_jax/configs/default.py`'s unless this is given).
        overrides: 'data.FIELD=VALUE' or 'eval.FIELD=VALUE' items applied after that (the CLIs'
            `--set`), e.g. 'eval.inference=tiles'; VALUE is a Python literal or else a string.

    Returns:
        The `LoadedRun`.

    Raises:
        UserError: `path` is neither kind of directory, the checkpoint is missing or damaged,
            or the stored variables do not fit the stored model config.
    """
    path = os.fspath(path)
    run_config, model_cfg, step, variables = _read(path, checkpoint)
    if run_config is None:  # A model directory: data/eval settings from a config file.
        run_config = load_config_file(config_path or _default_config_file())
    # An unlocked copy with resolved references, so CLI overrides cannot leak into the run's.
    config = ml_collections.ConfigDict(run_config.to_dict())
    config.model = ml_collections.ConfigDict(model_cfg.to_dict())
    if config_path is not None:
        override = load_config_file(config_path)
        config.data = ml_collections.ConfigDict(override.data.to_dict())
        config.eval = ml_collections.ConfigDict(override.eval.to_dict())
    apply_overrides(config, overrides)
    # thresholds.json of `evaluate --fit-thresholds`, unless eval.fitted_thresholds is False.
    thresholds.apply_fitted(config, path, step)
    model = models.create_model(config.model)
    return LoadedRun(model=model, variables=variables, config=config, step=step, path=path)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Sets 'data.FIELD=VALUE' / 'eval.FIELD=VALUE' items in `config` (see `load_run`).

    Only existing fields of the inference sections: the model is the checkpoint's.

    Raises:
        UserError: an item is not SECTION.FIELD=VALUE with an existing data or eval field.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        section, _, field = key.strip().partition(".")
        if not sep or section not in ("data", "eval") or field not in config[section]:
            raise UserError(
                f"--set {item}: not data.FIELD=VALUE or eval.FIELD=VALUE of an existing field",
                hint="e.g. --set eval.inference=tiles; config.json lists the fields",
            )
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        # A new section: a field's type (e.g. float for `threshold`) must not refuse the value.
        config[section] = ml_collections.ConfigDict({**config[section].to_dict(), field: value})


def load_model(
    path: str | os.PathLike, *, checkpoint: str | int = "best"
) -> tuple[nn.Module, dict]:
    """(model, {'params', 'batch_stats'}) of a workdir or model directory (see `load_run`)."""
    _, model_cfg, _, variables = _read(os.fspath(path), checkpoint)
    return models.create_model(model_cfg), variables


def _read(path: str, checkpoint: str | int):
    """(run config or None, model config, step or None, variables) of either directory kind."""
    if checkpointing.is_training_workdir(path):
        config = checkpointing.load_run_config(path)
        step, variables = _load_training_variables(path, config, parse_checkpoint(checkpoint))
        return config, config.model, step, variables
    if checkpointing.is_model_dir(path):
        model_cfg, variables = checkpointing.load_model(path)
        if model_cfg.get("encoder_only", False):
            raise UserError(
                f"{path} holds encoder weights only (converted from torchvision)",
                hint="use it as a training init_from (--config.init_from), not for inference",
            )
        return None, model_cfg, None, variables
    raise UserError(
        f"{path}: neither a training workdir (config.json + checkpoints/) nor a model "
        "directory (model_config.json + variables/)",
        hint="check --workdir",
    )


def _default_config_file() -> str:
    if not os.path.isfile(DEFAULT_CONFIG_FILE):
        raise UserError(
            f"{DEFAULT_CONFIG_FILE}: missing; a model directory needs a config for its data "
            "and evaluation settings",
            hint="pass --config=<config file>",
        )
    return DEFAULT_CONFIG_FILE


def _load_training_variables(
    workdir: str, config: ml_collections.ConfigDict, checkpoint: str | int
) -> tuple[int, dict]:
    """(step, {'params', 'batch_stats'}) of a training run's best, latest or given step."""
    manager = checkpointing.open_run_checkpoints(workdir, config)
    try:
        steps = manager.all_steps()
        if not steps:
            raise UserError(f"{manager.directory}: no checkpoint", hint="train the run first")
        chosen = select_step(manager, checkpoint)
        abstract = models.abstract_variables(config.model)
        if isinstance(checkpoint, int):
            return chosen, checkpointing.restore_variables(manager, chosen, abstract)
        return checkpoint_errors.restore_newest_readable(
            [chosen, *(s for s in sorted(steps, reverse=True) if s != chosen)],
            lambda step: checkpointing.restore_variables(manager, step, abstract),
        )
    finally:
        manager.close()


def select_step(manager, checkpoint: str | int) -> int:
    """The step `checkpoint` ('best' | 'latest' | int) names among the manager's steps.

    'best' is the latest step when no checkpoint has validation metrics.

    Raises:
        UserError: if a step number is not among the saved steps.
    """
    steps = sorted(manager.all_steps())
    if checkpoint == "latest":
        return steps[-1]
    if checkpoint == "best":
        best = manager.best_step()
        if best is None:
            logging.info("No evaluated checkpoint in %s: using the latest", manager.directory)
        return steps[-1] if best is None else best
    if checkpoint not in steps:
        raise UserError(
            f"{manager.directory}: no checkpoint of step {checkpoint}; available: {steps}",
            hint="--checkpoint=latest",
        )
    return checkpoint
