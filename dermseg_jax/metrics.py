"""Segmentation metrics: the thesis protocol, the official ISIC 2018 Task 2 score, micro and
per-image Jaccard / Dice, pooled-pixel ROC.

Everything runs on the host, image by image: `host_counts` turns one image's binary
prediction and truth into confusion counts `tp, fp, fn, tn` [K]; `SegmentationMetrics`
accumulates them and `finalize()` divides once (never averaging per-batch values). Its keys
(`<s>` = a structure name from `labels.STRUCTURE_NAMES`):

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
- `isic2018/jaccard/<s>`, `isic2018/dice/<s>`: the official ISIC 2018 Task 2 per-structure
  scores (`isic_challenge_scoring.task2.score`: per (structure, image) counts divided by the
  image's pixel count, summed over images; an all-zero `tp + fp + fn` scores 1.0, as the
  package does); `isic2018/overall`: the official overall score, the MICRO average (pooled
  over structures and images, not a mean of the five); `isic2018/macro`: the mean of the five
  per-structure official Jaccards; `isic2018/micro_average_dice`.
- `num_images`.

`isic2018_task2_score` returns the package's own nested dict (`{<s>: {'jaccard', 'dice'},
'micro_average': {'jaccard', 'dice'}, 'overall'}`); `submission.score_isic2018_dirs` scores
folders of PNG masks with it. `ThesisMetrics` reproduces the thesis' evaluation (Jaccard with
+1, per-image ROC AUC, 6x6 pixel confusion matrix of the raw argmax); `PooledRoc` gives
pooled-pixel ROC curves with bounded memory.
"""

import math
from collections.abc import Iterable, Sequence

import numpy as np

from dermseg_jax import labels

COUNT_KEYS = ("tp", "fp", "fn", "tn")
_ROC_BINS = 256


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

    Per channel: the thesis Jaccard (`thesis_jaccard`) of the post-processed prediction,
    averaged over the images where it counts; ROC AUC (`sklearn.metrics.roc_auc_score` of the
    channel's pixel scores) averaged over the images where the channel is present and not the
    whole image (AUC needs both classes); and, as the notebook, a 6x6 pixel confusion matrix of
    the RAW argmax of the scores (no lesion mask, no opening; rows: truth class by
    `labels.label_from_structures`, 0 = "others" or outside the lesion; columns: predicted
    class) summed over images.
    """

    def __init__(self) -> None:
        self._jaccard = [[] for _ in labels.CLASS_NAMES]
        self._auc = [[] for _ in labels.CLASS_NAMES]
        self.confusion_matrix = np.zeros((labels.NUM_CLASSES,) * 2, np.int64)
        self.num_images = 0

    def update(self, pred: np.ndarray, gt: np.ndarray, scores: np.ndarray) -> None:
        """Adds one image.

        Args:
            pred: [H, W, 6] post-processed prediction (`postprocess.decide_masks`).
            gt: [H, W, 6] ground truth in {0, 1} (`thesis_ground_truth`).
            scores: [H, W, 6] per-channel scores (the softmax's) for the AUC and the argmax.
        """
        from sklearn.metrics import roc_auc_score  # slow import, only needed here

        pred, gt, scores = np.asarray(pred) != 0, np.asarray(gt) != 0, np.asarray(scores)
        shape = (*pred.shape[:2], labels.NUM_CLASSES)
        if pred.shape != shape or gt.shape != shape or scores.shape != shape:
            raise ValueError(
                f"pred {pred.shape}, gt {gt.shape} and scores {scores.shape} must be [H, W, 6]"
            )
        for c in range(labels.NUM_CLASSES):
            jaccard = thesis_jaccard(pred[..., c], gt[..., c])
            if not math.isnan(jaccard):
                self._jaccard[c].append(jaccard)
            truth = gt[..., c].ravel()
            if truth.any() and not truth.all():
                self._auc[c].append(float(roc_auc_score(truth, scores[..., c].ravel())))
        n = labels.NUM_CLASSES
        cells = labels.label_from_structures(gt[..., 1:]) * n + np.argmax(scores, axis=-1)
        self.confusion_matrix += np.bincount(cells.ravel(), minlength=n * n).reshape(n, n)
        self.num_images += 1

    def finalize(self) -> dict[str, float]:
        """Returns `thesis/jaccard/<class>`, `thesis/auc/<class>` for the six classes, their
        `/mean` over the five structures and `/mean6` over all six, `thesis/num_images/<class>`
        (images counted for the Jaccard) and `thesis/num_images`. The confusion matrix is the
        attribute `confusion_matrix` (int64 [6, 6])."""
        out: dict[str, float] = {"thesis/num_images": float(self.num_images)}
        for metric, per_class in (("jaccard", self._jaccard), ("auc", self._auc)):
            means = [_mean_or_nan(v) for v in per_class]
            for name, value in zip(labels.CLASS_NAMES, means, strict=True):
                out[f"thesis/{metric}/{name}"] = value
            out[f"thesis/{metric}/mean"] = _nanmean(means[1:])
            out[f"thesis/{metric}/mean6"] = _nanmean(means)
        for name, values in zip(labels.CLASS_NAMES, self._jaccard, strict=True):
            out[f"thesis/num_images/{name}"] = float(len(values))
        return out


def host_counts(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Confusion counts of one image on the host (full-size masks never go to a device).

    Args:
        pred: [H, W, K] binary prediction (nonzero = positive).
        truth: [H, W, K] binary ground truth.

    Returns:
        {'tp', 'fp', 'fn', 'tn'}: int64 [K] pixel counts.
    """
    pred, truth = np.asarray(pred) != 0, np.asarray(truth) != 0
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} must both be [H, W, K]")
    pred, truth = pred.reshape(-1, pred.shape[-1]), truth.reshape(-1, truth.shape[-1])
    counts = {
        "tp": np.count_nonzero(pred & truth, axis=0),
        "fp": np.count_nonzero(pred & ~truth, axis=0),
        "fn": np.count_nonzero(~pred & truth, axis=0),
        "tn": np.count_nonzero(~pred & ~truth, axis=0),
    }
    return {k: v.astype(np.int64) for k, v in counts.items()}


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
        if np.shape(truth)[-1:] != (len(names),):
            raise ValueError(f"image {i}: truth {np.shape(truth)} must be [H, W, {len(names)}]")
        rows.append(host_counts(pred, truth))
    if not rows:
        raise ValueError("no image pairs to score")
    return isic2018_from_counts(*(np.stack([r[k] for r in rows]) for k in COUNT_KEYS), names)


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
    out["isic2018/macro"] = (
        float(np.mean([isic[name]["jaccard"] for name in names])) if isic else math.nan
    )
    out["isic2018/micro_average_dice"] = isic["micro_average"]["dice"] if isic else math.nan
    return out


class SegmentationMetrics:
    """Host-side accumulator of per-image counts; `finalize()` divides once."""

    def __init__(self, names: Sequence[str] = labels.STRUCTURE_NAMES) -> None:
        self.names = tuple(names)
        self._counts: dict[str, list[np.ndarray]] = {k: [] for k in COUNT_KEYS}

    def add(self, pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
        """Adds one image and returns its counts (`host_counts`).

        Args:
            pred: [H, W, K] binary prediction, K = len(names).
            truth: [H, W, K] binary ground truth.
        """
        if np.shape(pred)[-1:] != (len(self.names),):
            raise ValueError(f"prediction {np.shape(pred)} must be [H, W, {len(self.names)}]")
        counts = host_counts(pred, truth)
        for k in COUNT_KEYS:
            self._counts[k].append(counts[k])
        return counts

    @property
    def num_images(self) -> int:
        return len(self._counts["tp"])

    def finalize(self) -> dict[str, float]:
        """Returns the metrics named in the module docstring (NaN where undefined)."""
        empty = np.zeros((0, len(self.names)), np.int64)
        arrays = [np.stack(self._counts[k]) if self._counts[k] else empty for k in COUNT_KEYS]
        return metrics_from_counts(*arrays, names=self.names)


class PooledRoc:
    """Pooled-pixel ROC per structure from histograms of 8-bit scores (bounded memory)."""

    def __init__(self) -> None:
        self.pos = np.zeros((labels.NUM_STRUCTURES, _ROC_BINS), np.int64)
        self.neg = np.zeros((labels.NUM_STRUCTURES, _ROC_BINS), np.int64)

    def update(self, scores: np.ndarray, truth: np.ndarray) -> None:
        """Adds pixels: scores float [..., 5] in [0, 1]; truth [..., 5] in {0, 1}."""
        scores = np.asarray(scores).reshape(-1, labels.NUM_STRUCTURES)
        truth = np.asarray(truth).reshape(-1, labels.NUM_STRUCTURES)
        q = np.clip(np.rint(scores * (_ROC_BINS - 1)), 0, _ROC_BINS - 1).astype(np.int64)
        for k in range(labels.NUM_STRUCTURES):
            t = truth[:, k] > 0
            self.pos[k] += np.bincount(q[t, k], minlength=_ROC_BINS)
            self.neg[k] += np.bincount(q[~t, k], minlength=_ROC_BINS)

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
        """structure -> (fpr, tpr, AUC), for the structures with both classes present."""
        out = {}
        for k, name in enumerate(labels.STRUCTURE_NAMES):
            p, n = self.pos[k].sum(), self.neg[k].sum()
            if p == 0 or n == 0:
                continue
            # Thresholds from high to low: a pixel is positive when its bin >= threshold.
            tpr = np.concatenate([[0.0], np.cumsum(self.pos[k][::-1]) / p])
            fpr = np.concatenate([[0.0], np.cumsum(self.neg[k][::-1]) / n])
            out[name] = (fpr, tpr, float(np.trapezoid(tpr, fpr)))
        return out

    def finalize(self) -> dict[str, float]:
        """`roc_auc/<s>` (NaN where undefined) and `roc_auc/mean` over the defined ones."""
        curves = self.curves()
        aucs = {n: curves[n][2] if n in curves else math.nan for n in labels.STRUCTURE_NAMES}
        out = {f"roc_auc/{name}": auc for name, auc in aucs.items()}
        out["roc_auc/mean"] = _nanmean(list(aucs.values()))
        return out
