"""The ISIC 2018 Task 2 file format: image ids, mask file names, writing, reading and scoring.

One home for the format, so that `predict` writes, `evaluate` scores and the tests read the same
files: `<image_id>_attribute_<structure>.png`, 8-bit single channel, 0/255, at the image's size;
the official scorer (`isic_challenge_scoring.task2.score`) binarises at > 128, so 0/1 masks score
as empty. `score_isic2018_dirs` reproduces that scorer on two folders (`metrics` computes it).
"""

import pathlib
import re

import cv2
import numpy as np

from dermseg_jax import labels, metrics

ISIC_ID = re.compile(r"ISIC_\d{7}")
_ATTRIBUTE = re.compile(r"attribute_([a-z_]+)")
_IGNORED_FILES = ("ATTRIBUTION.txt", "LICENSE.txt")


def image_id(path: str | pathlib.Path) -> str:
    """The ISIC id (`ISIC_<7 digits>`) contained in a file name, else the file stem."""
    path = pathlib.Path(path)
    match = ISIC_ID.search(path.name)
    return match.group(0) if match else path.stem


def mask_filename(image_id_: str, structure: str) -> str:
    """ISIC 2018 Task 2 file name of one structure mask of one image."""
    return f"{image_id_}_attribute_{structure}.png"


def write_isic2018_masks(directory: str | pathlib.Path, image_id_: str, masks) -> None:
    """Writes the five 0/255 single-channel PNG masks of one image.

    Args:
        directory: output folder (created if missing).
        image_id_: e.g. 'ISIC_0000000'.
        masks: [H, W, 5] binary masks (nonzero = positive) in `labels.STRUCTURE_NAMES` order.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[-1] != labels.NUM_STRUCTURES:
        raise ValueError(f"masks must be [H, W, {labels.NUM_STRUCTURES}], got {masks.shape}")
    for k, name in enumerate(labels.STRUCTURE_NAMES):
        mask = np.where(masks[..., k] != 0, 255, 0).astype(np.uint8)
        path = directory / mask_filename(image_id_, name)
        if not cv2.imwrite(str(path), mask):
            raise OSError(f"could not write {path}")


def _parse_name(path: pathlib.Path) -> tuple[str, str]:
    ident = ISIC_ID.search(path.stem)
    attribute = _ATTRIBUTE.search(path.stem)
    if not ident or not attribute:
        raise ValueError(f"{path}: expected a name like ISIC_0000000_attribute_<structure>.png")
    return ident.group(0), attribute.group(1)


def read_mask(path: pathlib.Path) -> np.ndarray:
    """Reads one mask file as uint8 [H, W]; a clear error for anything else."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: could not decode the image")
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(
            f"{path}: expected an 8-bit single-channel mask, got shape {image.shape} "
            f"dtype {image.dtype}"
        )
    return image


def _mask_files(directory: pathlib.Path) -> list[tuple[pathlib.Path, tuple[str, str]]]:
    # Names are checked for the whole folder before any image is read.
    return [
        (path, _parse_name(path))
        for path in sorted(directory.iterdir())
        if path.name not in _IGNORED_FILES
    ]


def score_isic2018_dirs(truth_dir: str | pathlib.Path, pred_dir: str | pathlib.Path) -> dict:
    """The official ISIC 2018 Task 2 score of two folders of PNG masks.

    Every truth file `ISIC_<id>_attribute_<name>.png` needs exactly one prediction file with
    the same id and attribute; both are binarised at > 128, as the official scorer does. Only
    the attributes present in `truth_dir` are scored.

    Args:
        truth_dir: folder of ground-truth masks.
        pred_dir: folder of predicted masks.

    Returns:
        The package's nested dict, see `metrics.isic2018_from_counts`.
    """
    truth_dir, pred_dir = pathlib.Path(truth_dir), pathlib.Path(pred_dir)
    predictions: dict[tuple[str, str], pathlib.Path] = {}
    for path, key in _mask_files(pred_dir):
        if key in predictions:
            raise ValueError(f"{path}: a second prediction for {key} (also {predictions[key]})")
        predictions[key] = path
    counts: dict[str, list[dict[str, np.ndarray]]] = {}
    for path, key in _mask_files(truth_dir):
        if key not in predictions:
            raise ValueError(f"{path}: no matching prediction in {pred_dir}")
        truth, pred = read_mask(path), read_mask(predictions[key])
        if truth.shape != pred.shape:
            raise ValueError(
                f"{predictions[key]}: shape {pred.shape} differs from the truth's {truth.shape}"
            )
        counts.setdefault(key[1], []).append(
            metrics.host_counts((pred > 128)[..., None], (truth > 128)[..., None])
        )
    if not counts:
        raise ValueError(f"{truth_dir}: no ground-truth masks")
    names = sorted(counts)
    # Attributes may have different image counts: pad with all-zero rows (they add nothing).
    n = max(len(v) for v in counts.values())
    arrays = {k: np.zeros((n, len(names))) for k in metrics.COUNT_KEYS}
    for j, name in enumerate(names):
        for i, row in enumerate(counts[name]):
            for k in metrics.COUNT_KEYS:
                arrays[k][i, j] = row[k][0]
    return metrics.isic2018_from_counts(*(arrays[k] for k in metrics.COUNT_KEYS), names)
