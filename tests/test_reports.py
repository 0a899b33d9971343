"""Tests of `dermseg_jax.reports`: labelled summary rows (official micro overall, macro mean) and
strict JSON (no bare NaN) in metrics.jsonl and the evaluation JSON."""

import json
import math

import pytest

from dermseg_jax import labels, reports


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"bare {name}")

    return json.loads(text, parse_constant=refuse)


def _results(**extra) -> dict:
    out = {f"isic2018/jaccard/{s}": 0.1 * (i + 1) for i, s in enumerate(labels.STRUCTURE_NAMES)}
    out.update({f"thesis/jaccard/{s}": 0.2 for s in labels.STRUCTURE_NAMES})
    out.update({"isic2018/overall": 0.9, "isic2018/micro_average_dice": 0.95, **extra})
    return out


def _row(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_summary_rows_say_micro_and_macro():
    table = reports.metrics_table(_results())
    assert "| mean |" not in table
    micro, macro = _row(table, reports.MICRO_ROW), _row(table, reports.MACRO_ROW)
    assert micro[:2] == ["0.9000", "0.9500"] and set(micro[2:]) == {"-"}
    # Macro: the mean of the five per-structure values (0.1 .. 0.5), computed when absent.
    assert macro[0] == "0.3000" and macro[4] == "0.2000"
    with_key = reports.metrics_table(_results(**{"isic2018/macro": 0.25}))
    assert _row(with_key, reports.MACRO_ROW)[0] == "0.2500"
    for name in labels.STRUCTURE_NAMES:
        assert _row(table, name)


def test_metric_writer_and_json_have_no_bare_nan(tmp_path):
    writer = reports.MetricWriter(str(tmp_path), enabled=True)
    writer.write(3, {"val/auc": math.nan, "val/j": 0.5, "val/inf": math.inf})
    writer.close()
    (record,) = [_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record == {"step": 3, "val/auc": None, "val/j": 0.5, "val/inf": None}
    path = tmp_path / "eval.json"
    reports.write_metrics_json(str(path), {"a": math.nan}, {"split": "test"})
    assert _strict(path.read_text()) == {"metrics": {"a": None}, "meta": {"split": "test"}}


@pytest.mark.parametrize(
    "step,thesis,stem", [(None, False, "eval_test_model"), (7, True, "eval_test_7_thesis")]
)
def test_output_stem(step, thesis, stem):
    assert reports.output_stem("test", step, thesis) == stem
