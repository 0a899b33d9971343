"""The one mask decision: network scores -> binary masks, on the host (NumPy / OpenCV).

Every path from scores to masks goes through `decide_masks`: both heads, both evaluation
protocols (`evaluator.Evaluator`, used by training and `evaluate`) and `predict` (through
`inference.full_size_masks`), so evaluate and predict write exactly the same masks.

A presence gate (`dermseg_jax.presence`, sigmoid head) empties a structure's channel before
anything else when the image's presence probability is below its cut-off.

The thesis' rule (SEED_SPEC "Post-processing and metrics"): argmax over the six softmax
channels, one-hot, multiplied by the lesion mask, then per channel a morphological opening
(erode, then dilate; square kernel; one iteration) with `THESIS_OPENING_SIZES`. The sigmoid
head replaces the argmax by per-structure thresholds. Channel order: `labels.CLASS_NAMES`.
"""

from collections.abc import Sequence

import cv2
import numpy as np

from dermseg_jax import labels, presence

# Opening kernel sizes for [cysts, neg. net, pig. net, streaks, globules] (the thesis; its
# "others" channel has size 1, i.e. it is never opened).
THESIS_OPENING_SIZES = (21, 21, 15, 5, 15)
HEADS = ("softmax", "sigmoid")


def morphological_opening(masks: np.ndarray, kernel_sizes: Sequence[int]) -> np.ndarray:
    """Per-channel opening (erode then dilate, square kernel, one iteration).

    Pixels outside the image do not erode the mask (OpenCV's default border), so a structure
    touching the image edge is kept like one inside it.

    Args:
        masks: [H, W, K] binary masks (bool or integers in {0, 1}).
        kernel_sizes: K positive kernel sizes; 1 leaves the channel unchanged.

    Returns:
        uint8 [H, W, K] in {0, 1}.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [H, W, K], got shape {masks.shape}")
    if len(kernel_sizes) != masks.shape[-1]:
        raise ValueError(
            f"need one kernel size per channel: {len(kernel_sizes)} sizes for "
            f"{masks.shape[-1]} channels"
        )
    out = (masks != 0).astype(np.uint8)
    for channel, size in enumerate(kernel_sizes):
        size = int(size)
        if size < 1:
            raise ValueError(f"kernel sizes must be >= 1, got {size} for channel {channel}")
        if size > 1:
            kernel = np.ones((size, size), np.uint8)
            out[..., channel] = cv2.morphologyEx(
                np.ascontiguousarray(out[..., channel]), cv2.MORPH_OPEN, kernel
            )
    return out


def _decide_softmax(scores: np.ndarray, notebook_one_hot: bool) -> np.ndarray:
    if scores.shape[-1] != labels.NUM_CLASSES:
        raise ValueError(f"softmax scores need {labels.NUM_CLASSES} channels, got {scores.shape}")
    one_hot = np.eye(labels.NUM_CLASSES, dtype=np.uint8)[np.argmax(scores, axis=-1)]
    if notebook_one_hot:
        # Thesis defect 6: a one-hot for labels 1..6 applied to classes 0..5.
        one_hot = np.concatenate([one_hot[..., 1:], np.zeros_like(one_hot[..., :1])], axis=-1)
    return one_hot


def _decide_sigmoid(probs: np.ndarray, threshold: float | Sequence[float]) -> np.ndarray:
    if probs.shape[-1] != labels.NUM_STRUCTURES:
        raise ValueError(
            f"sigmoid probabilities need {labels.NUM_STRUCTURES} channels, got {probs.shape}"
        )
    thresholds = np.broadcast_to(np.asarray(threshold, np.float32), (labels.NUM_STRUCTURES,))
    if probs.dtype == np.uint8:
        thresholds = thresholds * 255.0
    # Compared in the input's dtype: a full-size uint8 map stays at one byte per pixel.
    structures = (probs > thresholds).astype(np.uint8)
    return np.concatenate([np.zeros_like(structures[..., :1]), structures], axis=-1)


def decide_masks(
    scores: np.ndarray,
    *,
    head: str,
    threshold: float | Sequence[float] = 0.5,
    opening_sizes: Sequence[int] | None = None,
    lesion: np.ndarray | None = None,
    notebook_one_hot: bool = False,
    presence_probs: Sequence[float] | None = None,
    presence_threshold: Sequence[float] | None = None,
) -> np.ndarray:
    """The mask decision of one image: decide per pixel, keep inside the lesion, open.

    Args:
        scores: [H, W, C] probabilities, float in [0, 1] or uint8 in 0..255. Softmax (C = 6):
            the argmax class (logits give the same); sigmoid (C = 5): probability > threshold.
        head: 'softmax' or 'sigmoid'.
        threshold: sigmoid threshold(s) in [0, 1], one or one per structure.
        opening_sizes: 5 kernel sizes for the structures, in pixels of `scores` ("others" is
            never opened); None = no opening.
        lesion: [H, W] (or [H, W, 1]) mask; every channel is kept only inside it. None = all.
        notebook_one_hot: thesis defect 6 (softmax only): the argmax one-hot encoded as the
            notebook's Jaccard code does, for labels 1..6: class c lands in channel c - 1 and
            class 0 in none.
        presence_probs: sigmoid head with a presence head: the image's 5 presence
            probabilities; with `presence_threshold` (5 cut-offs) structure k is emptied when
            its presence is below its cut-off. Either None = no gate.

    Returns:
        uint8 [H, W, 6] in {0, 1}: channel 0 "others" (softmax: argmax 0; sigmoid: no
        structure decided), channels 1..5 the structures; `[..., 1:]` are the structure masks.
    """
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"scores must be [H, W, C], got shape {scores.shape}")
    if head not in HEADS:
        raise ValueError(f"Unknown model head {head!r}; expected one of {HEADS}.")
    if notebook_one_hot and head != "softmax":
        raise ValueError("The notebook's one-hot (thesis defect 6) needs the softmax head.")
    if head == "softmax":
        masks = _decide_softmax(scores, notebook_one_hot)
    else:
        masks = _decide_sigmoid(scores, threshold)
        masks[..., 1:] = presence.gate_masks(masks[..., 1:], presence_probs, presence_threshold)
    inside = None
    if lesion is not None:
        lesion = np.asarray(lesion)
        if lesion.shape not in (scores.shape[:2], (*scores.shape[:2], 1)):
            raise ValueError(f"lesion mask {lesion.shape} does not match the image {scores.shape}")
        inside = (lesion.reshape(scores.shape[:2]) != 0).astype(np.uint8)
        masks *= inside[..., None]
    if opening_sizes is not None:
        masks = morphological_opening(masks, (1, *opening_sizes))
    if head == "sigmoid":
        # "Others": no structure left after the opening (inside the lesion, when given).
        masks[..., 0] = masks[..., 1:].max(axis=-1) == 0
        if inside is not None:
            masks[..., 0] *= inside
    return masks
