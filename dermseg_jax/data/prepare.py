"""Prepares a raw data set into the TFDS directory that training reads (`DATA_DIR`).

CLI:

    python -m dermseg_jax.data.prepare --format=isic2018 --root=RAW --out=DATA_DIR \
        [--task1_dir=RAW] [--shorter_side=1024] [--skip_bad] [--num_workers=4]
    python -m dermseg_jax.data.prepare --format=isic2017-thesis --root=RAW --out=DATA_DIR \
        [--splits_dir=splits/isic2017_seed]
    python -m dermseg_jax.data.prepare --format=synthetic --out=DATA_DIR --n=200 --seed=0

`DATA_DIR` itself is the TFDS data set directory: pass it to `tfds.builder_from_directory`
(and to `config.data.data_dir`). It also holds `class_counts.json` (training-split pixel
statistics, see `tfds_builder.count_example`) and `prepare_summary.json`. Every file is validated
before anything is written (all bad files are listed in one `DataError`), unless `skip_bad`.
Preparation writes into a temporary sibling folder and renames it into place, so `DATA_DIR` is
either complete or absent, also when two processes race (`ensure_synthetic`).

This module imports TensorFlow only inside `prepare`, so `class_weights_from_counts` and
`load_class_counts` are cheap to import.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from dermseg_jax import labels
from dermseg_jax.data import sources, synthetic

CLASS_COUNTS_FILE = "class_counts.json"
SUMMARY_FILE = "prepare_summary.json"
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


def _jsonable(counts: Mapping[str, Any]) -> dict[str, Any]:
    return {k: np.asarray(v).tolist() for k, v in counts.items()}


def _summary(builder, fmt: str, out: Path, skipped: Mapping[str, int]) -> dict[str, Any]:
    train = builder.class_counts.get("train") or next(iter(builder.class_counts.values()))
    counts = {
        "split": "train" if "train" in builder.class_counts else next(iter(builder.class_counts)),
        "class_names": list(labels.CLASS_NAMES),
        "structure_names": list(labels.STRUCTURE_NAMES),
        **_jsonable(train),
    }
    pixel_share = np.asarray(counts["structure_pixels"]) / max(1, counts["total_pixels"])
    return {
        "format": fmt,
        "data_dir": str(out),
        "splits": {s: int(builder.info.splits[s].num_examples) for s in builder.info.splits},
        "skipped": dict(skipped),
        "structure_images": dict(
            zip(labels.STRUCTURE_NAMES, counts["structure_images"], strict=True)
        ),
        "structure_pixel_share": dict(
            zip(labels.STRUCTURE_NAMES, pixel_share.tolist(), strict=True)
        ),
        "class_weights": class_weights_from_counts(counts).tolist(),
        "class_counts": counts,
    }


def _publish(version_dir: Path, out: Path, overwrite: bool) -> None:
    """Renames the finished folder to `out`: atomic, and it fails if another writer won."""
    if overwrite and out.exists():
        trash = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        version_dir.rename(out)  # replaces an empty directory, fails on a non-empty one
    except OSError as e:
        raise FileExistsError(f"{out}: already exists and is not empty (use overwrite)") from e


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
    progress: bool = True,
) -> dict[str, Any]:
    """Validates a raw data set and writes it as the TFDS directory `out`.

    Args:
        fmt: one of `sources.FORMATS`.
        root: the raw root. For 'synthetic', None (or a folder without data) generates the set
            (into `root` when given, else a temporary folder) from `n`, `n_val`, `n_test`,
            `seed`, `image_size`; a folder holding a generated set is read as it is.
        out: `DATA_DIR`, the folder to create (must be absent or empty unless `overwrite`).
        task1_dir: ISIC 2018 Task 1 root for lesion masks (see `sources.list_isic2018`).
        splits_dir: thesis split files (default: the repository's `splits/isic2017_seed`).
        splits: splits to prepare (default: all present).
        shorter_side: downscale larger images to this shorter side (None: full size).
        allow_non_rgb: convert grey-scale/RGBA images instead of rejecting them.
        skip_bad: skip bad examples with a warning instead of failing.
        num_workers: decoding threads.
        validate_first: read every example once before writing (lists all bad files at once).
        overwrite: replace an existing `out`.
        n, n_val, n_test, seed, image_size: synthetic set size (n_val/n_test default n // 4).
        progress: show progress bars.

    Returns:
        The summary written to `out/prepare_summary.json`: images per split, skipped examples,
        images and pixel share per structure, class weights and the training class counts.
    """
    import tensorflow_datasets as tfds

    from dermseg_jax.data import tfds_builder

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: already exists and is not empty (use overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        options: dict[str, Any] = {"fmt": fmt}
        if fmt == "synthetic":
            n_val = n // 4 if n_val is None else n_val
            n_test = n // 4 if n_test is None else n_test
            if root is None or not sources.available_splits(fmt, root):
                root = Path(root) if root is not None else work / "raw"
                synthetic.write_dataset(
                    root,
                    n_train=n,
                    n_val=n_val,
                    n_test=n_test,
                    seed=seed,
                    image_size=image_size,
                    num_workers=num_workers,
                )
            options.update(
                n=n,
                n_val=n_val,
                n_test=n_test,
                seed=seed,
                image_size=list(np.broadcast_to(image_size, 2).tolist()),
            )
        elif root is None:
            raise ValueError(f"format {fmt!r} needs a raw root folder")
        root = Path(root)
        if not root.is_dir():
            raise sources.DataError(f"{root}: raw data folder not found")
        splits = tuple(splits or sources.available_splits(fmt, root))
        if not splits:
            raise sources.DataError(f"{root}: no {fmt} split folder found")
        read = {"shorter_side": shorter_side, "allow_non_rgb": allow_non_rgb}
        refs = {
            s: sources.list_examples(fmt, root, s, task1_dir=task1_dir, splits_dir=splits_dir)
            for s in splits
        }
        listed = {s: len(r) for s, r in refs.items()}
        if validate_first:
            refs = {
                s: sources.validate_examples(
                    r, skip_bad=skip_bad, num_workers=num_workers, progress=progress, **read
                )
                for s, r in refs.items()
            }
        builder = tfds_builder.DermsegStructures(
            config=tfds_builder.CONFIG_NAMES[fmt],
            data_dir=work / "tfds",
            refs=refs,
            skip_bad=skip_bad,
            num_workers=num_workers,
            **read,
        )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(root),
                try_download_gcs=False,
                # Several shards per large split, so hosts can read disjoint files.
                min_shard_size=16 << 20,
                max_shard_size=256 << 20,
            )
        )
        skipped = {s: listed[s] - int(builder.info.splits[s].num_examples) for s in splits}
        version_dir = Path(builder.data_dir)
        summary = _summary(builder, fmt, out, skipped)
        summary["options"] = {
            **options,
            "root": str(root),
            "shorter_side": shorter_side,
            "task1_dir": str(task1_dir) if task1_dir else None,
        }
        (version_dir / CLASS_COUNTS_FILE).write_text(json.dumps(summary["class_counts"], indent=1))
        (version_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        _publish(version_dir, out, overwrite)
        return summary
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
    except FileExistsError:
        if not (data_dir / SUMMARY_FILE).is_file():
            raise
        logging.info("Another process prepared %s first; using it", data_dir)
    return data_dir


def _print_summary(summary: Mapping[str, Any]) -> None:
    print(f"Prepared {summary['format']} into {summary['data_dir']}")
    for split, count in summary["splits"].items():
        skipped = summary["skipped"].get(split, 0)
        print(f"  {split:<10} {count:>6} images" + (f" ({skipped} skipped)" if skipped else ""))
    total = summary["class_counts"]["images"]
    print(f"  {summary['class_counts']['split']} split, structures: images, pixel share")
    for name in labels.STRUCTURE_NAMES:
        images, share = summary["structure_images"][name], summary["structure_pixel_share"][name]
        print(f"    {name:<18} {images:>6} ({images / max(total, 1):6.1%})  {share:8.3%}")
    weights = ", ".join(
        f"{c} {w:.4f}" for c, w in zip(labels.CLASS_NAMES, summary["class_weights"], strict=True)
    )
    print(f"  class weights (inverse frequency): {weights}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The CLI (argparse, so that importing this module defines no absl flags)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dermseg_jax.data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--format", required=True, choices=sources.FORMATS)
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
    parser.add_argument("--no_validate_first", "--no-validate-first", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--n", type=int, default=200, help="synthetic training images")
    parser.add_argument("--n_val", "--n-val", type=int, help="default n // 4")
    parser.add_argument("--n_test", "--n-test", type=int, help="default n // 4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size",
        default="x".join(map(str, synthetic.DEFAULT_IMAGE_SIZE)),
        help="synthetic HEIGHTxWIDTH",
    )
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    try:
        size = tuple(int(v) for v in args.size.lower().split("x"))
        summary = prepare(
            args.format,
            args.root,
            args.out,
            task1_dir=args.task1_dir,
            splits_dir=args.splits_dir,
            splits=args.splits,
            shorter_side=args.shorter_side or None,
            allow_non_rgb=args.allow_non_rgb,
            skip_bad=args.skip_bad,
            num_workers=args.num_workers,
            validate_first=not args.no_validate_first,
            overwrite=args.overwrite,
            n=args.n,
            n_val=args.n_val,
            n_test=args.n_test,
            seed=args.seed,
            image_size=size,
        )
    except (sources.DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    _print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
