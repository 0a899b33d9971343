"""Training input pipeline throughput per host core, at a shipped recipe's data settings.

Times `pipeline.create_train_dataset` batches from a prepared data set (`--data_dir`) with the
data config and batch size of a recipe (`dermseg_jax/configs/<recipe>.py`: lesion crop, resize, crop, flips,
colour jitter, normalisation), uncached and with the in-memory cache (filled by a warm-up
epoch). Per core: the process is pinned to one core (`--core`) before TensorFlow starts, so
tf.data's thread pools and TF's op pools hold one thread; images per CPU-second of the process
are reported too (robust to other load on a shared machine). Each figure is the best of
`--repeats` timed windows. The accelerator host of the recipes has 16 cores: the goal is
per-core images/s x 16 >= what the device's training step consumes (docs/input_pipeline.md).

COMMAND (synthetic ISIC-like images in a temporary folder, never in the repo):
    T=$(mktemp -d)
    python -m dermseg_jax.data.prepare --format synthetic --root $T/raw --out $T/isic2018 \
        --size 1536x2048 --n 48 --n_val 4 --n_test 0
    python -m dermseg_jax.data.prepare --format synthetic --root $T/raw --out $T/thesis \
        --size 1536x2048 --n 48 --n_val 4 --n_test 0 --shorter_side 0
    .venv/bin/python scripts/benchmark_input.py --recipe isic2018 --data_dir $T/isic2018 \
        --out docs/benchmarks/input_isic2018.json
    .venv/bin/python scripts/benchmark_input.py --recipe thesis --data_dir $T/thesis \
        --out docs/benchmarks/input_thesis.json
"""

import argparse
import importlib
import json
import math
import os
import platform
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("isic2018", "thesis", "default")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--recipe", choices=RECIPES, required=True, help="dermseg_jax/configs/<recipe>.py"
    )
    p.add_argument("--data_dir", required=True, help="a prepared data set (dermseg_jax.prepare)")
    p.add_argument("--batch_size", type=int, help="default: the recipe's train.batch_size")
    p.add_argument("--steps", type=int, default=8, help="batches per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the best is reported")
    p.add_argument("--cache", nargs="+", default=["off", "on"], choices=("off", "on"))
    p.add_argument("--core", type=int, default=0, help="the host core to pin to; -1: no pinning")
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_windows(batches, batch_size: int, steps: int, repeats: int) -> dict:
    """Wall and CPU time of `repeats` windows of `steps` batches; rates of the best window.

    One more window runs first, untimed: batches prefetched during the warm-up would make it
    look faster than the pipeline is.
    """
    for _ in range(steps):
        next(batches)
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        for _ in range(steps):
            next(batches)
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu_seconds() - cpu_start)
    images = steps * batch_size
    return {
        "images_per_s": images / min(walls),
        "images_per_cpu_s": images / min(cpus),
        "window_s": walls,
        "window_cpu_s": cpus,
    }


def measure(data_cfg, batch_size: int, cache: bool, num_examples: int, a) -> dict:
    """Starts the pipeline, warms it up (a whole epoch when cached), then times it."""
    from dermseg_jax.data import pipeline  # noqa: PLC0415  (after pinning)

    with data_cfg.unlocked():
        data_cfg.cache = cache
    batches = pipeline.create_train_dataset(data_cfg, batch_size=batch_size, seed=0)
    warmup = math.ceil(num_examples / batch_size) + 1 if cache else 2
    start = time.perf_counter()
    for _ in range(warmup):
        next(batches)
    result = {"cache": cache, "warmup_batches": warmup, "warmup_s": time.perf_counter() - start}
    result.update(time_windows(batches, batch_size, a.steps, a.repeats))
    return result


def describe_data(data_dir: str) -> dict:
    """Number of training examples and the first one's stored image size."""
    from dermseg_jax.data import pipeline  # noqa: PLC0415

    raw, n = pipeline.read_split(data_dir, "train")
    first = next(iter(raw.take(1)))
    return {"num_examples": n, "first_image_shape": first["image"].shape.as_list()}


def main(a) -> dict:
    if a.core >= 0:
        os.sched_setaffinity(0, {a.core})  # before TensorFlow sizes its thread pools
    sys.path.insert(0, ROOT)
    recipe = importlib.import_module(f"dermseg_jax.configs.{a.recipe}").get_config()
    import tensorflow as tf  # noqa: PLC0415

    if a.core >= 0:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    data_cfg = recipe.data
    with data_cfg.unlocked():
        data_cfg.data_dir = a.data_dir
    batch_size = a.batch_size or int(recipe.train.batch_size)
    data = describe_data(a.data_dir)
    settings = {
        k: data_cfg[k]
        for k in ("lesion_crop", "resize_shorter", "resize_method", "crop_size", "flip")
        + ("color_jitter", "normalization")
    }
    result = {
        "recipe": a.recipe,
        "data": {"data_dir": os.path.basename(os.path.normpath(a.data_dir)), **data},
        "settings": {**settings, "batch_size": batch_size, "steps": a.steps},
        "machine": {
            "cpu_model": platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(),
            "pinned_cores": sorted(os.sched_getaffinity(0)),
            "load_average_start": os.getloadavg(),
            "tensorflow": tf.__version__,
        },
        "results": [],
    }
    for cache in a.cache:
        row = measure(data_cfg, batch_size, cache == "on", data["num_examples"], a)
        result["results"].append(row)
        print(
            f"{a.recipe}: {data_cfg.crop_size} px crops, batch {batch_size}, cache {cache}: "
            f"{row['images_per_s']:.1f} images/s on {len(result['machine']['pinned_cores'])} "
            f"core(s), {row['images_per_cpu_s']:.1f} images per CPU-second "
            f"(best of {a.repeats} x {a.steps} batches)",
            flush=True,
        )
    result["machine"]["load_average_end"] = os.getloadavg()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    args = parse_args()
    sys.path.insert(0, ROOT)
    from dermseg_jax import cli  # noqa: E402

    cli.guard(lambda: main(args), debug=args.debug, prog="benchmark_input.py")
