"""Tests of dermseg_jax.inference: predict_fn (BN mode, TTA, thesis path) and the way back."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dermseg_jax import inference, postprocess

jax.config.update("jax_disable_most_optimizations", True)


class PixelModel(nn.Module):
    """Per-pixel logits from a 1x1 conv, a BatchNorm and a dropout (model API of the design)."""

    channels: int = 6
    ramp: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool):
        y = nn.Conv(self.channels, (1, 1))(x)
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)
        y = nn.Dropout(0.5)(y, deterministic=not train)
        if self.ramp:
            # Not flip-equivariant: logits depend on the column.
            ramp = jnp.linspace(-3.0, 3.0, x.shape[2])[None, None, :, None]
            y = y + ramp * jnp.arange(self.channels)
        return y


def _init(model, shape=(2, 8, 8, 3)):
    x = jax.random.uniform(jax.random.key(1), shape)
    variables = model.init(jax.random.key(0), x, train=False)
    # Non-trivial running statistics, so running vs batch statistics differ.
    stats = jax.tree.map(lambda v: v + 0.3, variables["batch_stats"])
    return {"params": variables["params"], "batch_stats": stats}, x


def test_predict_fn_softmax_uses_running_statistics_and_is_cached():
    model = PixelModel()
    variables, x = _init(model)
    predict_fn = inference.create_predict_fn(model, head="softmax")
    assert inference.create_predict_fn(model, head="softmax") is predict_fn
    probs = np.asarray(predict_fn(variables, x))
    assert probs.shape == (2, 8, 8, 6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    expected = jax.nn.softmax(model.apply(variables, x, train=False), -1)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    # Running statistics: an image's prediction does not depend on its batch mate.
    alone = np.asarray(predict_fn(variables, x[:1]))
    np.testing.assert_allclose(alone[0], probs[0], atol=1e-6)


def test_predict_fn_sigmoid_head():
    model = PixelModel(channels=5)
    variables, x = _init(model)
    probs = np.asarray(inference.create_predict_fn(model, head="sigmoid")(variables, x))
    expected = jax.nn.sigmoid(model.apply(variables, x, train=False))
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    with pytest.raises(ValueError, match="head"):
        inference.create_predict_fn(model, head="argmax")


def test_tta_averages_identity_and_flips():
    model = PixelModel(ramp=True)
    variables, x = _init(model)
    tta = np.asarray(inference.create_predict_fn(model, tta=True)(variables, x))

    def probs(images):
        return np.asarray(jax.nn.softmax(model.apply(variables, images, train=False), -1))

    expected = (probs(x) + probs(x[:, :, ::-1])[:, :, ::-1] + probs(x[:, ::-1])[:, ::-1]) / 3.0
    np.testing.assert_allclose(tta, expected, atol=1e-5)
    assert not np.allclose(tta, probs(x), atol=1e-3)
    # A per-pixel model is flip-equivariant: TTA changes nothing.
    plain = PixelModel()
    v, _ = _init(plain)
    np.testing.assert_allclose(
        inference.create_predict_fn(plain, tta=True)(v, x),
        inference.create_predict_fn(plain)(v, x),
        atol=1e-5,
    )


def test_thesis_predict_fn_batch_statistics_and_batch_axis_softmax():
    model = PixelModel()
    variables, x = _init(model)
    scores = np.asarray(inference.create_thesis_predict_fn(model)(variables, x))
    # Defect 1: the softmax runs over the batch axis.
    np.testing.assert_allclose(scores.sum(0), 1.0, atol=1e-5)
    # Defect 3: BatchNorm with the batch's own statistics, dropout off.
    conv = nn.Conv(6, (1, 1)).apply({"params": variables["params"]["Conv_0"]}, x)
    bn = variables["params"]["BatchNorm_0"]
    mean, var = conv.mean((0, 1, 2)), conv.var((0, 1, 2))
    normed = (conv - mean) / np.sqrt(var + 1e-5) * bn["scale"] + bn["bias"]
    np.testing.assert_allclose(scores, jax.nn.softmax(normed, axis=0), atol=1e-4)
    # One image's scores depend on its batch mate.
    other = np.asarray(
        inference.create_thesis_predict_fn(model)(variables, jnp.stack([x[0], x[0] * 0.5]))
    )
    assert not np.allclose(other[0], scores[0], atol=1e-3)


def test_restore_probabilities_puts_values_at_the_right_pixels():
    s, (h, w) = 8, (4, 6)
    probs = np.zeros((s, s, 6), np.float32)
    probs[..., 0] = 1.0
    # Structure 1 on the left half of the resized crop, structure 5 only in the padding.
    probs[:h, :3, 0], probs[:h, :3, 1] = 0.0, 1.0
    probs[h:, :, 5] = probs[:, w:, 5] = 1.0
    box, image_size = (10, 20, 18, 32), (40, 50)
    full = inference.restore_probabilities(probs, box, (h, w), image_size)
    assert full.shape == (40, 50, 6) and full.dtype == np.uint8
    outside = np.ones(image_size, bool)
    outside[10:18, 20:32] = False
    assert (full[outside, 0] == 255).all() and (full[outside, 1:] == 0).all()
    # The crop is stretched x2: resized columns 0..2 -> image columns 20..25.
    assert (full[10:18, 20:25, 1] == 255).all()
    assert (full[10:18, 27:32, 1] == 0).all()
    assert (full[..., 5] == 0).all()  # nothing from the padding leaks in
    sigmoid = inference.restore_probabilities(
        probs[..., 1:], box, (h, w), image_size, head="sigmoid"
    )
    assert (sigmoid[outside] == 0).all()


def test_restore_probabilities_rejects_bad_geometry():
    probs = np.zeros((8, 8, 6), np.float32)
    with pytest.raises(ValueError, match="resized_size"):
        inference.restore_probabilities(probs, (0, 0, 4, 4), (9, 4), (10, 10))
    with pytest.raises(ValueError, match="crop_box"):
        inference.restore_probabilities(probs, (0, 0, 12, 4), (4, 4), (10, 10))


def test_full_size_masks_and_scaled_opening():
    s = 16
    probs = np.zeros((s, s, 6), np.float32)
    probs[..., 0] = 0.5
    probs[2:10, 2:10, 3] = 1.0  # an 8x8 pigment network square at eval resolution
    probs[12, 12, 4] = 1.0  # a one-pixel streak
    box, resized, size = (0, 0, 64, 64), (16, 16), (64, 64)
    assert inference.scaled_opening_sizes((21, 21, 15, 5, 15), resized, box) == (
        84,
        84,
        60,
        20,
        60,
    )
    masks = inference.full_size_masks(probs, box, resized, size, head="softmax")
    assert masks.shape == (64, 64, 5)
    assert masks[12:36, 12:36, 2].all() and not masks[:4, :, 2].any()
    assert masks[50, 50, 3] == 1
    opened = inference.full_size_masks(
        probs, box, resized, size, head="softmax", opening_sizes=(1, 1, 5, 3, 1)
    )
    # Opening at eval scale x4: the square (32 px) survives a 20 px kernel, the dot does not.
    assert opened[12:36, 12:36, 2].all() and not opened[..., 3].any()
    # The sigmoid head decides the same full-size uint8 map by its threshold (> 128 of 255,
    # where the softmax argmax beats "others" at 128).
    sigmoid = inference.full_size_masks(
        probs[..., 1:], box, resized, size, head="sigmoid", threshold=0.502
    )
    np.testing.assert_array_equal(sigmoid, masks)


def test_postprocess_settings_from_config():
    import ml_collections

    config = ml_collections.ConfigDict(
        {"model": {"head": "softmax"}, "eval": {"opening": True, "threshold": 0.4}}
    )
    settings = inference.PostprocessSettings.from_config(config, tta=True)
    assert settings.opening_sizes == tuple(postprocess.THESIS_OPENING_SIZES)
    assert settings.tta and settings.threshold == 0.4
    config.eval.opening_sizes = (3, 3, 3)
    with pytest.raises(ValueError, match="eval.opening_sizes"):
        inference.PostprocessSettings.from_config(config)
