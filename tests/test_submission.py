"""Tests for dermseg_jax.submission: ids, the mask writer and the official ISIC 2018 scorer."""

import pathlib

import cv2
import isic_challenge_scoring.task2
import numpy as np
import pytest
from test_metrics import SIZES, assert_scores_equal, random_pairs

from dermseg_jax import labels, metrics, submission

NAMES = labels.STRUCTURE_NAMES


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ISIC_0012345.jpg", "ISIC_0012345"),
        ("scan_ISIC_0012345_copy.PNG", "ISIC_0012345"),
        ("my photo.JPEG", "my photo"),
        ("ISIC_123.jpg", "ISIC_123"),
    ],
)
def test_image_id(name, expected):
    assert submission.image_id(pathlib.Path("/x") / name) == expected


def test_masks_pass_the_official_loader(tmp_path):
    from isic_challenge_scoring.load_image import load_segmentation_image

    masks = np.zeros((17, 23, 5), np.uint8)
    masks[2:9, 3:11, 2] = 1
    submission.write_isic2018_masks(tmp_path / "new", "ISIC_0000042", masks)
    for k, name in enumerate(NAMES):
        path = tmp_path / "new" / submission.mask_filename("ISIC_0000042", name)
        assert path.name == f"ISIC_0000042_attribute_{name}.png"
        loaded = load_segmentation_image(path)
        assert loaded.shape == (17, 23) and loaded.dtype == np.uint8
        assert set(np.unique(loaded)) <= {0, 255}
        np.testing.assert_array_equal(loaded > 128, masks[..., k] > 0)
    with pytest.raises(ValueError, match=r"\[H, W, 5\]"):
        submission.write_isic2018_masks(tmp_path, "ISIC_0000042", masks[..., :4])


def test_official_score_matches_isic_challenge_scoring(tmp_path):
    pairs = random_pairs(0, SIZES)
    for i, (truth, pred) in enumerate(pairs):
        submission.write_isic2018_masks(tmp_path / "truth", f"ISIC_{i:07d}", truth)
        submission.write_isic2018_masks(tmp_path / "pred", f"ISIC_{i:07d}", pred)
    # Grey values: the scorer binarises at > 128 (128 is negative, 129 positive).
    grey = np.zeros(SIZES[1], np.uint8)
    grey[:5, :5], grey[10:15, :5] = 128, 129
    cv2.imwrite(str(tmp_path / "pred" / "ISIC_0000001_attribute_streaks.png"), grey)
    expected = isic_challenge_scoring.task2.score(tmp_path / "truth", tmp_path / "pred")
    assert expected["overall"] == expected["micro_average"]["jaccard"]
    assert_scores_equal(
        submission.score_isic2018_dirs(tmp_path / "truth", tmp_path / "pred"), expected
    )

    pairs[1][1][..., 3] = grey > 128
    assert_scores_equal(metrics.isic2018_task2_score(pairs), expected)
    # Streaks are empty in truth: perfect where nothing is predicted (the package gives 1.0),
    # here the grey false positives give 0.
    assert expected["streaks"]["jaccard"] == 0.0
    # Through the evaluator's accumulator, image by image.
    acc = metrics.SegmentationMetrics()
    for truth, pred in pairs:
        acc.add(pred, truth)
    out = acc.finalize()
    for name in NAMES:
        assert out[f"isic2018/jaccard/{name}"] == pytest.approx(expected[name]["jaccard"], abs=1e-6)
        assert out[f"isic2018/dice/{name}"] == pytest.approx(expected[name]["dice"], abs=1e-6)
    assert out["isic2018/overall"] == pytest.approx(expected["overall"], abs=1e-6)
    assert out["isic2018/micro_average_dice"] == pytest.approx(
        expected["micro_average"]["dice"], abs=1e-6
    )


def test_official_score_all_empty_structure_scores_one(tmp_path):
    pairs = random_pairs(1, SIZES[:3])
    for i, (truth, pred) in enumerate(pairs):
        submission.write_isic2018_masks(tmp_path / "t", f"ISIC_{i:07d}", truth)
        submission.write_isic2018_masks(tmp_path / "p", f"ISIC_{i:07d}", pred)
    expected = isic_challenge_scoring.task2.score(tmp_path / "t", tmp_path / "p")
    assert expected["streaks"] == {"jaccard": 1.0, "dice": 1.0}
    assert_scores_equal(metrics.isic2018_task2_score(pairs), expected)
    assert_scores_equal(submission.score_isic2018_dirs(tmp_path / "t", tmp_path / "p"), expected)


def test_dirs_errors_name_the_file(tmp_path):
    mask = np.zeros((4, 4, 5), np.uint8)
    submission.write_isic2018_masks(tmp_path / "t", "ISIC_0000001", mask)
    submission.write_isic2018_masks(tmp_path / "p", "ISIC_0000001", mask)
    (tmp_path / "p" / "ISIC_0000001_attribute_globules.png").unlink()
    with pytest.raises(ValueError, match="ISIC_0000001_attribute_globules.png: no matching"):
        submission.score_isic2018_dirs(tmp_path / "t", tmp_path / "p")
    cv2.imwrite(
        str(tmp_path / "p" / "ISIC_0000001_attribute_globules.png"), np.zeros((4, 4, 3), np.uint8)
    )
    with pytest.raises(ValueError, match="globules.png: expected an 8-bit single-channel"):
        submission.score_isic2018_dirs(tmp_path / "t", tmp_path / "p")
    cv2.imwrite(
        str(tmp_path / "p" / "ISIC_0000001_attribute_globules.png"), np.zeros((5, 4), np.uint8)
    )
    with pytest.raises(ValueError, match="globules.png: shape"):
        submission.score_isic2018_dirs(tmp_path / "t", tmp_path / "p")
    (tmp_path / "t" / "notes.png").write_bytes(b"")
    with pytest.raises(ValueError, match="notes.png: expected a name like"):
        submission.score_isic2018_dirs(tmp_path / "t", tmp_path / "p")
