"""`Evaluator(model, data_cfg, eval_cfg).run(state) -> dict[str, float]`: the one evaluation.

Used by the trainer (periodic validation) and by `python -m dermseg_jax.evaluate`. Masks come
from the one decision, `postprocess.decide_masks` (at full size through
`inference.full_size_masks`, exactly as `predict`). Two protocols:

Default protocol: every image of the split once, as the eval pipeline prepares it (automatic
lesion crop, longer side resized to `eval_size`, padded), BatchNorm on running statistics,
optional flip TTA. With `eval.inference='tiles'` the network instead sees the stored image's
crop at the training scale tile by tile (`tiling.TiledPredictor`, as `predict`); its
probabilities are resized to the eval frame for the eval-resolution metrics. Two resolutions
are scored:
- DATASET resolution (the prepared image's size: the original wherever `prepare` did not
  downscale, see `isic2018/at_original_resolution`): the keys of `metrics.SegmentationMetrics`
  (`jaccard/<s>`, `image_*`, `micro_*`, the official `isic2018/*` incl. `isic2018/overall`
  (micro) and `isic2018/macro`).
- EVAL resolution (the network's input frame, real pixels of the lesion crop): the thesis'
  metrics `thesis/jaccard/<class>`, `thesis/auc/<class>` (`metrics.ThesisMetrics`), the 6x6
  confusion matrix of the raw argmax (attribute) and pooled-pixel ROC AUC `roc_auc/<s>`.

Thesis protocol (`thesis_protocol=True`, SEED_SPEC defects 1, 3, 4, 6): the notebook's test
loader (`data.thesis_eval`: ground-truth lesion crop, one random `eval_size` crop, shuffled
batches of `eval_cfg.batch_size`), BatchNorm on the batch's statistics, softmax over the batch
axis, predictions multiplied by the ground-truth lesion, the configured opening. The thesis
Jaccard uses the notebook's shifted one-hot (defect 6); `jaccard/<s>` keeps the correct
channels. All metrics then refer to that crop (there is no way back to the full image).

`Evaluator.fit_thresholds(state)`: per-structure sigmoid thresholds maximising the official
micro score (`thresholds.fit`), on the validation split only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import cv2
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from dermseg_jax import inference, labels, metrics, postprocess, sharding, thresholds, tiling
from dermseg_jax.errors import UserError


def variables_of(state_or_variables: Any) -> dict:
    """{'params', 'batch_stats'} of a TrainState-like object or a variables dict."""
    if isinstance(state_or_variables, Mapping):
        return {k: state_or_variables[k] for k in ("params", "batch_stats")}
    return {"params": state_or_variables.params, "batch_stats": state_or_variables.batch_stats}


@dataclasses.dataclass
class EvalExample:
    """One evaluated image kept for the pictures (dataset resolution)."""

    id: str
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray


@dataclasses.dataclass
class _Scored:
    """One image as a protocol delivers it: eval-resolution scores, dataset-resolution masks."""

    id: str
    probs: np.ndarray  # [h, w, C] network output on the real pixels
    structures: np.ndarray  # [h, w, 5] truth at eval resolution
    lesion: np.ndarray  # [h, w] truth lesion at eval resolution
    prediction: np.ndarray  # [H, W, 5] decided masks at dataset resolution
    truth: np.ndarray  # [H, W, 5]
    image: np.ndarray  # uint8 [H, W, 3] for the pictures
    at_original: bool
    full: np.ndarray | None = None  # uint8 [H, W, C] scores at dataset resolution (default)
    presence: np.ndarray | None = None  # [5] presence probabilities (presence head)


class Evaluator:
    """Evaluates a model on one split; see the module docstring for protocols and metric keys.

    Attributes (filled by `run`):
        rows: per-image dicts for a CSV (id, size, per-structure Jaccard and pixel counts).
        examples: the first `num_examples` images with truth and prediction, for pictures.
        confusion_matrix: int64 [6, 6] (rows truth, columns raw argmax), eval resolution.
        roc_curves: structure -> (fpr [N], tpr [N], AUC), pooled pixels, eval resolution.
    """

    def __init__(
        self,
        model: nn.Module,
        data_cfg: ml_collections.ConfigDict,
        eval_cfg: ml_collections.ConfigDict,
        *,
        head: str | None = None,
        batch_size: int | None = None,
        split: str | None = None,
        thesis_protocol: bool | None = None,
        tta: bool | None = None,
        num_examples: int = 0,
        mesh: jax.sharding.Mesh | None = None,
        seed: int = 0,
    ) -> None:
        """Builds the evaluator; the jitted predictor is created once here.

        Args:
            model: the Linen module.
            data_cfg: `config.data`.
            eval_cfg: `config.eval` (`split`, `batch_size`, `threshold`, `opening`, optional
                `opening_sizes`, `tta`, `thesis_protocol`, `inference`, `tile_size`,
                `tile_overlap`).
            head: 'softmax' | 'sigmoid'; None = `model.head`.
            batch_size: global eval batch; None = `eval_cfg.batch_size`.
            split: None = `eval_cfg.split`.
            thesis_protocol: None = `eval_cfg.thesis_protocol`.
            tta: None = `eval_cfg.tta`. Not used by the thesis protocol.
            num_examples: images to keep in `examples` for pictures.
            mesh: data mesh; None = `sharding.make_mesh()`.
            seed: seed of the thesis protocol's random crops and batch order.
        """
        self.data_cfg = data_cfg
        self.head = head or getattr(model, "head", "softmax")
        config = ml_collections.ConfigDict({"model": {"head": self.head}, "eval": eval_cfg})
        self.settings = inference.PostprocessSettings.from_config(config, tta=tta)
        self.batch_size = int(batch_size or eval_cfg.batch_size)
        self.split = split or eval_cfg.get("split", "validation")
        if thesis_protocol is None:
            thesis_protocol = eval_cfg.get("thesis_protocol", False)
        self.thesis_protocol = bool(thesis_protocol)
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        tiles = tiling.TileSettings.from_config(data_cfg, eval_cfg)
        self.tiler = None
        if tiles is not None and not self.thesis_protocol:
            self.tiler = tiling.TiledPredictor(data_cfg, tiles, batch_size=self.batch_size)
        if self.thesis_protocol:
            if self.head != "softmax":
                raise ValueError("The thesis protocol needs the softmax head (batch-axis softmax).")
            self.predict_fn = inference.create_thesis_predict_fn(model)
        else:
            sharding.check_batch_size(self.batch_size, self.mesh, "eval batch_size")
            self.predict_fn = inference.create_predict_fn(
                model, head=self.head, tta=self.settings.tta, mesh=self.mesh
            )
        self.rows: list[dict[str, Any]] = []
        self.examples: list[EvalExample] = []
        self.confusion_matrix = np.zeros((labels.NUM_CLASSES,) * 2, np.int64)
        self.roc_curves: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}

    def run(self, state_or_variables: Any) -> dict[str, float]:
        """Evaluates the split; returns a flat dict of floats (NaN where undefined).

        Args:
            state_or_variables: a TrainState (`params`, `batch_stats`) or variables dict.
        """
        variables = variables_of(state_or_variables)
        self.rows, self.examples = [], []
        seg, thesis = metrics.SegmentationMetrics(), metrics.ThesisMetrics()
        roc = metrics.PooledRoc()
        at_original = []
        for item in self._images(variables):
            self._score_eval_resolution(item, thesis, roc)
            counts = seg.add(item.prediction, item.truth)
            self.rows.append(_image_row(item.id, item.truth.shape, counts))
            at_original.append(float(item.at_original))
            if len(self.examples) < self.num_examples:
                self.examples.append(EvalExample(item.id, item.image, item.truth, item.prediction))
        if seg.num_images == 0:
            raise ValueError(f"split {self.split!r}: no images were evaluated")
        out = {**seg.finalize(), **thesis.finalize(), **roc.finalize()}
        self.confusion_matrix = thesis.confusion_matrix.copy()
        self.roc_curves = roc.curves()
        out["isic2018/at_original_resolution"] = float(np.mean(at_original))
        out["thesis_protocol"] = float(self.thesis_protocol)
        out["tta"] = float(self.settings.tta and not self.thesis_protocol)
        return {k: float(v) for k, v in out.items()}

    def _images(self, variables: dict) -> Iterator[_Scored]:
        if self.thesis_protocol:
            predict = functools.partial(self.predict_fn, variables)
            return _thesis_protocol_images(
                self.data_cfg, self.split, self.batch_size, self.seed, predict, self._decide
            )
        s = self.settings
        decide = functools.partial(
            inference.decide_full_size,
            head=self.head,
            threshold=s.threshold,
            opening_sizes=s.opening_sizes,
            presence_threshold=s.presence_threshold,
        )
        predict = functools.partial(self._predict, variables)
        tiled = None
        if self.tiler is not None:
            tiled = functools.partial(self.tiler.probabilities, predict)
        return _default_protocol_images(
            self.data_cfg, self.split, self.batch_size, predict, self.head, decide, tiled
        )

    def fit_thresholds(
        self, state_or_variables: Any, *, gate: bool | None = None
    ) -> thresholds.FittedThresholds:
        """Per-structure thresholds maximising the official (micro) score on this split.

        Refuses any split but 'validation': thresholds fitted on the test split would make its
        score meaningless. Reads only that split (scores at dataset resolution, as `run`).
        With a presence head (`gate` None = whether the model has one) the presence cut-offs
        are fitted jointly (`thresholds.fit(..., gate=True)`).

        Raises:
            UserError: the split is not 'validation', the head is not sigmoid, or the thesis
                protocol is on.
        """
        thresholds.check_fitting_split(self.split)
        if self.head != "sigmoid" or self.thesis_protocol:
            raise UserError(
                "fitting thresholds needs the sigmoid head and the default protocol",
                hint="drop --thesis-protocol; softmax models have no thresholds",
            )
        histograms = thresholds.ScoreHistograms()
        has_gate = None
        for item in self._images(variables_of(state_or_variables)):
            histograms.add(item.full[..., -labels.NUM_STRUCTURES :], item.truth, item.presence)
            has_gate = item.presence is not None
        if gate and not has_gate:
            raise UserError("fitting a presence gate needs a model with model.presence_head")
        return thresholds.fit(histograms, gate=bool(has_gate if gate is None else gate))

    def _decide(
        self,
        probs: np.ndarray,
        lesion: np.ndarray | None,
        notebook_one_hot: bool = False,
        presence_probs: np.ndarray | None = None,
    ) -> np.ndarray:
        s = self.settings
        return postprocess.decide_masks(
            probs,
            head=self.head,
            threshold=s.threshold,
            opening_sizes=s.opening_sizes,
            lesion=lesion,
            notebook_one_hot=notebook_one_hot,
            presence_probs=presence_probs,
            presence_threshold=s.presence_threshold,
        )

    def _score_eval_resolution(self, item: _Scored, thesis, roc) -> None:
        # The thesis protocol restricts to the ground-truth lesion (defect 4) and one-hot
        # encodes like the notebook's Jaccard code (defect 6).
        restrict = item.lesion if self.thesis_protocol else None
        pred6 = self._decide(
            item.probs,
            restrict,
            notebook_one_hot=self.thesis_protocol,
            presence_probs=item.presence,
        )
        scores6 = item.probs
        if self.head == "sigmoid":
            scores6 = np.concatenate([1.0 - item.probs.max(-1, keepdims=True), item.probs], -1)
        thesis.update(pred6, metrics.thesis_ground_truth(item.structures, item.lesion), scores6)
        roc.update(scores6[..., 1:], item.structures)

    def _predict(self, variables: dict, images: np.ndarray) -> tuple:
        """(probabilities [n, S, S, C], presence [n, 5] or None) of a batch of n images."""
        n = len(images)
        if n < self.batch_size:
            # A short last batch keeps the compiled shape: pad with zero images.
            pad = np.zeros((self.batch_size - n, *images.shape[1:]), images.dtype)
            images = np.concatenate([images, pad])
        lo = jax.process_index() * self.batch_size // jax.process_count()
        hi = (jax.process_index() + 1) * self.batch_size // jax.process_count()
        sharded = sharding.shard_batch({"image": images[lo:hi]}, self.mesh)["image"]
        return tiling.split_prediction(jax.device_get(self.predict_fn(variables, sharded)), n)


def _default_protocol_images(
    data_cfg: ml_collections.ConfigDict,
    split: str,
    batch_size: int,
    predict: Callable[[np.ndarray], tuple],
    head: str,
    decide: Callable[..., np.ndarray],
    tiled: Callable[[np.ndarray, tuple], tuple] | None,
) -> Iterator[_Scored]:
    """The default protocol, image by image: the eval pipeline's batches through `predict`
    (or, with `tiled(image, box)`, each stored image's crop tile by tile), restored onto the
    prepared image and decided there by `decide(full_scores, box, hw, presence_probs=...)`."""
    import tensorflow_datasets as tfds

    from dermseg_jax.data import eval_pipeline, pipeline

    data_dir = pipeline.resolve_data_dir(data_cfg)
    raw_iter = iter(tfds.as_numpy(pipeline.read_split(data_dir, split)[0]))
    for batch in eval_pipeline.create_eval_dataset(data_cfg, split=split, batch_size=batch_size):
        if tiled is None:
            probs, gates = predict(batch["image"])
        real = np.reshape(batch["valid"], (len(batch["valid"]), -1)).any(axis=1)
        for i in np.flatnonzero(real):
            example = next(raw_iter)
            ident = _text(batch["id"][i])
            if _text(example["id"]) != ident:
                raise RuntimeError(
                    f"eval batches and raw examples of {data_dir} are out of step: "
                    f"{ident!r} vs {_text(example['id'])!r}"
                )
            h, w = (int(v) for v in batch["resized_size"][i])
            stored = example["image"].shape[:2]
            original = tuple(int(v) for v in batch["original_size"][i])
            box = _box_in_stored_pixels(batch["crop_box"][i], original, stored)
            if tiled is None:
                net, net_hw = probs[i], (h, w)
                gate = None if gates is None else gates[i]
            else:  # The crop at the training scale; the eval-resolution metrics see it resized.
                net, gate = tiled(example["image"], box)
                net_hw = net.shape[:2]
            full = inference.restore_probabilities(net, box, net_hw, stored, head=head)
            yield _Scored(
                id=ident,
                probs=net[:h, :w] if tiled is None else cv2.resize(net, (w, h)) / np.float32(255),
                structures=batch["structures"][i, :h, :w],
                lesion=batch["lesion"][i, :h, :w],
                prediction=decide(full, box, net_hw, presence_probs=gate),
                truth=(example["structures"] != 0).astype(np.uint8),
                image=example["image"],
                at_original=tuple(stored) == original,
                full=full,
                presence=gate,
            )


def _thesis_protocol_images(
    data_cfg: ml_collections.ConfigDict,
    split: str,
    batch_size: int,
    seed: int,
    predict: Callable[[np.ndarray], np.ndarray],
    decide: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> Iterator[_Scored]:
    """The thesis notebook's test loop (module docstring), image by image."""
    from dermseg_jax.data import thesis_eval

    for batch in thesis_eval.thesis_eval_batches(
        data_cfg, split=split, batch_size=batch_size, seed=seed
    ):
        # Only the real images: a padded batch would change the batch statistics and the
        # batch-axis softmax (the notebook's last batch is simply smaller).
        scores = np.asarray(predict(batch["image"]))
        for i, probs in enumerate(scores):
            structures, lesion = batch["structures"][i], batch["lesion"][i]
            yield _Scored(
                id=_text(batch["id"][i]),
                probs=probs,
                structures=structures,
                lesion=lesion,
                prediction=decide(probs, lesion)[..., 1:],
                truth=(structures != 0).astype(np.uint8),
                image=_display_image(batch["image"][i]),
                at_original=False,
            )


def _image_row(ident: str, shape: tuple[int, ...], counts: Mapping[str, np.ndarray]) -> dict:
    """One CSV row: id, size, and per structure the Jaccard and pixel counts."""
    row: dict[str, Any] = {"id": ident, "height": int(shape[0]), "width": int(shape[1])}
    for k, name in enumerate(labels.STRUCTURE_NAMES):
        tp, fp, fn = (int(counts[c][k]) for c in ("tp", "fp", "fn"))
        union = tp + fp + fn
        row[f"jaccard/{name}"] = tp / union if union else float("nan")
        row[f"truth_pixels/{name}"] = tp + fn
        row[f"predicted_pixels/{name}"] = tp + fp
    return row


def _display_image(image: np.ndarray) -> np.ndarray:
    # Pictures only: stretch whatever the normalisation produced to 8 bits.
    image = np.asarray(image, np.float32)
    lo, hi = float(image.min()), float(image.max())
    if 0.0 <= lo and hi <= 1.0:
        return np.rint(image * 255).astype(np.uint8)
    return np.rint((image - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _box_in_stored_pixels(
    box: Iterable[int], original: tuple[int, int], stored: tuple[int, int]
) -> tuple[int, ...]:
    """The pipeline's crop box (original pixels) back in the prepared image's pixels."""
    box = np.asarray(list(box), np.float64)
    if tuple(stored) == tuple(original):
        return tuple(int(v) for v in box)
    ratio = np.asarray([stored[0], stored[1]] * 2, np.float64) / np.asarray(
        [original[0], original[1]] * 2, np.float64
    )
    out = np.rint(box * ratio).astype(int)
    out[[0, 1]] = np.maximum(out[[0, 1]], 0)
    out[2] = min(max(out[2], out[0] + 1), stored[0])
    out[3] = min(max(out[3], out[1] + 1), stored[1])
    return tuple(int(v) for v in out)
