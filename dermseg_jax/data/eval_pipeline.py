"""The evaluation and inference transforms: every image once, whole, in a padded square frame.

Kept apart from the training pipeline (`pipeline.py`) because it has no randomness and a
different contract: the lesion crop (`eval_lesion_crop`) is resized so its longer side is
`eval_size`, padded at the bottom and right, and each example carries what maps a prediction
back onto the original image (`crop_box`, `resized_size`, `original_size`; docs/design.md
"Data"). `inference_preprocessor` applies the same transform to images without ground truth.
"""

from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dermseg_jax import labels
from dermseg_jax.data import augment, lesion_crop, pipeline


def eval_example_fn(data_cfg: ml_collections.ConfigDict):
    """The per-example evaluation transform `raw example -> example dict` (no randomness).

    Lesion crop per `eval_lesion_crop` (default 'auto'), resize so the longer side is
    `eval_size`, padding to `eval_size x eval_size` at the bottom and right (`valid` 0) by
    repeating the crop's last row and column (`data.eval_padding='edge'`, default) or with
    zeros ('zeros', as before issue 17; kept for the ablation in docs/ablation_isic2018.md).
    Adds `id`, `original_size` int32 [2], `crop_box` int32 [4] (y0, x0, y1, x1 in the original
    image's pixels, end exclusive) and `resized_size` int32 [2] (the crop's size inside the
    padded frame), so predictions map back onto the original image.
    """
    size = int(data_cfg.eval_size)
    mode = data_cfg.get("eval_lesion_crop", "auto")
    normalization = data_cfg.get("eval_normalization", None) or data_cfg.normalization
    padding = data_cfg.get("eval_padding", "edge")
    if padding not in ("edge", "zeros"):
        raise ValueError(f"data.eval_padding must be 'edge' or 'zeros', got {padding!r}")

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
        out = pipeline.finish_example(image, masks, valid, normalization)
        # The padding repeats the crop's last row and column: zeros there would make the
        # network predict a band of structure along the crop's bottom and right edges.
        if padding == "edge":
            rows = tf.minimum(tf.range(size), resized[0] - 1)
            cols = tf.minimum(tf.range(size), resized[1] - 1)
            out["image"] = tf.gather(tf.gather(out["image"], rows, axis=0), cols, axis=1)
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
    raw, _ = pipeline.read_split(pipeline.resolve_data_dir(data_cfg), split)
    return iter(tfds.as_numpy(build_eval_dataset(raw, data_cfg, batch_size=batch_size)))


def inference_preprocessor(data_cfg: ml_collections.ConfigDict) -> Callable[[np.ndarray], dict]:
    """The evaluation transform of raw RGB images with no ground truth (for `predict`).

    Traced once for every image size (input signature uint8 [None, None, 3]), so a caller
    builds it once and calls it for every image.

    Args:
        data_cfg: the data config ('mask' lesion crops fall back to 'auto': there is no mask).

    Returns:
        A function of one uint8 [H, W, 3] image returning a numpy dict shaped as one evaluation
        example without a batch axis: image float32 [E, E, 3], valid float32 [E, E],
        original_size int32 [2], crop_box int32 [4], resized_size int32 [2] (plus all-zero
        label, structures and lesion). It raises ValueError for any other array.
    """
    transform = eval_example_fn(data_cfg)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    def traced(image: tf.Tensor) -> dict:
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        out = transform(
            {
                "id": tf.constant(""),
                "image": image,
                "structures": tf.zeros([h, w, labels.NUM_STRUCTURES], tf.uint8),
                "lesion": tf.zeros([h, w, 1], tf.uint8),
                "has_lesion_mask": tf.constant(False),
                "original_height": h,
                "original_width": w,
            }
        )
        return {k: v for k, v in out.items() if k != "id"}

    def preprocess(image: np.ndarray) -> dict:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"need a uint8 [H, W, 3] RGB image, got {image.dtype} {image.shape}")
        return {k: v.numpy() for k, v in traced(image).items()}

    return preprocess
