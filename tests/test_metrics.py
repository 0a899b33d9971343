"""Tests for dermseg_jax.metrics: hand-computed cases and the official ISIC 2018 scorer."""

import math

import cv2
import isic_challenge_scoring.task2
import jax
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dermseg_jax import labels, metrics

NAMES = labels.STRUCTURE_NAMES


def test_thesis_jaccard_formula_with_plus_one():
    pred = np.zeros((4, 4), bool)
    gt = np.zeros((4, 4), bool)
    pred[0, :3] = True  # |P| = 3
    gt[0, 1:] = True  # |G| = 3, |P n G| = 2
    assert metrics.thesis_jaccard(pred, gt) == pytest.approx(2 / (3 + 3 - 2 + 1))
    # Counted when only one side is present: 0 / (|P| + 1).
    assert metrics.thesis_jaccard(pred, np.zeros_like(gt)) == 0.0
    # Not counted (NaN) when both are empty.
    assert math.isnan(metrics.thesis_jaccard(np.zeros_like(pred), np.zeros_like(gt)))
    # A perfect single pixel is 1 / 2, not 1: the +1.
    one = np.zeros((4, 4), np.uint8)
    one[2, 2] = 1
    assert metrics.thesis_jaccard(one, one) == 0.5
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.thesis_jaccard(pred, gt[:2])


def test_thesis_ground_truth():
    structures = np.zeros((2, 3, 5), np.uint8)
    structures[0, 0, 2] = 1
    lesion = np.array([[1, 1, 0], [1, 0, 0]])
    gt = metrics.thesis_ground_truth(structures, lesion)
    assert gt.shape == (2, 3, 6) and gt.dtype == np.uint8
    np.testing.assert_array_equal(gt[..., 0], [[0, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(gt[..., 1:], structures)
    np.testing.assert_array_equal(
        metrics.thesis_ground_truth(structures)[..., 0], [[0, 1, 1], [1, 1, 1]]
    )


def _onehot(classes, n=6):
    return np.eye(n, dtype=np.uint8)[np.asarray(classes)]


def test_thesis_metrics_jaccard_counting_and_means():
    acc = metrics.ThesisMetrics()
    # Image 1: truth classes / predicted classes per pixel (2x2).
    acc.update(_onehot([[0, 1], [1, 3]]), _onehot([[0, 1], [3, 3]]))
    # Image 2: only "others" and class 2 (a false positive).
    acc.update(_onehot([[0, 2], [0, 0]]), _onehot([[0, 0], [0, 0]]))
    out = acc.finalize()
    # others: image 1: P={00}, G={00}: 1/(1+1-1+1) = 0.5; image 2: P 3 px, G 4 px, I 3: 3/5.
    assert out["thesis_jaccard/others"] == pytest.approx((0.5 + 3 / 5) / 2)
    # cysts (1): image 1: P 2 px, G 1 px, I 1: 1/3; image 2 not counted.
    assert out["thesis_jaccard/milia_like_cyst"] == pytest.approx(1 / 3)
    assert out["thesis_num_images/milia_like_cyst"] == 1
    # negative network (2): image 2 false positive counts 0; image 1 not counted.
    assert out["thesis_jaccard/negative_network"] == 0.0
    # pigment network (3): image 1: P 1, G 2, I 1: 1/3.
    assert out["thesis_jaccard/pigment_network"] == pytest.approx(1 / 3)
    # streaks / globules never present: NaN, left out of the mean.
    assert math.isnan(out["thesis_jaccard/streaks"])
    assert out["thesis_num_images/streaks"] == 0
    assert out["thesis_jaccard/mean"] == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)
    assert out["thesis_jaccard/mean6"] == pytest.approx((0.55 + 1 / 3 + 0 + 1 / 3) / 4)
    assert out["num_images"] == 2


def test_thesis_metrics_auc_skip_rules():
    rng = np.random.default_rng(0)
    gt = np.zeros((4, 4, 6), np.uint8)
    gt[..., 0] = 1
    gt[:2, :2, 0] = 0
    gt[:2, :2, 3] = 1  # pigment network on 4 of 16 pixels
    gt_full = np.zeros((4, 4, 6), np.uint8)
    gt_full[..., 4] = 1  # streaks on every pixel: only one class, AUC skipped
    scores = rng.random((4, 4, 6))
    scores2 = rng.random((4, 4, 6))
    acc = metrics.ThesisMetrics()
    acc.update(_onehot(np.zeros((4, 4), int)), gt, scores)
    acc.update(_onehot(np.zeros((4, 4), int)), gt_full, scores2)
    out = acc.finalize()
    expected3 = roc_auc_score(gt[..., 3].ravel(), scores[..., 3].ravel())
    expected0 = roc_auc_score(gt[..., 0].ravel(), scores[..., 0].ravel())
    assert out["thesis_auc/pigment_network"] == pytest.approx(expected3)
    assert out["thesis_auc/others"] == pytest.approx(expected0)
    # Absent channels (cysts) and the all-positive streaks image are skipped.
    assert math.isnan(out["thesis_auc/milia_like_cyst"])
    assert math.isnan(out["thesis_auc/streaks"])
    assert out["thesis_auc/mean"] == pytest.approx(expected3)
    assert out["thesis_auc/mean6"] == pytest.approx((expected3 + expected0) / 2)


def test_thesis_confusion_matrix():
    acc = metrics.ThesisMetrics()
    pred = _onehot([[0, 1, 1], [3, 3, 5]])
    pred[0, 0] = 0  # removed by the opening: counts as "others" (class 0)
    gt = _onehot([[2, 1, 0], [3, 4, 5]])
    gt[0, 2] = 0  # outside the lesion: class 0
    acc.update(pred, gt)
    acc.update(pred, gt)
    cm = acc.confusion_matrix
    expected = np.zeros((6, 6), np.int64)
    for t, p in [(2, 0), (1, 1), (0, 1), (3, 3), (4, 3), (5, 5)]:
        expected[t, p] += 2
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == 12


def test_eval_counts_hand_case_jit_and_valid():
    pred = np.zeros((2, 2, 3, 5), bool)
    gt = np.zeros((2, 2, 3, 5), bool)
    pred[0, 0, :, 0] = True  # 3 predicted
    gt[0, :, 0, 0] = True  # 2 true; overlap at (0, 0)
    pred[1, 1, 2, 4] = True
    valid = np.ones((2, 2, 3), np.float32)
    valid[1, 1, 2] = 0  # the only prediction of image 1 is on a padded pixel
    counts = jax.jit(metrics.eval_counts)(pred, gt, valid)
    np.testing.assert_array_equal(counts["tp"][0], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(counts["fp"][0], [2, 0, 0, 0, 0])
    np.testing.assert_array_equal(counts["fn"][0], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(counts["tn"][0], [2, 6, 6, 6, 6])
    np.testing.assert_array_equal(counts["fp"][1], 0)
    np.testing.assert_array_equal(counts["tn"][1], 5)
    assert counts["tp"].dtype == np.int32 and counts["tp"].shape == (2, 5)


def _random_pairs(seed, sizes):
    """(truth, prediction) [H, W, 5] pairs with blobs, empty channels and false positives."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i, (h, w) in enumerate(sizes):
        truth = np.zeros((h, w, 5), np.uint8)
        pred = np.zeros((h, w, 5), np.uint8)
        for k in range(4):  # streaks (k = 3) stays empty in truth and prediction everywhere
            if k == 3:
                continue
            if i % 3 != 0:
                y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
                truth[y : y + h // 3, x : x + w // 3, k] = 1
            if rng.random() < 0.8:
                y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
                pred[y : y + h // 4, x : x + w // 3, k] = 1
        pred[..., 4] = rng.random((h, w)) < 0.05  # globules: noise, false positives
        pairs.append((truth, pred))
    # Image 0: every channel empty in truth and prediction.
    pairs[0] = (np.zeros_like(pairs[0][0]), np.zeros_like(pairs[0][1]))
    return pairs


SIZES = [(20, 30), (33, 17), (24, 24), (40, 25), (16, 48), (21, 21)]


def _assert_scores_equal(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, dict):
            assert set(got[key]) == set(value)
            for metric, v in value.items():
                assert got[key][metric] == pytest.approx(v, abs=1e-6), (key, metric)
        else:
            assert got[key] == pytest.approx(value, abs=1e-6), key


def test_official_score_matches_isic_challenge_scoring(tmp_path):
    pairs = _random_pairs(0, SIZES)
    for i, (truth, pred) in enumerate(pairs):
        metrics.write_isic2018_masks(tmp_path / "truth", f"ISIC_{i:07d}", truth)
        metrics.write_isic2018_masks(tmp_path / "pred", f"ISIC_{i:07d}", pred)
    # Grey values: the scorer binarises at > 128 (128 is negative, 129 positive).
    grey = np.zeros(SIZES[1], np.uint8)
    grey[:5, :5], grey[10:15, :5] = 128, 129
    cv2.imwrite(str(tmp_path / "pred" / "ISIC_0000001_attribute_streaks.png"), grey)
    expected = isic_challenge_scoring.task2.score(tmp_path / "truth", tmp_path / "pred")
    assert expected["overall"] == expected["micro_average"]["jaccard"]
    _assert_scores_equal(
        metrics.score_isic2018_dirs(tmp_path / "truth", tmp_path / "pred"), expected
    )

    pairs[1][1][..., 3] = grey > 128
    _assert_scores_equal(metrics.isic2018_task2_score(pairs), expected)
    # Streaks are empty in truth: perfect where nothing is predicted (the package gives 1.0),
    # here the grey false positives give 0.
    assert expected["streaks"]["jaccard"] == 0.0
    # From per-image counts through the training-loop accumulator, on images padded to one
    # size as the eval pipeline does: `valid` must restore each image's own pixel count.
    h, w = max(s[0] for s in SIZES), max(s[1] for s in SIZES)
    padded = np.zeros((2, len(pairs), h, w, 5), np.uint8)
    valid = np.zeros((len(pairs), h, w), np.float32)
    for i, (truth, pred) in enumerate(pairs):
        hi, wi = truth.shape[:2]
        padded[0, i, :hi, :wi], padded[1, i, :hi, :wi], valid[i, :hi, :wi] = truth, pred, 1
    padded[1, :, -1, -1] = 1  # predictions on padding must not count
    acc = metrics.SegmentationMetrics()
    acc.update(metrics.eval_counts(padded[1], padded[0], valid))
    out = acc.finalize()
    for name in NAMES:
        assert out[f"isic2018/jaccard/{name}"] == pytest.approx(expected[name]["jaccard"], abs=1e-6)
        assert out[f"isic2018/dice/{name}"] == pytest.approx(expected[name]["dice"], abs=1e-6)
    assert out["isic2018/overall"] == pytest.approx(expected["overall"], abs=1e-6)
    assert out["isic2018/micro_average_dice"] == pytest.approx(
        expected["micro_average"]["dice"], abs=1e-6
    )


def test_official_score_all_empty_structure_scores_one(tmp_path):
    pairs = _random_pairs(1, SIZES[:3])
    for i, (truth, pred) in enumerate(pairs):
        metrics.write_isic2018_masks(tmp_path / "t", f"ISIC_{i:07d}", truth)
        metrics.write_isic2018_masks(tmp_path / "p", f"ISIC_{i:07d}", pred)
    expected = isic_challenge_scoring.task2.score(tmp_path / "t", tmp_path / "p")
    assert expected["streaks"] == {"jaccard": 1.0, "dice": 1.0}
    _assert_scores_equal(metrics.isic2018_task2_score(pairs), expected)
    _assert_scores_equal(metrics.score_isic2018_dirs(tmp_path / "t", tmp_path / "p"), expected)


def test_official_score_normalises_by_image_size():
    # One 10x10 image with 10 TP pixels, one 100x100 image with 10 FP pixels.
    small_t = np.zeros((10, 10, 5), np.uint8)
    small_t[0, :, 0] = 1
    big_p = np.zeros((100, 100, 5), np.uint8)
    big_p[0, :10, 0] = 1
    score = metrics.isic2018_task2_score([(small_t, small_t), (np.zeros_like(big_p), big_p)])
    tp, fp = 10 / 100, 10 / 10000
    assert score["milia_like_cyst"]["jaccard"] == pytest.approx(tp / (tp + fp))
    assert score["milia_like_cyst"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp))


def test_dirs_errors_name_the_file(tmp_path):
    mask = np.zeros((4, 4, 5), np.uint8)
    metrics.write_isic2018_masks(tmp_path / "t", "ISIC_0000001", mask)
    metrics.write_isic2018_masks(tmp_path / "p", "ISIC_0000001", mask)
    (tmp_path / "p" / "ISIC_0000001_attribute_globules.png").unlink()
    with pytest.raises(ValueError, match="ISIC_0000001_attribute_globules.png: no matching"):
        metrics.score_isic2018_dirs(tmp_path / "t", tmp_path / "p")
    cv2.imwrite(
        str(tmp_path / "p" / "ISIC_0000001_attribute_globules.png"), np.zeros((4, 4, 3), np.uint8)
    )
    with pytest.raises(ValueError, match="globules.png: expected an 8-bit single-channel"):
        metrics.score_isic2018_dirs(tmp_path / "t", tmp_path / "p")
    cv2.imwrite(
        str(tmp_path / "p" / "ISIC_0000001_attribute_globules.png"), np.zeros((5, 4), np.uint8)
    )
    with pytest.raises(ValueError, match="globules.png: shape"):
        metrics.score_isic2018_dirs(tmp_path / "t", tmp_path / "p")
    (tmp_path / "t" / "notes.png").write_bytes(b"")
    with pytest.raises(ValueError, match="notes.png: expected a name like"):
        metrics.score_isic2018_dirs(tmp_path / "t", tmp_path / "p")


def _direct_metrics(pairs):
    """Straightforward per-structure loops over whole masks (the reference)."""
    out = {}
    for k, name in enumerate(NAMES):
        thesis, image_j, image_d = [], [], []
        stp = sfp = sfn = 0
        for truth, pred in pairs:
            p, g = pred[..., k] != 0, truth[..., k] != 0
            inter, union = np.sum(p & g), np.sum(p | g)
            j = metrics.thesis_jaccard(p, g)
            if not math.isnan(j):
                thesis.append(j)
                image_j.append(inter / union)
                image_d.append(2 * inter / (p.sum() + g.sum()))
            stp, sfp, sfn = stp + inter, sfp + np.sum(p & ~g), sfn + np.sum(~p & g)
        out[f"jaccard/{name}"] = np.mean(thesis) if thesis else math.nan
        out[f"image_jaccard/{name}"] = np.mean(image_j) if image_j else math.nan
        out[f"image_dice/{name}"] = np.mean(image_d) if image_d else math.nan
        union = stp + sfp + sfn
        out[f"micro_jaccard/{name}"] = stp / union if union else math.nan
        out[f"micro_dice/{name}"] = 2 * stp / (2 * stp + sfp + sfn) if union else math.nan
    return out


def test_segmentation_metrics_equal_direct_computation():
    pairs = _random_pairs(2, [(24, 24)] * 7)
    acc = metrics.SegmentationMetrics()
    # Batches of 3 padded to 3 images; padded images are flagged invalid.
    for start in range(0, len(pairs), 3):
        chunk = pairs[start : start + 3]
        n = len(chunk)
        truth = np.stack([t for t, _ in chunk] + [np.ones_like(chunk[0][0])] * (3 - n))
        pred = np.stack([p for _, p in chunk] + [np.ones_like(chunk[0][1])] * (3 - n))
        counts = metrics.eval_counts(pred, truth, np.ones(truth.shape[:3]))
        acc.update(jax.device_get(counts), image_valid=np.arange(3) < n)
    assert acc.num_images == 7
    out = acc.finalize()
    direct = _direct_metrics(pairs)
    for key, value in direct.items():
        if math.isnan(value):
            assert math.isnan(out[key]), key
        else:
            assert out[key] == pytest.approx(value, abs=1e-12), key
    defined = [direct[f"jaccard/{n}"] for n in NAMES if not math.isnan(direct[f"jaccard/{n}"])]
    assert out["jaccard/mean"] == pytest.approx(np.mean(defined))
    assert math.isnan(out["micro_jaccard/streaks"])  # streaks empty everywhere
    stp = sum(np.sum((p != 0) & (t != 0)) for t, p in pairs)
    union = sum(np.sum((p != 0) | (t != 0)) for t, p in pairs)
    assert out["micro_jaccard/pooled"] == pytest.approx(stp / union)
    _assert_scores_equal(
        {k: out[f"isic2018/jaccard/{k}"] for k in NAMES},
        {k: v["jaccard"] for k, v in metrics.isic2018_task2_score(pairs).items() if k in NAMES},
    )


def test_segmentation_metrics_agree_with_thesis_metrics():
    pairs = _random_pairs(3, [(16, 16)] * 5)
    seg, thesis = metrics.SegmentationMetrics(), metrics.ThesisMetrics()
    for truth, pred in pairs:
        seg.update(metrics.eval_counts(pred[None], truth[None]))
        pred6 = np.concatenate([1 - pred.max(-1, keepdims=True), pred], -1)
        thesis.update(pred6, metrics.thesis_ground_truth(truth))
    seg_out, thesis_out = seg.finalize(), thesis.finalize()
    for name in NAMES:
        a, b = seg_out[f"jaccard/{name}"], thesis_out[f"thesis_jaccard/{name}"]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b), name
    assert seg_out["jaccard/mean"] == pytest.approx(thesis_out["thesis_jaccard/mean"])


def test_segmentation_metrics_skip_padding_and_reject_bad_shapes():
    acc = metrics.SegmentationMetrics()
    zeros = {k: np.zeros((2, 5), np.int32) for k in metrics.COUNT_KEYS}
    acc.update(zeros)  # images with no valid pixel: dropped
    assert acc.num_images == 0
    out = acc.finalize()
    assert math.isnan(out["jaccard/mean"]) and math.isnan(out["isic2018/overall"])
    with pytest.raises(ValueError, match=r"counts must all be \[B, 5\]"):
        acc.update({k: np.zeros((2, 4)) for k in metrics.COUNT_KEYS})
    with pytest.raises(ValueError, match="image_valid"):
        acc.update(zeros, image_valid=np.ones(3))
