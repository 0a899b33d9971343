"""The one-command GPU run of issue 15: parity on the device, then every variant's training step.

Why: GPU time comes rarely and in short leases, so everything the project wants to know from one
(does the network compute the same numbers on the GPU, and how fast and how large is each
variant's step) is one prepared run that writes one JSON and keeps to a time budget.

1. Parity with TF32 off in both frameworks (PyTorch `allow_tf32` False, JAX
   `jax_default_matmul_precision='highest'`): logits of JAX (both `model.kernels`) against
   PyTorch on the same weights and batch, relative difference <= 1e-4, and the training loss
   before and after one Adam step. The frameworks' default precision is restored afterwards.
2. The thesis training step at 128 px batch 24 and 256 px batch 8 for each variant, most
   important first (JAX bfloat16 and float32 with kernels 'xla' and 'cpu_tuned'; PyTorch
   channels_last + cudnn.benchmark eager float32, AMP bfloat16, torch.compile): compile time
   (the first step), images/s (median of `--steps` blocking steps), jit cache size (one
   compilation per shape), peak device memory (PyTorch: `max_memory_allocated`, reset per
   variant; JAX: the compiled step's buffers from `memory_analysis` and the process's
   `peak_bytes_in_use` so far), model TFLOP/s and MFU against the data-sheet peak
   (`_process.PEAK_TFLOPS`). A variant that would not finish inside `--budget-s` is skipped
   and listed under `skipped`.

COMMAND:
    bash scripts/device_check.sh                 # on a machine with one NVIDIA GPU
    .venv/bin/python scripts/device_check.py --device cpu --tiny --out /tmp/check.json
"""

import argparse
import json
import os
import statistics
import time

import _process as proc
import benchmark
import jax
import torch

from dermseg_jax import benchmarking as bm
from dermseg_jax import cli
from dermseg_jax.configs import thesis
from dermseg_jax.errors import UserError

SHAPES = ((128, 24), (256, 8))
GPU_VARIANTS = (
    "jax_bf16_xla",
    "torch_compile_amp_bf16",
    "torch_f32",
    "jax_f32_xla",
    "torch_amp_bf16",
    "jax_bf16_cpu_tuned",
    "jax_f32_cpu_tuned",
    "torch_compile_f32",
)
CPU_VARIANTS = ("jax_f32_xla", "jax_f32_cpu_tuned", "torch_f32")
TINY = {"width": 0.0625, "shapes": ((96, 2),), "steps": 2}
PARITY_SIZE, PARITY_BATCH, PARITY_RTOL = 128, 2, 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--out", default="docs/benchmarks/gpu_device_check.json")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and shape")
    p.add_argument("--budget-s", type=float, default=270.0, help="seconds for all the checks")
    p.add_argument("--variants", nargs="+", choices=bm.VARIANTS, help="default: per device")
    p.add_argument("--tiny", action="store_true", help="width 0.0625, 96 px batch 2: a smoke run")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def check_device(device: str) -> None:
    """Stops with one line when the asked-for device is not what both frameworks see."""
    if device == "gpu" and not (torch.cuda.is_available() and jax.default_backend() == "gpu"):
        raise UserError(
            f"--device gpu, but torch.cuda.is_available()="
            f"{torch.cuda.is_available()} and JAX's backend is {jax.default_backend()!r}",
            hint="run on a machine with an NVIDIA GPU and CUDA builds of jax and torch "
            "(scripts/device_check.sh installs them), or pass --device cpu",
        )


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 convolutions and matrix products in both frameworks (on: defaults)."""
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default for matrix products
    torch.backends.cudnn.allow_tf32 = enabled
    jax.config.update("jax_default_matmul_precision", None if enabled else "highest")


def parity(net, variables, device: str, size: int, kernel_sets) -> dict:
    """JAX (each kernel set) against PyTorch with TF32 off; failures are recorded, not raised."""
    set_tf32(False)
    out = {"tf32": False, "size": size, "batch": PARITY_BATCH, "logits_rtol": PARITY_RTOL}
    try:
        batch = bm.make_batch(PARITY_BATCH, size, seed=1)
        for kernels in kernel_sets:
            try:
                out[kernels] = bm.check_equivalence(
                    net,
                    variables,
                    batch,
                    thesis.get_config(),
                    device=device,
                    kernels=kernels,
                    logits_rtol=PARITY_RTOL,
                )
                out[kernels]["passed"] = True
            except bm.EquivalenceError as e:
                out[kernels] = {"passed": False, "error": str(e)}
    finally:
        set_tf32(True)
    return out


def jax_step_memory(run) -> dict:
    """The compiled JAX step's device buffers (arguments + outputs - aliased + temporaries)."""
    analysis = run.jitted.lower(*run.args()).compile().memory_analysis()
    if analysis is None:
        return {}
    total = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
        + analysis.temp_size_in_bytes
    )
    return {"step_buffers_bytes": int(total), "temp_bytes": int(analysis.temp_size_in_bytes)}


def measure(variant, size, batch_size, net, variables, a, machine, flops) -> dict:
    """Builds, compiles (first step) and times one variant at one shape."""
    settings = bm.variant_settings(variant)
    if a.device == "gpu":
        torch.cuda.reset_peak_memory_stats()
    batch = bm.make_batch(batch_size, size, seed=size + batch_size)
    run, jitted = benchmark.make_step(variant, "train", net, variables, batch, a.width, a.device)
    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    samples = []
    for _ in range(a.steps):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    step_s = statistics.median(samples)
    arithmetic = benchmark.arithmetic(variant)
    peak = proc.peak_tflops(machine.get("torch_device", ""), arithmetic)
    row = {
        "variant": variant,
        **settings,
        "size": size,
        "batch": batch_size,
        "arithmetic": arithmetic,
        "compile_s": compile_s,
        "step_s_median": step_s,
        "step_s_samples": samples,
        "images_per_s": batch_size / step_s,
        "model_flops_per_image": 3 * flops,
        "achieved_tflops": 3 * flops * batch_size / step_s / 1e12,
        "peak_tflops": peak,
    }
    row["mfu"] = row["achieved_tflops"] / peak if peak else None
    if jitted is not None:
        row["jit_cache_size"] = jitted._cache_size()
        row.update(jax_step_memory(run))
    row["device_peak_bytes"] = proc.device_peak_memory(settings["framework"])
    return row


def run_checks(a, save) -> dict:
    """Parity, then the variants at each shape within the budget; `save(result)` after each."""
    started = time.perf_counter()
    check_device(a.device)
    if a.tiny:
        a.width, shapes, a.steps = TINY["width"], TINY["shapes"], TINY["steps"]
    else:
        a.width, shapes = 1.0, SHAPES
    variants = a.variants or (GPU_VARIANTS if a.device == "gpu" else CPU_VARIANTS)
    machine = proc.machine_description(a.device)
    # Parity for the kernel sets of the JAX variants asked for ('xla' and 'cpu_tuned' by default).
    kernel_sets = sorted({bm.variant_settings(v)["kernels"] for v in variants} - {None})
    parity_size = shapes[0][0] if a.tiny else PARITY_SIZE
    net, variables = bm.build_pair(a.width)
    result = {
        "machine": machine,
        "settings": {"width": a.width, "steps": a.steps, "budget_s": a.budget_s},
        "parity": parity(net, variables, a.device, parity_size, kernel_sets),
        "results": [],
        "skipped": [],
    }
    print(f"parity: {json.dumps(result['parity'])}", flush=True)
    save(result)
    slowest = 0.0  # the longest variant so far: what the next one is assumed to need
    for size, batch_size in shapes:
        flops = bm.forward_flops(net, size)
        for variant in variants:
            left = a.budget_s - (time.perf_counter() - started)
            if left < slowest:
                result["skipped"].append({"variant": variant, "size": size, "left_s": left})
                continue
            start = time.perf_counter()
            row = measure(variant, size, batch_size, net, variables, a, machine, flops)
            slowest = max(slowest, time.perf_counter() - start)
            result["results"].append(row)
            result["wall_s"] = time.perf_counter() - started
            save(result)  # a run stopped from outside keeps what it measured
            print(
                f"{size}px b{batch_size} {variant}: {row['images_per_s']:.1f} img/s, compile "
                f"{row['compile_s']:.1f} s, MFU {row['mfu'] or 0:.1%}",
                flush=True,
            )
    result["wall_s"] = time.perf_counter() - started
    return result


def main(a) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)

    def save(result: dict) -> None:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)

    result = run_checks(a, save)
    save(result)
    print(f"wrote {a.out} ({result['wall_s']:.0f} s; skipped {len(result['skipped'])})")


if __name__ == "__main__":
    args = parse_args()
    cli.guard(lambda: main(args), debug=args.debug, prog="device_check.py")
