"""Benchmark: the JAX/Flax network against the PyTorch baseline (same weights, batch, device).

For each (size, batch) configuration and mode (train = the thesis' full step, infer = forward
with running statistics) every variant is warmed up (its first step, compile included, is
timed), then all variants run one step in turn for `--steps` interleaved rounds (A B A B ...);
the tables report medians. Before any timing an equivalence check compares both frameworks on
the same weights and batch and stops the run (exit status 2) when they disagree.
Variants: `benchmarking.VARIANTS`. On a GPU (default set `GPU_VARIANTS`) JAX runs float32 and
bfloat16 with each `model.kernels` ('xla', 'cpu_tuned'), PyTorch channels_last with
cudnn.benchmark in eager float32, AMP bfloat16 and torch.compile; the JSON's `machine.precision`
records both frameworks' TF32 settings, and MFU uses the TF32 peak where float32 convolutions
may use it. `scripts/device_check.sh` is the time-boxed GPU run of the same steps.

Peak memory: host RSS on the CPU, measured per variant in a fresh subprocess so that the other
variants' allocations do not count (both frameworks are imported there, and only the measured
one's copy of the weights is kept): the table shows the peak of one steady-state step (the
high-water mark is reset after the warm-up); the JSON also keeps the peak including compilation
and the first step. JAX's step is measured twice: compiled in that process ('step MiB'), and
loaded from the persistent compilation cache that this run's timing filled ('cached MiB'), as
every later run of the same program loads it (`dermseg_jax.compilation_cache`; XLA keeps less
memory with a loaded program than with one it has just compiled). The timing itself always
compiles: the run uses a fresh, temporary cache. Device memory on the GPU.
Scaling: images/s versus global batch (the configurations) and, for JAX, versus emulated CPU
devices (`--xla_force_host_platform_device_count`, subprocesses); the tf.data input pipeline's
images/s at the same crop and batch (subprocess: this process never imports TensorFlow).

CPU defaults are small because the thesis network costs 114 GFLOP per 128x128 image forward
(342 per training image): width 1.0 at 128 with batch 2 and at 256 with batch 1, ~15 minutes on
2 cores. The thesis batch (24) and 512x512 are one command each on the CPU (below).

COMMAND:
    .venv/bin/python scripts/benchmark.py --device cpu --steps 5 --out benchmark_cpu.json
    .venv/bin/python scripts/benchmark.py --device cpu --size 128 --batch 24 --modes train \
        --steps 3 --devices --no-input --out benchmark_cpu_thesis.json
    .venv/bin/python scripts/benchmark.py --device gpu --steps 20 --out benchmark_gpu.json
    .venv/bin/python scripts/plot_benchmark.py benchmark_cpu.json
"""

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import _process as proc
import torch  # noqa: F401  (torchvision before TensorFlow; here: before JAX's plugins)

from dermseg_jax import benchmarking as bm
from dermseg_jax import compilation_cache
from dermseg_jax.configs import thesis

GPU_PLAN = {128: (8, 24, 64), 256: (8, 24), 512: (4, 8)}
CPU_PLAN = {128: (2,), 256: (1,)}
# Every GPU variant of PyTorch runs channels_last with cudnn.benchmark (`benchmarking`).
GPU_VARIANTS = (
    *("jax_bf16_xla", "jax_bf16_cpu_tuned", "jax_f32_xla", "jax_f32_cpu_tuned"),
    *("torch_f32", "torch_amp_bf16", "torch_compile_f32", "torch_compile_amp_bf16"),
)
CPU_VARIANTS = ("jax_f32", "torch_f32")
MODES = ("train", "infer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--steps", type=int, default=5, help="interleaved timed rounds per variant")
    p.add_argument("--inner", type=int, default=None, help="steps per sample (GPU 5, CPU 1)")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (with --size: all pairs)")
    p.add_argument("--size", type=int, nargs="+", help="input sides (multiples of 8, >= 96)")
    p.add_argument("--width", type=float, default=1.0, help="1.0 = the thesis network")
    p.add_argument("--variants", nargs="+", choices=bm.VARIANTS, help="default: per device")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--memory", choices=("subprocess", "inprocess", "off"), default=None)
    p.add_argument("--devices", type=int, nargs="*", default=None, help="emulated JAX CPU devices")
    p.add_argument("--no-input", action="store_true", help="skip the input-pipeline timing")
    p.add_argument(
        "--peak-tflops",
        type=float,
        nargs=2,
        metavar=("FLOAT32", "BFLOAT16"),
        help="device peak TFLOP/s for MFU (default: data sheet of a known GPU, TF32 where a "
        "framework's float32 convolutions use it; none on CPU)",
    )
    p.add_argument("--out", default="benchmark.json")
    p.add_argument("--worker", choices=("memory", "devices", "input"), help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--compilation-cache", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_step(variant, mode, net, variables, batch, width, device):
    """A warmed-up-able run() for one variant and mode, plus its jitted fn (JAX) or None."""
    s = bm.variant_settings(variant)
    config = bm.training_config(thesis.get_config(), width, s["dtype"], s["kernels"] or "auto")
    if s["framework"] == "jax":
        make = bm.jax_train_step_fn if mode == "train" else bm.jax_infer_fn
        run = make(config, variables, batch)
        return run, run.jitted
    amp, compiled = s["amp"], s["compiled"]
    if mode == "train":
        return bm.torch_train_step_fn(net, config, batch, device, amp=amp, compiled=compiled), None
    return bm.torch_infer_fn(net, batch, device, amp=amp, compiled=compiled), None


def _subprocess_json(args: list[str], env=None, timeout=3600) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return json.loads(lines[-1])


def memory_worker(a) -> dict:
    """Child process: build one variant, warm up (compile + first step), then one more step.

    Peak RSS is read twice: after the warm-up (`first_step_peak_rss_bytes`, compilation and
    first-step allocations included) and, with freed heap returned to the OS and the high-water
    mark reset in between, over the second step alone (`step_peak_rss_bytes`: the steady-state
    memory of training). `--compilation-cache`: the persistent cache to load the JAX program
    from ('' = none: compile it here); `compilation_cache_hits` counts the programs loaded.
    """
    import jax

    compilation_cache.enable(a.compilation_cache)
    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **_: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None
    )
    baseline = proc.peak_rss_bytes()
    size, batch_size = a.size[0], a.batch[0]
    net, variables = bm.build_pair(a.width)
    run, _ = make_step(
        a.variant, a.mode, net, variables, bm.make_batch(batch_size, size), a.width, a.device
    )
    # The step holds its own copy of the weights (JAX: the train state or device variables;
    # PyTorch: a deep copy of the module); the other framework's copy is not its memory.
    del net, variables
    gc.collect()
    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    first_peak = proc.peak_rss_bytes()
    step_peak = None
    proc.release_free_heap()  # for both frameworks alike: compile-time garbage is not a step's
    faults = None
    if proc.reset_peak_rss():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run()
        step_peak = proc.peak_rss_bytes()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    framework = "jax" if a.variant.startswith("jax") else "torch"
    return {
        "first_step_peak_rss_bytes": first_peak,
        "step_peak_rss_bytes": step_peak,
        "step_minor_page_faults": faults,
        "rss_after_imports_bytes": baseline,
        "device_peak_bytes": proc.device_peak_memory(framework) if a.device == "gpu" else None,
        "first_step_s": first,
        "compilation_cache_hits": len(hits),
    }


def devices_worker(a) -> dict:
    """Child process with emulated devices: JAX float32 training images/s (median)."""
    import jax

    size, batch_size = a.size[0], a.batch[0]
    _, variables = bm.build_pair(a.width)
    config = bm.training_config(thesis.get_config(), a.width)
    run = bm.jax_train_step_fn(config, variables, bm.make_batch(batch_size, size))
    run()
    times = bm.time_interleaved({"jax": run}, a.steps)["jax"]
    step_s = statistics.median(times)
    return {
        "devices": jax.device_count(),
        "size": size,
        "batch": batch_size,
        "step_s": step_s,
        "images_per_s": batch_size / step_s,
    }


def input_worker(a) -> dict:
    """Child process: the tf.data training pipeline on the built-in synthetic set."""
    import tempfile

    from dermseg_jax.configs import default
    from dermseg_jax.data import pipeline

    size, batch_size = a.size[0], a.batch[0]
    with tempfile.TemporaryDirectory() as tmp:
        data_cfg = default.get_config().data
        with data_cfg.unlocked():
            data_cfg.data_dir = None
            data_cfg.synthetic_cache = tmp
            data_cfg.synthetic_num_train = 32
            data_cfg.crop_size = size
            data_cfg.resize_shorter = max(int(data_cfg.resize_shorter), size)
        batches = pipeline.create_train_dataset(data_cfg, batch_size=batch_size, seed=0)
        for _ in range(3):
            next(batches)
        n = max(a.steps, 10)
        start = time.perf_counter()
        for _ in range(n):
            next(batches)
        seconds = time.perf_counter() - start
    return {"size": size, "batch": batch_size, "images_per_s": n * batch_size / seconds}


def arithmetic(variant: str) -> str:
    """'bfloat16', or the float32 arithmetic the variant's framework is set to ('tf32')."""
    s = bm.variant_settings(variant)
    if s["dtype"] == "bfloat16" or s["amp"]:
        return "bfloat16"
    return proc.float32_arithmetic(s["framework"])


def peak_for(a, machine: dict, variant: str) -> float | None:
    """Peak TFLOP/s of the device for a variant's arithmetic (None: unknown, no MFU)."""
    kind = arithmetic(variant)
    if a.peak_tflops:
        return a.peak_tflops[kind == "bfloat16"]
    if a.device == "gpu":
        return proc.peak_tflops(machine.get("torch_device", ""), kind)
    return None


def run_configuration(a, size, batch_size, net, variables, variants, machine) -> list[dict]:
    """Warm-up, memory and interleaved timing of every variant and mode at one configuration."""
    batch = bm.make_batch(batch_size, size, seed=size + batch_size)
    forward_flops = bm.forward_flops(net, size)
    rows = []
    for mode in a.modes:
        runs, jitted, first = {}, {}, {}
        for variant in variants:
            if a.device == "gpu":
                torch.cuda.reset_peak_memory_stats()
            runs[variant], jitted[variant] = make_step(
                variant, mode, net, variables, batch, a.width, a.device
            )
            start = time.perf_counter()
            runs[variant]()
            first[variant] = time.perf_counter() - start
            print(
                f"  {size}px b{batch_size} {mode} {variant}: first step {first[variant]:.1f} s",
                flush=True,
            )
        samples = bm.time_interleaved(runs, a.steps, a.inner)
        for variant in variants:
            step_s = statistics.median(samples[variant])
            row = {
                "size": size,
                "batch": batch_size,
                "mode": mode,
                "variant": variant,
                **bm.variant_settings(variant),
                "arithmetic": arithmetic(variant),
                "images_per_s": batch_size / step_s,
                "step_s_median": step_s,
                "step_s_samples": samples[variant],
                "first_step_s": first[variant],
                "model_flops_per_image": forward_flops * (3 if mode == "train" else 1),
            }
            row["achieved_tflops"] = row["model_flops_per_image"] * row["images_per_s"] / 1e12
            peak = peak_for(a, machine, variant)
            row["peak_tflops"] = peak
            row["mfu"] = row["achieved_tflops"] / peak if peak else None
            if jitted[variant] is not None:
                # Exactly one compilation per shape: the timed steps must all hit the cache.
                row["jit_cache_size"] = jitted[variant]._cache_size()
            if a.memory == "inprocess" and a.device == "gpu":
                row["device_peak_bytes"] = proc.device_peak_memory(row["framework"])
            if a.memory == "subprocess":
                args = [
                    "--worker",
                    "memory",
                    "--variant",
                    variant,
                    "--mode",
                    mode,
                    "--size",
                    str(size),
                    "--batch",
                    str(batch_size),
                    "--width",
                    str(a.width),
                    "--device",
                    a.device,
                ]
                row.update({f"isolated_{k}": v for k, v in _subprocess_json(args).items()})
                if row["framework"] == "jax" and a.compilation_cache:
                    cached = _subprocess_json([*args, "--compilation-cache", a.compilation_cache])
                    row.update({f"isolated_cached_{k}": v for k, v in cached.items()})
            rows.append(row)
        del runs, jitted
        gc.collect()
    return rows


def print_table(result: dict) -> None:
    m = result["machine"]
    print(
        f"\n{m['cpu_model']} ({m['cpu_cores']} cores), device {m['device']} "
        f"({m['jax_devices']}), jax {m['jax']}, torch {m['torch']}, width "
        f"{result['settings']['width']}, load {m['load_average']}"
    )
    header = f"{'size':>5} {'batch':>5} {'mode':>5} {'variant':<20} {'img/s':>9} {'step s':>8} "
    print(
        header + f"{'first s':>8} {'step MiB':>9} {'cached MiB':>10} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'vs torch_f32':>12}"
    )
    ref = {
        (r["size"], r["batch"], r["mode"]): r["images_per_s"]
        for r in result["results"]
        if r["variant"] == "torch_f32"
    }
    for r in result["results"]:
        mem = r.get("isolated_step_peak_rss_bytes") or r.get("isolated_device_peak_bytes")
        mem = r.get("device_peak_bytes") or mem
        base = ref.get((r["size"], r["batch"], r["mode"]))
        ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        cached = r.get("isolated_cached_step_peak_rss_bytes")
        if cached and not r.get("isolated_cached_compilation_cache_hits"):
            cached = None  # not loaded from the cache after all: not what the column means
        cached = f"{cached / 2**20:.0f}" if cached else "-"
        print(
            f"{r['size']:>5} {r['batch']:>5} {r['mode']:>5} {r['variant']:<20} "
            f"{r['images_per_s']:>9.3f} {r['step_s_median']:>8.3f} {r['first_step_s']:>8.1f} "
            f"{(mem or 0) / 2**20:>9.0f} {cached:>10} {r['achieved_tflops']:>8.3f} {mfu:>6} "
            f"{ratio:>12}"
        )
    for r in result.get("devices_scaling", []):
        print(
            f"JAX f32 train, {r.get('devices')} emulated devices: "
            f"{r.get('images_per_s', float('nan')):.3f} img/s {r.get('error', '')}"
        )
    if "input_pipeline" in result:
        print(f"input pipeline: {result['input_pipeline']}")
    print(
        "step MiB: peak host RSS of one steady-state step in an isolated process (GPU: device "
        "memory); cached MiB: the same with JAX's program loaded from the persistent "
        "compilation cache, as on every run after the first; first s: warm-up step, "
        "compilation included; TFLOP/s: model FLOPs (3x forward for training) per second; MFU: "
        "that over the device's peak (GPU data sheet or --peak-tflops)"
    )
    for note in result["settings"]["notes"]:
        print("note:", note)


def main(argv=None) -> int:
    a = parse_args(argv)
    gpu = a.device == "gpu"
    a.inner = a.inner or (5 if gpu else 1)
    if a.worker:
        worker = {"memory": memory_worker, "devices": devices_worker, "input": input_worker}
        print(json.dumps(worker[a.worker](a)))
        return 0
    # A fresh cache: every timed warm-up compiles; the memory workers then load from it.
    a.compilation_cache = compilation_cache.enable(
        tempfile.mkdtemp(prefix="dermseg_jax_bench_"), min_compile_time_s=0
    )
    try:
        return _benchmark(a)
    finally:
        shutil.rmtree(a.compilation_cache, ignore_errors=True)


def _benchmark(a) -> int:
    gpu = a.device == "gpu"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device gpu: torch sees no CUDA device.")
    plan = GPU_PLAN if gpu else CPU_PLAN
    if a.size or a.batch:
        sizes = a.size or sorted(plan)
        plan = {s: tuple(a.batch or plan.get(s, (1,))) for s in sizes}
    variants = tuple(a.variants or (GPU_VARIANTS if gpu else CPU_VARIANTS))
    a.memory = a.memory or ("inprocess" if gpu else "subprocess")
    devices = a.devices if a.devices is not None else ([] if gpu else [1, 2])
    notes = []
    if not gpu and a.size is None:
        notes.append(
            f"CPU default: width {a.width:.3g} at 128 (batch 2) and 256 (batch 1); the thesis "
            "batch 24 and 512x512 only with --size/--batch (114 GFLOP per 128x128 forward)."
        )
    if gpu and a.memory == "inprocess":
        notes.append("GPU memory in-process: JAX's peak_bytes_in_use is a process-wide peak.")
    result = {
        "machine": proc.machine_description(a.device),
        "settings": {
            "width": a.width,
            "steps": a.steps,
            "inner": a.inner,
            "plan": {str(k): v for k, v in plan.items()},
            "variants": variants,
            "modes": a.modes,
            "memory": a.memory,
            "notes": notes,
        },
    }
    net, variables = bm.build_pair(a.width)
    check_size = min(plan)
    try:
        eq = bm.check_equivalence(
            net, variables, bm.make_batch(2, check_size, seed=1), thesis.get_config()
        )
    except bm.EquivalenceError as e:
        print(f"EQUIVALENCE CHECK FAILED: {e}", file=sys.stderr)
        return 2
    result["equivalence"] = {"size": check_size, "batch": 2, **eq}
    print(f"equivalence ({check_size}px, batch 2): {eq}", flush=True)
    result["results"] = []
    for size, batches in plan.items():
        for batch_size in batches:
            result["results"] += run_configuration(
                a, size, batch_size, net, variables, variants, result["machine"]
            )
    first_size, first_batch = min(plan), max(plan[min(plan)])
    result["devices_scaling"] = []
    for n in devices:
        env = dict(
            os.environ,
            XLA_FLAGS=(
                os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
            ).strip(),
        )
        b = -(-first_batch // n) * n
        args = [
            "--worker",
            "devices",
            "--size",
            str(first_size),
            "--batch",
            str(b),
            "--width",
            str(a.width),
            "--steps",
            str(a.steps),
        ]
        result["devices_scaling"].append(_subprocess_json(args, env=env))
    if not a.no_input:
        args = [
            "--worker",
            "input",
            "--size",
            str(first_size),
            "--batch",
            str(first_batch),
            "--steps",
            str(a.steps),
        ]
        result["input_pipeline"] = _subprocess_json(args)
    result["machine"]["load_average_end"] = os.getloadavg()
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print_table(result)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
