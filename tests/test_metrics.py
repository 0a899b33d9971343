"""Tests for dermseg_jax.metrics: hand-computed cases and the official ISIC 2018 formula."""

import math

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
    pred = _onehot([[0, 1], [1, 3]])
    acc.update(pred, _onehot([[0, 1], [3, 3]]), pred.astype(float))
    # Image 2: only "others" and class 2 (a false positive).
    pred = _onehot([[0, 2], [0, 0]])
    acc.update(pred, _onehot([[0, 0], [0, 0]]), pred.astype(float))
    out = acc.finalize()
    # others: image 1: P={00}, G={00}: 1/(1+1-1+1) = 0.5; image 2: P 3 px, G 4 px, I 3: 3/5.
    assert out["thesis/jaccard/others"] == pytest.approx((0.5 + 3 / 5) / 2)
    # cysts (1): image 1: P 2 px, G 1 px, I 1: 1/3; image 2 not counted.
    assert out["thesis/jaccard/milia_like_cyst"] == pytest.approx(1 / 3)
    assert out["thesis/num_images/milia_like_cyst"] == 1
    # negative network (2): image 2 false positive counts 0; image 1 not counted.
    assert out["thesis/jaccard/negative_network"] == 0.0
    # pigment network (3): image 1: P 1, G 2, I 1: 1/3.
    assert out["thesis/jaccard/pigment_network"] == pytest.approx(1 / 3)
    # streaks / globules never present: NaN, left out of the mean.
    assert math.isnan(out["thesis/jaccard/streaks"])
    assert out["thesis/num_images/streaks"] == 0
    assert out["thesis/jaccard/mean"] == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)
    assert out["thesis/jaccard/mean6"] == pytest.approx((0.55 + 1 / 3 + 0 + 1 / 3) / 4)
    assert out["thesis/num_images"] == 2


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
    assert out["thesis/auc/pigment_network"] == pytest.approx(expected3)
    assert out["thesis/auc/others"] == pytest.approx(expected0)
    # Absent channels (cysts) and the all-positive streaks image are skipped.
    assert math.isnan(out["thesis/auc/milia_like_cyst"])
    assert math.isnan(out["thesis/auc/streaks"])
    assert out["thesis/auc/mean"] == pytest.approx(expected3)
    assert out["thesis/auc/mean6"] == pytest.approx((expected3 + expected0) / 2)


def test_thesis_confusion_matrix_is_the_raw_argmax():
    acc = metrics.ThesisMetrics()
    raw = [[0, 1, 1], [3, 3, 5]]
    scores = _onehot(raw).astype(float) + 0.1
    pred = _onehot(raw)
    pred[0, 1] = 0  # removed by the opening / the lesion mask: the raw argmax still counts it
    gt = _onehot([[2, 1, 0], [3, 4, 5]])
    gt[0, 2] = 0  # outside the lesion: class 0
    acc.update(pred, gt, scores)
    acc.update(pred, gt, scores)
    cm = acc.confusion_matrix
    expected = np.zeros((6, 6), np.int64)
    for t, p in [(2, 0), (1, 1), (0, 1), (3, 3), (4, 3), (5, 5)]:
        expected[t, p] += 2
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == 12
    with pytest.raises(ValueError, match=r"\[H, W, 6\]"):
        acc.update(pred, gt, scores[..., 1:])


def random_pairs(seed, sizes):
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


def assert_scores_equal(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, dict):
            assert set(got[key]) == set(value)
            for metric, v in value.items():
                assert got[key][metric] == pytest.approx(v, abs=1e-6), (key, metric)
        else:
            assert got[key] == pytest.approx(value, abs=1e-6), key


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
    pairs = random_pairs(2, [(24, 24)] * 7)
    acc = metrics.SegmentationMetrics()
    for truth, pred in pairs:
        counts = acc.add(pred, truth)
        assert counts["tp"].shape == (5,) and counts["tp"].dtype == np.int64
        total = sum(counts[k] for k in metrics.COUNT_KEYS)
        np.testing.assert_array_equal(total, truth.shape[0] * truth.shape[1])
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
    assert_scores_equal(
        {k: out[f"isic2018/jaccard/{k}"] for k in NAMES},
        {k: v["jaccard"] for k, v in metrics.isic2018_task2_score(pairs).items() if k in NAMES},
    )


def test_segmentation_metrics_agree_with_thesis_metrics():
    pairs = random_pairs(3, [(16, 16)] * 5)
    seg, thesis = metrics.SegmentationMetrics(), metrics.ThesisMetrics()
    for truth, pred in pairs:
        seg.add(pred, truth)
        pred6 = np.concatenate([1 - pred.max(-1, keepdims=True), pred], -1)
        thesis.update(pred6, metrics.thesis_ground_truth(truth), pred6.astype(float))
    seg_out, thesis_out = seg.finalize(), thesis.finalize()
    for name in NAMES:
        a, b = seg_out[f"jaccard/{name}"], thesis_out[f"thesis/jaccard/{name}"]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b), name
    assert seg_out["jaccard/mean"] == pytest.approx(thesis_out["thesis/jaccard/mean"])


def test_isic2018_macro_is_the_mean_of_the_five_official_scores():
    pairs = random_pairs(4, SIZES)
    acc = metrics.SegmentationMetrics()
    for truth, pred in pairs:
        acc.add(pred, truth)
    out = acc.finalize()
    official = metrics.isic2018_task2_score(pairs)
    per_structure = [official[name]["jaccard"] for name in NAMES]
    assert out["isic2018/macro"] == pytest.approx(np.mean(per_structure))
    # The overall score is the micro average, not the mean of the five.
    assert out["isic2018/overall"] == pytest.approx(official["overall"])
    assert out["isic2018/overall"] != pytest.approx(out["isic2018/macro"])


def test_segmentation_metrics_empty_and_bad_shapes():
    acc = metrics.SegmentationMetrics()
    assert acc.num_images == 0
    out = acc.finalize()
    assert math.isnan(out["jaccard/mean"]) and math.isnan(out["isic2018/overall"])
    assert math.isnan(out["isic2018/macro"])
    with pytest.raises(ValueError, match=r"\[H, W, 5\]"):
        acc.add(np.zeros((2, 2, 4)), np.zeros((2, 2, 4)))
    with pytest.raises(ValueError, match="must both be"):
        acc.add(np.zeros((2, 2, 5)), np.zeros((3, 2, 5)))


def test_pooled_roc_from_histograms_matches_sklearn():
    rng = np.random.default_rng(0)
    truth = rng.random((2000, 5)) < 0.3
    scores = np.clip(truth * 0.2 + rng.random((2000, 5)) * 0.8, 0, 1)
    scores = np.round(scores * 255) / 255  # exactly representable in the 256 bins
    acc = metrics.PooledRoc()
    acc.update(scores[:1000], truth[:1000])
    acc.update(scores[1000:], truth[1000:])
    curves, out = acc.curves(), acc.finalize()
    for k, name in enumerate(NAMES):
        expected = roc_auc_score(truth[:, k], scores[:, k])
        assert curves[name][2] == pytest.approx(expected)
        assert out[f"roc_auc/{name}"] == pytest.approx(expected)
    assert out["roc_auc/mean"] == pytest.approx(np.mean([curves[n][2] for n in NAMES]))
    empty = metrics.PooledRoc()
    empty.update(np.zeros((3, 5)), np.zeros((3, 5)))
    assert math.isnan(empty.finalize()["roc_auc/streaks"]) and not empty.curves()
