"""Tests for dermseg_jax.losses: NumPy and PyTorch references, valid masks, gradients."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dermseg_jax import losses

B, H, W, C, K = 2, 5, 7, 6, 5
WEIGHTS = np.asarray(losses.THESIS_CLASS_WEIGHTS, np.float32)


def _softmax_case(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(B, H, W, C)).astype(np.float32)
    labels = rng.integers(0, C, size=(B, H, W)).astype(np.int32)
    valid = (rng.random((B, H, W)) > 0.3).astype(np.float32)
    return logits, labels, valid


def _sigmoid_case(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(B, H, W, K)).astype(np.float32)
    targets = (rng.random((B, H, W, K)) > 0.7).astype(np.uint8)
    valid = (rng.random((B, H, W)) > 0.3).astype(np.float32)
    return logits, targets, valid


def _np_log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_wce(logits, labels, weights):
    logp = np.take_along_axis(_np_log_softmax(logits), labels[..., None], -1)[..., 0]
    return -weights[labels] * logp


def _torch_wce(logits, labels, weights):
    return F.cross_entropy(
        torch.from_numpy(logits).permute(0, 3, 1, 2),
        torch.from_numpy(labels).long(),
        weight=torch.from_numpy(weights),
        reduction="none",
    )


def test_weighted_ce_matches_numpy_and_torch():
    logits, labels, _ = _softmax_case()
    got = losses.weighted_softmax_cross_entropy(logits, labels, WEIGHTS, reduction="none")
    np.testing.assert_allclose(got, _np_wce(logits, labels, WEIGHTS), rtol=1e-6, atol=1e-6)
    torch_wce = _torch_wce(logits, labels, WEIGHTS).numpy()
    np.testing.assert_allclose(got, torch_wce, rtol=1e-6, atol=1e-6)
    mean = losses.weighted_softmax_cross_entropy(logits, labels, WEIGHTS)
    # A plain mean over pixels, not PyTorch's reduction='mean' (divided by the sum of weights).
    np.testing.assert_allclose(mean, torch_wce.mean(), rtol=1e-6, atol=1e-6)


def test_thesis_focal_matches_torch_formula():
    logits, labels, _ = _softmax_case(1)
    wce = _torch_wce(logits, labels, WEIGHTS)
    expected = ((1 - torch.exp(-wce)) ** 2 * wce).mean().item()
    got = losses.thesis_focal_loss(logits, labels, WEIGHTS, gamma=2.0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    wce_np = _np_wce(logits, labels, WEIGHTS)
    np.testing.assert_allclose(
        got, np.mean((1 - np.exp(-wce_np)) ** 2 * wce_np), rtol=1e-6, atol=1e-6
    )


def test_focal_loss_matches_numpy():
    logits, labels, valid = _softmax_case(2)
    logp = np.take_along_axis(_np_log_softmax(logits), labels[..., None], -1)[..., 0]
    per_pixel = -WEIGHTS[labels] * (1 - np.exp(logp)) ** 1.5 * logp
    expected = (per_pixel * valid).sum() / valid.sum()
    got = losses.focal_loss(logits, labels, WEIGHTS, valid, gamma=1.5)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # gamma 0 without alpha is the plain cross entropy.
    np.testing.assert_allclose(
        losses.focal_loss(logits, labels, gamma=0.0),
        losses.weighted_softmax_cross_entropy(logits, labels),
        rtol=1e-6,
    )


def test_sigmoid_bce_matches_numpy_and_torch():
    logits, targets, valid = _sigmoid_case()
    pos_weight = np.asarray([1.0, 2.0, 3.0, 0.5, 4.0], np.float32)
    x = logits.astype(np.float64)
    log_sig, log_one_minus = -np.logaddexp(0, -x), -np.logaddexp(0, x)
    per_element = -(pos_weight * targets * log_sig + (1 - targets) * log_one_minus)
    expected = (per_element * valid[..., None]).sum() / (valid.sum() * K)
    got = losses.sigmoid_binary_cross_entropy(logits, targets, pos_weight, valid)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    torch_loss = F.binary_cross_entropy_with_logits(
        torch.from_numpy(logits),
        torch.from_numpy(targets).float(),
        pos_weight=torch.from_numpy(pos_weight),
    )
    np.testing.assert_allclose(
        losses.sigmoid_binary_cross_entropy(logits, targets, pos_weight),
        torch_loss.item(),
        rtol=1e-6,
        atol=1e-6,
    )


def test_soft_dice_and_jaccard_match_numpy():
    logits, targets, valid = _sigmoid_case(3)
    p = 1 / (1 + np.exp(-logits.astype(np.float64))) * valid[..., None]
    t = targets * valid[..., None]
    inter = (p * t).sum((0, 1, 2))
    card = p.sum((0, 1, 2)) + t.sum((0, 1, 2))
    dice = (2 * inter + 1) / (card + 1)
    iou = (inter + 1) / (card - inter + 1)
    np.testing.assert_allclose(
        losses.soft_dice_loss(logits, targets, valid=valid), 1 - dice.mean(), rtol=1e-5
    )
    np.testing.assert_allclose(
        losses.soft_jaccard_loss(logits, targets, valid=valid), 1 - iou.mean(), rtol=1e-5
    )
    # Probabilities in, the same result.
    probs = jax.nn.sigmoid(logits)
    np.testing.assert_allclose(
        losses.soft_dice_loss(probs, targets, from_logits=False, valid=valid),
        1 - dice.mean(),
        rtol=1e-5,
    )


def test_soft_dice_softmax_with_labels_and_channels():
    logits, labels, _ = _softmax_case(4)
    e = np.exp(_np_log_softmax(logits))
    t = np.eye(C)[labels]
    dice = (2 * (e * t).sum((0, 1, 2)) + 1) / (e.sum((0, 1, 2)) + t.sum((0, 1, 2)) + 1)
    got = losses.soft_dice_loss(logits, labels, activation="softmax", channels=(1, 2, 3, 4, 5))
    np.testing.assert_allclose(got, 1 - dice[1:].mean(), rtol=1e-5)
    perfect = losses.soft_dice_loss(t, labels, from_logits=False, smooth=0.0)
    np.testing.assert_allclose(perfect, 0.0, atol=1e-7)


SOFTMAX_FNS = [
    lambda lg, lb, v: losses.weighted_softmax_cross_entropy(lg, lb, WEIGHTS, v),
    lambda lg, lb, v: losses.thesis_focal_loss(lg, lb, WEIGHTS, v),
    lambda lg, lb, v: losses.focal_loss(lg, lb, WEIGHTS, v),
    lambda lg, lb, v: losses.soft_dice_loss(lg, lb, activation="softmax", valid=v),
    lambda lg, lb, v: losses.soft_jaccard_loss(lg, lb, activation="softmax", valid=v),
]


@pytest.mark.parametrize("fn", SOFTMAX_FNS, ids=["wce", "thesis_focal", "focal", "dice", "iou"])
def test_valid_mask_excludes_pixels(fn):
    logits, labels, valid = _softmax_case(5)
    base = fn(logits, labels, valid)
    rng = np.random.default_rng(9)
    changed = np.where(valid[..., None] > 0, logits, rng.normal(scale=50, size=logits.shape))
    labels_changed = np.where(valid > 0, labels, (labels + 1) % C)
    np.testing.assert_allclose(
        fn(changed.astype(np.float32), labels_changed, valid), base, rtol=1e-6
    )
    # And the mask does matter: without it the loss differs.
    assert not np.isclose(fn(changed.astype(np.float32), labels_changed, None), base)


def test_valid_mask_mean_is_over_valid_pixels_only():
    logits, labels, valid = _softmax_case(6)
    per_pixel = _np_wce(logits, labels, WEIGHTS)
    expected = (per_pixel * valid).sum() / valid.sum()
    got = losses.weighted_softmax_cross_entropy(logits, labels, WEIGHTS, valid.astype(bool))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_sigmoid_valid_mask_excludes_pixels():
    logits, targets, valid = _sigmoid_case(7)
    base = losses.sigmoid_binary_cross_entropy(logits, targets, None, valid)
    changed = np.where(valid[..., None] > 0, logits, 100.0).astype(np.float32)
    np.testing.assert_allclose(
        losses.sigmoid_binary_cross_entropy(changed, targets, None, valid), base, rtol=1e-6
    )


def test_no_valid_pixel_gives_zero_and_finite_gradient():
    logits, labels, _ = _softmax_case()
    zeros = np.zeros((B, H, W), np.float32)
    loss, grad = jax.value_and_grad(lambda x: losses.thesis_focal_loss(x, labels, WEIGHTS, zeros))(
        jnp.asarray(logits)
    )
    assert float(loss) == 0.0
    assert np.all(np.isfinite(grad)) and np.all(grad == 0)


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
def test_compute_loss_dispatch_jits_with_finite_gradients(name):
    logits6, labels, valid = _softmax_case(8)
    logits5, structures, _ = _sigmoid_case(8)
    batch = {"label": labels, "structures": structures, "valid": valid}
    cfg = ml_collections.ConfigDict({"name": name, "gamma": 2.0, "dice_weight": 0.5})
    softmax = name in losses.SOFTMAX_LOSSES
    logits = logits6 if softmax else logits5
    weights = WEIGHTS if softmax else np.full((K,), 2.0, np.float32)

    loss_fn = jax.jit(lambda x: losses.compute_loss(cfg, x, batch, weights))
    loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logits))
    assert np.isfinite(loss) and loss > 0
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)

    direct = {
        "thesis_focal": lambda: losses.thesis_focal_loss(logits, labels, WEIGHTS, valid),
        "weighted_ce": lambda: losses.weighted_softmax_cross_entropy(
            logits, labels, WEIGHTS, valid
        ),
        "focal": lambda: losses.focal_loss(logits, labels, WEIGHTS, valid),
        "weighted_ce_dice": lambda: (
            losses.weighted_softmax_cross_entropy(logits, labels, WEIGHTS, valid)
            + 0.5
            * losses.soft_dice_loss(
                logits, labels, activation="softmax", valid=valid, channels=(1, 2, 3, 4, 5)
            )
        ),
        "bce": lambda: losses.sigmoid_binary_cross_entropy(logits, structures, weights, valid),
        "bce_dice": lambda: (
            losses.sigmoid_binary_cross_entropy(logits, structures, weights, valid)
            + 0.5 * losses.soft_dice_loss(logits, structures, valid=valid)
        ),
        "bce_log_jaccard": lambda: losses.bce_log_jaccard_loss(logits, structures, weights, valid),
    }[name]()
    np.testing.assert_allclose(loss, direct, rtol=1e-6)


def test_compute_loss_rejects_unknown_name_and_missing_keys():
    logits, labels, _ = _softmax_case()
    with pytest.raises(ValueError, match="unknown loss name 'dice'"):
        losses.compute_loss({"name": "dice"}, logits, {"label": labels})
    with pytest.raises(KeyError, match="structures"):
        losses.compute_loss({"name": "bce"}, logits, {"label": labels})


def test_shape_errors_are_clear():
    logits, labels, _ = _softmax_case()
    with pytest.raises(ValueError, match="shapes disagree"):
        losses.weighted_softmax_cross_entropy(logits, labels[:, :-1])
    with pytest.raises(ValueError, match=r"class_weights must have shape \(6,\)"):
        losses.weighted_softmax_cross_entropy(logits, labels, WEIGHTS[:5])
    with pytest.raises(ValueError, match="reduction"):
        losses.weighted_softmax_cross_entropy(logits, labels, reduction="avg")


def _np_bce_log_jaccard(logits, targets, pos_weight, valid, smooth=1.0):
    x, t = logits.astype(np.float64), targets.astype(np.float64)
    v = valid.astype(np.float64)[..., None]
    p = 1.0 / (1.0 + np.exp(-x))
    bce = -(pos_weight * t * np.log(p) + (1 - t) * np.log(1 - p))
    bce = (bce * v).sum() / (v.sum() * x.shape[-1])
    inter, card = (p * t * v).sum(), ((p + t) * v).sum()  # pooled over batch AND structures
    return bce - np.log((inter + smooth) / (card - inter + smooth))


def test_bce_log_jaccard_pools_over_batch_and_structures():
    logits, targets, valid = _sigmoid_case(3)
    weights = np.asarray([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    got = losses.bce_log_jaccard_loss(logits, targets, weights, valid)
    np.testing.assert_allclose(got, _np_bce_log_jaccard(logits, targets, weights, valid), 1e-5)
    # Not the mean of per-image losses, nor of per-structure Jaccards.
    per_image = np.mean(
        [
            _np_bce_log_jaccard(logits[i : i + 1], targets[i : i + 1], weights, valid[i : i + 1])
            for i in range(B)
        ]
    )
    assert abs(float(got) - per_image) > 1e-3
    per_structure = losses.sigmoid_binary_cross_entropy(logits, targets, weights, valid) - np.log(
        1.0 - losses.soft_jaccard_loss(logits, targets, valid=valid)
    )
    assert abs(float(got) - float(per_structure)) > 1e-3


def test_bce_log_jaccard_perfect_prediction_is_the_minimum():
    logits, targets, valid = _sigmoid_case(4)
    perfect = np.where(targets > 0, 30.0, -30.0).astype(np.float32)
    best = float(losses.bce_log_jaccard_loss(perfect, targets, None, valid))
    assert 0.0 <= best < 1e-6
    rng = np.random.default_rng(0)
    for scale in (0.1, 1.0, 10.0):
        other = perfect + rng.normal(scale=scale, size=perfect.shape).astype(np.float32)
        assert float(losses.bce_log_jaccard_loss(other, targets, None, valid)) > best
    assert float(losses.bce_log_jaccard_loss(logits, targets, None, valid)) > 0.1


def test_bce_log_jaccard_gradient_matches_finite_differences():
    logits, targets, valid = _sigmoid_case(5)
    weights = np.asarray([1.0, 2.0, 0.5, 4.0, 3.0])
    with jax.enable_x64(True):
        x = jnp.asarray(logits, jnp.float64) / 3.0

        def fn(z):
            return losses.bce_log_jaccard_loss(z, targets, weights, valid, jaccard_weight=0.7)

        grad = np.asarray(jax.grad(fn)(x))
        assert grad.dtype == np.float64
        rng = np.random.default_rng(1)
        eps = 1e-6
        for _ in range(3):  # directional derivatives along random directions
            d = rng.normal(size=x.shape)
            numeric = (float(fn(x + eps * d)) - float(fn(x - eps * d))) / (2 * eps)
            np.testing.assert_allclose(np.sum(grad * d), numeric, rtol=1e-6)
        # Masked-out pixels get no gradient.
        assert np.all(grad[valid == 0] == 0)
