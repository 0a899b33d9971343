"""The presence gate: an image-level "is structure k in this image" output and its use.

Why: the official ISIC 2018 score adds each image's false positives normalised by its area, so
a few stray pixels of a rare structure (streaks are in 4 % of the images) on an image without
it cost as much as a missed structure. A per-pixel threshold cannot tell "faint" from "absent";
a decision per image can. With `model.presence_head` the network also returns one logit per
structure from its pooled bottleneck (`models.unet.PresenceHead`), trained with BCE on
"present in the training crop" (`presence_targets`, `presence_loss`). At inference a
structure's mask is emptied when its presence probability is below `eval.presence_threshold`
(`postprocess.decide_masks(presence=...)`); `thresholds.fit(..., gate=True)` fits that cut-off
on the validation split together with the pixel thresholds. With tiles an image's presence is
the largest over its tiles (a structure is in the image if it is in any tile).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dermseg_jax import labels


def presence_targets(batch: Mapping[str, jax.Array]) -> jax.Array:
    """float32 [B, K]: 1 where structure k has a valid pixel in image b of the batch.

    Args:
        batch: `structures` [B, H, W, K] (nonzero = positive), optional `valid` [B, H, W].
    """
    positive = batch["structures"] != 0
    if batch.get("valid") is not None:
        positive = positive & (batch["valid"][..., None] > 0)
    return jnp.any(positive, axis=(1, 2)).astype(jnp.float32)


def presence_loss(presence_logits: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean binary cross-entropy of the presence logits [B, K] against `presence_targets`."""
    targets = presence_targets(batch)
    logits = presence_logits.astype(jnp.float32)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets))


def check_thresholds(presence_threshold) -> tuple[float, ...] | None:
    """`eval.presence_threshold` as K floats in [0, 1], or None (no gate)."""
    if presence_threshold is None:
        return None
    values = np.broadcast_to(
        np.asarray(presence_threshold, np.float64), (labels.NUM_STRUCTURES,)
    ).copy()
    if not np.all((values >= 0.0) & (values <= 1.0)):
        raise ValueError(f"eval.presence_threshold must lie in [0, 1], got {presence_threshold}")
    return tuple(float(v) for v in values)


def gate_masks(
    masks: np.ndarray, presence: Sequence[float] | None, threshold: Sequence[float] | None
) -> np.ndarray:
    """Empties structure channel k of [H, W, K] masks where presence[k] < threshold[k].

    Either argument None leaves the masks unchanged (no head, or no gate chosen).
    """
    if presence is None or threshold is None:
        return masks
    presence = np.asarray(presence, np.float64).reshape(-1)
    threshold = np.asarray(threshold, np.float64).reshape(-1)
    if presence.shape != (masks.shape[-1],) or threshold.shape != presence.shape:
        raise ValueError(
            f"need {masks.shape[-1]} presence values and thresholds, got {presence.shape}, "
            f"{threshold.shape}"
        )
    keep = (presence >= threshold).astype(masks.dtype)
    return masks * keep
