"""The project's label convention: class names, channel order and the softmax target.

Per image the project holds `structures` (uint8 [H, W, 5], multi-label, ISIC 2018 structures may
overlap) and `lesion` (uint8 [H, W]). The thesis' exclusive labels (`smgt`, 0..6) map onto them
with `structures_from_thesis_labels`. The softmax head's target is `label_from_structures`.
"""

import numpy as np

STRUCTURE_NAMES = (
    "milia_like_cyst",
    "negative_network",
    "pigment_network",
    "streaks",
    "globules",
)
# The six channels of the softmax head: "others" (lesion or skin without structure) + structures.
CLASS_NAMES = ("others",) + STRUCTURE_NAMES
NUM_STRUCTURES = len(STRUCTURE_NAMES)
NUM_CLASSES = len(CLASS_NAMES)


def structures_from_thesis_labels(smgt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Splits thesis labels (0 outside, 1 lesion, 2..6 structures) into structures and lesion.

    Args:
        smgt: integer [H, W] array with values in 0..6.

    Returns:
        (structures uint8 [H, W, 5], lesion uint8 [H, W]).
    """
    smgt = np.asarray(smgt)
    structures = np.stack([smgt == k + 2 for k in range(NUM_STRUCTURES)], axis=-1)
    return structures.astype(np.uint8), (smgt > 0).astype(np.uint8)


def label_from_structures(structures):
    """The softmax target: 0 where no structure is present, else 1 + first structure present.

    This is `argmax([0, s_1, ..., s_5])`, which equals the thesis' target (argmax of a one-hot
    that is all zero outside structures) on exclusive labels. Works on numpy, jax and tf arrays
    that support `argmax` via numpy semantics; for tf use `pipeline`'s own op.

    Args:
        structures: [..., 5] array in {0, 1}.

    Returns:
        int32 [...] array in 0..5.
    """
    structures = np.asarray(structures)
    padded = np.concatenate([np.zeros_like(structures[..., :1]), structures], axis=-1)
    return np.argmax(padded, axis=-1).astype(np.int32)
