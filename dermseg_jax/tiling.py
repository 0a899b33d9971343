"""Tiled inference at the training scale: overlapping tiles, blended with a Gaussian window.

Why: resizing a whole lesion crop so its longer side is `eval_size` shrinks the fine structures
of ISIC-size images (pigment-network lines, globules) to a pixel or less, and pads the square
with pixels the network never saw in training. Here the crop is resized exactly as training
resizes it (shorter side `data.resize_shorter`), covered by `tile_size` tiles that never leave
the image (the last tile of a row or column ends at the border), run through the one jitted
predict function a batch of tiles at a time, and blended: each tile's probabilities are
weighted by a Gaussian window (largest at the tile's centre, where the network sees the most
context) and the weighted sum is divided by the summed weights. Memory is bounded: the
resized crop is computed one band of tile rows at a time, the sums cover one band, and
finished rows are kept as uint8 (C bytes per pixel at the training scale).

An image smaller than a tile along an axis is mirrored (symmetric padding) up to the tile size,
predicted as one tile and cropped back; an image covered by a single tile is that one pass,
unblended, so it gives exactly a whole-image pass.

With a presence head (`dermseg_jax.presence`) `predict` returns `(probabilities, presence)`;
the image's presence is the largest over its tiles.

Config (`config.eval`): `inference` ('resize' | 'tiles'), `tile_size` (None = `data.crop_size`),
`tile_overlap` (fraction of a tile shared by neighbours, in [0, 1)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

INFERENCE_MODES = ("resize", "tiles")
# Standard deviation of the blending window, as a fraction of the tile size (nnU-Net's 1/8).
WINDOW_SIGMA = 1.0 / 8.0

BatchPredictor = Callable[[np.ndarray], np.ndarray]
ProgressFn = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class TileSettings:
    """Tile geometry at the training scale.

    Attributes:
        tile_size: side of the square tiles (network input pixels; the model needs >= 75).
        stride: distance between neighbouring tiles' corners (at most the last tile is closer).
    """

    tile_size: int
    stride: int

    @classmethod
    def from_config(cls, data_cfg, eval_cfg) -> TileSettings | None:
        """Reads `eval.inference`, `eval.tile_size`, `eval.tile_overlap`; None for 'resize'."""
        mode = eval_cfg.get("inference", "resize")
        if mode not in INFERENCE_MODES:
            raise ValueError(f"eval.inference must be one of {INFERENCE_MODES}, got {mode!r}")
        if mode == "resize":
            return None
        tile = int(eval_cfg.get("tile_size", None) or data_cfg.crop_size)
        overlap = float(eval_cfg.get("tile_overlap", 0.5))
        if tile < 1 or not 0.0 <= overlap < 1.0:
            raise ValueError(
                f"need eval.tile_size >= 1 and 0 <= eval.tile_overlap < 1, got {tile}, {overlap}"
            )
        return cls(tile_size=tile, stride=max(1, tile - int(round(overlap * tile))))


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles covering [0, length), the last ending exactly at `length`.

    Args:
        length: image size along the axis (>= tile).
        tile: tile size.
        stride: step between starts.

    Returns:
        Increasing starts; [0] when `length == tile`.
    """
    if length < tile:
        raise ValueError(f"length {length} is smaller than the tile {tile}")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_window(tile: int) -> np.ndarray:
    """float32 [tile, tile] separable Gaussian weights, 1 at the centre, > 0 everywhere."""
    centre = (tile - 1) / 2.0
    sigma = max(tile * WINDOW_SIGMA, 1e-3)
    profile = np.exp(-0.5 * ((np.arange(tile) - centre) / sigma) ** 2)
    # Keep the border weights away from 0 so every pixel's normalisation is well conditioned.
    profile = np.maximum(profile, 1e-3)
    return np.outer(profile, profile).astype(np.float32)


def _tile_batches(corners: Sequence[tuple[int, int]], batch_size: int):
    for start in range(0, len(corners), batch_size):
        yield corners[start : start + batch_size]


def split_prediction(outputs, n: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities, presence or None) of a predict function's output, first `n` images."""
    probs, presence = outputs if isinstance(outputs, tuple) else (outputs, None)
    probs = np.asarray(probs)[:n]
    return probs, None if presence is None else np.asarray(presence)[:n]


def _run_batch(
    predict: BatchPredictor, tiles: list[np.ndarray], batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predicts a list of tiles, padded with zero tiles to `batch_size` (one compiled shape)."""
    batch = np.stack(tiles)
    missing = batch_size - len(tiles)
    if missing:
        batch = np.concatenate([batch, np.zeros((missing, *batch.shape[1:]), batch.dtype)])
    return split_prediction(predict(batch), len(tiles))


def _max_presence(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """Elementwise max of running presence `a` [K] and a batch of tiles' presence `b` [n, K]."""
    if b is None:
        return a
    b = b.max(axis=0)
    return b if a is None else np.maximum(a, b)


class _RowBlender:
    """Weighted sums over a rolling band of `tile` rows; finished rows leave as uint8.

    Tiles arrive in row-major order, so once a tile row starting at y arrives, no later tile
    touches the rows above y: they are divided by their weights and quantised.
    """

    def __init__(self, height: int, width: int, tile: int) -> None:
        self.tile, self.base = tile, 0
        self.window = blend_window(tile)
        self.weights = np.zeros((tile, width), np.float32)
        self.shape = (height, width)
        self.total = self.out = None

    def add(self, y: int, x: int, probs: np.ndarray) -> None:
        if self.out is None:
            self.out = np.zeros((*self.shape, probs.shape[-1]), np.uint8)
            self.total = np.zeros((self.tile, self.shape[1], probs.shape[-1]), np.float32)
        if y > self.base:
            self._flush(y)
        t = self.tile
        self.total[:, x : x + t] += probs * self.window[..., None]
        self.weights[:, x : x + t] += self.window

    def _flush(self, new_base: int) -> None:
        n = new_base - self.base
        self.out[self.base : new_base] = to_uint8(self.total[:n] / self.weights[:n, :, None])
        for acc in (self.total, self.weights):
            acc[: self.tile - n] = acc[n:].copy()
            acc[self.tile - n :] = 0.0
        self.base = new_base

    def finish(self) -> np.ndarray:
        self._flush(self.base + self.tile)
        return self.out


def to_uint8(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint8 0..255 (rounded), as `inference.restore_probabilities`."""
    return np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)


def predict_tiles(
    predict: BatchPredictor,
    image,
    settings: TileSettings,
    *,
    batch_size: int,
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Blended tile probabilities of one image (module docstring).

    Args:
        predict: `images float32 [batch_size, T, T, 3] -> probabilities [batch_size, T, T, C]`
            or `(probabilities, presence [batch_size, K])` (e.g.
            `inference.create_predict_fn(...)` with the variables bound).
        image: float32 [h, w, 3] in the network's input scale: an array, or anything with
            `shape` whose `image[top:bottom]` gives those rows as an array (it is read one band
            of tile rows at a time, so it need never exist whole).
        settings: tile size and stride.
        batch_size: tiles per `predict` call (the last call is padded with zero tiles).
        progress: called as `progress(tiles_done, tiles_total)` after every call.

    Returns:
        (uint8 [h, w, C] probabilities scaled to 0..255, float [K] presence: the largest over
        the tiles, or None without a presence head).
    """
    h, w = image.shape[:2]
    t = settings.tile_size
    if h < t or w < t:
        whole = np.asarray(image[0:h])
        padded = np.pad(whole, ((0, max(t - h, 0)), (0, max(t - w, 0)), (0, 0)), "symmetric")
        probs, presence = predict_tiles(
            predict, padded, settings, batch_size=batch_size, progress=progress
        )
        return probs[:h, :w], presence
    corners = [
        (top, left)
        for top in tile_starts(h, t, settings.stride)
        for left in tile_starts(w, t, settings.stride)
    ]
    if len(corners) == 1:
        probs, presence = _run_batch(predict, [np.asarray(image[0:t])], batch_size)
        if progress is not None:
            progress(1, 1)
        return to_uint8(probs[0]), None if presence is None else presence[0]
    blender = _RowBlender(h, w, t)
    band_top, band = None, None
    done, presence = 0, None
    for chunk in _tile_batches(corners, batch_size):
        tiles = []
        for y, x in chunk:
            if y != band_top:
                band_top, band = y, np.asarray(image[y : y + t])
            tiles.append(band[:, x : x + t])
        probs, tile_presence = _run_batch(predict, tiles, batch_size)
        for (y, x), tile_probs in zip(chunk, probs, strict=True):
            blender.add(y, x, tile_probs)
        presence = _max_presence(presence, tile_presence)
        done += len(chunk)
        if progress is not None:
            progress(done, len(corners))
    return blender.finish(), presence


class _ScaledImage:
    """The crop at the training scale, computed one band of rows at a time (`image[a:b]`)."""

    def __init__(self, traced, image, box: np.ndarray, size: tuple[int, int]) -> None:
        self._traced, self._image, self._box = traced, image, box
        self.shape = (*size, 3)

    def __getitem__(self, rows: slice) -> np.ndarray:
        top, bottom, _ = rows.indices(self.shape[0])
        return self._traced(self._image, self._box, np.int32(top), np.int32(bottom - top)).numpy()


def scaled_view_fn(data_cfg) -> Callable[[np.ndarray, Sequence[int]], _ScaledImage]:
    """The lesion crop at the training scale, as the network's input (no padding).

    The crop box is resized so its shorter side is `data.resize_shorter`, with training's
    resampling (`augment.sample_window`, `data.resize_method`) and the evaluation
    normalisation (`data.eval_normalization`, else `data.normalization`). Traced once; rows are
    computed when read, so the whole float image never exists.

    Returns:
        `view(image uint8 [H, W, 3], crop_box (top, left, bottom, right))` -> an [h, w, 3]
        float32 row source for `predict_tiles` (`np.asarray(view[0:h])` is the whole image).
    """
    import tensorflow as tf

    from dermseg_jax.data import augment

    shorter = int(data_cfg.resize_shorter)
    method = data_cfg.resize_method
    normalization = data_cfg.get("eval_normalization", None) or data_cfg.normalization
    specs = [tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([4], tf.int32)]
    specs += [tf.TensorSpec([], tf.int32)] * 2

    @tf.function(input_signature=specs)
    def traced(image, box, top, height):
        resized = augment.resized_hw_shorter(box[2] - box[0], box[3] - box[1], shorter)
        offset = tf.stack([top, 0])
        out_hw = tf.stack([height, resized[1]])
        no_flip = tf.constant([False, False])
        out, _, valid = augment.sample_window(
            image, (), box, resized, offset, out_hw, no_flip, method
        )
        return augment.normalize(out, valid, normalization)

    def view(image: np.ndarray, crop_box: Sequence[int]) -> _ScaledImage:
        box = np.asarray([int(v) for v in crop_box], np.int32)
        size = augment.resized_hw_shorter(box[2] - box[0], box[3] - box[1], shorter).numpy()
        return _ScaledImage(traced, tf.convert_to_tensor(image, tf.uint8), box, tuple(size))

    return view


class TiledPredictor:
    """`probabilities(predict, image, crop_box)`: an image's lesion crop, tile by tile.

    Shared by `Evaluator` and `predict`, so both see the same probabilities.
    """

    def __init__(self, data_cfg, settings: TileSettings, *, batch_size: int) -> None:
        """Args: `data_cfg` = `config.data`; tile settings; `batch_size` tiles per call."""
        self.settings = settings
        self.batch_size = int(batch_size)
        self._view = scaled_view_fn(data_cfg)

    def probabilities(
        self,
        predict: BatchPredictor,
        image: np.ndarray,
        crop_box: Sequence[int],
        progress: ProgressFn | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 [h, w, C] probabilities (0..255) of the crop at the training scale, and the
        image's presence [K] (None without a presence head): `predict_tiles`.

        Map them onto the image with `inference.full_size_masks(probs, crop_box, probs.shape[:2],
        image.shape[:2], ...)`.

        Args:
            predict: as in `predict_tiles` (variables bound).
            image: uint8 [H, W, 3], the image `crop_box` refers to.
            crop_box: (top, left, bottom, right), end exclusive.
            progress: `progress(tiles_done, tiles_total)` after every batch of tiles.
        """
        scaled = self._view(image, crop_box)
        return predict_tiles(
            predict, scaled, self.settings, batch_size=self.batch_size, progress=progress
        )
