"""Tests of dermseg_jax.tiling: tile geometry, seams, odd and tiny sizes, one-tile equality,
and no structure along the border of a plain-skin image (both inference modes)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dermseg_jax import inference, tiling

jax.config.update("jax_disable_most_optimizations", True)

SETTINGS = tiling.TileSettings(tile_size=80, stride=40)


def _pointwise(images):
    """A translation-equivariant 'network': per-pixel probabilities of the pixel's colour."""
    x = np.asarray(images, np.float64)
    return np.stack([1 / (1 + np.exp(-(x.sum(-1) - k))) for k in range(5)], -1).astype(np.float32)


class _Recorder:
    def __init__(self, fn):
        self.fn, self.batches = fn, []

    def __call__(self, images):
        self.batches.append(np.array(images))
        return self.fn(images)


@pytest.mark.parametrize("length,tile,stride", [(80, 80, 40), (81, 80, 40), (250, 80, 60)])
def test_tile_starts_cover_the_axis_and_never_leave_it(length, tile, stride):
    starts = tiling.tile_starts(length, tile, stride)
    covered = np.zeros(length, bool)
    for s in starts:
        assert 0 <= s and s + tile <= length
        covered[s : s + tile] = True
    assert covered.all() and starts[-1] == length - tile
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:], strict=False))
    with pytest.raises(ValueError):
        tiling.tile_starts(tile - 1, tile, stride)


def test_blend_window_is_positive_symmetric_and_peaks_in_the_centre():
    w = tiling.blend_window(80)
    assert w.shape == (80, 80) and w.min() > 0
    np.testing.assert_allclose(w, w[::-1, ::-1])
    np.testing.assert_allclose(w, w.T)
    assert w[39, 40] == w.max() and w[0, 0] < 0.01 * w.max()


@pytest.mark.parametrize("shape", [(250, 173), (80, 80), (81, 200), (30, 17), (5, 120)])
def test_constant_model_gives_a_constant_map_without_seams(shape):
    image = np.random.default_rng(0).random((*shape, 3), dtype=np.float32)
    constant = _Recorder(lambda x: np.full((*x.shape[:3], 5), 0.31, np.float32))
    probs, presence = tiling.predict_tiles(constant, image, SETTINGS, batch_size=3)
    assert presence is None
    assert probs.shape == (*shape, 5) and probs.dtype == np.uint8
    assert np.all(probs == tiling.to_uint8(np.float32(0.31)))
    assert all(b.shape == (3, 80, 80, 3) for b in constant.batches)  # one compiled shape


@pytest.mark.parametrize("shape", [(250, 173), (97, 81), (30, 17), (1, 1)])
def test_translation_equivariant_model_matches_the_whole_image_pass(shape):
    image = np.random.default_rng(1).random((*shape, 3), dtype=np.float32) * 4
    probs = tiling.predict_tiles(_pointwise, image, SETTINGS, batch_size=4)[0].astype(int)
    whole = tiling.to_uint8(_pointwise(image[None])[0]).astype(int)
    assert np.abs(probs - whole).max() <= 1  # equal up to the rounding of the blend


def test_tiles_stay_inside_the_image_and_progress_reaches_the_total():
    image = np.full((200, 130, 3), 2.0, np.float32)  # no pixel of the image is 0
    recorder = _Recorder(_pointwise)
    calls = []
    tiling.predict_tiles(
        recorder, image, SETTINGS, batch_size=4, progress=lambda d, t: calls.append((d, t))
    )
    tiles = np.concatenate(recorder.batches)
    total = len(tiling.tile_starts(200, 80, 40)) * len(tiling.tile_starts(130, 80, 40))
    assert np.all(tiles[:total] == 2.0)  # real tiles hold only image pixels
    assert np.all(tiles[total:] == 0.0)  # the rest is the last batch's filler
    assert calls[-1] == (total, total) and len(calls) == len(recorder.batches)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_tile_settings_from_config():
    data = ml_collections.ConfigDict({"crop_size": 96})
    assert tiling.TileSettings.from_config(data, ml_collections.ConfigDict({})) is None
    tiles = ml_collections.ConfigDict({"inference": "tiles", "tile_overlap": 0.25})
    assert tiling.TileSettings.from_config(data, tiles) == tiling.TileSettings(96, 72)
    tiles.tile_size = 80
    assert tiling.TileSettings.from_config(data, tiles) == tiling.TileSettings(80, 60)
    for bad in ({"inference": "crop"}, {"inference": "tiles", "tile_overlap": 1.0}):
        with pytest.raises(ValueError):
            tiling.TileSettings.from_config(data, ml_collections.ConfigDict(bad))


class _ConvModel(nn.Module):
    """A small sigmoid-head conv net (model API of the design)."""

    head: str = "sigmoid"

    @nn.compact
    def __call__(self, x, *, train: bool):
        y = nn.relu(nn.Conv(4, (5, 5))(x))
        return nn.Conv(5, (5, 5))(y)


class _DarknessModel(nn.Module):
    """Predicts every structure within 4 pixels of a (near) black pixel, nothing elsewhere."""

    head: str = "sigmoid"

    @nn.compact
    def __call__(self, x, *, train: bool):
        dark = (jnp.mean(x, axis=-1, keepdims=True) < 0.05).astype(jnp.float32)
        near = nn.max_pool(dark, (9, 9), strides=(1, 1), padding="SAME")
        return jnp.broadcast_to(20.0 * (near - 0.5), (*x.shape[:3], 5))


def _data_cfg(**overrides):
    cfg = {
        "resize_shorter": 80,
        "crop_size": 80,
        "eval_size": 96,
        "resize_method": "bilinear",
        "normalization": "none",
        "eval_lesion_crop": "none",
    }
    return ml_collections.ConfigDict({**cfg, **overrides})


def test_one_tile_gives_the_masks_of_a_single_whole_image_pass():
    model = _ConvModel()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 80, 80, 3)), train=False)
    predict_fn = inference.create_predict_fn(model, head="sigmoid")

    def predict(x):
        return predict_fn(variables, x)

    image = np.random.default_rng(2).integers(0, 256, (120, 150, 3), np.uint8)
    box = (0, 0, 120, 120)  # at the training scale exactly one 80 x 80 tile
    tiler = tiling.TiledPredictor(_data_cfg(), SETTINGS, batch_size=2)
    tiled, _ = tiler.probabilities(predict, image, box)
    view = tiling.scaled_view_fn(_data_cfg())(image, box)
    assert view.shape == (80, 80, 3)
    view = view[0:80]
    whole = np.asarray(predict(np.stack([view, view])))[0]
    assert tiled.shape == (80, 80, 5)
    kwargs = {"head": "sigmoid", "threshold": 0.5}
    masks = [
        inference.full_size_masks(p, box, (80, 80), image.shape[:2], **kwargs)
        for p in (
            tiled,
            whole,
        )
    ]
    np.testing.assert_array_equal(masks[0], masks[1])
    assert 0 < masks[0].mean() < 1  # something and not everything was predicted


@pytest.mark.parametrize("mode", ["tiles", "resize"])
def test_plain_skin_image_gets_no_structure_along_its_border(mode):
    from dermseg_jax.data import eval_pipeline

    model = _DarknessModel()
    predict_fn = inference.create_predict_fn(model, head="sigmoid")
    skin = np.empty((90, 200, 3), np.uint8)
    skin[...] = (200, 150, 130)
    data_cfg = _data_cfg()
    prepared = eval_pipeline.inference_preprocessor(data_cfg)(skin)
    if mode == "resize":  # the crop fills [:43, :96] of the padded 96 x 96 frame
        assert tuple(prepared["resized_size"]) == (43, 96)
        probs = np.asarray(predict_fn({}, prepared["image"][None]))[0]
        hw = prepared["resized_size"]
    else:
        tiler = tiling.TiledPredictor(data_cfg, SETTINGS, batch_size=2)
        probs, _ = tiler.probabilities(lambda x: predict_fn({}, x), skin, prepared["crop_box"])
        hw = probs.shape[:2]
    masks = inference.full_size_masks(
        probs, prepared["crop_box"], hw, skin.shape[:2], head="sigmoid", threshold=0.5
    )
    assert masks.shape == (90, 200, 5)
    assert masks.sum() == 0
    # The model does respond to black pixels: a black band is predicted.
    skin[-5:] = 0
    probs, _ = tiling.TiledPredictor(data_cfg, SETTINGS, batch_size=2).probabilities(
        lambda x: predict_fn({}, x), skin, (0, 0, 90, 200)
    )
    assert probs[-1].min() == 255 and probs[:30].max() == 0


def test_banded_view_equals_the_whole_view_and_blending_reads_bands():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (150, 230, 3), np.uint8)
    box = (10, 20, 140, 210)  # 130 x 190 -> shorter side 80: 80 x 116
    view = tiling.scaled_view_fn(_data_cfg(normalization="imagenet"))(image, box)
    assert view.shape == (80, 116, 3)
    whole = view[0:80]
    np.testing.assert_allclose(np.concatenate([view[0:33], view[33:80]]), whole, atol=1e-6)
    small = tiling.TileSettings(tile_size=32, stride=20)
    banded, _ = tiling.predict_tiles(_pointwise, view, small, batch_size=3)
    np.testing.assert_array_equal(
        banded, tiling.predict_tiles(_pointwise, whole, small, batch_size=3)[0]
    )
