"""Prepares a raw data set into the TFDS directory that training reads (`DATA_DIR`).

CLI:

    python -m dermseg_jax.data.prepare --format=isic2018 --root=RAW --out=DATA_DIR \
        [--task1_dir=RAW] [--shorter_side=1024] [--skip_bad] [--num_workers=4] [--overwrite]
    python -m dermseg_jax.data.prepare --format=isic2017-thesis --root=RAW --out=DATA_DIR \
        [--splits_dir=splits/isic2017_seed]
    python -m dermseg_jax.data.prepare --format=synthetic --out=DATA_DIR --n=200 --size=288x384

`DATA_DIR` itself is the TFDS data set directory: pass it to `tfds.builder_from_directory`
(and to `config.data.data_dir`). It also holds `class_counts.json` (training-split pixel
statistics, see `tfds_builder.count_example`) and `prepare_summary.json`, which marks it as
written by prepare. The steps of `prepare`: check the arguments (before anything is written),
list the sources, validate every file (all bad files in one `DataError`, or skipped, counted
and listed in the summary under `--skip_bad`), build the TFDS shards in a temporary folder,
write the summary, publish by renaming (`staging`: `--overwrite` replaces only a data set that
prepare wrote, never an input; `DATA_DIR` is complete or absent, also when two processes race).

This module imports TensorFlow only inside `prepare`, so `class_weights_from_counts` and
`load_class_counts` are cheap to import.
"""

import contextlib
import hashlib
import io
import json
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from dermseg_jax import cli, labels
from dermseg_jax.data import sources, staging, synthetic
from dermseg_jax.errors import UserError

CLASS_COUNTS_FILE = "class_counts.json"
SUMMARY_FILE = staging.SUMMARY_FILE
# Bump when the synthetic generator's output changes, so cached copies are rebuilt.
SYNTHETIC_VERSION = 1
DEFAULT_CACHE_DIR = Path(
    os.environ.get("DERMSEG_CACHE", Path.home() / ".cache" / "dermseg_jax")
).joinpath("synthetic")


def class_weights_from_counts(counts: Mapping[str, Any], key: str = "class_pixels") -> np.ndarray:
    """The thesis' class weights: inverse pixel frequency, normalised to sum 1.

    Args:
        counts: the content of `class_counts.json` (or `tfds_builder.count_example` sums).
        key: `class_pixels` (whole images) or `class_pixels_lesion_crop` (the thesis' crop).

    Returns:
        float32 [6] weights for `labels.CLASS_NAMES`; a class without pixels gets 0.
    """
    pixels = np.asarray(counts[key], np.float64)
    if pixels.shape != (labels.NUM_CLASSES,):
        raise ValueError(f"counts[{key!r}] must have {labels.NUM_CLASSES} entries: {pixels}")
    inverse = np.where(pixels > 0, 1.0 / np.maximum(pixels, 1.0), 0.0)
    if inverse.sum() == 0:
        raise ValueError(f"counts[{key!r}] holds no pixels")
    return (inverse / inverse.sum()).astype(np.float32)


def load_class_counts(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads `DATA_DIR/class_counts.json`."""
    path = Path(data_dir) / CLASS_COUNTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; was {data_dir} written by prepare?")
    return json.loads(path.read_text())


def _check_args(fmt, root, out: Path, task1_dir, splits_dir, overwrite: bool) -> None:
    """Step 1: the checks that read no data file, before anything is written."""
    if root is None and fmt != "synthetic":
        raise UserError(f"--format={fmt} needs --root, the raw data folder")
    if fmt == "isic2017-thesis" and splits_dir is None:
        splits_dir = sources.DEFAULT_THESIS_SPLITS_DIR
    inputs = {"--root": root, "--task1_dir": task1_dir, "--splits_dir": splits_dir}
    inputs = {flag: Path(path) for flag, path in inputs.items() if path is not None}
    for flag, path in inputs.items():
        generated = fmt == "synthetic" and flag == "--root" and not path.exists()
        if not path.is_dir() and not generated:
            raise UserError(f"{path}: {flag} folder not found")
    staging.check_out(out, inputs, overwrite)


def _raw_root(fmt, root, work: Path, generate: dict[str, Any], num_workers: int) -> Path:
    """The raw data folder; for 'synthetic', generates the set unless `root` holds one."""
    if fmt == "synthetic" and (root is None or not sources.available_splits(fmt, root)):
        root = Path(root) if root is not None else work / "raw"
        try:
            synthetic.write_dataset(root, **generate, num_workers=num_workers)
        except ValueError as e:  # its own limits, e.g. the smallest image size
            raise UserError(f"synthetic data set (--n, --size): {e}") from e
    return Path(root)


def _list_sources(fmt, root: Path, splits, task1_dir, splits_dir) -> dict[str, list]:
    """Step 2: the examples of every split (duplicate IDs are an error here)."""
    splits = tuple(splits or sources.available_splits(fmt, root))
    if not splits:
        raise sources.DataError(f"{root}: no {fmt} split folder found")
    return {
        s: sources.list_examples(fmt, root, s, task1_dir=task1_dir, splits_dir=splits_dir)
        for s in splits
    }


def _validate(refs, skipped, progress, skip_bad, num_workers, read) -> dict[str, list]:
    """Step 3: reads every example once; bad ones raise, or are listed in `skipped`."""
    good = {}
    for split, split_refs in refs.items():
        good[split], skipped[split] = sources.validate_examples(
            split_refs, skip_bad=skip_bad, num_workers=num_workers, progress=progress, **read
        )
    return good


def _build(fmt, root: Path, work: Path, refs, progress: bool, **options):
    """Step 4: writes the TFDS shards into `work`; returns the builder."""
    import tensorflow_datasets as tfds

    from dermseg_jax.data import tfds_builder

    builder = tfds_builder.DermsegStructures(
        config=tfds_builder.CONFIG_NAMES[fmt], data_dir=work / "tfds", refs=refs, **options
    )
    config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(root),
        try_download_gcs=False,
        # Several shards per large split, so hosts can read disjoint files.
        min_shard_size=16 << 20,
        max_shard_size=256 << 20,
    )
    if progress:
        builder.download_and_prepare(download_config=config)
        return builder
    # Inside another command (the synthetic set a training run prepares for itself), TFDS' own
    # progress bars and "Downloading and preparing" prints are noise on that command's console.
    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(download_config=config)
    return builder


def _summary(builder, out: Path, skipped: Mapping[str, list[str]], options) -> dict[str, Any]:
    """Step 5: the summary, written with the class counts into the built folder."""
    train = builder.class_counts.get("train") or next(iter(builder.class_counts.values()))
    counts = {
        "split": "train" if "train" in builder.class_counts else next(iter(builder.class_counts)),
        "class_names": list(labels.CLASS_NAMES),
        "structure_names": list(labels.STRUCTURE_NAMES),
        **{k: np.asarray(v).tolist() for k, v in train.items()},
    }
    pixel_share = np.asarray(counts["structure_pixels"]) / max(1, counts["total_pixels"])
    summary = {
        "format": options["fmt"],
        "data_dir": str(out),
        "splits": {s: int(builder.info.splits[s].num_examples) for s in builder.info.splits},
        "skipped": {split: len(problems) for split, problems in skipped.items()},
        "skipped_examples": dict(skipped),
        "structure_images": dict(
            zip(labels.STRUCTURE_NAMES, counts["structure_images"], strict=True)
        ),
        "structure_pixel_share": dict(
            zip(labels.STRUCTURE_NAMES, pixel_share.tolist(), strict=True)
        ),
        "class_weights": class_weights_from_counts(counts).tolist(),
        "class_counts": counts,
        "options": options,
    }
    version_dir = Path(builder.data_dir)
    (version_dir / CLASS_COUNTS_FILE).write_text(json.dumps(counts, indent=1))
    (version_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return summary


def prepare(
    fmt: str,
    root: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    task1_dir: str | os.PathLike | None = None,
    splits_dir: str | os.PathLike | None = None,
    splits: Sequence[str] | None = None,
    shorter_side: int | None = sources.DEFAULT_SHORTER_SIDE,
    allow_non_rgb: bool = False,
    skip_bad: bool = False,
    num_workers: int = 4,
    validate_first: bool = True,
    overwrite: bool = False,
    n: int = 200,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    image_size: int | tuple[int, int] = synthetic.DEFAULT_IMAGE_SIZE,
    profile: str = "default",
    progress: bool = True,
) -> dict[str, Any]:
    """Validates a raw data set and writes it as the TFDS directory `out`.

    Args:
        fmt: one of `sources.FORMATS`.
        root: the raw root. For 'synthetic', None (or a folder without data) generates the set
            (into `root` when given, else a temporary folder) from `n`, `n_val`, `n_test`,
            `seed`, `image_size`; a folder holding a generated set is read as it is.
        out: `DATA_DIR`, the folder to create: absent or empty, or with `overwrite` a data set
            that prepare wrote (`is_prepared`); never an input folder or a parent of one.
        task1_dir: ISIC 2018 Task 1 root for lesion masks (see `sources.list_isic2018`).
        splits_dir: thesis split files (default: the repository's `splits/isic2017_seed`).
        splits: splits to prepare (default: all present).
        shorter_side: downscale larger images to this shorter side (None: full size).
        allow_non_rgb: convert grey-scale/RGBA images instead of rejecting them.
        skip_bad: skip bad examples with a warning (counted and listed in the summary).
        num_workers: decoding threads.
        validate_first: read every example once before writing (lists all bad files at once).
        overwrite: replace `out` if it is a data set that prepare wrote.
        n, n_val, n_test, seed, image_size: synthetic set size (n_val/n_test default n // 4).
        profile: synthetic profile, `synthetic.PROFILES` (docs/synthetic.md).
        progress: show progress bars.

    Returns:
        The summary written to `out/prepare_summary.json`: images per split, skipped examples
        (count and "file: problem" lines), images and pixel share per structure, class weights
        and the training class counts.

    Raises:
        UserError: a bad argument or `out` (before anything is written), or a `DataError`.
    """
    out = Path(out)
    n_val = n // 4 if n_val is None else n_val
    n_test = n // 4 if n_test is None else n_test
    if fmt == "synthetic" and n <= 0:
        raise UserError(f"--n {n}: the synthetic set needs at least 1 training image")
    if fmt == "synthetic" and min(n_val, n_test) < 0:
        raise UserError(f"--n_val {n_val}, --n_test {n_test}: need 0 or more images")
    _check_args(fmt, root, out, task1_dir, splits_dir, overwrite)
    size = tuple(np.broadcast_to(image_size, 2).tolist())
    generate = dict(
        n_train=n, n_val=n_val, n_test=n_test, seed=seed, image_size=size, profile=profile
    )
    read = {"shorter_side": shorter_side, "allow_non_rgb": allow_non_rgb}
    options = {"fmt": fmt, "shorter_side": shorter_side, "task1_dir": task1_dir and str(task1_dir)}
    if fmt == "synthetic":
        options.update(
            n=n, n_val=n_val, n_test=n_test, seed=seed, image_size=list(size), profile=profile
        )
    with staging.staging_dir(out) as work:
        root = _raw_root(fmt, root, work, generate, num_workers)
        refs = _list_sources(fmt, root, splits, task1_dir, splits_dir)
        skipped: dict[str, list[str]] = {split: [] for split in refs}
        if validate_first:
            refs = _validate(refs, skipped, progress, skip_bad, num_workers, read)
        builder = _build(
            fmt, root, work, refs, progress, skip_bad=skip_bad, num_workers=num_workers, **read
        )
        for split, problems in builder.skipped.items():
            skipped[split] += problems
        summary = _summary(builder, out, skipped, {**options, "root": str(root)})
        staging.publish(Path(builder.data_dir), out, work, overwrite)
    return summary


def _synthetic_params(n_train, n_val, n_test, seed, image_size) -> dict[str, Any]:
    size = [int(s) for s in np.broadcast_to(image_size, 2)]
    return {
        "n_train": int(n_train),
        "n_val": int(n_val),
        "n_test": int(n_test),
        "seed": int(seed),
        "image_size": size,
        "version": SYNTHETIC_VERSION,
    }


def ensure_synthetic(
    cache_dir: str | os.PathLike | None = None,
    n_train: int = 200,
    n_val: int = 50,
    n_test: int = 50,
    seed: int = 0,
    image_size: int | tuple[int, int] = synthetic.DEFAULT_IMAGE_SIZE,
) -> Path:
    """Generates and prepares the synthetic set once into `cache_dir`, then reuses it.

    The folder name hashes the parameters (and `SYNTHETIC_VERSION`), so different parameters
    get their own copy. Safe if several processes race: each prepares into a temporary folder
    and the first rename wins; the others use the winner's copy.

    Args:
        cache_dir: cache root (default `$DERMSEG_CACHE/synthetic` or ~/.cache/dermseg_jax/...).
        n_train, n_val, n_test: images per split (0 leaves a split out).
        seed: data set seed.
        image_size: (height, width) or int.

    Returns:
        `DATA_DIR`, the prepared folder for `tfds.builder_from_directory`.
    """
    params = _synthetic_params(n_train, n_val, n_test, seed, image_size)
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    h, w = params["image_size"]
    data_dir = Path(cache_dir or DEFAULT_CACHE_DIR) / (
        f"synthetic_{n_train}-{n_val}-{n_test}_s{seed}_{h}x{w}_{key}"
    )
    if (data_dir / SUMMARY_FILE).is_file():
        return data_dir
    logging.info("Preparing the synthetic data set into %s", data_dir)
    try:
        prepare(
            "synthetic",
            None,
            data_dir,
            n=n_train,
            n_val=n_val,
            n_test=n_test,
            seed=seed,
            image_size=tuple(params["image_size"]),
            shorter_side=None,
            num_workers=2,
            progress=False,
        )
    except UserError:
        if not (data_dir / SUMMARY_FILE).is_file():
            raise
        logging.info("Another process prepared %s first; using it", data_dir)
    return data_dir


def _print_summary(summary: Mapping[str, Any]) -> None:
    print(f"Prepared {summary['format']} into {summary['data_dir']}")
    for split, count in summary["splits"].items():
        skipped = summary["skipped"].get(split, 0)
        note = f" ({skipped} skipped, listed in {SUMMARY_FILE})" if skipped else ""
        print(f"  {split:<10} {count:>6} images{note}")
    total = summary["class_counts"]["images"]
    print(f"  {summary['class_counts']['split']} split, structures: images, pixel share")
    for name in labels.STRUCTURE_NAMES:
        images, share = summary["structure_images"][name], summary["structure_pixel_share"][name]
        print(f"    {name:<18} {images:>6} ({images / max(total, 1):6.1%})  {share:8.3%}")
    weights = ", ".join(
        f"{c} {w:.4f}" for c, w in zip(labels.CLASS_NAMES, summary["class_weights"], strict=True)
    )
    print(f"  class weights (inverse frequency): {weights}")


def _parse_size(text: str) -> tuple[int, int]:
    """`--size` as (height, width): HEIGHTxWIDTH, or one number for a square."""
    parts = text.lower().split("x")
    if len(parts) <= 2 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[-1])
    raise UserError(f"--size {text!r}: expected HEIGHTxWIDTH in positive integers, e.g. 288x384")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The CLI (argparse, so that importing this module defines no absl flags)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dermseg_jax.data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--format", dest="fmt", required=True, choices=sources.FORMATS)
    parser.add_argument("--root", help="raw root (synthetic: optional, generated when absent)")
    parser.add_argument("--out", required=True, help="DATA_DIR to create")
    parser.add_argument("--task1_dir", "--task1-dir", help="ISIC 2018 Task 1 root (lesion masks)")
    parser.add_argument("--splits_dir", "--splits-dir", help="thesis split files folder")
    parser.add_argument("--splits", nargs="+", choices=sources.SPLITS, help="default: all present")
    parser.add_argument(
        "--shorter_side",
        "--shorter-side",
        type=int,
        default=sources.DEFAULT_SHORTER_SIDE,
        help="0 keeps full size",
    )
    parser.add_argument("--skip_bad", "--skip-bad", action="store_true")
    parser.add_argument("--allow_non_rgb", "--allow-non-rgb", action="store_true")
    parser.add_argument("--num_workers", "--num-workers", type=int, default=4)
    parser.add_argument(
        "--no_validate_first", "--no-validate-first", dest="validate_first", action="store_false"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out if prepare wrote it"
    )
    parser.add_argument("--n", type=int, default=200, help="synthetic training images")
    parser.add_argument("--n_val", "--n-val", type=int, help="default n // 4")
    parser.add_argument("--n_test", "--n-test", type=int, help="default n // 4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size",
        default="x".join(map(str, synthetic.DEFAULT_IMAGE_SIZE)),
        help="synthetic HEIGHTxWIDTH",
    )
    parser.add_argument(
        "--profile", choices=synthetic.PROFILES, default="default", help="docs/synthetic.md"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    args = vars(parser.parse_args(argv))
    debug = args.pop("debug")
    logging.set_verbosity(logging.INFO)

    def run() -> dict[str, Any]:
        args["image_size"] = _parse_size(args.pop("size"))
        args["shorter_side"] = args["shorter_side"] or None
        return prepare(**args)

    summary = cli.guard(run, debug=debug, prog="prepare")
    _print_summary(summary)
    return summary


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through `prepare`, which removes its folder


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
