"""CLI: evaluate a checkpoint on a split and write metrics, a report and pictures.

COMMAND:
    python -m dermseg_jax.evaluate --workdir=runs/default                  # best checkpoint, val
    python -m dermseg_jax.evaluate --workdir=runs/default --checkpoint=latest --split=test --tta
    python -m dermseg_jax.evaluate --workdir=runs/thesis --split=test --thesis-protocol
    python -m dermseg_jax.evaluate --workdir=models/thesis --data=data/isic2017 --split=test

`--workdir` is a training workdir or a converted model directory (`python -m dermseg_jax.convert`;
it has no data config of its own: `dermseg_jax/configs/default.py`'s, or `--config`'s). Writes, into it:
- `eval_<split>_<step>.json`: the flat metrics dict (keys: `dermseg_jax.evaluator`) plus `meta`;
- `eval_<split>_<step>.md`: a report (structure x metric table, what each column measures);
- `eval_<split>_<step>.csv`: one row per image;
- `eval_<split>_<step>/`: `roc_curves.png`, `examples.png`, `confusion_matrix.png`.
`<step>` is the checkpoint's step (`model` for a model directory); `--thesis-protocol` appends
`_thesis` so the two protocols never overwrite each other. Flags accept `-` or `_`.
Loading is `dermseg_jax.loading.load_run`; the files are written by `dermseg_jax.reports`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from absl import app, flags, logging

from dermseg_jax import cli, compilation_cache, loading, reports, run_checks, thresholds


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the CLI flags (only when run as a program, so importing defines none)."""
    cli.define_checkpoint_flags(flag_values)
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
    flags.DEFINE_bool(
        "fit_thresholds",
        False,
        "Fit per-structure sigmoid thresholds to the official score on --split=validation, "
        "write them to thresholds.json in --workdir (evaluate and predict then use them), "
        "and evaluate with them.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer("num_examples", 6, "Images in examples.png.", flag_values=flag_values)
    flags.DEFINE_multi_string(
        "set",
        [],
        "data.FIELD=VALUE or eval.FIELD=VALUE, repeatable: overrides the run's inference "
        "settings, e.g. --set eval.inference=tiles --set eval.tta=True.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "config",
        None,
        "Config file whose data/eval sections replace the run's.",
        flag_values=flag_values,
    )


_SPLIT_ALIASES = {"val": "validation", "valid": "validation"}


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
    overrides: Sequence[str] = (),
    fit_thresholds: bool = False,
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
        overrides: `--set` items ('eval.inference=tiles'), after `config_path`.
        fit_thresholds: fit sigmoid thresholds on the validation split first (refused for any
            other split), store them in `workdir/thresholds.json` and evaluate with them.

    Returns:
        (metrics dict, path of the JSON file).
    """
    from dermseg_jax import evaluator, plots

    split = _SPLIT_ALIASES.get(split, split)
    if fit_thresholds:
        thresholds.check_fitting_split(split)  # before anything loads
    run = loading.load_run(
        workdir, checkpoint=checkpoint, config_path=config_path, overrides=overrides
    )
    config = run.config
    if data_dir is not None:
        config.data.data_dir = data_dir
    config.data.data_dir = run_checks.resolve_data(config.data, [split])
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
    if fit_thresholds:
        _fit_thresholds(ev, run, workdir)
    logging.info("Evaluating %s (step %s) on %s", workdir, run.step, split)
    results = ev.run(run.variables)
    stem = reports.output_stem(split, run.step, thesis_protocol)
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
        "data_dir": config.data.data_dir,
        "postprocess": (
            f"head {s.head}, threshold {s.threshold}, opening "
            f"{'off' if s.opening_sizes is None else list(s.opening_sizes)}"
            + ("" if s.presence_threshold is None else f", presence gate {s.presence_threshold}")
            + (", predictions x ground-truth lesion" if thesis_protocol else "")
        ),
    }
    json_path = os.path.join(workdir, stem + ".json")
    reports.write_metrics_json(json_path, results, meta)
    with open(os.path.join(workdir, stem + ".md"), "w") as f:
        f.write(reports.markdown_report(results, meta, pictures))
    reports.write_rows_csv(os.path.join(workdir, stem + ".csv"), ev.rows)
    print(f"\n{title}: {int(results['num_images'])} images\n")
    print(reports.metrics_table(results))
    print(f"\nWrote {json_path} (+ .md, .csv, {stem}/)")
    return results, json_path


def _fit_thresholds(ev, run, workdir: str) -> None:
    """Fits thresholds on the validation split, writes them, and makes `ev` use them."""
    fitted = ev.fit_thresholds(run.variables)
    path = thresholds.save(workdir, fitted, step=run.step)
    ev.settings = dataclasses.replace(
        ev.settings, threshold=fitted.thresholds, presence_threshold=fitted.presence_thresholds
    )
    gate = ""
    if fitted.presence_thresholds is not None:
        gate = f", presence gate {[round(t, 4) for t in fitted.presence_thresholds]}"
    print(
        f"Fitted thresholds {[round(t, 4) for t in fitted.thresholds]}{gate} on "
        f"{fitted.num_images} validation images: official (micro) {fitted.score:.4f}, "
        f"{fitted.score_at_half:.4f} at 0.5; wrote {path}"
    )


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
        overrides=flags.FLAGS.set,
        fit_thresholds=flags.FLAGS.fit_thresholds,
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main, flags_parser=cli.parse_flags)
