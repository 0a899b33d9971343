"""Tests for dermseg_jax.postprocess (the one mask decision) on hand-made masks."""

import numpy as np
import pytest

from dermseg_jax import postprocess


def test_thesis_sizes():
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


def _softmax(scores, **kwargs):
    return postprocess.decide_masks(scores, head="softmax", **kwargs)


def test_softmax_argmax_one_hot():
    scores = np.zeros((2, 3, 6), np.float32)
    scores[0, 0, 2] = 5
    scores[0, 1, 5] = 1
    scores[1, 2, 4] = 3
    classes = _softmax(scores)
    assert classes.shape == (2, 3, 6) and classes.dtype == np.uint8
    np.testing.assert_array_equal(classes, np.eye(6, dtype=np.uint8)[np.argmax(scores, -1)])
    structures = classes[..., 1:]
    assert structures[0, 0, 1] == 1 and structures[0, 1, 4] == 1 and structures[1, 2, 3] == 1
    assert structures.sum() == 3  # others (argmax 0) is not a structure
    # uint8 probabilities (full-size maps) decide the same.
    np.testing.assert_array_equal(_softmax((scores * 40).astype(np.uint8)), classes)


def test_notebook_one_hot_shifts_every_class_by_one_channel():
    # Thesis defect 6: class c lands in channel c - 1; class 0 ("others") in none.
    classes = np.arange(6).reshape(2, 3)
    scores = np.eye(6, dtype=np.float32)[classes]
    shifted = _softmax(scores, notebook_one_hot=True)
    expected = np.zeros((2, 3, 6), np.uint8)
    for c in range(1, 6):
        expected[classes == c, c - 1] = 1
    np.testing.assert_array_equal(shifted, expected)
    assert shifted[..., 5].sum() == 0 and shifted[0, 0].sum() == 0
    # The opening runs after the shift: cysts (class 1) now in channel 0 are never opened.
    scores = np.zeros((30, 30, 6), np.float32)
    scores[..., 0] = 0.5
    scores[10:20, 10:20, 1] = 1.0  # 10x10 cysts: removed by their own 21x21 kernel
    opened = _softmax(scores, opening_sizes=postprocess.THESIS_OPENING_SIZES)
    assert opened[..., 1].sum() == 0
    shifted = _softmax(
        scores, opening_sizes=postprocess.THESIS_OPENING_SIZES, notebook_one_hot=True
    )
    assert shifted[..., 0].sum() == 100 and shifted[..., 1:].sum() == 0
    with pytest.raises(ValueError, match="softmax head"):
        postprocess.decide_masks(scores[..., 1:], head="sigmoid", notebook_one_hot=True)


def test_lesion_restriction_both_heads():
    scores = np.zeros((4, 4, 6), np.float32)
    scores[..., 3] = 1.0  # pigment network everywhere
    lesion = np.zeros((4, 4, 1), np.uint8)
    lesion[1:3, 1:3] = 1
    masks = _softmax(scores, lesion=lesion)
    np.testing.assert_array_equal(masks[..., 3], lesion[..., 0])
    assert masks[..., [0, 1, 2, 4, 5]].sum() == 0
    sigmoid = postprocess.decide_masks(scores[..., 1:], head="sigmoid", lesion=lesion[..., 0])
    np.testing.assert_array_equal(sigmoid, masks)


def test_softmax_thesis_opening_per_class():
    # Channels: 0 others, 1 cysts (21), 2 neg. net (21), 3 pig. net (15), 4 streaks (5),
    # 5 globules (15).
    scores = np.zeros((64, 64, 6), np.float32)
    scores[..., 0] = 0.5
    scores[5:25, 5:25, 3] = 1.0  # 20x20 pigment network: kept by a 15x15 kernel
    scores[40:50, 40:50, 1] = 1.0  # 10x10 cysts: removed by 21x21
    scores[40:47, 5:12, 4] = 1.0  # 7x7 streaks: kept by 5x5
    scores[5:12, 40:47, 5] = 1.0  # 7x7 globules: removed by 15x15
    masks = _softmax(scores, opening_sizes=postprocess.THESIS_OPENING_SIZES)
    assert masks[..., 1].sum() == 0 and masks[..., 2].sum() == 0
    assert masks[..., 3].sum() == 400 and masks[5:25, 5:25, 3].all()
    assert masks[..., 4].sum() == 49 and masks[40:47, 5:12, 4].all()
    assert masks[..., 5].sum() == 0
    # "others" is never opened.
    np.testing.assert_array_equal(masks[..., 0], np.argmax(scores, -1) == 0)


def test_sigmoid_thresholds_others_and_uint8():
    probs = np.zeros((4, 4, 5))
    probs[..., 0] = 0.6
    probs[..., 1] = 0.4
    probs[..., 2] = 0.9
    probs[0, 0] = 0.0
    masks = postprocess.decide_masks(probs, head="sigmoid", threshold=[0.5, 0.3, 0.95, 0.5, 0.5])
    assert masks[..., 1].sum() == 15 and masks[..., 2].sum() == 15
    assert not masks[..., 3:].any()
    # Overlaps are allowed (multi-label); "others" = no structure decided.
    assert (masks[..., 1:].sum(-1) == 2).sum() == 15
    assert masks[..., 0].sum() == 1 and masks[0, 0, 0] == 1
    as_bytes = np.rint(probs * 255).astype(np.uint8)
    np.testing.assert_array_equal(
        postprocess.decide_masks(as_bytes, head="sigmoid", threshold=0.5),
        postprocess.decide_masks(probs, head="sigmoid", threshold=0.5),
    )


def test_channel_head_and_lesion_shape_errors():
    with pytest.raises(ValueError, match="6 channels"):
        _softmax(np.zeros((4, 4, 5)))
    with pytest.raises(ValueError, match="5 channels"):
        postprocess.decide_masks(np.zeros((4, 4, 6)), head="sigmoid")
    with pytest.raises(ValueError, match="head"):
        postprocess.decide_masks(np.zeros((4, 4, 6)), head="argmax")
    with pytest.raises(ValueError, match="lesion mask"):
        _softmax(np.zeros((4, 4, 6)), lesion=np.ones((3, 4)))
