"""Pure TensorFlow per-example ops of the input pipeline: geometry, colour, normalisation, labels.

Geometry is done by index arithmetic, not by resizing whole images: the lesion crop, the resize
(shorter side to `resize_shorter`, or longer side to `eval_size`), the random crop or padding
and the flips all compose into one source row index vector and one source column index vector,
and the output is two `tf.gather`s. Only the pixels of the output window are ever computed,
which is what keeps the training pipeline fast on two CPU cores, and image, structures and
lesion are sampled with the very same indices, so they stay aligned by construction.

Resampling rules (`resize_method`):
- 'thesis_nearest': image and masks take source index floor(dst * in / out) (PyTorch/PIL
  nearest as used by the thesis).
- 'bilinear': the image is bilinear with half-pixel centres and edge clamping, exactly
  `tf.image.resize(..., 'bilinear', antialias=False)`; masks are nearest with half-pixel centres,
  source index floor((dst + 0.5) * in / out).

All randomness is stateless: every op draws from `tf.random.experimental.stateless_fold_in(seed,
op_id)` of the example's seed, so one draw per op applies to image and masks alike and the result
is a pure function of the seed.
"""

import tensorflow as tf

# Mean and std (per RGB channel, on [0, 1] values) of every `data_cfg.normalization`.
# 'thesis_wrap' and 'isic' use the thesis notebook's ISIC constants; 'thesis_wrap' reproduces its
# 8-bit wrap-around (see `normalize`), 'isic' is the plain float standardisation with them.
NORMALIZATION = {
    "none": None,
    "thesis_wrap": ((0.1769, 0.1479, 0.1367), (0.0352, 0.0378, 0.0417)),
    "isic": ((0.1769, 0.1479, 0.1367), (0.0352, 0.0378, 0.0417)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
RESIZE_METHODS = ("bilinear", "thesis_nearest")

# Op identifiers folded into an example's seed: one independent stream per random op.
_OP_CROP_Y, _OP_CROP_X, _OP_FLIP_UD, _OP_FLIP_LR = 1, 2, 3, 4
_OP_BRIGHTNESS, _OP_CONTRAST, _OP_SATURATION, _OP_HUE = 5, 6, 7, 8


def op_seed(seed: tf.Tensor, op_id: int) -> tf.Tensor:
    """The stateless seed ([2] int64) of one random op, derived from an example's seed."""
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), op_id)


def label_from_structures(structures: tf.Tensor) -> tf.Tensor:
    """Softmax target in TF: 0 where no structure is present, else 1 + first structure present.

    Same rule as `dermseg_jax.labels.label_from_structures` (argmax([0, s_1..s_5])), written
    without `tf.argmax`, whose tie-breaking is unspecified.

    Args:
        structures: [..., 5] tensor in {0, 1}.

    Returns:
        int32 [...] tensor in 0..5.
    """
    present = structures > 0
    label = tf.zeros(tf.shape(structures)[:-1], tf.int32)
    for k in reversed(range(structures.shape[-1])):
        label = tf.where(present[..., k], k + 1, label)
    return label


def pack_masks(structures: tf.Tensor, lesion: tf.Tensor) -> tf.Tensor:
    """Packs the {0, 1} masks into one byte a pixel: bit k = structure k, bit 5 = the lesion.

    Args:
        structures: uint8 [..., 5]; lesion: uint8 [..., 1] (nonzero = on).

    Returns:
        uint8 [..., 1].
    """
    bits = tf.cast(tf.concat([structures, lesion], axis=-1) > 0, tf.int32)
    weights = tf.bitwise.left_shift(1, tf.range(tf.shape(bits)[-1]))
    return tf.cast(tf.reduce_sum(bits * weights, axis=-1, keepdims=True), tf.uint8)


def unpack_masks(packed: tf.Tensor, num_structures: int = 5) -> tuple[tf.Tensor, tf.Tensor]:
    """The inverse of `pack_masks`: (structures uint8 [..., 5], lesion uint8 [..., 1])."""
    shifts = tf.constant(list(range(num_structures + 1)), tf.uint8)
    bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(packed, shifts), tf.constant(1, tf.uint8))
    return bits[..., :num_structures], bits[..., num_structures:]


def resized_hw_shorter(height: tf.Tensor, width: tf.Tensor, shorter: int) -> tf.Tensor:
    """Size after resizing the shorter side to `shorter` (torchvision: long = int(s * l / s0)).

    Returns:
        int32 [2] (height, width).
    """
    h, w = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
    s = tf.constant(shorter, tf.int64)
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    new_long = tf.maximum(s * long // short, s)
    return tf.cast(tf.where(h <= w, tf.stack([s, new_long]), tf.stack([new_long, s])), tf.int32)


def resized_hw_longer(height: tf.Tensor, width: tf.Tensor, longer: int) -> tf.Tensor:
    """Size after resizing the longer side to `longer` (the shorter side rounded, at least 1).

    Returns:
        int32 [2] (height, width).
    """
    h, w = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
    s = tf.constant(longer, tf.int64)
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    new_short = tf.clip_by_value((2 * s * short + long) // (2 * long), 1, s)
    return tf.cast(tf.where(h >= w, tf.stack([s, new_short]), tf.stack([new_short, s])), tf.int32)


def _nearest_source(dst: tf.Tensor, src_len: tf.Tensor, dst_len: tf.Tensor, thesis: bool):
    dst, src_len, dst_len = (tf.cast(v, tf.int64) for v in (dst, src_len, dst_len))
    if thesis:
        src = dst * src_len // dst_len
    else:
        src = (2 * dst + 1) * src_len // (2 * dst_len)
    return tf.cast(tf.clip_by_value(src, 0, src_len - 1), tf.int32)


def _bilinear_source(dst: tf.Tensor, src_len: tf.Tensor, dst_len: tf.Tensor):
    scale = tf.cast(src_len, tf.float32) / tf.cast(dst_len, tf.float32)
    src = (tf.cast(dst, tf.float32) + 0.5) * scale - 0.5
    src = tf.clip_by_value(src, 0.0, tf.cast(src_len - 1, tf.float32))
    lo = tf.cast(tf.floor(src), tf.int32)
    hi = tf.minimum(lo + 1, tf.cast(src_len, tf.int32) - 1)
    return lo, hi, src - tf.floor(src)


def _gather_bilinear(image: tf.Tensor, axis: int, lo, hi, frac) -> tf.Tensor:
    shape = [-1, 1, 1] if axis == 0 else [1, -1, 1]
    frac = tf.reshape(frac, shape)
    a = tf.cast(tf.gather(image, lo, axis=axis), tf.float32)
    b = tf.cast(tf.gather(image, hi, axis=axis), tf.float32)
    return a + (b - a) * frac


def _window(offset: tf.Tensor, size: int, resized_len: tf.Tensor, flip: tf.Tensor):
    """Resized-frame positions of an output window and whether each lies inside the image."""
    pos = tf.range(size, dtype=tf.int32)
    pos = tf.where(flip, size - 1 - pos, pos) + offset
    valid = (pos >= 0) & (pos < resized_len)
    return tf.clip_by_value(pos, 0, resized_len - 1), valid


def sample_window(
    image: tf.Tensor,
    masks,
    box: tf.Tensor,
    resized_hw: tf.Tensor,
    offset: tf.Tensor,
    out_hw: tuple[int, int],
    flip: tf.Tensor,
    method: str,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Crops `box`, resizes it to `resized_hw`, takes an `out_hw` window, flips; one gather.

    The window's top-left corner is `offset` in the resized frame and may be negative or reach
    past the image: those output pixels are padding (zero image and masks, `valid` 0).

    Args:
        image: uint8 [H, W, 3].
        masks: uint8 [H, W, C], or a tuple of such (e.g. structures and lesion: separate
            tensors avoid a full-size concatenation), resampled with nearest neighbour.
        box: int32 [4] (y0, x0, y1, x1), the region of the input that is resized.
        resized_hw: int32 [2], the size the box is resized to.
        offset: int32 [2], the window's top-left corner in the resized frame.
        out_hw: (h, w) output size: ints, or an int32 [2] tensor (a whole resized image).
        flip: bool [2], (vertical, horizontal) flips of the window.
        method: one of `RESIZE_METHODS`.

    Returns:
        (image float32 [h, w, 3] in [0, 1], masks uint8 [h, w, C] (same structure as the
        input), valid float32 [h, w]).
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize_method must be one of {RESIZE_METHODS}, got {method!r}")
    thesis = method == "thesis_nearest"
    box = tf.cast(box, tf.int32)
    box_hw = tf.stack([box[2] - box[0], box[3] - box[1]])
    rows, valid_r = _window(offset[0], out_hw[0], resized_hw[0], flip[0])
    cols, valid_c = _window(offset[1], out_hw[1], resized_hw[1], flip[1])
    valid = tf.cast(valid_r[:, None] & valid_c[None, :], tf.float32)

    mask_rows = box[0] + _nearest_source(rows, box_hw[0], resized_hw[0], thesis)
    mask_cols = box[1] + _nearest_source(cols, box_hw[1], resized_hw[1], thesis)

    def _sample_mask(mask):
        out = tf.gather(tf.gather(mask, mask_rows, axis=0), mask_cols, axis=1)
        return out * tf.cast(valid[..., None], mask.dtype)

    out_masks = tf.nest.map_structure(_sample_mask, masks)

    if thesis:
        out_image = tf.gather(tf.gather(image, mask_rows, axis=0), mask_cols, axis=1)
        out_image = tf.cast(out_image, tf.float32)
    else:
        # Only the rows the window needs are interpolated, then only its columns; the uint8
        # rows are gathered before the cast so the full image is never converted to float.
        r_lo, r_hi, r_frac = _bilinear_source(rows, box_hw[0], resized_hw[0])
        c_lo, c_hi, c_frac = _bilinear_source(cols, box_hw[1], resized_hw[1])
        region = _gather_bilinear(image, 0, box[0] + r_lo, box[0] + r_hi, r_frac)
        out_image = _gather_bilinear(region, 1, box[1] + c_lo, box[1] + c_hi, c_frac)
    out_image = out_image / 255.0 * valid[..., None]
    return out_image, out_masks, valid


def random_window(
    seed: tf.Tensor, resized_hw: tf.Tensor, crop_size: int, flip: bool
) -> tuple[tf.Tensor, tf.Tensor]:
    """Draws a random crop corner and flips (p 0.5 each) for `sample_window`.

    Where the resized image is smaller than the crop, the corner is drawn from
    [resized - crop, 0], so the image lands at a random place inside zero padding.

    Returns:
        (offset int32 [2], flip bool [2]).
    """
    lo = tf.minimum(0, resized_hw - crop_size)
    hi = tf.maximum(0, resized_hw - crop_size) + 1
    offset_y = tf.random.stateless_uniform(
        [], op_seed(seed, _OP_CROP_Y), minval=lo[0], maxval=hi[0], dtype=tf.int32
    )
    offset_x = tf.random.stateless_uniform(
        [], op_seed(seed, _OP_CROP_X), minval=lo[1], maxval=hi[1], dtype=tf.int32
    )
    if flip:
        flip_ud = tf.random.stateless_uniform([], op_seed(seed, _OP_FLIP_UD)) < 0.5
        flip_lr = tf.random.stateless_uniform([], op_seed(seed, _OP_FLIP_LR)) < 0.5
    else:
        flip_ud = flip_lr = tf.constant(False)
    return tf.stack([offset_y, offset_x]), tf.stack([flip_ud, flip_lr])


def _uniform(seed: tf.Tensor, op_id: int, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform([], op_seed(seed, op_id), minval=low, maxval=high)


def _grey(image: tf.Tensor) -> tf.Tensor:
    # ITU-R 601-2 luma, as PIL's convert('L') and torchvision's rgb_to_grayscale.
    return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)


def jitter_factors(seed: tf.Tensor, strength: tuple[float, float, float, float]) -> tf.Tensor:
    """Draws one example's colour-jitter factors (torchvision ColorJitter ranges).

    Brightness, contrast and saturation factors are uniform in [1 - s, 1 + s], the hue shift
    uniform in [-s, s] of a full turn; a strength of 0 gives the identity (1, 1, 1, 0).

    Returns:
        float32 [4] (brightness, contrast, saturation, hue).
    """
    ops = (_OP_BRIGHTNESS, _OP_CONTRAST, _OP_SATURATION, _OP_HUE)
    centres = (1.0, 1.0, 1.0, 0.0)
    return tf.stack(
        [
            _uniform(seed, op, c - s, c + s) if s > 0 else tf.constant(c)
            for op, c, s in zip(ops, centres, strength, strict=True)
        ]
    )


def color_jitter(image: tf.Tensor, valid: tf.Tensor, factors: tf.Tensor) -> tf.Tensor:
    """torchvision-style ColorJitter with given factors, in the fixed order b, c, s, h.

    Brightness blends with black, contrast with the mean grey of the real pixels, saturation
    with each pixel's grey; hue rotates the HSV hue. torchvision applies the four in a random
    order; a fixed order is cheaper and the same to first order. Works on single images and on
    batches (one factor row per image), so the pipeline applies it once per batch.

    Args:
        image: float32 [..., h, w, 3] in [0, 1].
        valid: float32 [..., h, w], 1 on real pixels (padding stays zero and is left out of the
            contrast mean).
        factors: float32 [..., 4] from `jitter_factors`.

    Returns:
        float32 [..., h, w, 3] in [0, 1].
    """
    f = factors[..., None, None, :]
    weight = valid[..., None]
    image = tf.clip_by_value(image * f[..., 0:1], 0.0, 1.0)
    mean = tf.reduce_sum(_grey(image) * weight, axis=(-3, -2, -1), keepdims=True)
    mean = mean / tf.maximum(tf.reduce_sum(weight, axis=(-3, -2, -1), keepdims=True), 1.0)
    image = tf.clip_by_value(mean + f[..., 1:2] * (image - mean), 0.0, 1.0)
    grey = _grey(image)
    image = tf.clip_by_value(grey + f[..., 2:3] * (image - grey), 0.0, 1.0)
    hsv = tf.image.rgb_to_hsv(image)
    hue = tf.math.floormod(hsv[..., 0:1] + f[..., 3:4], 1.0)
    image = tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], axis=-1))
    return tf.clip_by_value(image, 0.0, 1.0) * weight


def normalize(image: tf.Tensor, valid: tf.Tensor, normalization: str) -> tf.Tensor:
    """Maps [0, 1] pixels to the network's input scale per `data_cfg.normalization`.

    'thesis_wrap' reproduces the thesis' step exactly: the (jittered) image as 8 bits,
    `ToTensor` (/255), `Normalize(mean, std)`, then `ToPILImage`, i.e. `(v * 255).byte()`, which
    truncates toward zero and wraps modulo 256 (checked against torchvision), then /255 again.
    The result lies in [0, 1], with false-colour bands where values wrap (SEED_SPEC "Data";
    note the thesis' own preprocessing figure shows jittered, not wrapped, crops).
    Padding pixels (valid 0) are set to 0 after normalisation.

    Args:
        image: float32 [..., h, w, 3] in [0, 1].
        valid: float32 [..., h, w].
        normalization: a key of `NORMALIZATION`.

    Returns:
        float32 [..., h, w, 3].
    """
    if normalization not in NORMALIZATION:
        raise ValueError(
            f"normalization must be one of {tuple(NORMALIZATION)}, got {normalization!r}"
        )
    if normalization == "none":
        return image * valid[..., None]
    mean, std = (tf.constant(v, tf.float32) for v in NORMALIZATION[normalization])
    if normalization == "thesis_wrap":
        eight_bit = tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0) / 255.0
        scaled = (eight_bit - mean) / std * 255.0
        # |scaled| < 2^13: the integer arithmetic is exact in float32 (cheaper than int64).
        truncated = tf.math.sign(scaled) * tf.floor(tf.abs(scaled))
        out = (truncated - 256.0 * tf.floor(truncated / 256.0)) / 255.0
    else:
        out = (image - mean) / std
    return out * valid[..., None]
