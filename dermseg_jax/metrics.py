"""Segmentation metrics: the thesis protocol, the official ISIC 2018 Task 2 score, micro and
per-image Jaccard / Dice.

Device side, `eval_counts` (pure jnp, jit-able) turns a batch of binary predictions into
per-image confusion counts `tp, fp, fn, tn` `[B, K]` over valid pixels. Host side,
`SegmentationMetrics` accumulates those counts and `finalize()` divides once (never averaging
per-batch values). Its keys (`<s>` = a structure name from `labels.STRUCTURE_NAMES`):

- `jaccard/<s>`: the thesis protocol: per image `tp / (tp + fp + fn + 1)` (i.e.
  `|P n G| / (|P| + |G| - |P n G| + 1)`), counted only on images where `|P| + |G| > 0`,
  averaged over those images. `jaccard/mean`: mean over the five structures (the thesis'
  reported "mean Jaccard"; structures counted on no image are left out of the mean).
- `image_jaccard/<s>`, `image_dice/<s>` (+ `/mean`): standard per-image Jaccard `tp / (tp + fp
  + fn)` and Dice `2 tp / (2 tp + fp + fn)`, averaged over the images where they are defined
  (`|P| + |G| > 0`; empty-vs-empty images are skipped, not scored 1).
- `micro_jaccard/<s>`, `micro_dice/<s>`: dataset level, from counts summed over all pixels of
  all images; `/mean` = mean over structures, `/pooled` = counts pooled over structures too.
  NaN where the structure appears in neither truth nor prediction anywhere.
- `isic2018/jaccard/<s>`, `isic2018/dice/<s>`, `isic2018/overall` (= pooled Jaccard, the
  official "overall"), `isic2018/micro_average_dice`: the official ISIC 2018 Task 2 score
  (`isic_challenge_scoring.task2.score`): per (structure, image) counts divided by the image's
  pixel count, summed over images; an all-zero `tp + fp + fn` scores 1.0, as the package does.
- `num_images`.

`isic2018_task2_score` / `score_isic2018_dirs` return the package's own nested dict
(`{<s>: {'jaccard', 'dice'}, 'micro_average': {'jaccard', 'dice'}, 'overall'}`).
`ThesisMetrics` reproduces the thesis' evaluation (Jaccard with +1, per-image ROC AUC,
6x6 pixel confusion matrix) on six-channel one-hot predictions.
"""

import math
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from dermseg_jax import labels

COUNT_KEYS = ("tp", "fp", "fn", "tn")
_ISIC_ID_RE = re.compile(r"ISIC_[0-9]{7}")
_ATTRIBUTE_RE = re.compile(r"attribute_([a-z_]+)")
_IGNORED_FILES = ("ATTRIBUTION.txt", "LICENSE.txt")


def _mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _nanmean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return _mean_or_nan(values)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


def thesis_jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """The thesis' Jaccard of one image and channel: `|P n G| / (|P| + |G| - |P n G| + 1)`.

    Args:
        pred: [H, W] binary prediction (nonzero = positive).
        gt: [H, W] binary ground truth.

    Returns:
        The Jaccard, or NaN where `|P| + |G| == 0` (the image does not count for the channel).
    """
    pred, gt = np.asarray(pred) != 0, np.asarray(gt) != 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} shapes differ")
    intersection = np.count_nonzero(pred & gt)
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    if total == 0:
        return math.nan
    return intersection / (total - intersection + 1)


def thesis_ground_truth(structures: np.ndarray, lesion: np.ndarray | None = None) -> np.ndarray:
    """The thesis' six-channel ground truth: "others" = lesion without structure, + structures.

    Args:
        structures: [H, W, 5] in {0, 1}.
        lesion: [H, W] (or [H, W, 1]) lesion mask, or None (then "others" = no structure).

    Returns:
        uint8 [H, W, 6]; outside the lesion all channels are 0, as the thesis' one-hot.
    """
    structures = (np.asarray(structures) != 0).astype(np.uint8)
    others = 1 - structures.max(axis=-1)
    if lesion is not None:
        lesion = np.asarray(lesion).reshape(structures.shape[:2]) != 0
        others = others * lesion
    return np.concatenate([others[..., None], structures], axis=-1).astype(np.uint8)


class ThesisMetrics:
    """The thesis' evaluation, accumulated image by image on the six softmax channels.

    Per channel: the thesis Jaccard (`thesis_jaccard`) averaged over the images where it
    counts; ROC AUC (`sklearn.metrics.roc_auc_score` of the channel's pixel scores) averaged
    over the images where the channel is present and not the whole image (AUC needs both
    classes); and a 6x6 pixel confusion matrix (rows: truth class, columns: predicted class,
    both by the label rule `labels.label_from_structures` on channels 1..5: the first structure
    set, else 0 "others") summed over images.
    """

    def __init__(self) -> None:
        self._jaccard = [[] for _ in labels.CLASS_NAMES]
        self._auc = [[] for _ in labels.CLASS_NAMES]
        self.confusion_matrix = np.zeros((labels.NUM_CLASSES,) * 2, np.int64)
        self.num_images = 0

    def update(self, pred: np.ndarray, gt: np.ndarray, scores: np.ndarray | None = None) -> None:
        """Adds one image.

        Args:
            pred: [H, W, 6] post-processed one-hot prediction (`predict_classes_softmax`).
            gt: [H, W, 6] ground truth in {0, 1} (`thesis_ground_truth`).
            scores: [H, W, 6] per-channel scores (softmax probabilities) for the AUC, or None.
        """
        from sklearn.metrics import roc_auc_score  # slow import, only needed here

        pred, gt = np.asarray(pred) != 0, np.asarray(gt) != 0
        shape = (*pred.shape[:2], labels.NUM_CLASSES)
        if pred.shape != shape or gt.shape != shape:
            raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be [H, W, 6]")
        for c in range(labels.NUM_CLASSES):
            jaccard = thesis_jaccard(pred[..., c], gt[..., c])
            if not math.isnan(jaccard):
                self._jaccard[c].append(jaccard)
        if scores is not None:
            scores = np.asarray(scores)
            if scores.shape != shape:
                raise ValueError(f"scores {scores.shape} must be [H, W, 6] like pred {shape}")
            for c in range(labels.NUM_CLASSES):
                truth = gt[..., c].ravel()
                if truth.any() and not truth.all():
                    self._auc[c].append(float(roc_auc_score(truth, scores[..., c].ravel())))
        truth_cls = labels.label_from_structures(gt[..., 1:]).ravel()
        pred_cls = labels.label_from_structures(pred[..., 1:]).ravel()
        n = labels.NUM_CLASSES
        self.confusion_matrix += np.bincount(truth_cls * n + pred_cls, minlength=n * n).reshape(
            n, n
        )
        self.num_images += 1

    def finalize(self) -> dict[str, float]:
        """Returns `thesis_jaccard/<class>`, `thesis_auc/<class>` for the six classes, their
        `/mean` over the five structures and `/mean6` over all six, and
        `thesis_num_images/<class>` (images counted for the Jaccard). The confusion matrix is
        the attribute `confusion_matrix` (int64 [6, 6])."""
        out: dict[str, float] = {"num_images": float(self.num_images)}
        for metric, per_class in (("thesis_jaccard", self._jaccard), ("thesis_auc", self._auc)):
            means = [_mean_or_nan(v) for v in per_class]
            for name, value in zip(labels.CLASS_NAMES, means, strict=True):
                out[f"{metric}/{name}"] = value
            out[f"{metric}/mean"] = _nanmean(means[1:])
            out[f"{metric}/mean6"] = _nanmean(means)
        for name, values in zip(labels.CLASS_NAMES, self._jaccard, strict=True):
            out[f"thesis_num_images/{name}"] = float(len(values))
        return out


def eval_counts(
    pred: jax.Array, gt: jax.Array, valid: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Per-image confusion counts over valid pixels (pure jnp, jit-able).

    Args:
        pred: [B, H, W, K] binary predictions (bool or {0, 1}).
        gt: [B, H, W, K] binary ground truth.
        valid: [B, H, W] pixel mask (nonzero = real pixel), or None for all pixels.

    Returns:
        {'tp', 'fp', 'fn', 'tn'}: int32 [B, K] pixel counts.
    """
    pred = jnp.asarray(pred).astype(bool)
    gt = jnp.asarray(gt).astype(bool)
    if pred.shape != gt.shape or pred.ndim != 4:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be [B, H, W, K]")
    if valid is None:
        mask = jnp.ones(pred.shape[:3] + (1,), bool)
    else:
        mask = (jnp.asarray(valid) > 0)[..., None]

    def count(x):
        return jnp.sum(x & mask, axis=(1, 2), dtype=jnp.int32)

    return {
        "tp": count(pred & gt),
        "fp": count(pred & ~gt),
        "fn": count(~pred & gt),
        "tn": count(~pred & ~gt),
    }


def _host_counts(pred: np.ndarray, gt: np.ndarray) -> dict[str, np.ndarray]:
    """NumPy `eval_counts` of one [H, W, K] image (no device round trip), as int64 [K]."""
    pred, gt = pred.reshape(-1, pred.shape[-1]), gt.reshape(-1, gt.shape[-1])
    return {
        "tp": np.count_nonzero(pred & gt, axis=0),
        "fp": np.count_nonzero(pred & ~gt, axis=0),
        "fn": np.count_nonzero(~pred & gt, axis=0),
        "tn": np.count_nonzero(~pred & ~gt, axis=0),
    }


def isic2018_from_counts(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray, names: Sequence[str]
) -> dict:
    """The official ISIC 2018 Task 2 score from per-image counts.

    Args:
        tp, fp, fn, tn: [N, K] per-image, per-structure pixel counts (N images, K structures).
        names: K structure names (the result's keys).

    Returns:
        `{name: {'jaccard', 'dice'}, 'micro_average': {'jaccard', 'dice'}, 'overall'}`, as
        `isic_challenge_scoring.task2.score`.
    """
    counts = np.stack([np.asarray(x, np.float64) for x in (tp, fp, fn, tn)])  # [4, N, K]
    pixels = counts.sum(axis=0, keepdims=True)
    # Each (structure, image) confusion matrix is normalised by the image's pixel count.
    normalised = np.divide(counts, pixels, out=np.zeros_like(counts), where=pixels > 0)

    def scores(ntp, nfp, nfn):
        if ntp + nfp + nfn == 0:  # perfect on all-negative truth: the package scores 1
            return {"jaccard": 1.0, "dice": 1.0}
        return {
            "jaccard": float(ntp / (ntp + nfp + nfn)),
            "dice": float(2 * ntp / (2 * ntp + nfp + nfn)),
        }

    per_structure = normalised.sum(axis=1)  # [4, K]
    result: dict = {name: scores(*per_structure[:3, k]) for k, name in enumerate(names)}
    result["micro_average"] = scores(*normalised.sum(axis=(1, 2))[:3])
    result["overall"] = result["micro_average"]["jaccard"]
    return result


def isic2018_task2_score(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    names: Sequence[str] = labels.STRUCTURE_NAMES,
) -> dict:
    """The official ISIC 2018 Task 2 score of in-memory masks.

    Args:
        pairs: (truth, prediction) per image, each [H, W, K] (nonzero = positive); images
            may differ in size.
        names: K structure names.

    Returns:
        The package's nested dict, see `isic2018_from_counts`.
    """
    rows = []
    for i, (truth, pred) in enumerate(pairs):
        truth, pred = np.asarray(truth) != 0, np.asarray(pred) != 0
        if truth.shape != pred.shape or truth.ndim != 3 or truth.shape[-1] != len(names):
            raise ValueError(
                f"image {i}: truth {truth.shape} and prediction {pred.shape} must both be "
                f"[H, W, {len(names)}]"
            )
        rows.append(_host_counts(pred, truth))
    if not rows:
        raise ValueError("no image pairs to score")
    return isic2018_from_counts(*(np.stack([r[k] for r in rows]) for k in COUNT_KEYS), names)


def write_isic2018_masks(directory: str | pathlib.Path, image_id: str, structures) -> None:
    """Writes ISIC 2018 Task 2 files `<image_id>_attribute_<s>.png` (8-bit, 0/255).

    Args:
        directory: output folder (created).
        image_id: e.g. 'ISIC_0000000'.
        structures: [H, W, 5] binary masks in `labels.STRUCTURE_NAMES` order.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    structures = np.asarray(structures)
    for k, name in enumerate(labels.STRUCTURE_NAMES):
        mask = np.where(structures[..., k] != 0, 255, 0).astype(np.uint8)
        path = directory / f"{image_id}_attribute_{name}.png"
        if not cv2.imwrite(str(path), mask):
            raise OSError(f"could not write {path}")


def _parse_isic_name(path: pathlib.Path) -> tuple[str, str]:
    image_id = _ISIC_ID_RE.search(path.stem)
    attribute = _ATTRIBUTE_RE.search(path.stem)
    if not image_id or not attribute:
        raise ValueError(f"{path}: expected a name like ISIC_0000000_attribute_<structure>.png")
    return image_id.group(0), attribute.group(1)


def _read_mask(path: pathlib.Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: could not decode the image")
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(
            f"{path}: expected an 8-bit single-channel mask, got shape {image.shape} "
            f"dtype {image.dtype}"
        )
    return image


def score_isic2018_dirs(truth_dir: str | pathlib.Path, pred_dir: str | pathlib.Path) -> dict:
    """The official ISIC 2018 Task 2 score of two folders of PNG masks.

    Every truth file `ISIC_<id>_attribute_<name>.png` needs exactly one prediction file with
    the same id and attribute; both are binarised at > 128 (so 0/1 masks score as empty),
    as `isic_challenge_scoring.task2.score`. Only the attributes present in `truth_dir` are
    scored.

    Args:
        truth_dir: folder of ground-truth masks.
        pred_dir: folder of predicted masks.

    Returns:
        The package's nested dict, see `isic2018_from_counts`.
    """
    truth_dir, pred_dir = pathlib.Path(truth_dir), pathlib.Path(pred_dir)
    predictions: dict[tuple[str, str], pathlib.Path] = {}
    for path in sorted(pred_dir.iterdir()):
        if path.name in _IGNORED_FILES:
            continue
        key = _parse_isic_name(path)
        if key in predictions:
            raise ValueError(f"{path}: a second prediction for {key} (also {predictions[key]})")
        predictions[key] = path
    counts: dict[str, list[dict[str, np.ndarray]]] = {}
    # Names are checked for the whole folder before any image is read.
    truths = [
        (path, _parse_isic_name(path))
        for path in sorted(truth_dir.iterdir())
        if path.name not in _IGNORED_FILES
    ]
    for path, key in truths:
        if key not in predictions:
            raise ValueError(f"{path}: no matching prediction in {pred_dir}")
        truth, pred = _read_mask(path), _read_mask(predictions[key])
        if truth.shape != pred.shape:
            raise ValueError(
                f"{predictions[key]}: shape {pred.shape} differs from the truth's {truth.shape}"
            )
        c = _host_counts((pred > 128)[..., None], (truth > 128)[..., None])
        counts.setdefault(key[1], []).append({k: v[0] for k, v in c.items()})
    if not counts:
        raise ValueError(f"{truth_dir}: no ground-truth masks")
    names = sorted(counts)
    # Attributes may have different image counts: pad with all-zero rows (they add nothing).
    n = max(len(v) for v in counts.values())
    arrays = {k: np.zeros((n, len(names))) for k in COUNT_KEYS}
    for j, name in enumerate(names):
        for i, row in enumerate(counts[name]):
            for k in COUNT_KEYS:
                arrays[k][i, j] = row[k]
    return isic2018_from_counts(*(arrays[k] for k in COUNT_KEYS), names)


def metrics_from_counts(
    tp: np.ndarray,
    fp: np.ndarray,
    fn: np.ndarray,
    tn: np.ndarray,
    names: Sequence[str] = labels.STRUCTURE_NAMES,
) -> dict[str, float]:
    """All `SegmentationMetrics` keys (module docstring) from per-image counts [N, K]."""
    tp, fp, fn, tn = (np.asarray(x, np.float64) for x in (tp, fp, fn, tn))
    union = tp + fp + fn
    counted = union > 0
    out: dict[str, float] = {"num_images": float(tp.shape[0])}
    per_image = {
        "jaccard": tp / (union + 1),
        "image_jaccard": _safe_ratio(tp, union),
        "image_dice": _safe_ratio(2 * tp, 2 * tp + fp + fn),
    }
    for metric, values in per_image.items():
        means = [_mean_or_nan(values[counted[:, k], k]) for k in range(len(names))]
        out.update({f"{metric}/{name}": m for name, m in zip(names, means, strict=True)})
        out[f"{metric}/mean"] = _nanmean(means)
    stp, sfp, sfn = tp.sum(0), fp.sum(0), fn.sum(0)
    micro = {
        "micro_jaccard": (stp, stp + sfp + sfn),
        "micro_dice": (2 * stp, 2 * stp + sfp + sfn),
    }
    for metric, (num, den) in micro.items():
        values = [float(v) for v in _safe_ratio(num, den)]
        out.update({f"{metric}/{name}": v for name, v in zip(names, values, strict=True)})
        out[f"{metric}/mean"] = _nanmean(values)
        out[f"{metric}/pooled"] = float(_safe_ratio(num.sum(), den.sum()))
    # With no image the package would fail; NaN rather than its all-negative "perfect" 1.0.
    isic = isic2018_from_counts(tp, fp, fn, tn, names) if tp.shape[0] else None
    for name in names:
        out[f"isic2018/jaccard/{name}"] = isic[name]["jaccard"] if isic else math.nan
        out[f"isic2018/dice/{name}"] = isic[name]["dice"] if isic else math.nan
    out["isic2018/overall"] = isic["overall"] if isic else math.nan
    out["isic2018/micro_average_dice"] = isic["micro_average"]["dice"] if isic else math.nan
    return out


class SegmentationMetrics:
    """Host-side accumulator of per-image counts from `eval_counts`; `finalize()` divides once.

    Images flagged invalid (batch padding), and images without a single valid pixel, are
    dropped, so every real image counts exactly once.
    """

    def __init__(self, names: Sequence[str] = labels.STRUCTURE_NAMES) -> None:
        self.names = tuple(names)
        self._counts: dict[str, list[np.ndarray]] = {k: [] for k in COUNT_KEYS}

    def update(self, counts: Mapping[str, jax.Array], image_valid=None) -> None:
        """Adds a batch of per-image counts.

        Args:
            counts: {'tp', 'fp', 'fn', 'tn'}: [B, K] counts (`eval_counts`' output).
            image_valid: [B] flags (nonzero = a real image), or None for all.
        """
        arrays = {k: np.asarray(jax.device_get(counts[k]), np.int64) for k in COUNT_KEYS}
        shape = arrays["tp"].shape
        if any(a.shape != shape for a in arrays.values()) or shape[1:] != (len(self.names),):
            raise ValueError(
                f"counts must all be [B, {len(self.names)}], got "
                f"{ {k: a.shape for k, a in arrays.items()} }"
            )
        keep = sum(arrays.values()).sum(axis=1) > 0
        if image_valid is not None:
            image_valid = np.asarray(image_valid).reshape(-1)
            if image_valid.shape != shape[:1]:
                raise ValueError(f"image_valid {image_valid.shape} must be [{shape[0]}]")
            keep &= image_valid > 0
        for k in COUNT_KEYS:
            self._counts[k].append(arrays[k][keep])

    @property
    def num_images(self) -> int:
        return int(sum(len(a) for a in self._counts["tp"]))

    def finalize(self) -> dict[str, float]:
        """Returns the metrics named in the module docstring (NaN where undefined)."""
        empty = np.zeros((0, len(self.names)), np.int64)
        arrays = [np.concatenate([empty, *self._counts[k]]) for k in COUNT_KEYS]
        return metrics_from_counts(*arrays, names=self.names)
