"""Per-structure sigmoid thresholds fitted to the official ISIC 2018 Task 2 (micro) score.

Why: the official score divides each image's counts by its pixel count and pools them over
images and structures, so every false positive on an image without the structure costs as much
as a miss; 0.5 is rarely the best cut-off for rare structures. The fit reads the VALIDATION
split only (`Evaluator.fit_thresholds` refuses any other), in one pass:

- `ScoreHistograms.add(scores, truth)`: per image and structure, histograms of the uint8
  full-size scores of the positive and the negative pixels, each divided by the image's pixel
  count (the official normalisation), summed over images.
- `fit(histograms)`: with candidate cut-offs between consecutive uint8 levels, a structure's
  normalised TP and FP at every cut-off are suffix sums of its histograms, and the micro score
  is sum_k TP_k / sum_k (P_k + FP_k) (P_k = TP_k + FN_k does not depend on the cut-off). That
  ratio is maximised exactly over all 256^5 combinations by Dinkelbach's iteration: for a trial
  score L, each structure independently maximises TP_k - L * FP_k; L becomes the new score,
  until it stops increasing. The fit sees the masks before any morphological opening
  (`eval.opening`, off by default): with an opening the fitted score is an estimate.
- `fit(histograms, gate=True)`: with a presence head (`dermseg_jax.presence`) each structure
  also chooses a presence cut-off g (images whose presence probability is below g contribute
  no positive pixels). Each image's histograms are kept, so a structure's options are all
  (g, cut-off) pairs, g = 0 (no gate) or between two validation images' presence values; the
  same Dinkelbach iteration maximises over them exactly.

The result is stored as `thresholds.json` in the run or model directory (`save`); `apply_fitted`
puts it into `config.eval.threshold` when `config.eval.fitted_thresholds` is true (default) and
the stored step matches the loaded checkpoint, so `evaluate` and `predict` use it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import ml_collections
import numpy as np

from dermseg_jax import labels
from dermseg_jax.errors import UserError

THRESHOLDS_FILE = "thresholds.json"
LEVELS = 256
# Cut-off b separates uint8 levels <= b from levels > b; the last one predicts nothing.
CANDIDATES = np.minimum((np.arange(LEVELS) + 0.5) / 255.0, 1.0)


class ScoreHistograms:
    """Normalised per-structure score histograms of positive and negative pixels.

    Attributes:
        positives, negatives: float64 [K, 256]; entry [k, v] sums, over images, the share of the
            image's pixels with score level v whose truth for structure k is 1 (resp. 0).
        per_image: (positives [K, 256], negatives [K, 256]) of every image, in order.
        presence: [K] presence probabilities of every image (presence head), else empty.
        num_images: images added.
    """

    def __init__(self, num_structures: int = labels.NUM_STRUCTURES) -> None:
        self.positives = np.zeros((num_structures, LEVELS), np.float64)
        self.negatives = np.zeros((num_structures, LEVELS), np.float64)
        self.per_image: list[tuple[np.ndarray, np.ndarray]] = []
        self.presence: list[np.ndarray] = []
        self.num_images = 0

    def add(self, scores: np.ndarray, truth: np.ndarray, presence=None) -> None:
        """Adds one image.

        Args:
            scores: uint8 [H, W, K] probabilities scaled to 0..255 (`restore_probabilities`).
            truth: [H, W, K] binary ground truth (nonzero = positive).
            presence: [K] presence probabilities of the image (presence head), or None; give
                it for every image or for none.
        """
        scores, truth = np.asarray(scores), np.asarray(truth)
        if scores.dtype != np.uint8 or scores.shape != truth.shape or scores.ndim != 3:
            raise ValueError(
                f"need uint8 scores and truth of one shape [H, W, K]: {scores.dtype} "
                f"{scores.shape} vs {truth.shape}"
            )
        if scores.shape[-1] != self.positives.shape[0]:
            raise ValueError(f"need {self.positives.shape[0]} structures, got {scores.shape}")
        if (presence is None) != (len(self.presence) == 0) and self.num_images:
            raise ValueError("give presence for every image or for none")
        pixels = scores.shape[0] * scores.shape[1]
        positives, negatives = np.zeros_like(self.positives), np.zeros_like(self.negatives)
        for k in range(scores.shape[-1]):
            index = scores[..., k].ravel().astype(np.int32)
            index += LEVELS * (truth[..., k].ravel() != 0)
            both = np.bincount(index, minlength=2 * LEVELS) / pixels
            negatives[k], positives[k] = both[:LEVELS], both[LEVELS:]
        self.positives += positives
        self.negatives += negatives
        self.per_image.append((positives, negatives))
        if presence is not None:
            self.presence.append(np.asarray(presence, np.float64).reshape(-1))
        self.num_images += 1

    def counts_at(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(TP [K, 256], FP [K, 256], P [K]) normalised, for cut-off index b: levels > b."""
        tp, fp = _above(self.positives), _above(self.negatives)
        return tp, fp, self.positives.sum(axis=1)


def _above(histogram: np.ndarray) -> np.ndarray:
    """[..., 256] histogram -> [..., 256] sums over the levels > b, for every cut-off index b."""
    suffix = np.cumsum(histogram[..., ::-1], axis=-1)[..., ::-1]
    # Levels > b: shift the suffix sums by one, nothing above the last level.
    return np.concatenate([suffix[..., 1:], np.zeros_like(suffix[..., :1])], axis=-1)


@dataclasses.dataclass(frozen=True)
class FittedThresholds:
    """Fitted cut-offs and the official micro score they reach on the fitting split.

    Attributes:
        thresholds: K thresholds in [0, 1] (`eval.threshold`: a pixel is positive if > it).
        score: the official micro score at `thresholds` (from the histograms).
        score_at_half: the same with every threshold 0.5, for comparison.
        num_images: images the fit saw.
        presence_thresholds: K presence cut-offs (0 = no gate for that structure), or None when
            no gate was fitted.
    """

    thresholds: tuple[float, ...]
    score: float
    score_at_half: float
    num_images: int
    presence_thresholds: tuple[float, ...] | None = None


def check_fitting_split(split: str) -> None:
    """Raises UserError unless `split` is 'validation' (fitting on test would leak it)."""
    if split != "validation":
        raise UserError(
            f"--split={split}: thresholds are fitted on the validation split only",
            hint="--split=validation",
        )


def micro_score(histograms: ScoreHistograms, indices: np.ndarray) -> float:
    """The official micro score with cut-off index `indices[k]` for structure k."""
    tp, fp, positives = histograms.counts_at()
    rows = np.arange(len(indices))
    num = tp[rows, indices].sum()
    den = positives.sum() + fp[rows, indices].sum()
    return float(num / den) if den > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class _Options:
    """One structure's choices: normalised TP and FP of each, its cut-off index and gate."""

    tp: np.ndarray  # [M]
    fp: np.ndarray  # [M]
    cutoff: np.ndarray  # [M] index into CANDIDATES
    gate: np.ndarray  # [M] presence cut-off (0 = no gate)
    cost: np.ndarray  # [M] tie-break: prefer no gate, then the cut-off closest to 0.5


def _gate_candidates(presence: np.ndarray) -> np.ndarray:
    """0 (no gate), then midpoints between consecutive distinct presence values."""
    values = np.unique(presence)
    return np.concatenate([[0.0], (values[1:] + values[:-1]) / 2.0])


def _structure_options(histograms: ScoreHistograms, k: int, gate: bool) -> _Options:
    cutoffs = np.arange(LEVELS)
    half_distance = np.abs(CANDIDATES - 0.5)
    if not gate:
        tp, fp = _above(histograms.positives[k]), _above(histograms.negatives[k])
        return _Options(tp, fp, cutoffs, np.zeros(LEVELS), half_distance)
    presence = np.stack(histograms.presence)[:, k]
    positives = np.stack([p[k] for p, _ in histograms.per_image])
    negatives = np.stack([n[k] for _, n in histograms.per_image])
    gates = _gate_candidates(presence)
    kept = (presence[None, :] >= gates[:, None]).astype(np.float64)  # [G, N]
    tp, fp = _above(kept @ positives), _above(kept @ negatives)  # [G, 256]
    cost = half_distance[None, :] + (gates > 0)[:, None] * 1.0
    return _Options(
        tp.ravel(),
        fp.ravel(),
        np.tile(cutoffs, len(gates)),
        np.repeat(gates, LEVELS),
        cost.ravel(),
    )


def _best(objective: np.ndarray, cost: np.ndarray) -> int:
    """The maximising option; among ties the one of least cost."""
    best = objective.max()
    ties = objective >= best - 1e-12 * max(abs(best), 1.0)
    return int(np.argmin(np.where(ties, cost, np.inf)))


def _score(options: list[_Options], choice: list[int], positives: float) -> float:
    num = sum(o.tp[i] for o, i in zip(options, choice, strict=True))
    den = positives + sum(o.fp[i] for o, i in zip(options, choice, strict=True))
    return float(num / den) if den > 0 else 1.0


def fit(
    histograms: ScoreHistograms, *, gate: bool = False, max_iterations: int = 100
) -> FittedThresholds:
    """Thresholds (and presence cut-offs) maximising the official micro score (Dinkelbach).

    Args:
        histograms: accumulated on the validation split.
        gate: also fit a presence cut-off per structure (needs `presence` for every image).
        max_iterations: bound on the iterations (they converge in a handful).

    Returns:
        The `FittedThresholds`.
    """
    if histograms.num_images == 0:
        raise ValueError("no image to fit thresholds on")
    if gate and len(histograms.presence) != histograms.num_images:
        raise ValueError("fitting a presence gate needs the presence of every image")
    num_structures = histograms.positives.shape[0]
    options = [_structure_options(histograms, k, gate) for k in range(num_structures)]
    positives = float(histograms.positives.sum())
    choice = [_best(o.tp, o.cost) for o in options]  # trial score 0: maximise TP alone
    score = _score(options, choice, positives)
    for _ in range(max_iterations):
        candidate = [_best(o.tp - score * o.fp, o.cost) for o in options]
        new_score = _score(options, candidate, positives)
        if new_score <= score + 1e-15:
            break
        choice, score = candidate, new_score
    half = np.full(num_structures, int(np.searchsorted(CANDIDATES, 0.5)))
    return FittedThresholds(
        thresholds=tuple(
            float(CANDIDATES[o.cutoff[i]]) for o, i in zip(options, choice, strict=True)
        ),
        score=score,
        score_at_half=micro_score(histograms, half),
        num_images=histograms.num_images,
        presence_thresholds=(
            tuple(float(o.gate[i]) for o, i in zip(options, choice, strict=True)) if gate else None
        ),
    )


def save(directory: str | os.PathLike, fitted: FittedThresholds, *, step: int | None) -> str:
    """Writes `directory/thresholds.json` (thresholds by structure, step, scores); its path."""
    path = os.path.join(os.fspath(directory), THRESHOLDS_FILE)
    record = {
        "thresholds": list(fitted.thresholds),
        "structures": list(labels.STRUCTURE_NAMES),
        "split": "validation",
        "step": step,
        "isic2018/overall": fitted.score,
        "isic2018/overall_at_0.5": fitted.score_at_half,
        "num_images": fitted.num_images,
        "presence_thresholds": (
            None if fitted.presence_thresholds is None else list(fitted.presence_thresholds)
        ),
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path


def load(directory: str | os.PathLike) -> dict | None:
    """The content of `directory/thresholds.json`, or None when there is none."""
    path = os.path.join(os.fspath(directory), THRESHOLDS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def apply_fitted(config, directory: str | os.PathLike, step: int | None) -> bool:
    """Sets `config.eval.threshold` (and `presence_threshold`, when fitted) from
    `directory/thresholds.json` when it applies.

    It applies when `config.eval.fitted_thresholds` is true (default), the model head is
    sigmoid, and the file was fitted for `step` (the loaded checkpoint; None = model directory).

    Returns:
        Whether the fitted thresholds were applied.
    """
    record = load(directory)
    if record is None or not config.eval.get("fitted_thresholds", True):
        return False
    if config.model.get("head") != "sigmoid":
        return False
    if record.get("step") != step:
        logging.warning(
            "%s was fitted for step %s, not the loaded step %s: using eval.threshold",
            os.path.join(os.fspath(directory), THRESHOLDS_FILE),
            record.get("step"),
            step,
        )
        return False
    fitted = {"threshold": tuple(float(t) for t in record["thresholds"])}
    if record.get("presence_thresholds") is not None:
        fitted["presence_threshold"] = tuple(float(t) for t in record["presence_thresholds"])
    # A new section: the config's `threshold` field may be typed float.
    config.eval = ml_collections.ConfigDict({**config.eval.to_dict(), **fitted})
    return True
