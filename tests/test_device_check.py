"""scripts/device_check.py, the one-command GPU run, on this CPU at a tiny size: it runs end to
end and writes the JSON fields the docs read; asked for a GPU it does not have, it says so in one
line. scripts/device_check.sh is at least valid bash."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "device_check.py")


def test_a_tiny_cpu_run_writes_parity_and_step_figures(tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--out", str(out)]
    cmd += ["--variants", "jax_f32_xla", "torch_f32", "--budget-s", "3000"]
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    parity = result["parity"]
    assert parity["tf32"] is False and set(parity) >= {"xla"} and "cpu_tuned" not in parity
    assert parity["xla"]["passed"] and parity["xla"]["logits_rel_diff"] <= 1e-4
    assert "precision" in result["machine"] and result["skipped"] == []
    rows = {r["variant"]: r for r in result["results"]}
    assert set(rows) == {"jax_f32_xla", "torch_f32"}
    for row in rows.values():
        assert (row["size"], row["batch"]) == (96, 2)
        assert row["images_per_s"] > 0 and row["compile_s"] > 0 and len(row["step_s_samples"]) == 2
        assert row["mfu"] is None  # no data-sheet peak for a CPU
    jax_row = rows["jax_f32_xla"]
    assert jax_row["kernels"] == "xla" and jax_row["jit_cache_size"] == 1
    assert jax_row["step_buffers_bytes"] > jax_row["temp_bytes"] > 0


def test_asking_for_a_gpu_without_one_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, SCRIPT, "--device", "gpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error: --device gpu" in proc.stderr and "--device cpu" in proc.stderr
    assert not out.exists()


def test_the_shell_wrapper_is_valid_bash():
    script = os.path.join(ROOT, "scripts", "device_check.sh")
    proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
