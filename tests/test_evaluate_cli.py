"""Tests of `python -m dermseg_jax.evaluate`: outputs, and agreement with predict + official scorer.

The official scorer `isic_challenge_scoring.task2.score` run on the files that
`python -m dermseg_jax.predict` writes must give the `overall` Jaccard that evaluate reports for
the same checkpoint (same post-processing, original resolution).
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import pytest
from test_evaluator import EvalFixture, build_eval_fixture

from dermseg_jax import cli, evaluate, labels, reports
from dermseg_jax.errors import UserError

jax.config.update("jax_disable_most_optimizations", True)

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def eval_fixture(tmp_path_factory) -> EvalFixture:
    return build_eval_fixture(tmp_path_factory.getbasetemp() / "dermseg_eval_fixture")


@pytest.fixture()
def run_dir(eval_fixture, tmp_path) -> pathlib.Path:
    # A private copy: evaluate writes its outputs into the model directory.
    target = tmp_path / "model"
    shutil.copytree(eval_fixture.model_dir, target)
    return target


def _config_file(eval_fixture, tmp_path) -> str:
    """A config file pointing the tiny preset at the fixture's data."""
    path = tmp_path / "eval_config.py"
    path.write_text(
        "from dermseg_jax.configs import tiny\n\n\n"
        "def get_config():\n"
        "    config = tiny.get_config()\n"
        f"    config.data.data_dir = {str(eval_fixture.data_dir)!r}\n"
        "    return config\n"
    )
    return str(path)


def test_evaluate_writes_json_report_csv_and_pictures(eval_fixture, run_dir, tmp_path, capsys):
    results, json_path = evaluate.run_evaluate(
        str(run_dir), split="val", config_path=_config_file(eval_fixture, tmp_path)
    )
    assert json_path == str(run_dir / "eval_validation_model.json")
    saved = json.loads(pathlib.Path(json_path).read_text())
    assert saved["meta"]["split"] == "validation" and saved["meta"]["thesis_protocol"] is False
    for key, value in results.items():
        stored = saved["metrics"][key]
        assert (stored is None and math.isnan(value)) or stored == pytest.approx(value)
    report = (run_dir / "eval_validation_model.md").read_text()
    for name in labels.STRUCTURE_NAMES:
        assert f"| {name} |" in report
    assert "official ISIC 2018" in report
    assert f"| {reports.MICRO_ROW} | {results['isic2018/overall']:.4f} |" in report
    assert f"| {reports.MACRO_ROW} | {results['isic2018/macro']:.4f} |" in report
    rows = (run_dir / "eval_validation_model.csv").read_text().splitlines()
    assert len(rows) == 1 + results["num_images"]
    for picture in ("roc_curves.png", "examples.png", "confusion_matrix.png"):
        data = (run_dir / "eval_validation_model" / picture).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    printed = capsys.readouterr().out
    assert "ISIC18 J" in printed and "pigment_network" in printed


def test_thesis_protocol_outputs_do_not_overwrite_default(eval_fixture, run_dir, tmp_path):
    results, json_path = evaluate.run_evaluate(
        str(run_dir),
        split="validation",
        thesis_protocol=True,
        batch_size=2,
        num_examples=2,
        config_path=_config_file(eval_fixture, tmp_path),
    )
    assert json_path.endswith("eval_validation_model_thesis.json")
    assert results["thesis_protocol"] == 1.0
    assert "thesis protocol" in pathlib.Path(json_path.replace(".json", ".md")).read_text()


def test_flags_accept_dashes():
    from absl import flags

    flag_values = flags.FlagValues()
    evaluate.define_flags(flag_values)
    cli.parse_flags(
        ["evaluate", "--workdir=/x", "--thesis-protocol", "--split", "test", "--batch-size=2"],
        flag_values,
    )
    assert flag_values.thesis_protocol and flag_values.batch_size == 2
    assert flag_values.split == "test" and flag_values.checkpoint == "best"


def _evaluate_cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    return subprocess.run(
        [sys.executable, "-m", "dermseg_jax.evaluate", *args,
         f"--compilation_cache={tmp_path / 'jax_cache'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _training_workdir(tmp_path) -> pathlib.Path:
    """A workdir holding a checkpoint of step 1 (arrays that fit no model: never restored)."""
    from test_checkpointing import _save_steps

    from dermseg_jax import checkpointing, loading

    run = tmp_path / "run"
    checkpointing.save_run_config(
        run, loading.load_config_file(str(REPO / "dermseg_jax/configs/tiny.py"))
    )
    _save_steps(run, [(1, None)]).close()
    return run


@pytest.mark.parametrize("case", ["no_workdir", "no_step", "no_data"])
def test_cli_errors_are_one_line(case, tmp_path, run_dir):
    if case == "no_workdir":
        args, needles = [f"--workdir={tmp_path / 'absent'}"], ["absent: neither a training"]
    elif case == "no_step":
        run = _training_workdir(tmp_path)
        args, needles = [f"--workdir={run}", "--checkpoint=99"], ["no checkpoint of step 99"]
    else:
        args, needles = [f"--workdir={run_dir}", f"--data={tmp_path / 'nodata'}"], ["nodata"]
    proc = _evaluate_cli(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("evaluate: error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in needles), proc.stderr[-3000:]
    if case == "no_data":
        assert "python -m dermseg_jax.data.prepare" in proc.stderr
    assert not list(run_dir.glob("eval_*"))


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="neither a training workdir"):
        evaluate.run_evaluate(str(tmp_path))


def test_predict_cli_scores_like_evaluate(eval_fixture, run_dir, tmp_path):
    """predict's files + the official scorer == evaluate's `isic2018/overall`."""
    from isic_challenge_scoring import task2

    config_path = _config_file(eval_fixture, tmp_path)
    results, _ = evaluate.run_evaluate(str(run_dir), split="validation", config_path=config_path)
    out = tmp_path / "submission"
    # Every program is cached, however fast it compiles (JAX's default skips those under 1 s).
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dermseg_jax.predict", f"--workdir={run_dir}",
         f"--images={eval_fixture.val_images}", f"--out={out}", f"--config={config_path}",
         f"--compilation_cache={tmp_path / 'jax_cache'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 skipped" in proc.stdout
    assert os.listdir(tmp_path / "jax_cache")  # the flag reached JAX
    official = task2.score(eval_fixture.val_truth, out)
    assert official["overall"] == pytest.approx(results["isic2018/overall"], abs=1e-9)
    for name in labels.STRUCTURE_NAMES:
        assert official[name]["jaccard"] == pytest.approx(
            results[f"isic2018/jaccard/{name}"], abs=1e-9
        )
