"""The benchmark scripts' process measurements (scripts/_process.py): peak RSS and its reset,
the data-sheet peaks MFU is computed against, and the precision settings each JSON records."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
import _process as proc  # noqa: E402


def test_peak_rss_can_be_reset_to_tell_a_step_from_its_warm_up():
    big = np.ones(300 * 2**20 // 8)  # 300 MiB touched, then freed
    peak = proc.peak_rss_bytes()
    del big
    proc.release_free_heap()
    assert proc.reset_peak_rss()
    assert proc.peak_rss_bytes() < peak - 200 * 2**20


def test_peaks_are_the_dense_data_sheet_figures_per_arithmetic():
    assert proc.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
    assert proc.peak_tflops("NVIDIA H200", "tf32") == 494.5
    assert proc.peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 67.0
    assert proc.peak_tflops("cpu", "bfloat16") is None


@pytest.fixture
def cudnn_tf32():
    before = torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32 = before


def test_float32_arithmetic_follows_the_frameworks_tf32_switches(cudnn_tf32, monkeypatch):
    torch.backends.cudnn.allow_tf32 = True
    assert proc.float32_arithmetic("torch") == "float32"  # no tensor cores on this CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert proc.float32_arithmetic("torch") == "tf32"
    assert proc.precision_settings()["torch_cudnn_allow_tf32"] is True
    torch.backends.cudnn.allow_tf32 = False
    assert proc.float32_arithmetic("torch") == "float32"
    assert proc.float32_arithmetic("jax") == "float32"  # JAX uses TF32 on NVIDIA GPUs only
