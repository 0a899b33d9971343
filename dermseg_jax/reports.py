"""Result files: the evaluation report (markdown table), per-image CSV, metrics JSON, and the
training run's `metrics.jsonl` / TensorBoard scalars.

JSON has no NaN (an undefined metric: no positive pixel in any image, say), so every JSON this
project writes stores a non-finite value as `null` (`json_safe`); `metrics.jsonl` therefore
stays readable by any JSON parser. The report labels each summary row by what it averages:
the official ISIC 2018 overall is a micro average (pixels pooled over structures and images),
the macro row is the mean of the five per-structure scores.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from dermseg_jax import labels

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
MICRO_ROW = "ISIC 2018 overall (micro)"
MACRO_ROW = "mean of the 5 structures (macro)"
# The official micro averages, shown in the ISIC columns of MICRO_ROW.
_MICRO_KEYS = {
    "isic2018/jaccard/{}": "isic2018/overall",
    "isic2018/dice/{}": ("isic2018/micro_average_dice"),
}


def json_safe(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with NaN and infinite floats replaced by None (written as JSON `null`)."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()
    }


def output_stem(split: str, step: int | None, thesis_protocol: bool) -> str:
    """`eval_<split>_<step>` (+ `_thesis`), the common name of every evaluation output."""
    stem = f"eval_{split}_{'model' if step is None else step}"
    return stem + ("_thesis" if thesis_protocol else "")


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def macro(results: Mapping[str, float], pattern: str) -> float:
    """The mean over the five structures of `pattern.format(structure)` (NaN if any is NaN).

    `isic2018/macro` (from `metrics`) when present, for the official Jaccard.
    """
    if pattern == "isic2018/jaccard/{}" and "isic2018/macro" in results:
        return results["isic2018/macro"]
    values = [results.get(pattern.format(s), math.nan) for s in labels.STRUCTURE_NAMES]
    return math.fsum(values) / len(values)


def metrics_table(results: Mapping[str, float]) -> str:
    """A markdown table: a row per structure, the micro and the macro rows; a column per metric."""
    header = "| structure | " + " | ".join(c[0] for c in TABLE_COLUMNS) + " |"
    lines = [header, "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    rows = [
        (name, [results.get(p.format(name), math.nan) for _, p, _ in TABLE_COLUMNS])
        for name in labels.STRUCTURE_NAMES
    ]
    rows.append(
        (MICRO_ROW, [results.get(_MICRO_KEYS.get(p, ""), math.nan) for _, p, _ in TABLE_COLUMNS])
    )
    rows.append((MACRO_ROW, [macro(results, p) for _, p, _ in TABLE_COLUMNS]))
    lines += [f"| {name} | " + " | ".join(_fmt(v) for v in values) + " |" for name, values in rows]
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
        f"`{MICRO_ROW}`: the official ISIC 2018 Task 2 score, pixels pooled over the five "
        "structures and all images (`isic2018/overall`, `isic2018/micro_average_dice`). "
        f"`{MACRO_ROW}`: the mean of the five per-structure values of each column.",
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


def write_metrics_json(path: str, results: Mapping[str, float], meta: Mapping[str, Any]) -> None:
    """Writes `{'metrics': results, 'meta': meta}` (non-finite values as null)."""
    with open(path, "w") as f:
        json.dump({"metrics": json_safe(results), "meta": meta}, f, indent=2, sort_keys=True)


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` (non-finite as null) and TensorBoard.

    Disabled (every call a no-op) on processes other than 0.
    """

    def __init__(self, workdir: str, enabled: bool):
        self._enabled = enabled
        if enabled:
            # Imported here: TensorBoard pulls in TensorFlow, never at package import time.
            from flax.metrics import tensorboard

            self._tb = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends one record `{'step': step, **scalars}`."""
        if not self._enabled:
            return
        record = json.dumps({"step": step, **json_safe(scalars)}, allow_nan=False)
        self._jsonl.write(record + "\n")
        self._jsonl.flush()
        for name, value in scalars.items():
            self._tb.scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        """Closes both files."""
        if self._enabled:
            self._jsonl.close()
            self._tb.close()
