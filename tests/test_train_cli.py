"""Tests of `python -m dermseg_jax.train` in subprocesses: user errors are one line (exit 2, no
traceback, no workdir made); SIGTERM saves a checkpoint, and a run interrupted by SIGTERM and
then SIGKILL resumes to exactly the parameters of an uninterrupted run; a diverging run never
saves a non-finite state; a rerun with another model changes nothing and metrics.jsonl is strict JSON.
(Resume past a damaged checkpoint and a failed validation: tests/test_trainer.py, in-process.)"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dermseg_jax import loading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, cache, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    # Compiled executables are shared by the runs through JAX's persistent cache.
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=os.path.join(cache, "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        **(env or {}),
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dermseg_jax.train",
            "--config=dermseg_jax/configs/tiny.py",
            f"--workdir={workdir}",
            f"--config.data.synthetic_cache={cache}",
            # 8 steps, a checkpoint every 2: time to interrupt between checkpoints.
            "--config.train.num_epochs=4",
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _steps(workdir) -> list[int]:
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def _wait_for_checkpoint(proc, workdir, after: int = 0, timeout: float = 600) -> None:
    start = time.time()
    while not [s for s in _steps(workdir) if s > after]:
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() - start < timeout, "no checkpoint in time"
        time.sleep(0.05)


def _finish(proc, timeout: float = 900) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _assert_one_line_error(rc: int, out: str, *needles: str) -> str:
    """Exit status 2, an `error:` line holding every needle, and no traceback."""
    assert rc == 2, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("train: error: ")]
    assert len(errors) == 1, out[-4000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> str:
    """A synthetic-data cache shared by this module's runs (prepared by the first one)."""
    return str(tmp_path_factory.mktemp("cache"))


FAST = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def test_config_override_typo_is_one_line(tmp_path):
    proc = _train(tmp_path / "run", str(tmp_path), "--config.model.widht=1")
    rc, out = _finish(proc, timeout=300)
    _assert_one_line_error(rc, out, "widht")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["batch", "no_data", "not_prepared", "workdir_file", "split"])
def test_start_up_errors_are_one_line_and_leave_no_workdir(case, tmp_path, data_cache):
    run = tmp_path / "run"
    env = dict(FAST)
    if case == "batch":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        args, needles = ["--config.train.batch_size=3"], ["batch_size=3", "2 devices"]
    elif case == "no_data":
        args, needles = [f"--config.data.data_dir={tmp_path / 'absent'}"], ["no such directory"]
    elif case == "not_prepared":
        (tmp_path / "raw").mkdir()
        args, needles = [f"--config.data.data_dir={tmp_path / 'raw'}"], ["not a prepared"]
    elif case == "workdir_file":
        run.write_text("my notes")
        args, needles = [], ["not a directory"]
    else:
        args, needles = ["--config.eval.split=valid"], ["no split 'valid'"]
    rc, out = _finish(_train(run, data_cache, *args, env=env), timeout=600)
    _assert_one_line_error(rc, out, *needles)
    if case in ("no_data", "not_prepared"):
        assert "python -m dermseg_jax.data.prepare" in out
    if case == "workdir_file":
        assert run.read_text() == "my notes"
    else:
        assert not run.exists()


@pytest.fixture(scope="module")
def diverged(tmp_path_factory, data_cache) -> dict:
    """A run whose learning rate becomes infinite at step 4 (between the logging steps 0 and 8,
    checkpoints every step), then the rerun of it with a sane learning rate."""
    run = tmp_path_factory.mktemp("diverged") / "run"
    common = [
        "--config.checkpoint.every_steps=1",
        "--config.train.log_every_steps=8",
        "--config.optim.schedule=thesis_step",
        "--config.optim.step_size=3",
    ]
    first = _finish(_train(run, data_cache, *common, "--config.optim.step_gamma=inf", env=FAST))
    steps_after_first = _steps(run)
    latest = loading.load_run(run, checkpoint="latest")
    rerun = _finish(_train(run, data_cache, *common, "--config.optim.step_gamma=0.5", env=FAST))
    return {
        "run": run,
        "first": first,
        "steps_after_first": steps_after_first,
        "latest_after_first": latest,
        "rerun": rerun,
        "common": common,
    }


def test_divergence_stops_naming_the_step_and_saves_nothing_non_finite(diverged):
    rc, out = diverged["first"]
    _assert_one_line_error(rc, out, "Non-finite loss or parameters at step 4", "step 3")
    assert diverged["steps_after_first"][-1] == 3
    latest = diverged["latest_after_first"]
    assert latest.step == 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(latest.variables))
    rc, out = diverged["rerun"]
    assert rc == 0, out[-4000:]
    assert f"Resuming from {diverged['run'] / 'checkpoints'} step 3" in out
    assert _steps(diverged["run"])[-1] == 8


def test_metrics_jsonl_is_strict_json(diverged):
    def no_nan(name):
        raise ValueError(f"bare {name} in metrics.jsonl")

    lines = (diverged["run"] / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=no_nan) for line in lines]
    validation = [r for r in records if "val/jaccard/mean" in r]
    # The tiny validation set has structures no image holds: their AUC is undefined -> null.
    assert validation and None in validation[-1].values()


def test_rerun_with_another_model_is_refused_before_anything_is_written(diverged, data_cache):
    run = diverged["run"]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = _train(run, data_cache, *diverged["common"], "--config.model.width=0.125", env=FAST)
    rc, out = _finish(proc, timeout=600)
    _assert_one_line_error(rc, out, "model.width 0.0625 -> 0.125", "does not fit")
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.log"}
    assert after == {p: b for p, b in before.items() if p.name != "train.log"}


def test_interrupted_runs_resume_to_the_uninterrupted_result(tmp_path):
    cache = str(tmp_path / "cache")
    reference = tmp_path / "reference"
    rc, out = _finish(_train(reference, cache))
    assert rc == 0, out[-4000:]
    assert _steps(reference)[-1] == 8

    run = tmp_path / "run"
    # SIGTERM after the first checkpoint: a checkpoint of the current step, exit 128 + 15.
    proc = _train(run, cache)
    _wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 128 + signal.SIGTERM, out[-4000:]
    stopped = _steps(run)[-1]
    assert f"interrupted by signal 15 at step {stopped}" in out
    assert stopped < 8

    # SIGKILL after the next checkpoint: nothing is saved, the rerun resumes from a checkpoint.
    proc = _train(run, cache)
    _wait_for_checkpoint(proc, run, after=stopped)
    proc.kill()
    proc.communicate()
    killed = _steps(run)[-1]
    assert stopped < killed < 8

    rc, out = _finish(_train(run, cache))
    assert rc == 0, out[-4000:]
    assert f"Resuming from {run / 'checkpoints'} step {killed}" in out
    assert _steps(run)[-1] == 8

    losses = f"losses {_train_losses(reference)} vs {_train_losses(run)}"
    expected = loading.load_run(reference, checkpoint="latest").variables
    resumed = loading.load_run(run, checkpoint="latest").variables
    for col in ("params", "batch_stats"):
        flat_a = _flatten(expected[col])
        flat_b = _flatten(resumed[col])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=f"{key}; {losses}")


def _train_losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _flatten(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    return {prefix: np.asarray(tree)}


def test_gated_sigmoid_run_fits_thresholds_at_the_end_and_loads_them(tmp_path):
    run = tmp_path / "gated"
    rc, out = _finish(
        _train(
            run,
            str(tmp_path / "cache"),
            "--config.train.num_epochs=1",
            "--config.model.head=sigmoid",
            "--config.model.presence_head=True",
            "--config.loss.name=bce_log_jaccard",
            "--config.eval.fit_thresholds=True",
        )
    )
    assert rc == 0, out[-4000:]
    step = _steps(run)[-1]
    record = json.loads((run / "thresholds.json").read_text())
    assert record["step"] == step and record["split"] == "validation"
    assert len(record["thresholds"]) == len(record["presence_thresholds"]) == 5
    loaded = loading.load_run(run, checkpoint="latest")
    assert loaded.config.eval.threshold == tuple(record["thresholds"])
    assert loaded.config.eval.presence_threshold == tuple(record["presence_thresholds"])
