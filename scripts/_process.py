"""What the benchmark scripts measure about their own process and machine (not library code).

Host memory from Linux's /proc (peak RSS and its reset, glibc's `malloc_trim`), device memory,
the data-sheet peaks that MFU is computed against, and a description of the machine and of
both frameworks' float32 precision settings (TF32), so every JSON says what was measured.
"""

import ctypes
import os
import platform
import resource

import jax
import torch

# Dense peak TFLOP/s (no sparsity, SXM parts) by (device name fragment, arithmetic), from
# NVIDIA's data sheets: H200 and H100 SXM (nvidia.com/en-us/data-center/h200/, .../h100/:
# BF16 tensor core 1,979 and TF32 tensor core 989 TFLOP/s "with sparsity", i.e. 989 and 494.5
# dense; FP32 67), A100 SXM (BF16 312, TF32 156, FP32 19.5). A float32 step is measured
# against the TF32 peak when its convolutions may use TF32 (`precision_settings`), else FP32.
PEAK_TFLOPS = {
    ("H200", "bfloat16"): 989.0,
    ("H200", "tf32"): 494.5,
    ("H200", "float32"): 67.0,
    ("H100", "bfloat16"): 989.0,
    ("H100", "tf32"): 494.5,
    ("H100", "float32"): 67.0,
    ("A100", "bfloat16"): 312.0,
    ("A100", "tf32"): 156.0,
    ("A100", "float32"): 19.5,
}


def peak_tflops(device_name: str, arithmetic: str) -> float | None:
    """The data-sheet peak of a known accelerator ('bfloat16' | 'tf32' | 'float32'), else None."""
    for (fragment, kind), value in PEAK_TFLOPS.items():
        if fragment in device_name and kind == arithmetic:
            return value
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Linux's VmHWM (reset by exec); `ru_maxrss` is not used because a child started with
    fork + exec inherits its parent's value as a floor.
    """
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def release_free_heap() -> None:
    """Returns freed heap memory to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Compilation (XLA) and model building free much more memory than they keep; glibc holds the
    freed pages in the process, where they would count as the next step's memory.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS (VmHWM) to its current RSS; False where unsupported.

    Linux >= 4.0: writing 5 to /proc/self/clear_refs. Lets a step's own peak be told apart from
    the (larger, one-off) peak of compiling it.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def device_peak_memory(framework: str) -> int | None:
    """Peak accelerator memory of a framework in this process (None on the CPU).

    PyTorch's is reset per variant by the caller (`torch.cuda.reset_peak_memory_stats`);
    JAX's `peak_bytes_in_use` is the process's peak so far.
    """
    if framework == "torch":
        return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def precision_settings() -> dict:
    """Float32 arithmetic of both frameworks: may convolutions and matrix products use TF32?"""
    return {
        "torch_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "torch_cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        # None = XLA's default: TF32 for float32 convolutions and dots on NVIDIA GPUs.
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
    }


def float32_arithmetic(framework: str) -> str:
    """'tf32' when the framework's float32 convolutions may run on TF32 tensor cores (a GPU)."""
    settings = precision_settings()
    if framework == "torch":
        on_gpu = torch.cuda.is_available()
        return "tf32" if on_gpu and settings["torch_cudnn_allow_tf32"] else "float32"
    exact = settings["jax_default_matmul_precision"] in ("highest", "float32")
    return "float32" if exact or jax.default_backend() != "gpu" else "tf32"


def machine_description(device: str) -> dict:
    """CPU model, core count, library versions, devices, XLA flags and precision settings."""
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(ln.split(":", 1)[1].strip() for ln in f if "model name" in ln)
    except (OSError, StopIteration):
        pass
    jax_device = jax.devices()[0]
    info = {
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": __import__("flax").__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "jax_devices": f"{jax.device_count()} x {jax_device.device_kind}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "precision": precision_settings(),
    }
    if device == "gpu" and torch.cuda.is_available():
        info["torch_device"] = torch.cuda.get_device_name(0)
    return info
