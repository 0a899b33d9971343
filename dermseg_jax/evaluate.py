"""CLI: evaluate a checkpoint on a split and write metrics, a report and pictures.

COMMAND:
    python -m dermseg_jax.evaluate --workdir=runs/default                  # best checkpoint, val
    python -m dermseg_jax.evaluate --workdir=runs/default --checkpoint=latest --split=test --tta
    python -m dermseg_jax.evaluate --workdir=runs/thesis --split=test --thesis-protocol
    python -m dermseg_jax.evaluate --workdir=models/thesis --data=data/isic2017 --split=test

`--workdir` is a training workdir or a converted model directory (`python -m dermseg_jax.convert`;
it has no data config of its own: `configs/default.py`'s, or `--config`'s). Writes, into it:
- `eval_<split>_<step>.json`: the flat metrics dict (keys: `dermseg_jax.evaluator`) plus `meta`;
- `eval_<split>_<step>.md`: a report (structure x metric table, what each column measures);
- `eval_<split>_<step>.csv`: one row per image;
- `eval_<split>_<step>/`: `roc_curves.png`, `examples.png`, `confusion_matrix.png`.
`<step>` is the checkpoint's step (`model` for a model directory); `--thesis-protocol` appends
`_thesis` so the two protocols never overwrite each other. Flags accept `-` or `_`.

`load_run` (also used by `predict`) turns either kind of directory into a model, its variables
and the config (data/eval sections) that says how to feed and post-process it.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import ml_collections
from absl import app, flags, logging

from dermseg_jax import compilation_cache, labels, sharding


def define_checkpoint_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines `--workdir`, `--checkpoint` and `--compilation_cache`, shared with `predict`."""
    compilation_cache.define_flag(flag_values)
    flags.DEFINE_string(
        "workdir",
        None,
        "Training workdir or converted model directory.",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "checkpoint",
        "best",
        "For a training workdir: 'best', 'latest' or a step number.",
        flag_values=flag_values,
    )


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the CLI flags (only when run as a program, so importing defines none)."""
    define_checkpoint_flags(flag_values)
    flags.DEFINE_string(
        "split", "validation", "'val'/'validation' or 'test' (or 'train').", flag_values=flag_values
    )
    flags.DEFINE_string(
        "data", None, "Prepared data directory (overrides data.data_dir).", flag_values=flag_values
    )
    flags.DEFINE_bool(
        "thesis_protocol",
        False,
        "Reproduce the thesis notebook's evaluation (SEED_SPEC defects).",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "tta", None, "Flip test-time augmentation (default: the config's).", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "batch_size", None, "Eval batch (default: eval.batch_size).", flag_values=flag_values
    )
    flags.DEFINE_integer("num_examples", 6, "Images in examples.png.", flag_values=flag_values)
    flags.DEFINE_string(
        "config",
        None,
        "Config file whose data/eval sections replace the run's.",
        flag_values=flag_values,
    )


_SPLIT_ALIASES = {"val": "validation", "valid": "validation"}

# (column title, key pattern, what it measures) of the report table.
TABLE_COLUMNS = (
    ("ISIC18 J", "isic2018/jaccard/{}", "official ISIC 2018 Task 2 Jaccard (dataset resolution)"),
    ("ISIC18 Dice", "isic2018/dice/{}", "official ISIC 2018 Task 2 Dice (dataset resolution)"),
    ("micro J", "micro_jaccard/{}", "Jaccard of pixel counts pooled over images"),
    ("image J", "image_jaccard/{}", "per-image Jaccard averaged over images where defined"),
    ("thesis J", "thesis/jaccard/{}", "thesis Jaccard |P&G|/(|P|+|G|-|P&G|+1), eval resolution"),
    ("thesis AUC", "thesis/auc/{}", "thesis per-image ROC AUC averaged, eval resolution"),
    ("pooled AUC", "roc_auc/{}", "ROC AUC of all pixels pooled, eval resolution"),
)


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
    """Calls `get_config()` of a config file (e.g. `configs/thesis.py`)."""
    spec = importlib.util.spec_from_file_location(f"_dermseg_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: config file not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: config file has no get_config()")
    return module.get_config()


def load_run(
    path: str, *, checkpoint: str | int = "best", config_path: str | None = None
) -> LoadedRun:
    """Loads a training workdir's checkpoint or a converted model directory for inference.

    Args:
        path: training workdir (`config.json` + `checkpoints/`) or model directory
            (`model_config.json` + `variables/`).
        checkpoint: for a workdir: 'best', 'latest' or a step number (int or digits).
        config_path: config file whose `data` and `eval` sections replace the run's (a model
            directory has none of its own: it uses `configs/default.py` unless this is given).

    Returns:
        The `LoadedRun`.

    Raises:
        FileNotFoundError: `path` is neither kind of directory, or the checkpoint is missing.
    """
    import dermseg_jax
    from dermseg_jax import checkpointing, models

    if checkpointing.is_training_workdir(path):
        config = checkpointing.load_run_config(path)
        step, variables = _load_training_checkpoint(path, config, checkpoint)
        model_cfg = config.model.to_dict()
    elif checkpointing.is_model_dir(path):
        from configs import default

        # Rejects encoder-only directories (converted torchvision weights) with a clear error.
        _, variables = dermseg_jax.load_checkpoint(path)
        model_cfg = checkpointing.load_model_config(path).to_dict()
        config = default.get_config()
        step = None
    else:
        raise FileNotFoundError(
            f"{path}: neither a training workdir (config.json + checkpoints/) nor a model "
            "directory (model_config.json + variables/)"
        )
    # An unlocked copy with resolved references, so CLI overrides cannot leak into the run's.
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = ml_collections.ConfigDict(model_cfg)
    if config_path is not None:
        override = load_config_file(config_path)
        config.data = ml_collections.ConfigDict(override.data.to_dict())
        config.eval = ml_collections.ConfigDict(override.eval.to_dict())
    model = models.create_model(config.model)
    return LoadedRun(model=model, variables=variables, config=config, step=step, path=path)


def _load_training_checkpoint(
    workdir: str, config: ml_collections.ConfigDict, checkpoint: str | int
) -> tuple[int, dict]:
    """(step, {'params', 'batch_stats'}) of a training run's best, latest or given step."""
    from dermseg_jax import checkpointing, trainer

    ckpt = config.get("checkpoint", None) or {}
    manager = checkpointing.create_checkpoint_manager(
        workdir,
        best_metric=ckpt.get("best_metric", "jaccard/mean"),
        best_mode=ckpt.get("best_mode", "max"),
        read_only=True,
    )
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{workdir}: no checkpoint in {manager.directory}")
        if isinstance(checkpoint, str) and checkpoint.isdigit():
            checkpoint = int(checkpoint)
        if checkpoint == "latest":
            step = steps[-1]
        elif checkpoint == "best":
            # Runs that were never evaluated have no best: fall back to the latest.
            best = manager.best_step()
            step = steps[-1] if best is None else best
        elif isinstance(checkpoint, int):
            if checkpoint not in steps:
                raise FileNotFoundError(
                    f"{workdir}: no checkpoint of step {checkpoint}; available: {steps}"
                )
            step = checkpoint
        else:
            raise ValueError(f"checkpoint must be 'best', 'latest' or a step, got {checkpoint!r}")
        state = trainer.restore_train_state(config, manager, sharding.make_mesh(), step=step)
    finally:
        manager.close()
    return int(step), {"params": state.params, "batch_stats": state.batch_stats}


def output_stem(split: str, step: int | None, thesis_protocol: bool) -> str:
    """`eval_<split>_<step>` (+ `_thesis`), the common name of every output."""
    stem = f"eval_{split}_{'model' if step is None else step}"
    return stem + ("_thesis" if thesis_protocol else "")


def _fmt(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def _mean_key(pattern: str) -> str:
    if pattern.startswith("isic2018/jaccard"):
        return "isic2018/overall"
    if pattern.startswith("isic2018/dice"):
        return "isic2018/micro_average_dice"
    return pattern.format("mean")


def metrics_table(results: Mapping[str, float]) -> str:
    """A markdown table: one row per structure plus the mean, one column per metric."""
    header = "| structure | " + " | ".join(c[0] for c in TABLE_COLUMNS) + " |"
    lines = [header, "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name in (*labels.STRUCTURE_NAMES, "mean"):
        cells = []
        for _, pattern, _ in TABLE_COLUMNS:
            key = _mean_key(pattern) if name == "mean" else pattern.format(name)
            cells.append(_fmt(results.get(key, math.nan)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(
    results: Mapping[str, float], meta: Mapping[str, Any], pictures: Mapping[str, str]
) -> str:
    """The report: what was evaluated, the table, the column legend and the pictures."""
    protocol = (
        "thesis protocol (ground-truth lesion crop, one random crop per image, batch-statistics "
        "BatchNorm, softmax over the batch axis: SEED_SPEC defects 1, 3, 4)"
        if meta["thesis_protocol"]
        else "default protocol (whole image, automatic lesion crop, running-statistics BatchNorm)"
    )
    at_original = results.get("isic2018/at_original_resolution", math.nan)
    lines = [
        f"# Evaluation of `{meta['path']}` on `{meta['split']}`",
        "",
        f"- checkpoint step: {'- (model directory)' if meta['step'] is None else meta['step']}; "
        f"images: {int(results.get('num_images', 0))}",
        f"- {protocol}; flip TTA: {'on' if meta['tta'] else 'off'}",
        f"- post-processing: {meta['postprocess']}",
        f"- data: `{meta['data_dir']}`",
    ]
    if meta["thesis_protocol"]:
        lines.append("- every column refers to the random crop the network saw (thesis protocol)")
    else:
        lines.append(
            "- dataset resolution = the prepared images' size; it equals the original size for "
            f"{100 * at_original:.0f}% of the images (`isic2018/at_original_resolution`). "
            "Eval resolution = the network's input frame (lesion crop, longer side `eval_size`)."
        )
    lines += [
        "",
        metrics_table(results),
        "",
        "`mean` row: ISIC columns = the official micro average over structures and images "
        "(`overall`); other columns = mean over the five structures.",
        "",
    ]
    lines += [f"- **{title}**: {text}" for title, _, text in TABLE_COLUMNS]
    lines += ["", "## Pictures", ""]
    lines += [f"![{name}]({path})" for name, path in pictures.items()]
    lines += [
        "",
        "## All metrics",
        "",
        "| key | value |",
        "|---|---|",
        *(f"| `{k}` | {_fmt(v)} |" for k, v in sorted(results.items())),
        "",
    ]
    return "\n".join(lines)


def write_rows_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes the evaluator's per-image rows."""
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_evaluate(
    workdir: str,
    *,
    checkpoint: str = "best",
    split: str = "validation",
    data_dir: str | None = None,
    thesis_protocol: bool = False,
    tta: bool | None = None,
    batch_size: int | None = None,
    num_examples: int = 6,
    config_path: str | None = None,
) -> tuple[dict[str, float], str]:
    """Loads the checkpoint, evaluates, writes JSON, markdown, CSV and pictures.

    Args:
        workdir: training workdir or model directory (outputs are written into it).
        checkpoint: 'best', 'latest' or a step (training workdir).
        split: 'validation' (or 'val'), 'test' or 'train'.
        data_dir: prepared data directory overriding `data.data_dir`.
        thesis_protocol: the thesis notebook's evaluation instead of the default.
        tta: flip TTA; None = the config's `eval.tta`.
        batch_size: None = `eval.batch_size`.
        num_examples: images in the example grid.
        config_path: config file whose data/eval sections replace the run's.

    Returns:
        (metrics dict, path of the JSON file).
    """
    from dermseg_jax import evaluator, plots
    from dermseg_jax.data import pipeline

    split = _SPLIT_ALIASES.get(split, split)
    run = load_run(workdir, checkpoint=checkpoint, config_path=config_path)
    config = run.config
    if data_dir is not None:
        config.data.data_dir = data_dir
    ev = evaluator.Evaluator(
        run.model,
        config.data,
        config.eval,
        batch_size=batch_size,
        split=split,
        thesis_protocol=thesis_protocol,
        tta=tta,
        num_examples=num_examples,
    )
    logging.info("Evaluating %s (step %s) on %s", workdir, run.step, split)
    results = ev.run(run.variables)
    stem = output_stem(split, run.step, thesis_protocol)
    picture_dir = os.path.join(workdir, stem)
    os.makedirs(picture_dir, exist_ok=True)
    pictures = {}
    step_label = "model directory" if run.step is None else f"step {run.step}"
    title = f"{split}, {step_label}" + (" (thesis protocol)" if thesis_protocol else "")
    if ev.roc_curves:
        plots.plot_roc_curves(ev.roc_curves, os.path.join(picture_dir, "roc_curves.png"))
        pictures["ROC curves"] = f"{stem}/roc_curves.png"
    plots.plot_confusion_matrix(
        ev.confusion_matrix, os.path.join(picture_dir, "confusion_matrix.png")
    )
    pictures["confusion matrix"] = f"{stem}/confusion_matrix.png"
    if ev.examples:
        plots.plot_examples(
            [vars(e) for e in ev.examples], os.path.join(picture_dir, "examples.png"), title=title
        )
        pictures["examples"] = f"{stem}/examples.png"
    s = ev.settings
    meta = {
        "path": workdir,
        "step": run.step,
        "split": split,
        "thesis_protocol": thesis_protocol,
        "tta": bool(s.tta and not thesis_protocol),
        "data_dir": pipeline.resolve_data_dir(config.data),
        "postprocess": (
            f"head {s.head}, threshold {s.threshold}, opening "
            f"{'off' if s.opening_sizes is None else list(s.opening_sizes)}"
            + (", predictions x ground-truth lesion" if thesis_protocol else "")
        ),
    }
    json_path = os.path.join(workdir, stem + ".json")
    with open(json_path, "w") as f:
        # NaN is written as null: JSON has no NaN.
        clean = {k: (None if math.isnan(v) else v) for k, v in results.items()}
        json.dump({"metrics": clean, "meta": meta}, f, indent=2, sort_keys=True)
    with open(os.path.join(workdir, stem + ".md"), "w") as f:
        f.write(markdown_report(results, meta, pictures))
    write_rows_csv(os.path.join(workdir, stem + ".csv"), ev.rows)
    print(f"\n{title}: {int(results['num_images'])} images\n")
    print(metrics_table(results))
    print(f"\nWrote {json_path} (+ .md, .csv, {stem}/)")
    return results, json_path


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl parsing that also accepts `-` for `_` in flag names (`--thesis-protocol`); shared
    with `predict`."""
    fixed = [argv[0]]
    for arg in argv[1:]:
        if arg.startswith("--") and not arg.startswith("---"):
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        fixed.append(arg)
    return flag_values(fixed)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    compilation_cache.enable(flags.FLAGS.compilation_cache)
    run_evaluate(
        flags.FLAGS.workdir,
        checkpoint=flags.FLAGS.checkpoint,
        split=flags.FLAGS.split,
        data_dir=flags.FLAGS.data,
        thesis_protocol=flags.FLAGS.thesis_protocol,
        tta=flags.FLAGS.tta,
        batch_size=flags.FLAGS.batch_size,
        num_examples=flags.FLAGS.num_examples,
        config_path=flags.FLAGS.config,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
