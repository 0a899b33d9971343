"""The thesis notebook's test loader, for `evaluate --thesis-protocol` (SEED_SPEC defect 4).

The notebook evaluates on ONE random square crop of each test image, cropped to the
ground-truth lesion first, in shuffled batches whose last one is short. This reproduces that
loader with the training pipeline's geometry (`pipeline.train_example_fn`) and a fixed seed, so
the same seed gives the same crops, order and batch mates.
"""

from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dermseg_jax.data import augment, pipeline


def eval_normalization(data_cfg: ml_collections.ConfigDict) -> str:
    """The normalisation of the thesis' test images.

    `data.eval_normalization` when set; else `data.normalization`, except that the thesis'
    'thesis_wrap' is a training-only step (its test images are plain [0, 1], defect 5).
    """
    chosen = data_cfg.get("eval_normalization", None)
    if chosen:
        return chosen
    return "none" if data_cfg.normalization == "thesis_wrap" else data_cfg.normalization


def thesis_eval_batches(
    data_cfg: ml_collections.ConfigDict, *, split: str, batch_size: int, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """The thesis notebook's test batches: shuffled, one random crop per image, last batch short.

    Ground-truth lesion crop ('mask'; 'auto' where an example has no mask), shorter side to
    `resize_shorter` with `resize_method`, one random `eval_size` square crop, no flips, no
    colour jitter, then `eval_normalization(data_cfg)`.

    Args:
        data_cfg: `config.data`.
        split: split name.
        batch_size: images per batch (thesis: 2); the last batch holds the rest.
        seed: seed of the order and of the crops.

    Returns:
        Iterator of numpy batches: image float32 [b, E, E, 3] (normalised), structures uint8
        [b, E, E, 5], lesion uint8 [b, E, E], valid, label, id.
    """
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.lesion_crop = "mask"
    cfg.color_jitter = (0.0, 0.0, 0.0, 0.0)
    cfg.flip = False
    cfg.crop_size = int(data_cfg.eval_size)
    normalization = eval_normalization(data_cfg)
    raw, num = pipeline.read_split(pipeline.resolve_data_dir(cfg), split)
    example_fn = pipeline.train_example_fn(cfg)
    base = tf.constant([seed, 0], tf.int64)

    def fn(index, example):
        out = example_fn(example, tf.random.experimental.stateless_fold_in(base, index))
        out["image"] = augment.normalize(out["image"], out["valid"], normalization)
        out["id"] = example["id"]
        return out

    dataset = raw.enumerate().shuffle(num, seed=seed).map(fn).batch(batch_size)
    return iter(tfds.as_numpy(dataset))
