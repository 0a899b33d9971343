"""Host-side post-processing: scores -> binary structure masks (NumPy / OpenCV).

The thesis' rule (SEED_SPEC "Post-processing and metrics"): argmax over the six softmax
channels, one-hot, multiplied by the lesion mask, then per channel a morphological opening
(erode, then dilate; square kernel; one iteration) with the sizes `THESIS_OPENING_SIZES_6`.
A kernel size of 1 leaves a channel unchanged. For the sigmoid head, per-structure thresholds
replace the argmax.

Channel order is `labels.CLASS_NAMES` (6 channels) / `labels.STRUCTURE_NAMES` (5 channels).
"""

from collections.abc import Sequence

import cv2
import numpy as np

from dermseg_jax import labels

# Opening kernel sizes for [others, cysts, neg. net, pig. net, streaks, globules] (the thesis).
THESIS_OPENING_SIZES_6 = (1, 21, 21, 15, 5, 15)
# The same for the five structures only.
THESIS_OPENING_SIZES = THESIS_OPENING_SIZES_6[1:]


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
        if size == 1:
            continue
        kernel = np.ones((size, size), np.uint8)
        out[..., channel] = cv2.morphologyEx(
            np.ascontiguousarray(out[..., channel]), cv2.MORPH_OPEN, kernel
        )
    return out


def _lesion_2d(lesion: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    if lesion is None:
        return None
    lesion = np.asarray(lesion)
    if lesion.ndim == 3 and lesion.shape[-1] == 1:
        lesion = lesion[..., 0]
    if lesion.shape != shape:
        raise ValueError(f"lesion mask shape {lesion.shape} does not match the image {shape}")
    return (lesion != 0).astype(np.uint8)


def _map_images(fn, scores: np.ndarray, lesion: np.ndarray | None) -> np.ndarray:
    """Applies a per-image fn to [H, W, C] or, image by image, to [B, H, W, C]."""
    if scores.ndim == 3:
        return fn(scores, lesion)
    if scores.ndim == 4:
        lesions = [None] * len(scores) if lesion is None else lesion
        return np.stack([fn(s, m) for s, m in zip(scores, lesions, strict=True)])
    raise ValueError(f"scores must be [H, W, C] or [B, H, W, C], got shape {scores.shape}")


def predict_classes_softmax(
    scores: np.ndarray,
    lesion: np.ndarray | None = None,
    opening: Sequence[int] | None = THESIS_OPENING_SIZES_6,
) -> np.ndarray:
    """The thesis' six-channel prediction: argmax -> one-hot -> x lesion -> opening.

    Args:
        scores: [H, W, 6] (or [B, H, W, 6]) softmax probabilities or logits (same argmax).
        lesion: [H, W] (or [H, W, 1], or batched) lesion mask in {0, 1}, or None.
        opening: six kernel sizes (thesis `THESIS_OPENING_SIZES_6`), or None for no opening.

    Returns:
        uint8 [H, W, 6] (or [B, H, W, 6]) in {0, 1}; at most one channel set per pixel, none
        outside the lesion or where the opening removed the pixel.
    """
    scores = np.asarray(scores)

    def one_image(s, m):
        num_classes = s.shape[-1]
        one_hot = np.eye(num_classes, dtype=np.uint8)[np.argmax(s, axis=-1)]
        m = _lesion_2d(m, s.shape[:2])
        if m is not None:
            one_hot *= m[..., None]
        if opening is not None:
            one_hot = morphological_opening(one_hot, opening)
        return one_hot

    return _map_images(one_image, scores, lesion)


def predict_masks_softmax(
    scores: np.ndarray,
    lesion: np.ndarray | None = None,
    opening: Sequence[int] | None = THESIS_OPENING_SIZES,
) -> np.ndarray:
    """Structure masks from the softmax head (the thesis' rule, "others" dropped).

    Args:
        scores: [H, W, 6] (or [B, H, W, 6]) softmax probabilities or logits.
        lesion: [H, W] (or [H, W, 1], or batched) lesion mask in {0, 1}, or None.
        opening: five kernel sizes for the structures (thesis `THESIS_OPENING_SIZES`), or None.

    Returns:
        uint8 [H, W, 5] (or [B, H, W, 5]) structures in {0, 1}.
    """
    scores = np.asarray(scores)
    if scores.shape[-1] != labels.NUM_CLASSES:
        raise ValueError(f"softmax scores need {labels.NUM_CLASSES} channels, got {scores.shape}")
    opening6 = None if opening is None else (1, *opening)
    return predict_classes_softmax(scores, lesion, opening6)[..., 1:]


def predict_masks_sigmoid(
    probs: np.ndarray,
    thresholds: float | Sequence[float] = 0.5,
    lesion: np.ndarray | None = None,
    opening: Sequence[int] | None = THESIS_OPENING_SIZES,
    from_logits: bool = False,
) -> np.ndarray:
    """Structure masks from the sigmoid head: probability > threshold -> x lesion -> opening.

    Args:
        probs: [H, W, 5] (or [B, H, W, 5]) probabilities, or logits with `from_logits=True`.
        thresholds: one threshold or five (per structure), on probabilities.
        lesion: [H, W] (or [H, W, 1], or batched) lesion mask in {0, 1}, or None.
        opening: five kernel sizes, or None for no opening.
        from_logits: apply the sigmoid first.

    Returns:
        uint8 [H, W, 5] (or [B, H, W, 5]) structures in {0, 1}.
    """
    probs = np.asarray(probs, np.float64)
    if probs.shape[-1] != labels.NUM_STRUCTURES:
        raise ValueError(
            f"sigmoid scores need {labels.NUM_STRUCTURES} channels, got shape {probs.shape}"
        )
    if from_logits:
        probs = 1.0 / (1.0 + np.exp(-probs))
    thresholds = np.broadcast_to(np.asarray(thresholds, np.float64), (labels.NUM_STRUCTURES,))

    def one_image(p, m):
        masks = (p > thresholds).astype(np.uint8)
        m = _lesion_2d(m, p.shape[:2])
        if m is not None:
            masks *= m[..., None]
        if opening is not None:
            masks = morphological_opening(masks, opening)
        return masks

    return _map_images(one_image, probs, lesion)
