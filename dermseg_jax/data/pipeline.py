"""tf.data training pipeline, the reading of prepared data sets, and their class weights.

Reading (`read_split`: a TFDS data set directory, see docs/design.md "Data") is kept apart from
the raw-example -> batch transformation (`build_train_dataset`), so both can be tested and the
latter fed from any `tf.data.Dataset` of raw examples: `id` string, `image` uint8 [H, W, 3],
`structures` uint8 [H, W, 5], `lesion` uint8 [H, W, 1] (both in {0, 1}), `has_lesion_mask`
bool, `original_height`, `original_width` int32. Evaluation batches: `eval_pipeline.py`.

Why two halves: decoding a stored image and resizing its lesion crop cost far more than the
random part, and at the training scale with the masks packed into one byte the result (the
"view", `training_view_fn`) is ~10x smaller than the decoded source, so it is what the cache
keeps; each step then only crops, flips and colours the view (`window_fn`;
docs/input_pipeline.md has the figures).

Determinism and resumption: epoch e visits the process's shard in the order of a shuffle seeded
by (seed, process, e), and the i-th example of the whole stream is augmented with the stateless
seed (seed, process, i). Batch k is therefore a function of (seed, k) alone, and a run started at
`start_step=k` begins at epoch k * B // n, skips the first k * B % n examples of that epoch and
yields exactly the batches the uninterrupted run yields from step k.
"""

import json
import os
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from dermseg_jax import labels
from dermseg_jax.data import augment, lesion_crop

CLASS_COUNTS_FILE = "class_counts.json"
_INT64_MAX = np.iinfo(np.int64).max
# `data_cfg.cache=None` (the default) keeps the training views in memory when they fit in this
# many bytes: image 3 + packed masks 1 bytes a pixel, at ISIC's usual 4:3 aspect.
CACHE_BUDGET_BYTES = 2 << 30
_VIEW_BYTES_PER_PIXEL = 4
_VIEW_ASPECT = 4 / 3
_SHUFFLE_STREAM = 2**31 - 1


def _hide_gpus_from_tf() -> None:
    # TF must not grab the accelerator memory JAX is about to use.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF's runtime is already initialised; nothing left to change.
        pass


_hide_gpus_from_tf()


def resolve_data_dir(data_cfg: ml_collections.ConfigDict) -> str:
    """`data_cfg.data_dir`, or the built-in synthetic set (prepared once) when it is None."""
    if data_cfg.data_dir is not None:
        return os.fspath(data_cfg.data_dir)
    from dermseg_jax.data import prepare  # noqa: PLC0415  (pulls in the prepare-time readers)

    return os.fspath(
        prepare.ensure_synthetic(
            cache_dir=data_cfg.synthetic_cache,
            n_train=data_cfg.synthetic_num_train,
            n_val=data_cfg.synthetic_num_val,
            n_test=data_cfg.synthetic_num_test,
            seed=data_cfg.synthetic_seed,
            image_size=data_cfg.synthetic_image_size,
        )
    )


def read_split(
    data_dir: str, split: str, *, process_index: int = 0, process_count: int = 1
) -> tuple[tf.data.Dataset, int]:
    """Reads this process's even share of a split of a prepared data set, in file order.

    Returns:
        (dataset of raw examples, number of examples in it).
    """
    builder = tfds.builder_from_directory(data_dir)
    if split not in builder.info.splits:
        raise ValueError(
            f"{data_dir}: no split {split!r}; prepared splits: {sorted(builder.info.splits)}"
        )
    sub_split = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
    num_examples = builder.info.splits[sub_split].num_examples
    if num_examples == 0:
        raise ValueError(f"{data_dir}: split {sub_split!r} holds no examples")
    # No TFDS auto-cache: it would keep a small set's decoded images in memory whatever
    # `data_cfg.cache` says (and makes an uncached benchmark time a cached pipeline).
    read_config = tfds.ReadConfig(try_autocache=False)
    dataset = builder.as_dataset(split=sub_split, shuffle_files=False, read_config=read_config)
    return dataset, num_examples


def _example_seed(base: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(base, index)


def training_view_fn(data_cfg: ml_collections.ConfigDict):
    """The deterministic half of the training transform: `raw example -> view`.

    The view is the lesion crop (`lesion_crop`) resized so its shorter side is `resize_shorter`
    (`resize_method`): `image` uint8 [h, w, 3] (bilinear values rounded to 8 bits, as PIL's
    resize gives) and `masks` uint8 [h, w, 1] (`augment.pack_masks`). It is what the cache
    holds: at the training scale with masks packed it is 4 bytes a pixel, where the decoded
    source is 9 bytes a pixel at the stored size.
    """

    def fn(example: dict) -> dict:
        box = lesion_crop.lesion_box(example, data_cfg.lesion_crop)
        resized = augment.resized_hw_shorter(
            box[2] - box[0], box[3] - box[1], data_cfg.resize_shorter
        )
        image, (structures, lesion), _ = augment.sample_window(
            example["image"],
            (example["structures"], example["lesion"]),
            box,
            resized,
            tf.zeros([2], tf.int32),
            resized,
            tf.constant([False, False]),
            data_cfg.resize_method,
        )
        image = tf.cast(tf.round(image * 255.0), tf.uint8)
        return {"image": image, "masks": augment.pack_masks(structures, lesion)}

    return fn


def window_fn(data_cfg: ml_collections.ConfigDict):
    """The random half: `(view, seed [2]) -> example dict` (crop, padding, flips, jitter draw).

    A random `crop_size` window of the view (padded where the view is smaller) and flips,
    by index gathers of the window's pixels only. The image is float32 in [0, 1], not yet
    coloured: with jitter on, the example carries its drawn factors under `jitter` [4] and
    `build_train_dataset` applies jitter and normalisation per batch (batched ops are cheaper).
    """
    crop = int(data_cfg.crop_size)
    jitter = tuple(float(v) for v in data_cfg.color_jitter)
    if len(jitter) != 4:
        raise ValueError(f"color_jitter needs 4 strengths (b, c, s, h), got {jitter}")

    def fn(view: dict, seed: tf.Tensor) -> dict:
        hw = tf.shape(view["image"])[:2]
        offset, flip = augment.random_window(seed, hw, crop, bool(data_cfg.flip))
        box = tf.concat([tf.zeros([2], tf.int32), hw], 0)
        image, masks, valid = augment.sample_window(
            view["image"], view["masks"], box, hw, offset, (crop, crop), flip, "thesis_nearest"
        )
        out = finish_example(image, augment.unpack_masks(masks), valid, None)
        if any(jitter):
            out["jitter"] = augment.jitter_factors(seed, jitter)
        return out

    return fn


def train_example_fn(data_cfg: ml_collections.ConfigDict):
    """The whole per-example training transform `(raw example, seed [2]) -> example dict`:
    `training_view_fn` then `window_fn`. With 'thesis_nearest' this equals the thesis' order
    (jitter, wrap, resize, crop, flip: jitter and wrap are per-pixel), except that the
    contrast mean is the crop's."""
    view, window = training_view_fn(data_cfg), window_fn(data_cfg)
    return lambda example, seed: window(view(example), seed)


def finish_example(image, masks, valid, normalization: str | None) -> dict:
    """An example dict (docs/design.md "Data") from a sampled window; normalised unless None."""
    structures, lesion = masks
    if normalization is not None:
        image = augment.normalize(image, valid, normalization)
    return {
        "image": image,
        "label": augment.label_from_structures(structures),
        "structures": structures,
        "lesion": lesion[..., 0],
        "valid": valid,
    }


def build_train_dataset(
    raw: tf.data.Dataset,
    data_cfg: ml_collections.ConfigDict,
    *,
    num_examples: int,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    cache: bool = False,
) -> tf.data.Dataset:
    """Turns this process's raw examples into the infinite, deterministic training batches.

    Args:
        raw: raw examples of this process's shard, in a fixed order.
        data_cfg: the data config.
        num_examples: number of examples in `raw`.
        batch_size: examples per batch (this process's share of the global batch).
        seed: data seed; batch k is a function of (seed, process_index, k).
        start_step: the first batch to yield (resumption).
        process_index: folded into the seeds so processes see different augmentations.
        cache: keep the training views (`training_view_fn`) in memory after the first epoch:
            decoding and resizing then happen once per run; results are identical either way.

    Returns:
        Dataset of dicts: image float32 [B, c, c, 3], label int32 [B, c, c], structures uint8
        [B, c, c, 5], lesion uint8 [B, c, c], valid float32 [B, c, c], c = `crop_size`.
    """
    if num_examples <= 0:
        raise ValueError(f"the training split is empty (num_examples={num_examples})")
    if batch_size <= 0 or start_step < 0:
        raise ValueError(f"need batch_size > 0 and start_step >= 0, got {batch_size}, {start_step}")
    views = raw.map(
        training_view_fn(data_cfg), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    if cache:
        views = views.cache()
    base = tf.constant([seed, process_index], tf.int64)
    shuffle_base = _example_seed(base, _SHUFFLE_STREAM)  # apart from the augmentation seeds
    buffer = max(1, min(int(data_cfg.shuffle_buffer), num_examples))

    def epoch(e):
        shuffle_seed = tf.random.stateless_uniform(
            [], _example_seed(shuffle_base, e), minval=0, maxval=_INT64_MAX, dtype=tf.int64
        )
        return views.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

    first = start_step * batch_size
    stream = tf.data.Dataset.counter(first // num_examples).flat_map(epoch)
    stream = stream.skip(first % num_examples).enumerate(start=first)
    window = window_fn(data_cfg)
    stream = stream.map(
        lambda i, view: window(view, _example_seed(base, i)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    stream = stream.batch(batch_size, drop_remainder=True)
    stream = stream.map(
        lambda batch: _colour_batch(batch, data_cfg.normalization),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return stream.prefetch(tf.data.AUTOTUNE)


def _colour_batch(batch: dict, normalization: str) -> dict:
    batch = dict(batch)
    image = batch["image"]
    if "jitter" in batch:
        image = augment.color_jitter(image, batch["valid"], batch.pop("jitter"))
    batch["image"] = augment.normalize(image, batch["valid"], normalization)
    return batch


def create_train_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of numpy training batches of this process (see `build_train_dataset`).

    A run resumed with `start_step=k` sees exactly the batches the uninterrupted run saw from
    step k. `data_cfg.cache` None (default) caches the training views when they fit in
    `CACHE_BUDGET_BYTES` (`view_bytes`).
    """
    data_dir = resolve_data_dir(data_cfg)
    raw, n = read_split(data_dir, "train", process_index=process_index, process_count=process_count)
    cache = data_cfg.get("cache", None)
    if cache is None:
        cache = view_bytes(n, int(data_cfg.resize_shorter)) <= CACHE_BUDGET_BYTES
    logging.info("Training input: %d examples in this process's shard, cache=%s", n, cache)
    dataset = build_train_dataset(
        raw,
        data_cfg,
        num_examples=n,
        batch_size=batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        cache=bool(cache),
    )
    return iter(tfds.as_numpy(dataset))


def view_bytes(num_examples: int, resize_shorter: int) -> float:
    """Estimated memory of `num_examples` training views: 4 bytes a pixel at a 4:3 aspect."""
    return num_examples * resize_shorter**2 * _VIEW_ASPECT * _VIEW_BYTES_PER_PIXEL


def count_classes(raw: tf.data.Dataset) -> dict[str, list[int] | int]:
    """Pixel counts of the softmax classes over raw examples (the keys `prepare` writes).

    Returns:
        {'class_pixels': [6] over whole images, 'class_pixels_lesion_crop': [6] inside the
        lesion mask's rows and columns (whole image without a mask), 'lesion_pixels', 'images'}.
    """

    def count(example):
        label = augment.label_from_structures(example["structures"])
        usable = tf.cast(example["has_lesion_mask"], tf.bool)
        box = tf.cond(
            usable,
            lambda: lesion_crop.box_from_mask(example["lesion"]),
            lambda: lesion_crop.whole_box(tf.shape(label)[0], tf.shape(label)[1]),
        )
        crop = label[box[0] : box[2], box[1] : box[3]]
        return (
            _bincount(label),
            _bincount(crop),
            tf.reduce_sum(tf.cast(example["lesion"] > 0, tf.int64)),
        )

    record = {
        "class_pixels": np.zeros(labels.NUM_CLASSES, np.int64),
        "class_pixels_lesion_crop": np.zeros(labels.NUM_CLASSES, np.int64),
        "lesion_pixels": 0,
        "images": 0,
    }
    for whole, crop, lesion in raw.map(
        count, num_parallel_calls=tf.data.AUTOTUNE
    ).as_numpy_iterator():
        record["class_pixels"] += whole
        record["class_pixels_lesion_crop"] += crop
        record["lesion_pixels"] += int(lesion)
        record["images"] += 1
    record["class_pixels"] = record["class_pixels"].tolist()
    record["class_pixels_lesion_crop"] = record["class_pixels_lesion_crop"].tolist()
    return record


def _bincount(label: tf.Tensor) -> tf.Tensor:
    return tf.math.bincount(
        tf.reshape(label, [-1]),
        minlength=labels.NUM_CLASSES,
        maxlength=labels.NUM_CLASSES,
        dtype=tf.int64,
    )


def class_weights(data_cfg: ml_collections.ConfigDict) -> np.ndarray:
    """Class weights of the training split: inverse pixel frequency, normalised to sum 1.

    Reads `DATA_DIR/class_counts.json` (written by `prepare`; computed from the training split
    and cached there when missing). With `lesion_crop='mask'` the counts inside the lesion
    crops are used, as those crops are what training sees; else whole-image counts.

    Returns:
        float32 [6] in `labels.CLASS_NAMES` order (`prepare.class_weights_from_counts`).
    """
    from dermseg_jax.data import prepare  # noqa: PLC0415

    data_dir = resolve_data_dir(data_cfg)
    path = os.path.join(data_dir, CLASS_COUNTS_FILE)
    if os.path.exists(path):
        record = prepare.load_class_counts(data_dir)
    else:
        logging.info("%s missing: counting the training split's pixels", path)
        record = count_classes(read_split(data_dir, "train")[0])
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
    key = "class_pixels_lesion_crop" if data_cfg.lesion_crop == "mask" else "class_pixels"
    if key not in record:
        raise ValueError(f"{path}: no {key!r} entry (keys: {sorted(record)})")
    return prepare.class_weights_from_counts(record, key)
