"""The lesion crop ("background elimination"): a box from the lesion mask, or found automatically.

`box_from_mask` is the thesis' rule: keep the rows and the columns that contain a lesion pixel,
implemented as the bounding box of those rows and columns.

`auto_box` needs no ground truth (inference never has a lesion mask). It runs on a greyscale
copy shrunk to `AUTO_GRID` pixels on the longer side:
1. The dermoscope's vignette: very dark pixels (grey < `VIGNETTE_MAX_GREY`) connected to the
   image border, grown by `VIGNETTE_GROW` grid pixels to swallow its soft edge. The rest is the
   field of view.
2. Otsu's threshold on the field's grey levels; darker field pixels are lesion candidates,
   cleaned by a 3x3 opening (hairs, speckle).
3. The largest 8-connected candidate component; its bounding box, grown by `AUTO_MARGIN` of its
   size on each side, in the input's pixels.
It falls back to the whole image when the field's histogram is not bimodal (Otsu separability
below `MIN_SEPARABILITY`, or class means closer than `MIN_CONTRAST`) or the component is tiny
(< `MIN_AREA` of the field).

It is written in pure TensorFlow rather than numpy/cv2 behind `tf.numpy_function`: the ops run
inside tf.data's parallel map without taking the Python GIL, the pipeline stays a serialisable
graph, and on a 64-pixel grid the connected-component passes (iterated 3x3 max-pooling of
component labels) cost about a millisecond.
"""

import tensorflow as tf

AUTO_GRID = 64
VIGNETTE_MAX_GREY = 0.15
VIGNETTE_GROW = 2
# Otsu's separability of a unimodal (Gaussian) histogram is 2 / pi ~ 0.64; a lesion on skin
# gives ~0.9. The class means must also differ by MIN_CONTRAST (uniform skin quantised into two
# bins is "separable" too).
MIN_SEPARABILITY = 0.8
MIN_CONTRAST = 0.08
MIN_AREA = 0.002
AUTO_MARGIN = 0.1
_HIST_BINS = 64


def whole_box(height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """The box of the whole image: int32 [4] (0, 0, height, width)."""
    return tf.cast(tf.stack([0, 0, height, width]), tf.int32)


def _extent(flags: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    idx = tf.cast(tf.where(flags)[:, 0], tf.int32)
    return tf.reduce_min(idx), tf.reduce_max(idx) + 1


def box_from_mask(lesion: tf.Tensor) -> tf.Tensor:
    """The thesis' crop: the extent of the rows and columns holding a lesion pixel.

    Args:
        lesion: [H, W] or [H, W, 1], nonzero on the lesion.

    Returns:
        int32 [4] (y0, x0, y1, x1), end exclusive; the whole image when there is no lesion pixel.
    """
    if lesion.shape.rank == 3:
        lesion = lesion[..., 0]
    on = lesion > 0
    rows, cols = tf.reduce_any(on, axis=1), tf.reduce_any(on, axis=0)
    shape = tf.shape(lesion)

    def _box():
        y0, y1 = _extent(rows)
        x0, x1 = _extent(cols)
        return tf.stack([y0, x0, y1, x1])

    return tf.cond(tf.reduce_any(rows), _box, lambda: whole_box(shape[0], shape[1]))


def _max_pool(x: tf.Tensor, size: int) -> tf.Tensor:
    return tf.nn.max_pool2d(x[None, ..., None], size, 1, "SAME")[0, ..., 0]


def _reconstruct(seed: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """The parts of `mask` 8-connected to `seed` (morphological reconstruction), float32 {0, 1}."""

    def body(cur, _):
        return _max_pool(cur, 3) * mask, cur

    out, _ = tf.while_loop(
        lambda cur, prev: tf.reduce_any(tf.not_equal(cur, prev)),
        body,
        (seed * mask, tf.zeros_like(mask)),
        maximum_iterations=tf.size(mask),
    )
    return out


def _largest_component(mask: tf.Tensor) -> tf.Tensor:
    """The largest 8-connected component of a {0, 1} float mask, float32 {0, 1}."""
    n = tf.size(mask)
    labels = tf.reshape(tf.range(1, n + 1, dtype=tf.float32), tf.shape(mask)) * mask

    def body(cur, _):
        return _max_pool(cur, 3) * mask, cur

    labels, _ = tf.while_loop(
        lambda cur, prev: tf.reduce_any(tf.not_equal(cur, prev)),
        body,
        (labels, tf.zeros_like(labels)),
        maximum_iterations=n,
    )
    counts = tf.math.bincount(tf.reshape(tf.cast(labels, tf.int32), [-1]), minlength=n + 1)
    biggest = tf.argmax(counts[1:], output_type=tf.int32) + 1
    return tf.cast(tf.equal(labels, tf.cast(biggest, tf.float32)), tf.float32)


def _otsu(grey: tf.Tensor, weight: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Otsu's threshold of weighted grey levels in [0, 1], its separability, the mean gap."""
    bins = tf.clip_by_value(tf.cast(grey * _HIST_BINS, tf.int32), 0, _HIST_BINS - 1)
    hist = tf.math.unsorted_segment_sum(
        tf.reshape(weight, [-1]), tf.reshape(bins, [-1]), _HIST_BINS
    )
    p = hist / tf.maximum(tf.reduce_sum(hist), 1e-6)
    centres = (tf.range(_HIST_BINS, dtype=tf.float32) + 0.5) / _HIST_BINS
    omega = tf.cumsum(p)
    mu = tf.cumsum(p * centres)
    mu_total = mu[-1]
    between = (mu_total * omega - mu) ** 2 / tf.maximum(omega * (1.0 - omega), 1e-9)
    k = tf.argmax(between[:-1], output_type=tf.int32)
    total = tf.reduce_sum(p * (centres - mu_total) ** 2)
    threshold = tf.cast(k + 1, tf.float32) / _HIST_BINS
    dark_mean = mu[k] / tf.maximum(omega[k], 1e-9)
    bright_mean = (mu_total - mu[k]) / tf.maximum(1.0 - omega[k], 1e-9)
    return threshold, between[k] / tf.maximum(total, 1e-9), bright_mean - dark_mean


def auto_box(image: tf.Tensor) -> tf.Tensor:
    """Finds the lesion's box without ground truth (see the module docstring).

    Args:
        image: uint8 [H, W, 3] dermoscopic image.

    Returns:
        int32 [4] (y0, x0, y1, x1), end exclusive; the whole image when no lesion is found.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    scale = AUTO_GRID / tf.cast(tf.maximum(height, width), tf.float32)
    grid_h = tf.maximum(1, tf.cast(tf.round(tf.cast(height, tf.float32) * scale), tf.int32))
    grid_w = tf.maximum(1, tf.cast(tf.round(tf.cast(width, tf.float32) * scale), tf.int32))
    small = tf.image.resize(tf.cast(image, tf.float32) / 255.0, [grid_h, grid_w], "area")
    grey = tf.reduce_mean(small, axis=-1)

    dark = tf.cast(grey < VIGNETTE_MAX_GREY, tf.float32)
    rows, cols = tf.range(grid_h)[:, None], tf.range(grid_w)[None, :]
    border = (rows == 0) | (rows == grid_h - 1) | (cols == 0) | (cols == grid_w - 1)
    border = tf.cast(border, tf.float32)
    vignette = _reconstruct(border, dark)
    field = 1.0 - _max_pool(vignette, 2 * VIGNETTE_GROW + 1)

    threshold, separability, contrast = _otsu(grey, field)
    candidates = tf.cast(grey < threshold, tf.float32) * field
    candidates = _max_pool(-_max_pool(-candidates, 3), 3)  # opening: erode, then dilate
    component = _largest_component(candidates)
    area = tf.reduce_sum(component)
    found = (
        (separability >= MIN_SEPARABILITY)
        & (contrast >= MIN_CONTRAST)
        & (area >= MIN_AREA * tf.reduce_sum(field))
        & (area > 0)
    )

    def _box():
        gy0, gy1 = _extent(tf.reduce_any(component > 0, axis=1))
        gx0, gx1 = _extent(tf.reduce_any(component > 0, axis=0))
        # Grid cell i covers input rows [i * H / grid_h, (i + 1) * H / grid_h).
        fy = tf.cast(height, tf.float32) / tf.cast(grid_h, tf.float32)
        fx = tf.cast(width, tf.float32) / tf.cast(grid_w, tf.float32)
        y0, y1 = tf.cast(gy0, tf.float32) * fy, tf.cast(gy1, tf.float32) * fy
        x0, x1 = tf.cast(gx0, tf.float32) * fx, tf.cast(gx1, tf.float32) * fx
        my, mx = AUTO_MARGIN * (y1 - y0), AUTO_MARGIN * (x1 - x0)
        box = tf.stack(
            [tf.floor(y0 - my), tf.floor(x0 - mx), tf.math.ceil(y1 + my), tf.math.ceil(x1 + mx)]
        )
        box = tf.cast(box, tf.int32)
        low = tf.zeros([2], tf.int32)
        high = tf.stack([height, width])
        return tf.concat(
            [tf.clip_by_value(box[:2], low, high - 1), tf.clip_by_value(box[2:], low + 1, high)], 0
        )

    return tf.cond(found, _box, lambda: whole_box(height, width))


def lesion_box(example: dict, mode: str) -> tf.Tensor:
    """The crop box of a raw example per `lesion_crop` mode ('mask' | 'auto' | 'none').

    'mask' uses the lesion mask when the example has one with at least one lesion pixel, and
    falls back to 'auto' otherwise.

    Args:
        example: raw example with `image` uint8 [H, W, 3], `lesion` uint8 [H, W, 1] and
            `has_lesion_mask` bool.
        mode: 'mask', 'auto' or 'none'.

    Returns:
        int32 [4] (y0, x0, y1, x1) in the example's pixels, end exclusive.
    """
    image = example["image"]
    shape = tf.shape(image)
    if mode == "none":
        return whole_box(shape[0], shape[1])
    if mode == "auto":
        return auto_box(image)
    if mode != "mask":
        raise ValueError(f"lesion crop must be 'mask', 'auto' or 'none', got {mode!r}")
    usable = tf.cast(example["has_lesion_mask"], tf.bool) & tf.reduce_any(example["lesion"] > 0)
    return tf.cond(usable, lambda: box_from_mask(example["lesion"]), lambda: auto_box(image))
