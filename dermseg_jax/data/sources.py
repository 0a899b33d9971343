"""Readers of the raw data layouts, yielding validated `Example` records.

Three layouts are read (`FORMATS`):

- `isic2018`: the ISIC 2018 Task 2 release,
  `ROOT/ISIC2018_Task1-2_<Split>_Input/ISIC_<7 digits>.jpg` and
  `ROOT/ISIC2018_Task2_<Split>_GroundTruth*/ISIC_<id>_attribute_<name>.png` (0/255, may overlap),
  with lesion masks from `TASK1_DIR/ISIC2018_Task1_<Split>_GroundTruth*/ISIC_<id>_segmentation.png`
  when `task1_dir` is given. Non-image files (LICENSE, ATTRIBUTION, metadata) and hidden files
  are ignored; every other entry named like an image is an example, so that one which cannot be
  read (a broken link, a folder named `*.jpg`, a name that is not an ISIC ID) is reported, and
  two files with one ID (`X.jpg`, `X.JPEG`) are an error naming both.
- `isic2017-thesis`: ISIC 2017 Part 2 as the thesis stored it, images
  `ROOT/ISIC-2017_<Training|Validation|Test_v2>_Data/<ID>.jpg`, labels
  `ROOT/ISIC-2017_<...>_Part2_GroundTruth/gtann/<ID>.mat` (key `smgt`, 0..6), IDs from split
  files (`train.txt`, `val.txt`, `test.txt`; default: the repository's `splits/isic2017_seed`).
- `synthetic`: the built-in synthetic set (`dermseg_jax.data.synthetic`), which is written in the
  ISIC 2018 layout including Task 1 lesion masks and read by the ISIC 2018 reader.

Listing (`list_examples`) only builds `ExampleRef`s; `read_example` decodes and validates one
(file-level checks live in `dermseg_jax.data.decoding`).
Every problem raises `DataError` naming the file and the problem: corrupt or truncated JPEG/PNG,
missing file, mask size != image size, non-binary mask, labels outside 0..6, missing `smgt` key,
empty split, and grey-scale, RGBA, palette or CMYK images (an error unless
`allow_non_rgb=True`, which converts them to RGB: ISIC images are RGB, so anything else is
likely a wrong file). `validate_examples` checks a whole split up front and, with
`skip_bad=True` (`--skip_bad`), drops bad examples with an absl warning and returns their
problems, so that the caller can count and list them.
"""

import collections
import concurrent.futures
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from absl import logging

from dermseg_jax import labels
from dermseg_jax.data import decoding
from dermseg_jax.data.decoding import DataError

FORMATS = ("isic2018", "isic2017-thesis", "synthetic")
SPLITS = ("train", "validation", "test")
DEFAULT_SHORTER_SIDE = 1024

_ISIC2018_SPLIT_DIRS = {"train": "Training", "validation": "Validation", "test": "Test"}
_THESIS_SPLIT_DIRS = {"train": "Training", "validation": "Validation", "test": "Test_v2"}
_THESIS_SPLIT_FILES = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
_ISIC_ID = re.compile(r"^(ISIC_\d{7})\.(jpg|jpeg)$", re.IGNORECASE)
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
_NOT_AN_ID = "image name is not ISIC_<7 digits>.jpg (no ground truth)"
# How many problems one error message or warning line shows.
_SHOWN_PROBLEMS = 10
# Thesis split files live in the repository beside the package.
DEFAULT_THESIS_SPLITS_DIR = Path(__file__).resolve().parents[2] / "splits" / "isic2017_seed"

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclasses.dataclass(frozen=True)
class ExampleRef:
    """Where one example's files are, before anything is read.

    Attributes:
        id: image ID, e.g. `ISIC_0000000`.
        split: 'train', 'validation' or 'test'.
        image_path: the RGB image (JPEG).
        structure_paths: ISIC 2018 masks in `labels.STRUCTURE_NAMES` order, or None.
        label_path: thesis `.mat` labels, or None.
        lesion_path: ISIC 2018 Task 1 lesion mask, or None (no lesion mask).
        origin: where the ID came from, for error messages.
        problem: why the listed file cannot be an example (e.g. its name is no ISIC ID), raised
            as a `DataError` when it is read; None for a usable entry.
    """

    id: str
    split: str
    image_path: Path
    structure_paths: tuple[Path, ...] | None = None
    label_path: Path | None = None
    lesion_path: Path | None = None
    origin: str = ""
    problem: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One decoded example in the label convention of `dermseg_jax.labels`.

    Attributes:
        id: image ID.
        image: uint8 [H, W, 3] RGB, at most `shorter_side` on its shorter side.
        structures: uint8 [H, W, 5] in {0, 1}, channels in `labels.STRUCTURE_NAMES` order.
        lesion: uint8 [H, W] in {0, 1}, or None where the layout has no lesion mask.
        original_size: (height, width) of the source image.
        jpeg_bytes: the source JPEG file when `image` is its unchanged full-size decode (lets
            the writer store it without re-encoding), else None.
    """

    id: str
    image: np.ndarray
    structures: np.ndarray
    lesion: np.ndarray | None
    original_size: tuple[int, int]
    jpeg_bytes: bytes | None = None


def _subdir(root: Path, pattern: str, what: str) -> Path | None:
    matches = sorted(p for p in root.glob(pattern) if p.is_dir())
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise DataError(f"{root}: several {what} folders match {pattern!r}: {names}")
    return matches[0] if matches else None


def available_splits(fmt: str, root: str | os.PathLike) -> tuple[str, ...]:
    """The splits whose image folder exists under `root`, in `SPLITS` order."""
    root = Path(root)
    _check_format(fmt)
    if fmt == "isic2017-thesis":
        dirs = [f"ISIC-2017_{_THESIS_SPLIT_DIRS[s]}_Data" for s in SPLITS]
    else:
        dirs = [f"ISIC2018_Task1-2_{_ISIC2018_SPLIT_DIRS[s]}_Input" for s in SPLITS]
    return tuple(s for s, d in zip(SPLITS, dirs, strict=True) if (root / d).is_dir())


def list_isic2018(
    root: str | os.PathLike, split: str, *, task1_dir: str | os.PathLike | None = None
) -> list[ExampleRef]:
    """Lists the examples of one split of the ISIC 2018 Task 2 layout.

    Args:
        root: folder holding `ISIC2018_Task1-2_<Split>_Input` and
            `ISIC2018_Task2_<Split>_GroundTruth*`.
        split: 'train', 'validation' or 'test'.
        task1_dir: folder holding `ISIC2018_Task1_<Split>_GroundTruth*` (lesion masks), or None.

    Returns:
        The split's examples sorted by ID (files are checked when read).

    Raises:
        DataError: a folder is missing or holds no `ISIC_<7 digits>.jpg` image.
    """
    root, name = Path(root), _ISIC2018_SPLIT_DIRS[_check_split(split)]
    input_dir = root / f"ISIC2018_Task1-2_{name}_Input"
    if not input_dir.is_dir():
        raise DataError(f"{input_dir}: image folder not found")
    gt_dir = _subdir(root, f"ISIC2018_Task2_{name}_GroundTruth*", "Task 2 ground-truth")
    if gt_dir is None:
        raise DataError(f"{root}: no ISIC2018_Task2_{name}_GroundTruth* folder for {split}")
    lesion_dir = None
    if task1_dir is not None:
        lesion_dir = _subdir(Path(task1_dir), f"ISIC2018_Task1_{name}_GroundTruth*", "Task 1")
        if lesion_dir is None:
            logging.warning(
                "%s: no ISIC2018_Task1_%s_GroundTruth*; no lesion masks for %s",
                task1_dir,
                name,
                split,
            )
    refs = []
    for path in _image_entries(input_dir):
        match = _ISIC_ID.match(path.name)
        image_id = match.group(1) if match else path.stem
        refs.append(
            ExampleRef(
                id=image_id,
                split=split,
                image_path=path,
                structure_paths=tuple(
                    gt_dir / f"{image_id}_attribute_{s}.png" for s in labels.STRUCTURE_NAMES
                ),
                lesion_path=lesion_dir / f"{image_id}_segmentation.png" if lesion_dir else None,
                origin=str(input_dir),
                problem=None if match else _NOT_AN_ID,
            )
        )
    if not refs:
        raise DataError(f"{input_dir}: empty split {split!r}: no ISIC_<7 digits>.jpg images")
    check_unique_ids(refs)
    return refs


def _image_entries(folder: Path) -> list[Path]:
    """Entries named like images, files or not (hidden files aside), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def check_unique_ids(refs: Sequence[ExampleRef]) -> None:
    """Raises `DataError` naming both files when two examples share an ID (`X.jpg`, `X.JPEG`).

    TFDS would only fail when it finalises the split, with both examples dumped into the log.
    """
    first: dict[str, ExampleRef] = {}
    clashes = []
    for ref in refs:
        other = first.setdefault(ref.id, ref)
        if other is not ref:
            clashes.append(f"{other.image_path}: ID {ref.id} also used by {ref.image_path.name}")
    if clashes:
        raise DataError(
            f"{refs[0].split} split: {len(clashes)} image ID(s) used twice: "
            + _join_problems(clashes),
            hint="keep one image file per ID",
        )


def _join_problems(problems: Sequence[str]) -> str:
    """The first problems on one line, then how many more there are."""
    more = len(problems) - _SHOWN_PROBLEMS
    return "; ".join(problems[:_SHOWN_PROBLEMS]) + (f"; ... and {more} more" if more > 0 else "")


def read_split_file(path: str | os.PathLike) -> list[tuple[int, str]]:
    """Reads a split file: one ID a line, CRLF allowed, blank lines ignored.

    Returns:
        (1-based line number, ID) pairs in file order.

    Raises:
        DataError: the file is missing, empty, or lists an ID twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    entries, seen = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        image_id = line.strip()
        if not image_id:
            continue
        if image_id in seen:
            raise DataError(f"{path}:{number}: {image_id} already listed on line {seen[image_id]}")
        seen[image_id] = number
        entries.append((number, image_id))
    if not entries:
        raise DataError(f"{path}: empty split: the file lists no IDs")
    return entries


def list_isic2017_thesis(
    root: str | os.PathLike, split: str, *, splits_dir: str | os.PathLike | None = None
) -> list[ExampleRef]:
    """Lists the examples of one split of the thesis' ISIC 2017 Part 2 layout.

    Args:
        root: folder holding `ISIC-2017_<Training|Validation|Test_v2>_Data` and
            `ISIC-2017_<...>_Part2_GroundTruth/gtann`.
        split: 'train', 'validation' or 'test' (files `train.txt`, `val.txt`, `test.txt`).
        splits_dir: folder of the split files; default `DEFAULT_THESIS_SPLITS_DIR`.

    Returns:
        The split's examples in split-file order (files are checked when read).
    """
    root, name = Path(root), _THESIS_SPLIT_DIRS[_check_split(split)]
    split_file = Path(splits_dir or DEFAULT_THESIS_SPLITS_DIR) / _THESIS_SPLIT_FILES[split]
    image_dir = root / f"ISIC-2017_{name}_Data"
    gt_dir = root / f"ISIC-2017_{name}_Part2_GroundTruth" / "gtann"
    return [
        ExampleRef(
            id=image_id,
            split=split,
            image_path=image_dir / f"{image_id}.jpg",
            label_path=gt_dir / f"{image_id}.mat",
            origin=f"{split_file}:{number}",
        )
        for number, image_id in read_split_file(split_file)
    ]


def list_examples(
    fmt: str,
    root: str | os.PathLike,
    split: str,
    *,
    task1_dir: str | os.PathLike | None = None,
    splits_dir: str | os.PathLike | None = None,
) -> list[ExampleRef]:
    """Lists one split of any of `FORMATS` (synthetic: ISIC 2018 with lesion masks in root)."""
    _check_format(fmt)
    if fmt == "isic2017-thesis":
        return list_isic2017_thesis(root, split, splits_dir=splits_dir)
    if fmt == "synthetic":
        task1_dir = root
    return list_isic2018(root, split, task1_dir=task1_dir)


def read_example(
    ref: ExampleRef,
    *,
    shorter_side: int | None = DEFAULT_SHORTER_SIDE,
    allow_non_rgb: bool = False,
) -> Example:
    """Reads, validates and (for large images) downscales one example.

    Args:
        ref: the example's files, from `list_examples`.
        shorter_side: downscale so the shorter side is at most this (None: full size).
        allow_non_rgb: convert grey-scale/RGBA/palette/CMYK images instead of raising.

    Returns:
        The `Example`: image uint8 [h, w, 3], structures uint8 [h, w, 5], lesion uint8 [h, w]
        or None, with (h, w) = the source size scaled to `shorter_side`.

    Raises:
        DataError: naming the file and the problem.
    """
    if ref.problem is not None:
        raise DataError(f"{ref.image_path}: {ref.problem}")
    image, size, jpeg = decoding.decode_image(ref, shorter_side, allow_non_rgb)
    target = image.shape[:2]
    lesion = None
    if ref.label_path is not None:
        smgt = decoding.read_thesis_labels(ref.label_path, ref, size, target)
        structures, lesion = labels.structures_from_thesis_labels(smgt)
    elif ref.structure_paths is not None:
        masks = [decoding.read_binary_mask(p, ref, size, target) for p in ref.structure_paths]
        structures = np.stack(masks, axis=-1)
    else:
        raise DataError(f"{ref.image_path}: no ground truth given for {ref.id}")
    if ref.lesion_path is not None:
        lesion = decoding.read_binary_mask(ref.lesion_path, ref, size, target)
    return Example(ref.id, image, structures, lesion, size, jpeg)


def parallel_map(
    fn: Callable[[_T], _R], items: Iterable[_T], num_workers: int = 4
) -> Iterator[_R | Exception]:
    """Maps `fn` over `items` in a thread pool, in order, with bounded look-ahead.

    cv2 and zlib release the GIL, so threads decode in parallel; the look-ahead of
    2 * num_workers keeps memory bounded for large images. Exceptions are returned, not
    raised, so that callers can count or skip them.
    """
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        pending = collections.deque()

        def call(item):
            try:
                return fn(item)
            except Exception as e:  # noqa: BLE001 - handed back to the caller
                return e

        for item in items:
            pending.append(pool.submit(call, item))
            if len(pending) >= 2 * max(1, num_workers):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def validate_examples(
    refs: Sequence[ExampleRef],
    *,
    shorter_side: int | None = DEFAULT_SHORTER_SIDE,
    allow_non_rgb: bool = False,
    skip_bad: bool = False,
    num_workers: int = 4,
    progress: bool = False,
) -> tuple[list[ExampleRef], list[str]]:
    """Reads every example of `refs` once and returns those that are good.

    Args:
        refs: examples of one split.
        shorter_side, allow_non_rgb: as in `read_example` (validation reads what is written).
        skip_bad: drop bad examples with an absl warning instead of raising.
        num_workers: decoding threads.
        progress: show a tqdm progress bar.

    Returns:
        (the good refs in order, one "file: problem" line per skipped example).

    Raises:
        DataError: naming the bad files on one line (unless skip_bad), or when none is good.
    """
    if not refs:
        raise DataError("empty split: no examples listed")

    def check(ref):
        read_example(ref, shorter_side=shorter_side, allow_non_rgb=allow_non_rgb)

    results = parallel_map(check, refs, num_workers)
    if progress:
        import tqdm

        results = tqdm.tqdm(results, total=len(refs), desc=f"validating {refs[0].split}")
    good, problems = [], []
    for ref, result in zip(refs, results, strict=True):
        if isinstance(result, DataError):
            problems.append(str(result))
        elif isinstance(result, Exception):
            problems.append(f"{ref.image_path}: unexpected {type(result).__name__}: {result}")
        else:
            good.append(ref)
    split = refs[0].split
    count = f"{len(problems)} of {len(refs)} {split} examples are bad"
    if problems and not skip_bad:
        raise DataError(f"{count}: {_join_problems(problems)}", hint="--skip_bad skips them")
    if problems:
        logging.warning("Skipping them: %s: %s", count, _join_problems(problems))
    if not good:
        raise DataError(f"empty split {split!r}: all {len(refs)} examples are bad")
    return good, problems


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
    return fmt
