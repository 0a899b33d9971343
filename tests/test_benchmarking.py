"""The benchmark: same weights give the same numbers in both frameworks, a perturbed weight is
caught, the timing loop interleaves, and the script writes the JSON fields the README reads."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from dermseg_jax import benchmarking as bm
from dermseg_jax.configs import thesis

jax.config.update("jax_disable_most_optimizations", True)

WIDTH, SIZE = 0.0625, 96
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pair():
    return bm.build_pair(WIDTH, seed=0)


def test_identical_weights_pass_the_equivalence_check(pair):
    net, variables = pair
    result = bm.check_equivalence(
        net, variables, bm.make_batch(2, SIZE, seed=1), thesis.get_config()
    )
    assert result["logits_rel_diff"] < 1e-4
    assert result["loss_rel_diff"] < 1e-4
    # One Adam step (lr 1e-3) changes the loss, and both frameworks change it alike.
    assert result["loss_after_step_jax"] != pytest.approx(result["loss_jax"], rel=1e-3)
    assert result["loss_after_step_rel_diff"] < 1e-3


def test_a_perturbed_weight_fails_the_equivalence_check(pair):
    net, variables = pair
    perturbed = jax.tree.map(np.copy, variables)
    perturbed["params"]["decoder"]["head"]["kernel"][0, 0, 0, 0] += 0.5
    with pytest.raises(bm.EquivalenceError, match="disagree"):
        bm.check_equivalence(net, perturbed, bm.make_batch(2, SIZE, seed=1), thesis.get_config())


def test_a_perturbed_optimizer_fails_the_equivalence_check(pair, monkeypatch):
    net, variables = pair
    original = bm.torch_optimizer

    def faster_torch_adam(module, config):
        opt = original(module, config)
        for group in opt.param_groups:
            group["lr"] *= 2
        return opt

    monkeypatch.setattr(bm, "torch_optimizer", faster_torch_adam)
    with pytest.raises(bm.EquivalenceError, match="loss_after_step_rel_diff"):
        bm.check_equivalence(net, variables, bm.make_batch(2, SIZE, seed=1), thesis.get_config())


def test_variant_names_say_framework_dtype_and_kernels():
    assert bm.variant_settings("jax_bf16_cpu_tuned") == {
        "framework": "jax",
        "dtype": "bfloat16",
        "kernels": "cpu_tuned",
        "amp": False,
        "compiled": False,
    }
    assert bm.variant_settings("jax_f32")["kernels"] == "auto"
    torch_amp = bm.variant_settings("torch_compile_amp_bf16")
    assert torch_amp["amp"] and torch_amp["compiled"] and torch_amp["kernels"] is None
    assert "jax_f32_ynn_conv" not in bm.VARIANTS
    with pytest.raises(ValueError, match="unknown variant"):
        bm.variant_settings("jax_f32_ynn_conv")


def test_training_config_sets_the_kernels_and_leaves_its_base_alone():
    base = thesis.get_config()
    config = bm.training_config(base, 0.5, "bfloat16", "xla")
    assert (config.model.kernels, config.model.dtype, config.model.width) == (
        "xla",
        "bfloat16",
        0.5,
    )
    assert base.model.width == 1.0 and base.model.kernels == "auto"


def test_time_interleaved_alternates_the_variants():
    calls = []
    samples = bm.time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3
    )
    assert calls == ["a", "b"] * 3
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}


def test_train_steps_compile_once_and_both_frameworks_lower_the_loss(pair):
    net, variables = pair
    batch = bm.make_batch(2, SIZE, seed=2)
    config = bm.training_config(thesis.get_config(), WIDTH)
    jax_run = bm.jax_train_step_fn(config, variables, batch)
    torch_run = bm.torch_train_step_fn(net, config, batch, "cpu")
    jax_losses = [jax_run() for _ in range(3)]
    torch_losses = [torch_run() for _ in range(3)]
    assert jax_run.jitted._cache_size() == 1
    assert jax_losses[-1] < jax_losses[0] and torch_losses[-1] < torch_losses[0]
    # The frozen groups stay frozen on the PyTorch side, as in the thesis.
    trained = torch_run.module.named_parameters()
    frozen = [p.requires_grad for n, p in trained if n.startswith(("l1.", "l2."))]
    assert frozen and not any(frozen)


def test_script_writes_the_expected_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "--device", "cpu"]
    cmd += ["--width", str(WIDTH), "--size", str(SIZE), "--batch", "2", "--steps", "1"]
    cmd += ["--memory", "off", "--devices", "--no-input", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for key in ("cpu_model", "cpu_cores", "jax", "torch", "device", "load_average"):
        assert key in result["machine"]
    assert result["machine"]["torch"] == torch.__version__
    precision = result["machine"]["precision"]
    for key in (
        "torch_matmul_allow_tf32",
        "torch_cudnn_allow_tf32",
        "jax_default_matmul_precision",
    ):
        assert key in precision
    assert precision["torch_float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert result["equivalence"]["loss_rel_diff"] < 1e-3
    rows = {(r["variant"], r["mode"]): r for r in result["results"]}
    assert set(rows) == {(v, m) for v in ("jax_f32", "torch_f32") for m in ("train", "infer")}
    for row in rows.values():
        assert row["images_per_s"] == pytest.approx(2 / row["step_s_median"])
        assert row["first_step_s"] > 0 and len(row["step_s_samples"]) == 1
    assert rows[("jax_f32", "train")]["jit_cache_size"] == 1
    assert rows[("jax_f32", "train")]["kernels"] == "auto"
    assert rows[("torch_f32", "train")]["arithmetic"] == "float32"  # no TF32 on a CPU
    assert "vs torch_f32" in proc.stdout


def test_plot_merges_runs_at_different_batch_sizes(tmp_path):
    machine = {"device": "cpu", "cpu_model": "test cpu", "jax": "j", "torch": "t"}
    paths = []
    for batch in (2, 24):
        rows = [
            {"variant": v, "size": 128, "mode": "train", "batch": batch, "images_per_s": batch / d}
            for v, d in (("jax_f32", 2.0), ("torch_f32", 3.0))
        ]
        path = tmp_path / f"b{batch}.json"
        path.write_text(
            json.dumps({"machine": machine, "settings": {"width": 1.0}, "results": rows})
        )
        paths.append(str(path))
    out = tmp_path / "plot.png"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "plot_benchmark.py"), *paths]
    proc = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forward_flops_count_the_multiply_adds_of_convolutions():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),  # 8x8 out: 64 * 4 * (3 * 9) MACs
        torch.nn.ConvTranspose2d(4, 2, 3, stride=2),  # 8x8 in: 64 * 4 * 2 * 9 MACs
        torch.nn.ReLU(),
    )
    assert bm.forward_flops(net, 8) == 2 * (64 * 4 * 27 + 64 * 4 * 2 * 9)
    assert net.training  # the mode is restored
