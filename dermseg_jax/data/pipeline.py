"""tf.data training and evaluation pipelines, and the class weights of a prepared data set.

Reading (`read_split`: a TFDS data set directory, see docs/design.md "Data") is kept apart from
the raw-example -> batch transformation (`build_train_dataset`, `build_eval_dataset`), so both
can be tested and the latter fed from any `tf.data.Dataset` of raw examples:
`id` string, `image` uint8 [H, W, 3], `structures` uint8 [H, W, 5], `lesion` uint8 [H, W, 1],
`has_lesion_mask` bool, `original_height`, `original_width` int32.

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
from dermseg_jax.data.augment import NORMALIZATION  # noqa: F401  (the design's home for it)

CLASS_COUNTS_FILE = "class_counts.json"
_INT64_MAX = np.iinfo(np.int64).max
# `data_cfg.cache=None` (the default) keeps the decoded training shard in memory when it fits in
# this many bytes (image 3 + structures 5 + lesion 1 bytes a pixel).
CACHE_BUDGET_BYTES = 2 << 30
_BYTES_PER_PIXEL = 9
_SHUFFLE_STREAM = 2**31 - 1


def _hide_gpus_from_tf() -> None:
    # TF must not grab the accelerator memory JAX is about to use.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF's runtime is already initialised; nothing left to change.
        pass


_hide_gpus_from_tf()


def _get(data_cfg: ml_collections.ConfigDict, name: str, default):
    return data_cfg[name] if name in data_cfg else default


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
    dataset = builder.as_dataset(split=sub_split, shuffle_files=False)
    return dataset, num_examples


def _example_seed(base: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(base, index)


def train_example_fn(data_cfg: ml_collections.ConfigDict):
    """The per-example geometric training transform `(raw example, seed [2]) -> example dict`.

    Lesion crop (`lesion_crop`; or the example's precomputed `box`), resize of the shorter side
    to `resize_shorter`, random `crop_size` crop (padded where smaller), flips. The image is
    float32 in [0, 1], not yet coloured: when jitter is on, the example carries its drawn
    factors under `jitter` [4], and `build_train_dataset` applies jitter and normalisation per
    batch. Geometry comes first and only the crop's pixels are sampled; jitter and the thesis'
    wrap are per-pixel, so with 'thesis_nearest' this equals the thesis' order (jitter, wrap,
    resize, crop, flip), except that the contrast mean is the crop's.
    """
    crop = int(data_cfg.crop_size)
    jitter = tuple(float(v) for v in data_cfg.color_jitter)
    if len(jitter) != 4:
        raise ValueError(f"color_jitter needs 4 strengths (b, c, s, h), got {jitter}")

    def fn(example: dict, seed: tf.Tensor) -> dict:
        if "box" in example:
            box = example["box"]
        else:
            box = lesion_crop.lesion_box(example, data_cfg.lesion_crop)
        resized = augment.resized_hw_shorter(
            box[2] - box[0], box[3] - box[1], data_cfg.resize_shorter
        )
        offset, flip = augment.random_window(seed, resized, crop, bool(data_cfg.flip))
        masks = (example["structures"], example["lesion"])
        image, masks, valid = augment.sample_window(
            example["image"],
            masks,
            box,
            resized,
            offset,
            (crop, crop),
            flip,
            data_cfg.resize_method,
        )
        out = _finish(image, masks, valid, None)
        if any(jitter):  # applied per batch (`_colour_batch`): batched ops are much cheaper
            out["jitter"] = augment.jitter_factors(seed, jitter)
        return out

    return fn


def _finish(image, masks, valid, normalization: str | None) -> dict:
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
        cache: keep the decoded raw examples in memory after the first epoch (decoding
            dominates the cost of the pipeline); results are identical either way.

    Returns:
        Dataset of dicts: image float32 [B, c, c, 3], label int32 [B, c, c], structures uint8
        [B, c, c, 5], lesion uint8 [B, c, c], valid float32 [B, c, c], c = `crop_size`.
    """
    if num_examples <= 0:
        raise ValueError(f"the training split is empty (num_examples={num_examples})")
    if batch_size <= 0 or start_step < 0:
        raise ValueError(f"need batch_size > 0 and start_step >= 0, got {batch_size}, {start_step}")
    keys = ("image", "structures", "lesion")

    def with_box(example):
        # The lesion box is a deterministic function of the example: computed once, and cached.
        out = {k: example[k] for k in keys}
        out["box"] = lesion_crop.lesion_box(example, data_cfg.lesion_crop)
        return out

    raw = raw.map(with_box, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
        raw = raw.cache()
    base = tf.constant([seed, process_index], tf.int64)
    shuffle_base = _example_seed(base, _SHUFFLE_STREAM)  # apart from the augmentation seeds
    buffer = max(1, min(int(data_cfg.shuffle_buffer), num_examples))

    def epoch(e):
        shuffle_seed = tf.random.stateless_uniform(
            [], _example_seed(shuffle_base, e), minval=0, maxval=_INT64_MAX, dtype=tf.int64
        )
        return raw.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)

    first = start_step * batch_size
    stream = tf.data.Dataset.counter(first // num_examples).flat_map(epoch)
    stream = stream.skip(first % num_examples).enumerate(start=first)
    example_fn = train_example_fn(data_cfg)
    stream = stream.map(
        lambda i, ex: example_fn(ex, _example_seed(base, i)),
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
    step k.
    """
    data_dir = resolve_data_dir(data_cfg)
    raw, n = read_split(data_dir, "train", process_index=process_index, process_count=process_count)
    cache = _get(data_cfg, "cache", None)
    if cache is None:
        cache = _decoded_bytes(data_dir) / process_count <= CACHE_BUDGET_BYTES
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


def _decoded_bytes(data_dir: str) -> float:
    """Decoded size of the training split per `class_counts.json` (inf when unknown)."""
    try:
        with open(os.path.join(data_dir, CLASS_COUNTS_FILE)) as f:
            return float(json.load(f)["total_pixels"]) * _BYTES_PER_PIXEL
    except (OSError, KeyError, ValueError):
        return float("inf")


def eval_example_fn(data_cfg: ml_collections.ConfigDict):
    """The per-example evaluation transform `raw example -> example dict` (no randomness).

    Lesion crop per `eval_lesion_crop` (default 'auto'), resize so the longer side is
    `eval_size`, zero padding to `eval_size x eval_size` at the bottom and right (`valid` 0).
    Adds `id`, `original_size` int32 [2], `crop_box` int32 [4] (y0, x0, y1, x1 in the original
    image's pixels, end exclusive) and `resized_size` int32 [2] (the crop's size inside the
    padded frame), so predictions map back onto the original image.
    """
    size = int(data_cfg.eval_size)
    mode = _get(data_cfg, "eval_lesion_crop", "auto")
    normalization = _get(data_cfg, "eval_normalization", None) or data_cfg.normalization

    def fn(example: dict) -> dict:
        box = lesion_crop.lesion_box(example, mode)
        resized = augment.resized_hw_longer(box[2] - box[0], box[3] - box[1], size)
        masks = (example["structures"], example["lesion"])
        no = tf.constant([False, False])
        image, masks, valid = augment.sample_window(
            example["image"],
            masks,
            box,
            resized,
            tf.zeros([2], tf.int32),
            (size, size),
            no,
            data_cfg.resize_method,
        )
        out = _finish(image, masks, valid, normalization)
        stored = tf.shape(example["image"])[:2]
        original = tf.cast(
            tf.stack([example["original_height"], example["original_width"]]), tf.int32
        )
        # The prepared image may be a downscaled copy: express the box in original pixels.
        ratio = tf.cast(tf.tile(original, [2]), tf.float64) / tf.cast(
            tf.tile(stored, [2]), tf.float64
        )
        out["crop_box"] = tf.cast(tf.round(tf.cast(box, tf.float64) * ratio), tf.int32)
        out["original_size"] = original
        out["resized_size"] = resized
        out["id"] = example["id"]
        return out

    return fn


def _pad_batch(batch: dict, batch_size: int) -> dict:
    missing = batch_size - tf.shape(batch["valid"])[0]

    def pad(x):
        paddings = tf.concat([[[0, missing]], tf.zeros([tf.rank(x) - 1, 2], tf.int32)], axis=0)
        return tf.pad(x, paddings)

    return {k: pad(v) for k, v in batch.items()}


def build_eval_dataset(
    raw: tf.data.Dataset, data_cfg: ml_collections.ConfigDict, *, batch_size: int
) -> tf.data.Dataset:
    """Turns raw examples into padded evaluation batches, each image exactly once, in order.

    The last batch is padded to `batch_size` with all-zero examples (`valid` 0, `id` b'').

    Returns:
        Finite dataset of dicts: image float32 [B, E, E, 3], label int32 [B, E, E], structures
        uint8 [B, E, E, 5], lesion uint8 [B, E, E], valid float32 [B, E, E], id string [B],
        original_size int32 [B, 2], crop_box int32 [B, 4], resized_size int32 [B, 2];
        E = `eval_size`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dataset = raw.map(eval_example_fn(data_cfg), num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size).map(lambda b: _pad_batch(b, batch_size))
    return dataset.prefetch(tf.data.AUTOTUNE)


def create_eval_dataset(
    data_cfg: ml_collections.ConfigDict, *, split: str, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Finite iterator of padded numpy evaluation batches of a split (see `build_eval_dataset`)."""
    raw, _ = read_split(resolve_data_dir(data_cfg), split)
    return iter(tfds.as_numpy(build_eval_dataset(raw, data_cfg, batch_size=batch_size)))


def preprocess_for_inference(image: np.ndarray, data_cfg: ml_collections.ConfigDict) -> dict:
    """The evaluation transform of one raw RGB image with no ground truth (for `predict`).

    Args:
        image: uint8 [H, W, 3].
        data_cfg: the data config ('mask' lesion crops fall back to 'auto': there is no mask).

    Returns:
        Numpy dict as one evaluation example without a batch axis: image float32 [E, E, 3],
        valid float32 [E, E], original_size int32 [2], crop_box int32 [4], resized_size
        int32 [2] (plus all-zero label, structures and lesion).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"need a uint8 [H, W, 3] RGB image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    example = {
        "id": tf.constant(""),
        "image": tf.constant(image),
        "structures": tf.zeros([h, w, labels.NUM_STRUCTURES], tf.uint8),
        "lesion": tf.zeros([h, w, 1], tf.uint8),
        "has_lesion_mask": tf.constant(False),
        "original_height": tf.constant(h, tf.int32),
        "original_width": tf.constant(w, tf.int32),
    }
    out = tf.function(eval_example_fn(data_cfg))(example)
    return {k: v.numpy() for k, v in out.items() if k != "id"}


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
