"""Whole-image inference: the one jitted `predict_fn`, test-time flips, and the way back to size.

Everything that turns network inputs into per-pixel probabilities lives here, and is shared by
the training-time validation (`Evaluator`), `python -m dermseg_jax.evaluate` and
`python -m dermseg_jax.predict`:

- `create_predict_fn(model, head=..., tta=...)`: `predict_fn(variables, images [B, S, S, 3]) ->
  probabilities [B, S, S, C]` (with a presence head: `(probabilities, presence [B, 5])`),
  BatchNorm on running statistics, jitted once per (model, head, tta) (`functools.cache`).
- `create_thesis_predict_fn(model)`: the thesis notebook's evaluation (defects 1 and 3: BatchNorm
  on the batch's own statistics, softmax over the BATCH axis). Only for `--thesis-protocol`.
- `restore_probabilities(...)`: undo the eval pipeline's geometry (pad, resize, lesion crop) on
  the host with cv2, one channel at a time, into a full-size uint8 canvas.
- `full_size_masks(...)`: restore, then the one mask decision (`decide_full_size`, i.e.
  `postprocess.decide_masks`), shared by evaluate and predict, so that both write exactly the
  same masks. With `eval.inference='tiles'` the probabilities come from
  `tiling.TiledPredictor` (the crop at the training scale, unpadded) and `resized_size` is
  their shape; the rest is the same.

Geometry of an eval example (`dermseg_jax.data.pipeline`): the image (`image_size` = [H, W]) is
cropped to `crop_box` = (top, left, bottom, right) (exclusive ends), resized to `resized_size`
= (h, w) (longer side = eval_size) and padded at the bottom and right to [S, S].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dermseg_jax import labels, models, postprocess, presence, sharding

PredictFn = Callable[[dict, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class PostprocessSettings:
    """How probabilities become masks; read from a config so evaluate and predict agree.

    Attributes:
        head: 'softmax' or 'sigmoid' (`model.head`).
        threshold: sigmoid threshold(s) (`eval.threshold`).
        presence_threshold: 5 presence-gate cut-offs (`eval.presence_threshold`), or None.
        opening_sizes: 5 opening kernel sizes at eval resolution, or None (`eval.opening` False).
            With `eval.opening` True: `eval.opening_sizes` if set, else the thesis'
            `postprocess.THESIS_OPENING_SIZES`.
        tta: flip test-time augmentation (`eval.tta`, default False).
    """

    head: str = "softmax"
    threshold: float | tuple[float, ...] = 0.5
    opening_sizes: tuple[int, ...] | None = None
    tta: bool = False
    presence_threshold: tuple[float, ...] | None = None

    @classmethod
    def from_config(cls, config, *, tta: bool | None = None) -> PostprocessSettings:
        """Reads `config.model.head` and `config.eval` (missing eval fields keep defaults)."""
        evaluation = config.get("eval", None) or {}
        sizes = None
        if evaluation.get("opening", False):
            sizes = evaluation.get("opening_sizes", None) or postprocess.THESIS_OPENING_SIZES
            sizes = tuple(int(k) for k in sizes)
            if len(sizes) != labels.NUM_STRUCTURES:
                raise ValueError(
                    f"eval.opening_sizes needs {labels.NUM_STRUCTURES} sizes, got {sizes}"
                )
        threshold = evaluation.get("threshold", 0.5)
        if not isinstance(threshold, (int, float)):
            threshold = tuple(float(t) for t in threshold)
        return cls(
            head=str(config.model.head),
            threshold=threshold,
            opening_sizes=sizes,
            tta=bool(evaluation.get("tta", False)) if tta is None else bool(tta),
            presence_threshold=presence.check_thresholds(
                evaluation.get("presence_threshold", None)
            ),
        )


def _activation(logits: jax.Array, head: str) -> jax.Array:
    if head == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if head == "sigmoid":
        return jax.nn.sigmoid(logits)
    raise ValueError(f"Unknown model head {head!r}; expected 'softmax' or 'sigmoid'.")


def _jit(fn, mesh: jax.sharding.Mesh | None):
    if mesh is None:
        return jax.jit(fn)
    # Replicated outputs can be read back by every process of a multi-host run.
    return jax.jit(fn, out_shardings=sharding.replicated_sharding(mesh))


@functools.cache
def create_predict_fn(
    model: nn.Module,
    *,
    head: str = "softmax",
    tta: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> PredictFn:
    """The jitted whole-image predictor, built once per (model, head, tta, mesh).

    Args:
        model: the Linen module (`dermseg_jax.create_model`), applied with `train=False`.
        head: 'softmax' (probabilities over the 6 classes) or 'sigmoid' (5 independent maps).
        tta: average the probabilities of the identity, horizontal and vertical flips.
        mesh: the data mesh the images are sharded over (outputs come back replicated), or
            None for single-device use.

    Returns:
        `predict_fn(variables, images)` with images float32 [B, S, S, 3] (pipeline scale) and
        result float32 probabilities [B, S, S, C]; for a model with `presence_head`,
        `(probabilities, presence probabilities [B, 5])` (`tiling.split_prediction` reads both).
    """
    if head not in ("softmax", "sigmoid"):
        raise ValueError(f"Unknown model head {head!r}; expected 'softmax' or 'sigmoid'.")

    def forward(variables, images, axis=None):
        logits, gate = models.split_outputs(model.apply(variables, images, train=False))
        probs = _activation(logits, head)
        if axis is not None:
            probs = jnp.flip(probs, axis)
        return probs, None if gate is None else jax.nn.sigmoid(gate)

    def predict_fn(variables, images):
        probs, gate = forward(variables, images)
        if tta:
            # The padded square is flipped as a whole, so flipping each output back realigns
            # every pixel with the input pixel it came from.
            for axis in (2, 1):
                more, more_gate = forward(variables, jnp.flip(images, axis), axis)
                probs = probs + more
                gate = None if gate is None else gate + more_gate
            probs = probs / 3.0
            gate = None if gate is None else gate / 3.0
        return probs if gate is None else (probs, gate)

    return _jit(predict_fn, mesh)


def _deterministic_dropout(next_fun, args, kwargs, context):
    # The thesis evaluates with BatchNorm on batch statistics but without dropout: force every
    # Dropout to be the identity while the module runs with train=True.
    if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
        kwargs = dict(kwargs, deterministic=True)
    return next_fun(*args, **kwargs)


@functools.cache
def create_thesis_predict_fn(
    model: nn.Module, *, mesh: jax.sharding.Mesh | None = None
) -> PredictFn:
    """The thesis notebook's evaluation forward pass: defects 1 and 3 together.

    The notebook turns off `track_running_stats`, so BatchNorm normalises every evaluation batch
    with its own statistics (running statistics are neither used nor updated) and one image's
    prediction depends on its batch mate (defect 3); the softmax runs over the batch axis, so
    with the notebook's batches of 2 the two images' scores sum to 1 (defect 1). Dropout is off.

    Args:
        model: a softmax-head Linen module.
        mesh: as in `create_predict_fn`.

    Returns:
        `predict_fn(variables, images [B, S, S, 3]) -> scores [B, S, S, 6]` (jitted); call it with
        only the real images of a batch (no padding): padded images would change the result.
    """

    def predict_fn(variables, images):
        with nn.intercept_methods(_deterministic_dropout):
            logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return jax.nn.softmax(logits, axis=0)

    return _jit(predict_fn, mesh)


def _check_geometry(probs: np.ndarray, crop_box, resized_size, image_size) -> tuple:
    top, left, bottom, right = (int(v) for v in crop_box)
    h, w = (int(v) for v in resized_size)
    height, width = (int(v) for v in image_size)
    if probs.ndim != 3 or h > probs.shape[0] or w > probs.shape[1] or h < 1 or w < 1:
        raise ValueError(
            f"resized_size {(h, w)} does not fit the probabilities of shape {probs.shape}."
        )
    if not (0 <= top < bottom <= height and 0 <= left < right <= width):
        raise ValueError(f"crop_box {(top, left, bottom, right)} lies outside image {image_size}.")
    return top, left, bottom, right, h, w, height, width


def restore_probabilities(
    probs: np.ndarray,
    crop_box: Sequence[int],
    resized_size: Sequence[int],
    image_size: Sequence[int],
    *,
    head: str = "softmax",
) -> np.ndarray:
    """Maps eval-resolution probabilities back onto the full image, as uint8 (0..255).

    Undoes the padding (keeps [:h, :w]), resizes each channel bilinearly to the crop box size on
    the host, and places it into a full-size canvas. Outside the crop box nothing was seen: the
    softmax canvas says "others" (channel 0 = 255), the sigmoid canvas says 0 everywhere. Works
    one channel at a time in uint8, so a 30 MP image needs about C bytes per pixel.

    Args:
        probs: float [S, S, C] probabilities of one image (network output), or uint8 0..255
            (`tiling`'s output).
        crop_box: (top, left, bottom, right) of the lesion crop in image pixels (exclusive ends).
        resized_size: (h, w) of the resized crop inside the padded [S, S] square.
        image_size: (H, W) of the output canvas (the image the crop box refers to).
        head: 'softmax' or 'sigmoid' (decides the canvas outside the crop box).

    Returns:
        uint8 [H, W, C] probabilities scaled to 0..255.
    """
    probs = np.asarray(probs)
    top, left, bottom, right, h, w, height, width = _check_geometry(
        probs, crop_box, resized_size, image_size
    )
    channels = probs.shape[-1]
    canvas = np.zeros((height, width, channels), np.uint8)
    if head == "softmax":
        canvas[..., 0] = 255
    for c in range(channels):
        # Quantising before the resize keeps the big intermediate at one byte per pixel.
        small = probs[:h, :w, c]
        if small.dtype != np.uint8:
            small = np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)
        canvas[top:bottom, left:right, c] = cv2.resize(
            small, (right - left, bottom - top), interpolation=cv2.INTER_LINEAR
        )
    return canvas


def scaled_opening_sizes(
    opening_sizes: Sequence[int], resized_size: Sequence[int], crop_box: Sequence[int]
) -> tuple[int, ...]:
    """Opening kernel sizes given at eval resolution, scaled to the output resolution.

    The thesis opened its masks at the network's resolution; an image shown to the network at
    a quarter of its size needs a four times larger kernel to remove the same structures.

    Args:
        opening_sizes: 5 square kernel sizes (pixels at eval resolution; 1 = no opening).
        resized_size: (h, w) of the crop at eval resolution.
        crop_box: (top, left, bottom, right) of the crop at output resolution.

    Returns:
        5 kernel sizes in output pixels (at least 1).
    """
    top, left, bottom, right = (int(v) for v in crop_box)
    scale = max(bottom - top, right - left) / max(int(resized_size[0]), int(resized_size[1]))
    return tuple(max(1, int(round(int(k) * scale))) for k in opening_sizes)


def full_size_masks(
    probs: np.ndarray,
    crop_box: Sequence[int],
    resized_size: Sequence[int],
    image_size: Sequence[int],
    *,
    head: str,
    threshold: float | Sequence[float] = 0.5,
    opening_sizes: Sequence[int] | None = None,
    presence_probs: Sequence[float] | None = None,
    presence_threshold: Sequence[float] | None = None,
) -> np.ndarray:
    """Eval-resolution probabilities of one image -> post-processed masks at full size.

    The probabilities are restored onto the full image (`restore_probabilities`), then decided
    there by `postprocess.decide_masks` with the opening scaled to the output resolution.

    Args:
        probs: float [S, S, C] network probabilities of one padded eval image.
        crop_box: (top, left, bottom, right) of the lesion crop in output pixels.
        resized_size: (h, w) of the crop inside the padded square.
        image_size: (H, W) of the output.
        head: 'softmax' or 'sigmoid'.
        threshold: sigmoid threshold(s).
        opening_sizes: 5 kernel sizes at EVAL resolution (scaled here); None = no opening.
        presence_probs, presence_threshold: the presence gate (`postprocess.decide_masks`).

    Returns:
        uint8 [H, W, 5] structure masks in {0, 1}.
    """
    full = restore_probabilities(probs, crop_box, resized_size, image_size, head=head)
    return decide_full_size(
        full,
        crop_box,
        resized_size,
        head=head,
        threshold=threshold,
        opening_sizes=opening_sizes,
        presence_probs=presence_probs,
        presence_threshold=presence_threshold,
    )


def decide_full_size(
    full: np.ndarray,
    crop_box: Sequence[int],
    resized_size: Sequence[int],
    *,
    head: str,
    threshold: float | Sequence[float] = 0.5,
    opening_sizes: Sequence[int] | None = None,
    presence_probs: Sequence[float] | None = None,
    presence_threshold: Sequence[float] | None = None,
) -> np.ndarray:
    """Restored full-size scores (`restore_probabilities`) -> post-processed structure masks.

    Args:
        full: uint8 [H, W, C] scores at full size.
        crop_box, resized_size: the geometry the scores were restored from (scales the opening).
        head, threshold, opening_sizes, presence_probs, presence_threshold: as
            `full_size_masks`.

    Returns:
        uint8 [H, W, 5] structure masks in {0, 1}.
    """
    sizes = None
    if opening_sizes is not None:
        sizes = scaled_opening_sizes(opening_sizes, resized_size, crop_box)
    masks = postprocess.decide_masks(
        full,
        head=head,
        threshold=threshold,
        opening_sizes=sizes,
        presence_probs=presence_probs,
        presence_threshold=presence_threshold,
    )
    return masks[..., 1:]
