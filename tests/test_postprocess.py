"""Tests for dermseg_jax.postprocess on hand-made masks."""

import numpy as np
import pytest

from dermseg_jax import postprocess


def test_thesis_sizes():
    assert postprocess.THESIS_OPENING_SIZES_6 == (1, 21, 21, 15, 5, 15)
    assert postprocess.THESIS_OPENING_SIZES == (21, 21, 15, 5, 15)


def test_opening_removes_speck_and_keeps_big_square():
    mask = np.zeros((40, 40, 1), np.uint8)
    mask[3, 3] = 1  # a 1-pixel speck
    mask[10:30, 12:32] = 1  # a 20x20 square
    opened = postprocess.morphological_opening(mask, [5])
    expected = np.zeros_like(mask)
    expected[10:30, 12:32] = 1
    np.testing.assert_array_equal(opened, expected)
    assert opened.dtype == np.uint8


def test_opening_removes_thin_line_and_square_smaller_than_kernel():
    mask = np.zeros((30, 30, 2), np.uint8)
    mask[5, 2:28, 0] = 1  # 1-pixel-thick line
    mask[10:14, 10:14, 1] = 1  # 4x4 square, kernel 5
    opened = postprocess.morphological_opening(mask, [3, 5])
    assert opened.sum() == 0
    # Exactly the kernel size survives.
    mask[10:15, 10:15, 1] = 1
    assert postprocess.morphological_opening(mask, [3, 5])[..., 1].sum() == 25


def test_kernel_size_one_is_identity_and_per_channel():
    rng = np.random.default_rng(0)
    mask = (rng.random((16, 16, 2)) > 0.5).astype(np.uint8)
    opened = postprocess.morphological_opening(mask, [1, 3])
    np.testing.assert_array_equal(opened[..., 0], mask[..., 0])
    assert opened[..., 1].sum() < mask[..., 1].sum()


def test_opening_keeps_square_touching_border():
    mask = np.zeros((20, 20, 1), np.uint8)
    mask[0:6, 0:6] = 1
    np.testing.assert_array_equal(postprocess.morphological_opening(mask, [5]), mask)


def test_opening_rejects_bad_sizes():
    with pytest.raises(ValueError, match="one kernel size per channel"):
        postprocess.morphological_opening(np.zeros((4, 4, 2)), [3])
    with pytest.raises(ValueError, match=">= 1"):
        postprocess.morphological_opening(np.zeros((4, 4, 1)), [0])


def test_softmax_argmax_one_hot():
    scores = np.zeros((2, 3, 6), np.float32)
    scores[0, 0, 2] = 5
    scores[0, 1, 5] = 1
    scores[1, 2, 4] = 3
    classes = postprocess.predict_classes_softmax(scores, opening=None)
    expected_idx = np.argmax(scores, -1)
    np.testing.assert_array_equal(classes, np.eye(6, dtype=np.uint8)[expected_idx])
    structures = postprocess.predict_masks_softmax(scores, opening=None)
    assert structures.shape == (2, 3, 5) and structures.dtype == np.uint8
    assert structures[0, 0, 1] == 1 and structures[0, 1, 4] == 1 and structures[1, 2, 3] == 1
    assert structures.sum() == 3  # others (argmax 0) is not a structure


def test_softmax_lesion_restriction():
    scores = np.zeros((4, 4, 6), np.float32)
    scores[..., 3] = 1.0  # pigment network everywhere
    lesion = np.zeros((4, 4, 1), np.uint8)
    lesion[1:3, 1:3] = 1
    masks = postprocess.predict_masks_softmax(scores, lesion=lesion, opening=None)
    np.testing.assert_array_equal(masks[..., 2], lesion[..., 0])
    assert masks[..., [0, 1, 3, 4]].sum() == 0


def test_softmax_thesis_opening_per_class():
    # Channels: 0 others, 1 cysts (21), 2 neg. net (21), 3 pig. net (15), 4 streaks (5),
    # 5 globules (15); structure index = channel - 1.
    scores = np.zeros((64, 64, 6), np.float32)
    scores[..., 0] = 0.5
    scores[5:25, 5:25, 3] = 1.0  # 20x20 pigment network: kept by a 15x15 kernel
    scores[40:50, 40:50, 1] = 1.0  # 10x10 cysts: removed by 21x21
    scores[40:47, 5:12, 4] = 1.0  # 7x7 streaks: kept by 5x5
    scores[5:12, 40:47, 5] = 1.0  # 7x7 globules: removed by 15x15
    masks = postprocess.predict_masks_softmax(scores)
    assert masks[..., 0].sum() == 0
    assert masks[..., 1].sum() == 0
    assert masks[..., 2].sum() == 400 and masks[5:25, 5:25, 2].all()
    assert masks[..., 3].sum() == 49 and masks[40:47, 5:12, 3].all()
    assert masks[..., 4].sum() == 0
    # "others" has kernel 1: unchanged by the six-channel opening.
    classes = postprocess.predict_classes_softmax(scores)
    np.testing.assert_array_equal(classes[..., 0], np.argmax(scores, -1) == 0)


def test_batched_softmax_matches_per_image():
    rng = np.random.default_rng(1)
    scores = rng.random((3, 24, 24, 6))
    lesion = (rng.random((3, 24, 24)) > 0.2).astype(np.uint8)
    batched = postprocess.predict_masks_softmax(scores, lesion, opening=(3, 3, 3, 1, 3))
    for i in range(3):
        np.testing.assert_array_equal(
            batched[i], postprocess.predict_masks_softmax(scores[i], lesion[i], (3, 3, 3, 1, 3))
        )


def test_sigmoid_thresholds_lesion_and_logits():
    probs = np.zeros((4, 4, 5))
    probs[..., 0] = 0.6
    probs[..., 1] = 0.4
    probs[..., 2] = 0.9
    masks = postprocess.predict_masks_sigmoid(probs, [0.5, 0.3, 0.95, 0.5, 0.5], opening=None)
    assert masks[..., 0].all() and masks[..., 1].all()
    assert not masks[..., 2:].any()
    # Overlaps are allowed (multi-label).
    assert (masks.sum(-1) == 2).all()
    lesion = np.eye(4, dtype=np.uint8)
    restricted = postprocess.predict_masks_sigmoid(probs, 0.5, lesion=lesion, opening=None)
    np.testing.assert_array_equal(restricted[..., 0], lesion)
    logits = np.log(probs + 1e-9) - np.log(1 - probs + 1e-9)
    np.testing.assert_array_equal(
        postprocess.predict_masks_sigmoid(logits, 0.5, opening=None, from_logits=True),
        postprocess.predict_masks_sigmoid(probs, 0.5, opening=None),
    )


def test_channel_and_lesion_shape_errors():
    with pytest.raises(ValueError, match="6 channels"):
        postprocess.predict_masks_softmax(np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="5 channels"):
        postprocess.predict_masks_sigmoid(np.zeros((4, 4, 6)))
    with pytest.raises(ValueError, match="lesion mask shape"):
        postprocess.predict_masks_softmax(np.zeros((4, 4, 6)), lesion=np.ones((3, 4)))
