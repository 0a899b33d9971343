"""Tests of `python -m dermseg_jax.train` in subprocesses: locked config overrides, SIGTERM
saves a checkpoint, and a run interrupted by SIGTERM and then SIGKILL resumes to exactly the
parameters of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from dermseg_jax import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, cache, *overrides: str) -> subprocess.Popen:
    # Compiled executables are shared by the runs through JAX's persistent cache.
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=os.path.join(cache, "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dermseg_jax.train",
            "--config=configs/tiny.py",
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


def test_config_override_typo_is_an_error(tmp_path):
    proc = _train(tmp_path / "run", str(tmp_path), "--config.train.batchsize=8")
    rc, out = _finish(proc, timeout=300)
    assert rc != 0
    assert "batchsize" in out
    assert not (tmp_path / "run" / "checkpoints").exists()


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
    _, expected = checkpointing.load_training_variables(reference, which="latest")
    _, resumed = checkpointing.load_training_variables(run, which="latest")
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
