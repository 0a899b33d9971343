"""Input throughput benchmark: (a) `prepare` on large JPEGs, (b) the tf.data training pipeline.

(a) writes `--num_images` synthetic 3008x2000 JPEGs in the ISIC 2018 layout (not timed) and times
`dermseg_jax.data.prepare.prepare` on them (validation, decoding, downscaling to the prepared
shorter side, JPEG/zlib encoding, TFDS shards, class counts).
(b) times `pipeline.create_train_dataset` batches (lesion crop, resize, random crop, flips,
colour jitter, normalisation) from the set prepared in (a), without and with the in-memory
cache of decoded examples, and from the built-in synthetic set (or `--data_dir`).

COMMAND:
    .venv/bin/python scripts/benchmark_input.py --num_images 8 --steps 30
"""

import resource
import tempfile
import time
from pathlib import Path

import ml_collections
import torch  # noqa: F401  (torchvision must be imported before TensorFlow)
import torchvision  # noqa: F401
from absl import app, flags, logging

from dermseg_jax.data import pipeline, prepare, synthetic

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 8, "Large JPEGs to prepare in (a); 0 skips (a).")
flags.DEFINE_integer("shorter_side", 1024, "Prepared shorter side in (a).")
flags.DEFINE_string("data_dir", None, "Extra prepared data set to time in (b).")
flags.DEFINE_integer("batch_size", 32, "Training batch size in (b).")
flags.DEFINE_integer("crop_size", 128, "Training crop in (b).")
flags.DEFINE_integer("resize_shorter", 256, "Shorter side after the lesion crop in (b).")
flags.DEFINE_integer("steps", 30, "Timed batches per configuration in (b).")
flags.DEFINE_integer("warmup", 3, "Untimed batches first (pipeline start, first cache fill).")


def data_config(data_dir: str | None, **overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        {
            "data_dir": data_dir,
            "synthetic_cache": None,
            "synthetic_num_train": 160,
            "synthetic_num_val": 32,
            "synthetic_num_test": 32,
            "synthetic_seed": 0,
            "synthetic_image_size": 128,
            "lesion_crop": "mask",
            "eval_lesion_crop": "auto",
            "resize_shorter": FLAGS.resize_shorter,
            "resize_method": "bilinear",
            "crop_size": FLAGS.crop_size,
            "flip": True,
            "color_jitter": (0.05, 0.05, 0.05, 0.05),
            "normalization": "none",
            "eval_size": 256,
            "shuffle_buffer": 256,
            "cache": None,
        }
    )
    cfg.update(overrides)
    return cfg


def time_prepare(work: Path) -> Path:
    raw, out = work / "raw", work / "prepared"
    synthetic.write_dataset(
        raw, n_train=FLAGS.num_images, n_val=0, n_test=0, image_size=(2000, 3008), vary_size=False
    )
    start = time.perf_counter()
    prepare.prepare("isic2018", raw, out, shorter_side=FLAGS.shorter_side, progress=False)
    seconds = time.perf_counter() - start
    print(
        f"(a) prepare: {FLAGS.num_images} JPEGs of 3008x2000 -> shorter side "
        f"{FLAGS.shorter_side}: {seconds:.1f} s, {FLAGS.num_images / seconds:.2f} images/s"
    )
    return out


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_training(name: str, cfg: ml_collections.ConfigDict) -> None:
    """Prints wall-clock images/s and images per CPU-second (robust to a shared machine)."""
    batches = pipeline.create_train_dataset(cfg, batch_size=FLAGS.batch_size, seed=0)
    for _ in range(FLAGS.warmup):
        next(batches)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    for _ in range(FLAGS.steps):
        next(batches)
    images = FLAGS.steps * FLAGS.batch_size
    rate = images / (time.perf_counter() - start)
    per_cpu = images / (_cpu_seconds() - cpu_start)
    print(
        f"(b) train pipeline, {name}, cache={cfg.cache}: {rate:.0f} images/s wall, "
        f"{per_cpu:.0f} images per CPU-second "
        f"({FLAGS.crop_size}x{FLAGS.crop_size} crops, batch {FLAGS.batch_size})"
    )
    del batches  # the prefetching iterator keeps working in the background until collected


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        if FLAGS.num_images > 0:
            prepared = str(time_prepare(Path(tmp)))
            for cache in (False, True):
                cfg = data_config(prepared, cache=cache)
                time_training(f"{FLAGS.num_images} prepared 3008x2000 images", cfg)
        time_training("built-in synthetic set", data_config(None, synthetic_cache=tmp))
        if FLAGS.data_dir:
            time_training(FLAGS.data_dir, data_config(FLAGS.data_dir))


if __name__ == "__main__":
    app.run(main)
