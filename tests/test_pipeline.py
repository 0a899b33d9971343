"""Tests of the tf.data pipeline: augmentations (eagerly and inside tf.data), lesion crops,
normalisation, labels, determinism and resumption of training batches, padded evaluation
batches, inference preprocessing and class weights."""

import json

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import torchvision.transforms as T

from dermseg_jax import labels
from dermseg_jax.data import augment, eval_pipeline, lesion_crop, pipeline


def make_config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        {
            "data_dir": None,
            "lesion_crop": "mask",
            "eval_lesion_crop": "mask",
            "resize_shorter": 48,
            "resize_method": "thesis_nearest",
            "crop_size": 32,
            "flip": True,
            "color_jitter": (0.0, 0.0, 0.0, 0.0),
            "normalization": "none",
            "eval_size": 40,
            "shuffle_buffer": 64,
        }
    )
    cfg.update(overrides)
    return cfg


def self_labelled_example(rng, height=60, width=80, index=0, original_scale=1) -> dict:
    """An example whose masks are functions of its own pixels, so alignment is checkable."""
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    thresholds = (200, 150, 100, 220, 60)
    structures = np.stack(
        [image[..., k % 3] > t for k, t in enumerate(thresholds)], axis=-1
    ).astype(np.uint8)
    lesion = np.zeros((height, width, 1), np.uint8)
    lesion[height // 4 : 3 * height // 4, width // 5 : 4 * width // 5] = 1
    return {
        "id": f"img{index}",
        "image": image,
        "structures": structures,
        "lesion": lesion,
        "has_lesion_mask": True,
        "original_height": np.int32(height * original_scale),
        "original_width": np.int32(width * original_scale),
    }


def raw_dataset(examples: list[dict]) -> tf.data.Dataset:
    signature = {
        "id": tf.TensorSpec([], tf.string),
        "image": tf.TensorSpec([None, None, 3], tf.uint8),
        "structures": tf.TensorSpec([None, None, 5], tf.uint8),
        "lesion": tf.TensorSpec([None, None, 1], tf.uint8),
        "has_lesion_mask": tf.TensorSpec([], tf.bool),
        "original_height": tf.TensorSpec([], tf.int32),
        "original_width": tf.TensorSpec([], tf.int32),
    }
    return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)


def as_tensors(example: dict) -> dict:
    return {k: tf.constant(v) for k, v in example.items()}


def in_tf_data(fn, *args):
    """Runs `fn(*args)` inside a tf.data map (graph mode) and returns its numpy output."""
    dataset = tf.data.Dataset.from_tensors(args).map(lambda *a: fn(*a))
    return next(iter(dataset.as_numpy_iterator()))


def assert_aligned(out: dict, atol=0.0):
    """structures/lesion still equal the thresholds of the sampled pixels on valid pixels."""
    pixels = np.round(out["image"] * 255).astype(np.int64)
    valid = out["valid"] > 0
    assert valid.any()
    for k, t in enumerate((200, 150, 100, 220, 60)):
        expected = pixels[..., k % 3] > t
        np.testing.assert_array_equal(out["structures"][..., k][valid], expected[valid])
    assert not out["structures"][~valid].any() and not out["lesion"][~valid].any()
    np.testing.assert_array_equal(out["label"], labels.label_from_structures(out["structures"]))


def test_label_rule_agrees_with_labels_module():
    rng = np.random.default_rng(0)
    structures = (rng.random((7, 9, 5)) < 0.3).astype(np.uint8)
    expected = labels.label_from_structures(structures)
    np.testing.assert_array_equal(augment.label_from_structures(tf.constant(structures)), expected)
    np.testing.assert_array_equal(
        in_tf_data(augment.label_from_structures, tf.constant(structures)), expected
    )
    assert set(np.unique(expected)) == set(range(6))


def test_resized_sizes():
    assert augment.resized_hw_shorter(300, 400, 256).numpy().tolist() == [256, 341]
    assert augment.resized_hw_shorter(500, 200, 256).numpy().tolist() == [640, 256]
    assert augment.resized_hw_longer(300, 400, 256).numpy().tolist() == [192, 256]
    assert augment.resized_hw_longer(401, 100, 256).numpy().tolist() == [256, 64]


@pytest.mark.parametrize("graph", [False, True])
def test_thesis_nearest_takes_floor_of_dst_times_in_over_out(graph):
    h, w, rh, rw = 50, 70, 23, 31
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([rows, cols, rows + cols], -1).astype(np.uint8)
    masks = image[..., :2].copy()
    args = (
        tf.constant(image),
        tf.constant(masks),
        tf.constant([0, 0, h, w]),
        tf.constant([rh, rw]),
        tf.constant([0, 0]),
    )

    def fn(image, masks, box, resized, offset):
        flip = tf.constant([False, False])
        return augment.sample_window(
            image, masks, box, resized, offset, (rh, rw), flip, "thesis_nearest"
        )

    out_image, out_masks, valid = in_tf_data(fn, *args) if graph else fn(*args)
    src_r = np.arange(rh) * h // rh
    src_c = np.arange(rw) * w // rw
    np.testing.assert_array_equal(out_masks, masks[src_r][:, src_c])
    np.testing.assert_array_equal(np.round(np.asarray(out_image) * 255), image[src_r][:, src_c])
    assert np.all(np.asarray(valid) == 1)


@pytest.mark.parametrize("graph", [False, True])
def test_bilinear_window_equals_tf_resize_then_crop(graph):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    box, resized, offset, out_hw = [10, 20, 70, 110], [40, 60], [5, 17], (30, 30)

    def fn(image):
        return augment.sample_window(
            image,
            tf.zeros([90, 120, 1], tf.uint8),
            tf.constant(box),
            tf.constant(resized),
            tf.constant(offset),
            out_hw,
            tf.constant([False, False]),
            "bilinear",
        )

    out = (in_tf_data(fn, tf.constant(image)) if graph else fn(tf.constant(image)))[0]
    region = tf.cast(image[box[0] : box[2], box[1] : box[3]], tf.float32) / 255.0
    reference = tf.image.resize(region, resized, "bilinear", antialias=False).numpy()
    reference = reference[offset[0] : offset[0] + 30, offset[1] : offset[1] + 30]
    np.testing.assert_allclose(out, reference, atol=1e-4)


def test_flips_reverse_the_window():
    rng = np.random.default_rng(2)
    example = as_tensors(self_labelled_example(rng))
    args = (example["image"], example["structures"], tf.constant([0, 0, 60, 80]))

    def window(flip):
        return augment.sample_window(
            *args,
            tf.constant([48, 64]),
            tf.constant([3, 5]),
            (32, 32),
            tf.constant(flip),
            "bilinear",
        )

    plain, flipped = window([False, False]), window([True, True])
    for a, b in zip(plain, flipped, strict=True):
        np.testing.assert_array_equal(np.asarray(a)[::-1, ::-1], b)


@pytest.mark.parametrize("graph", [False, True])
def test_train_augmentations_keep_image_and_masks_aligned(graph):
    rng = np.random.default_rng(3)
    cfg = make_config(lesion_crop="mask", resize_shorter=48, crop_size=32)
    fn = pipeline.train_example_fn(cfg)
    example = as_tensors(self_labelled_example(rng))
    seeds = tf.constant([[s, 0] for s in range(6)], tf.int64)
    if graph:  # one tf.data pipeline over all seeds: tracing is the slow part
        outs = tf.data.Dataset.from_tensor_slices(seeds).map(lambda s: fn(example, s))
        outs = list(outs.as_numpy_iterator())
    else:
        outs = [{k: v.numpy() for k, v in fn(example, s).items()} for s in seeds]
    flips = set()
    for out in outs:
        assert out["image"].shape == (32, 32, 3) and out["label"].dtype == np.int32
        assert out["structures"].shape == (32, 32, 5) and out["lesion"].shape == (32, 32)
        assert_aligned(out)
        # The lesion crop keeps only lesion rows and columns: the crop is all lesion.
        assert np.all(out["lesion"] == 1)
        flips.add(out["image"].tobytes())
    assert len(flips) > 1


def test_packed_masks_unpack_to_the_same_masks():
    rng = np.random.default_rng(5)
    structures = rng.integers(0, 2, (7, 9, 5), dtype=np.uint8)
    lesion = rng.integers(0, 2, (7, 9, 1), dtype=np.uint8)
    packed = augment.pack_masks(tf.constant(structures), tf.constant(lesion))
    assert packed.shape == (7, 9, 1) and packed.dtype == tf.uint8
    got_structures, got_lesion = augment.unpack_masks(packed)
    np.testing.assert_array_equal(got_structures, structures)
    np.testing.assert_array_equal(got_lesion, lesion)


def direct_window(example, cfg, seed):
    """The window sampled straight from the source image (no view): the reference geometry."""
    box = lesion_crop.lesion_box(example, cfg.lesion_crop)
    resized = augment.resized_hw_shorter(box[2] - box[0], box[3] - box[1], cfg.resize_shorter)
    offset, flip = augment.random_window(seed, resized, cfg.crop_size, cfg.flip)
    masks = (example["structures"], example["lesion"])
    crop = (cfg.crop_size, cfg.crop_size)
    return augment.sample_window(
        example["image"], masks, box, resized, offset, crop, flip, cfg.resize_method
    )


@pytest.mark.parametrize("method", ["thesis_nearest", "bilinear"])
def test_view_then_window_equals_sampling_the_source_directly(method):
    # thesis_nearest: bit for bit (same draws, same pixels); bilinear: the view's pixels are
    # rounded to 8 bits, so within half a grey level.
    rng = np.random.default_rng(6)
    cfg = make_config(resize_method=method, resize_shorter=45, crop_size=40)
    example = as_tensors(self_labelled_example(rng, 61, 83))
    fn = pipeline.train_example_fn(cfg)
    for s in range(4):
        seed = tf.constant([s, 9], tf.int64)
        out = fn(example, seed)
        image, (structures, lesion), valid = direct_window(example, cfg, seed)
        atol = 0.0 if method == "thesis_nearest" else 0.5 / 255 + 1e-6
        np.testing.assert_allclose(out["image"], image, rtol=0, atol=atol)
        np.testing.assert_array_equal(out["structures"], structures)
        np.testing.assert_array_equal(out["lesion"], lesion[..., 0])
        np.testing.assert_array_equal(out["valid"], valid)


def test_the_recipes_training_views_fit_the_cache_budget():
    # ISIC 2018: 2334 training images at a shorter side of 384; the thesis: 1590 at 256.
    assert pipeline.view_bytes(2334, 384) <= pipeline.CACHE_BUDGET_BYTES
    assert pipeline.view_bytes(1590, 256) <= pipeline.CACHE_BUDGET_BYTES / 2
    assert pipeline.view_bytes(10_000, 384) > pipeline.CACHE_BUDGET_BYTES


def test_crop_pads_where_the_image_is_smaller():
    rng = np.random.default_rng(4)
    cfg = make_config(lesion_crop="none", resize_shorter=20, crop_size=32, flip=False)
    out = pipeline.train_example_fn(cfg)(
        as_tensors(self_labelled_example(rng, 40, 50)), tf.constant([0, 1], tf.int64)
    )
    out = {k: v.numpy() for k, v in out.items()}
    assert out["valid"].sum() == 20 * 25  # shorter side 20: 40x50 -> 20x25, inside 32x32
    assert not out["image"][out["valid"] == 0].any()
    assert_aligned(out)


def test_lesion_crop_from_mask_equals_the_rows_and_columns_rule():
    h, w = 70, 90
    rows, cols = np.mgrid[:h, :w]
    lesion = (((rows - 30) / 18.0) ** 2 + ((cols - 50) / 25.0) ** 2 <= 1).astype(np.uint8)
    image = np.random.default_rng(5).integers(0, 256, (h, w, 3), dtype=np.uint8)
    keep_rows, keep_cols = lesion.any(axis=1), lesion.any(axis=0)
    thesis_crop = image[keep_rows][:, keep_cols]
    for box in (
        lesion_crop.box_from_mask(tf.constant(lesion[..., None])).numpy(),
        in_tf_data(lesion_crop.box_from_mask, tf.constant(lesion[..., None])),
    ):
        y0, x0, y1, x1 = box
        np.testing.assert_array_equal(image[y0:y1, x0:x1], thesis_crop)
    empty = lesion_crop.box_from_mask(tf.zeros([h, w], tf.uint8)).numpy()
    assert empty.tolist() == [0, 0, h, w]


def dermoscopy_like(rng, h=300, w=400, blob=(120, 250, 60, 90), vignette=True):
    """Skin-coloured noise, a dark elliptical lesion (cy, cx, ry, rx), black vignette corners."""
    image = np.empty((h, w, 3), np.float32)
    image[:] = (215, 160, 140)
    rows, cols = np.mgrid[:h, :w]
    cy, cx, ry, rx = blob
    inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
    image[inside] = (110, 65, 50)
    image += rng.normal(0, 12, image.shape)
    if vignette:
        radius = np.hypot(rows - h / 2, cols - w / 2) / (0.55 * np.hypot(h, w) / 1.414)
        image *= np.clip(1.0 - (radius - 1.0) * 8.0, 0.0, 1.0)[..., None]
    image = np.clip(image, 0, 255).astype(np.uint8)
    return image, (cy - ry, cx - rx, cy + ry + 1, cx + rx + 1)


def box_iou(a, b):
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.mark.parametrize("vignette", [True, False])
def test_auto_crop_finds_a_dark_blob_inside_a_vignette(vignette):
    rng = np.random.default_rng(6)
    image, blob = dermoscopy_like(rng, vignette=vignette)
    if vignette:
        assert image[0, 0].max() < 20 and image[-1, -1].max() < 20
    for box in (
        lesion_crop.auto_box(tf.constant(image)).numpy(),
        in_tf_data(lesion_crop.auto_box, tf.constant(image)),
    ):
        assert box[0] <= blob[0] and box[1] <= blob[1] and box[2] >= blob[2] and box[3] >= blob[3]
        assert box_iou(box, blob) > 0.6, (box, blob)


def test_auto_crop_falls_back_to_the_whole_image_without_a_lesion():
    rng = np.random.default_rng(7)
    skin = np.clip(rng.normal((215, 160, 140), 10, (120, 160, 3)), 0, 255).astype(np.uint8)
    assert lesion_crop.auto_box(tf.constant(skin)).numpy().tolist() == [0, 0, 120, 160]


def test_mask_crop_falls_back_to_auto_without_a_mask():
    rng = np.random.default_rng(8)
    image, _ = dermoscopy_like(rng)
    example = {
        "image": tf.constant(image),
        "lesion": tf.ones([300, 400, 1], tf.uint8),
        "has_lesion_mask": tf.constant(False),
    }
    auto = lesion_crop.auto_box(example["image"]).numpy()
    np.testing.assert_array_equal(lesion_crop.lesion_box(example, "mask"), auto)
    example["has_lesion_mask"] = tf.constant(True)
    assert lesion_crop.lesion_box(example, "mask").numpy().tolist() == [0, 0, 300, 400]
    with pytest.raises(ValueError, match="lesion crop"):
        lesion_crop.lesion_box(example, "bbox")


def test_thesis_wrap_reproduces_torchvision_normalize_then_to_pil():
    rng = np.random.default_rng(9)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mean, std = augment.NORMALIZATION["thesis_wrap"]
    torch_wrapped = np.array(T.ToPILImage()(T.Normalize(mean, std)(T.ToTensor()(image))))
    x = tf.constant(image, tf.float32) / 255.0
    ones = tf.ones([16, 16])
    for out in (
        augment.normalize(x, ones, "thesis_wrap").numpy(),
        in_tf_data(lambda a, v: augment.normalize(a, v, "thesis_wrap"), x, ones),
    ):
        np.testing.assert_array_equal(np.round(out * 255).astype(np.uint8), torch_wrapped)


def test_normalization_constants():
    norm = augment.NORMALIZATION
    assert set(norm) == {"none", "thesis_wrap", "isic", "imagenet"}
    assert norm["thesis_wrap"] == ((0.1769, 0.1479, 0.1367), (0.0352, 0.0378, 0.0417))
    assert norm["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean_pixel = tf.constant([[norm["imagenet"][0]]], tf.float32)
    np.testing.assert_allclose(
        augment.normalize(mean_pixel, tf.ones([1, 1]), "imagenet"), 0, atol=1e-6
    )
    with pytest.raises(ValueError, match="normalization"):
        augment.normalize(mean_pixel, tf.ones([1, 1]), "zscore")


@pytest.mark.parametrize("graph", [False, True])
def test_color_jitter(graph):
    rng = np.random.default_rng(10)
    image = tf.constant(rng.random((16, 16, 3)), tf.float32)
    valid = tf.constant(np.pad(np.ones((16, 12)), ((0, 0), (0, 4))), tf.float32)
    image = image * valid[..., None]

    def jitter(seed, strength):
        def fn(i, v, s):
            return augment.color_jitter(i, v, augment.jitter_factors(s, strength))

        args = (image, valid, tf.constant(seed, tf.int64))
        return in_tf_data(fn, *args) if graph else fn(*args).numpy()

    np.testing.assert_allclose(jitter([1, 1], (0.0, 0.0, 0.0, 0.0)), image, atol=1e-5)
    a, b = jitter([1, 1], (0.05,) * 4), jitter([1, 2], (0.05,) * 4)
    np.testing.assert_array_equal(a, jitter([1, 1], (0.05,) * 4))
    assert not np.allclose(a, b) and not np.allclose(a, image)
    assert a.min() >= 0 and a.max() <= 1 and not a[:, 12:].any()
    assert np.abs(a - image.numpy()).max() < 0.2
    factors = augment.jitter_factors(tf.constant([1, 1], tf.int64), (0.05, 0.0, 0.1, 0.05))
    lo, hi = np.array([0.95, 1, 0.9, -0.05]), np.array([1.05, 1, 1.1, 0.05])
    assert np.all((factors >= lo) & (factors <= hi)) and factors[1] == 1.0
    # Batched (as the pipeline applies it) equals one image at a time.
    seeds = tf.constant([[1, 1], [1, 2]], tf.int64)
    batch_factors = tf.stack([augment.jitter_factors(s, (0.05,) * 4) for s in seeds])
    batched = augment.color_jitter(
        tf.stack([image, image]), tf.stack([valid, valid]), batch_factors
    )
    np.testing.assert_allclose(batched[1], b, atol=1e-6)


def train_batches(examples, cfg, *, seed, start_step=0, steps=4, batch_size=2, cache=False):
    dataset = pipeline.build_train_dataset(
        raw_dataset(examples),
        cfg,
        num_examples=len(examples),
        batch_size=batch_size,
        seed=seed,
        start_step=start_step,
        cache=cache,
    )
    return list(dataset.take(steps).as_numpy_iterator())


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_batches_are_determined_by_the_seed():
    rng = np.random.default_rng(11)
    examples = [self_labelled_example(rng, index=i) for i in range(5)]
    cfg = make_config(color_jitter=(0.05,) * 4, normalization="thesis_wrap")
    first = train_batches(examples, cfg, seed=3)
    assert_same_batches(first, train_batches(examples, cfg, seed=3))
    other = train_batches(examples, cfg, seed=4)
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    batch = first[0]
    assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2, 32, 32) and batch["label"].dtype == np.int32
    assert batch["structures"].shape == (2, 32, 32, 5) and batch["structures"].dtype == np.uint8
    assert batch["lesion"].shape == (2, 32, 32) and batch["lesion"].dtype == np.uint8
    assert batch["valid"].shape == (2, 32, 32) and batch["valid"].dtype == np.float32


def test_resumed_run_sees_the_batches_of_the_uninterrupted_run():
    rng = np.random.default_rng(12)
    examples = [self_labelled_example(rng, index=i) for i in range(5)]
    cfg = make_config(color_jitter=(0.05,) * 4)
    full = train_batches(examples, cfg, seed=5, steps=9)  # 5 examples, batches of 2: 3+ epochs
    for start, cache in ((1, False), (3, True), (7, False)):
        resumed = train_batches(
            examples, cfg, seed=5, start_step=start, steps=9 - start, cache=cache
        )
        assert_same_batches(full[start:], resumed)


def test_each_epoch_visits_every_example_once_in_a_new_order():
    examples = []
    for i in range(6):
        ex = self_labelled_example(np.random.default_rng(i), index=i)
        ex["image"][:] = 10 * (i + 1)  # identify the example by its colour
        examples.append(ex)
    cfg = make_config(lesion_crop="none", shuffle_buffer=6)
    batches = train_batches(examples, cfg, seed=0, steps=6, batch_size=3)
    seen = np.concatenate([np.round(b["image"][:, 0, 0, 0] * 255) for b in batches])
    epochs = seen.reshape(3, 6)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == [10.0 * (i + 1) for i in range(6)]
    assert not (np.array_equal(epochs[0], epochs[1]) and np.array_equal(epochs[1], epochs[2]))


def test_eval_batches_count_every_image_exactly_once():
    rng = np.random.default_rng(13)
    examples = [
        self_labelled_example(rng, 50 + 3 * i, 70, index=i, original_scale=2) for i in range(5)
    ]
    cfg = make_config(eval_lesion_crop="mask", eval_size=40)
    batches = list(
        eval_pipeline.build_eval_dataset(
            raw_dataset(examples), cfg, batch_size=2
        ).as_numpy_iterator()
    )
    assert len(batches) == 3
    assert all(b["image"].shape == (2, 40, 40, 3) for b in batches)
    valid_images = np.concatenate([b["valid"].reshape(2, -1).max(axis=1) for b in batches])
    np.testing.assert_array_equal(valid_images, [1, 1, 1, 1, 1, 0])
    ids = np.concatenate([b["id"] for b in batches])
    assert ids.tolist() == [b"img0", b"img1", b"img2", b"img3", b"img4", b""]
    last = batches[-1]
    assert not last["image"][1].any() and not last["valid"][1].any()
    for b in batches:
        for j in np.flatnonzero(b["id"] != b""):
            rh, rw = b["resized_size"][j]
            assert b["valid"][j].sum() == rh * rw
            assert_aligned(
                {k: b[k][j] for k in ("image", "structures", "lesion", "label", "valid")}
            )
    first = batches[0]
    h, w = 50, 70  # lesion rows h/4..3h/4, cols w/5..4w/5, in original (2x) pixels
    assert first["crop_box"][0].tolist() == [
        2 * (h // 4),
        2 * (w // 5),
        2 * (3 * h // 4),
        2 * (4 * w // 5),
    ]
    assert first["original_size"][0].tolist() == [100, 140]
    assert first["resized_size"][0].tolist() == [24, 40]


def test_preprocess_for_inference_matches_the_eval_dataset():
    rng = np.random.default_rng(14)
    image, _ = dermoscopy_like(rng, 150, 200, blob=(60, 110, 30, 45))
    example = {
        "id": "x",
        "image": image,
        "structures": np.zeros((150, 200, 5), np.uint8),
        "lesion": np.zeros((150, 200, 1), np.uint8),
        "has_lesion_mask": False,
        "original_height": np.int32(150),
        "original_width": np.int32(200),
    }
    cfg = make_config(eval_lesion_crop="auto", resize_method="bilinear", normalization="imagenet")
    batch = next(
        eval_pipeline.build_eval_dataset(
            raw_dataset([example]), cfg, batch_size=1
        ).as_numpy_iterator()
    )
    preprocess = eval_pipeline.inference_preprocessor(cfg)
    single = preprocess(image)
    for key in ("image", "valid", "crop_box", "original_size", "resized_size"):
        np.testing.assert_allclose(single[key], batch[key][0], atol=1e-6, err_msg=key)
    assert single["crop_box"].tolist() != [0, 0, 150, 200]
    with pytest.raises(ValueError, match="uint8"):
        preprocess(image.astype(np.float32))


def test_class_counts_and_weights(tmp_path):
    rng = np.random.default_rng(15)
    examples = [self_labelled_example(rng, index=i) for i in range(3)]
    examples[2]["has_lesion_mask"] = False
    record = pipeline.count_classes(raw_dataset(examples))
    label_maps = [labels.label_from_structures(e["structures"]) for e in examples]
    whole = np.bincount(np.concatenate([m.ravel() for m in label_maps]), minlength=6)
    h, w = 60, 80  # lesion rows h/4..3h/4, cols w/5..4w/5 (whole image without a mask)
    crops = [m[h // 4 : 3 * h // 4, w // 5 : 4 * w // 5] for m in label_maps[:2]] + [label_maps[2]]
    in_crop = np.bincount(np.concatenate([c.ravel() for c in crops]), minlength=6)
    assert record["class_pixels"] == whole.tolist()
    assert record["class_pixels_lesion_crop"] == in_crop.tolist()
    assert record["lesion_pixels"] == sum(int(e["lesion"].sum()) for e in examples)
    assert record["images"] == 3

    (tmp_path / pipeline.CLASS_COUNTS_FILE).write_text(
        json.dumps(
            {"class_pixels": [1000, 10, 10, 100, 5, 20], "class_pixels_lesion_crop": [1] * 6}
        )
    )
    weights = pipeline.class_weights(make_config(data_dir=str(tmp_path), lesion_crop="none"))
    assert weights.shape == (6,) and weights.dtype == np.float32
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(weights[1] / weights[0], 100.0, rtol=1e-5)
    np.testing.assert_allclose(weights[4] / weights[3], 20.0, rtol=1e-5)
    crop_weights = pipeline.class_weights(make_config(data_dir=str(tmp_path), lesion_crop="mask"))
    np.testing.assert_allclose(crop_weights, np.full(6, 1 / 6), rtol=1e-6)


@pytest.fixture(scope="module")
def prepared_synthetic(tmp_path_factory):
    """A tiny synthetic data set written by the real `prepare` (ISIC 2018 layout -> TFDS)."""
    from dermseg_jax.data import prepare

    cache = tmp_path_factory.mktemp("synthetic")
    return prepare.ensure_synthetic(
        cache_dir=cache, n_train=6, n_val=5, n_test=0, seed=3, image_size=(120, 150)
    )


def test_end_to_end_on_a_prepared_synthetic_set(prepared_synthetic):
    cfg = make_config(
        data_dir=str(prepared_synthetic),
        eval_lesion_crop="auto",
        resize_method="bilinear",
        color_jitter=(0.05,) * 4,
        normalization="imagenet",
    )
    train = pipeline.create_train_dataset(cfg, batch_size=4, seed=0)
    batches = [next(train) for _ in range(3)]
    resumed = pipeline.create_train_dataset(cfg, batch_size=4, seed=0, start_step=2)
    assert_same_batches(batches[2:], [next(resumed)])
    assert batches[0]["image"].shape == (4, 32, 32, 3)
    assert all(b["lesion"].mean() > 0.5 for b in batches)  # lesion crops are mostly lesion

    evaluated = list(eval_pipeline.create_eval_dataset(cfg, split="validation", batch_size=2))
    assert len(evaluated) == 3
    ids = [i for b in evaluated for i in b["id"] if i]
    assert len(ids) == len(set(ids)) == 5
    assert sum(int(b["valid"][j].any()) for b in evaluated for j in range(2)) == 5
    weights = pipeline.class_weights(cfg)
    assert weights.shape == (6,) and np.isclose(weights.sum(), 1.0)


def test_auto_crop_keeps_the_lesion_of_synthetic_images(prepared_synthetic):
    raw, n = pipeline.read_split(str(prepared_synthetic), "validation")
    boxes = raw.map(lambda ex: (lesion_crop.auto_box(ex["image"]), ex["lesion"], ex["image"]))
    for box, lesion, image in boxes.as_numpy_iterator():
        y0, x0, y1, x1 = box
        kept = lesion[y0:y1, x0:x1].sum() / lesion.sum()
        assert kept > 0.95, box
        # A crop, not the whole image: the box is at most ~1.5x the lesion's own box.
        my0, mx0, my1, mx1 = lesion_crop.box_from_mask(tf.constant(lesion)).numpy()
        assert (y1 - y0) * (x1 - x0) < 1.6 * (my1 - my0) * (mx1 - mx0), (box, image.shape)
