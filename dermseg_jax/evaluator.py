"""`Evaluator(model, data_cfg, eval_cfg).run(state) -> dict[str, float]`: the one evaluation.

Used by the trainer (periodic validation) and by `python -m dermseg_jax.evaluate`. Two protocols:

Default (correct) protocol: every image of the split once, as the eval pipeline prepares it
(automatic lesion crop, longer side resized to `eval_size`, padded), BatchNorm on running
statistics (`eval.batch_stats_bn` switches to each batch's own statistics, thesis defect 3),
optional flip TTA (`inference.create_predict_fn`). Two resolutions are scored:

- DATASET resolution (the prepared image's size: the original wherever `prepare` did not
  downscale, see `isic2018/at_original_resolution`): probabilities are mapped back with
  `inference.full_size_masks`, exactly as `predict` does, and compared with the stored masks.
  Keys of `metrics.SegmentationMetrics`: `jaccard/<s>` (thesis formula, +1), `image_jaccard/`,
  `image_dice/`, `micro_jaccard/`, `micro_dice/` (+ `/mean`, `/pooled`) and the official
  `isic2018/jaccard/<s>`, `isic2018/dice/<s>`, `isic2018/overall`, `isic2018/micro_average_dice`.
- EVAL resolution (the network's input frame, real pixels of the lesion crop): the thesis'
  metrics `thesis/jaccard/<class>`, `thesis/auc/<class>` (+ `/mean` over the five structures,
  `/mean6`), the 6x6 confusion matrix (attribute), and pooled-pixel ROC AUC `roc_auc/<s>`.

Thesis protocol (`thesis_protocol=True`, SEED_SPEC defects 1, 3, 4): the ground-truth lesion
crops each image; shorter side to `resize_shorter`, ONE random `eval_size` crop (fixed seed),
shuffled batches of `eval_cfg.batch_size` real images, BatchNorm on the batch's statistics,
softmax over the batch axis, predictions multiplied by the ground-truth lesion, the thesis'
opening. All metrics then refer to that crop (there is no way back to the full image).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from dermseg_jax import inference, labels, metrics, postprocess, sharding

_ROC_BINS = 256


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


class _RocAccumulator:
    """Pooled-pixel ROC per structure from histograms of 8-bit scores (bounded memory)."""

    def __init__(self) -> None:
        self.pos = np.zeros((labels.NUM_STRUCTURES, _ROC_BINS), np.int64)
        self.neg = np.zeros((labels.NUM_STRUCTURES, _ROC_BINS), np.int64)

    def update(self, scores: np.ndarray, truth: np.ndarray) -> None:
        """scores float [N, 5] in [0, 1]; truth [N, 5] in {0, 1}."""
        q = np.clip(np.rint(scores * (_ROC_BINS - 1)), 0, _ROC_BINS - 1).astype(np.int64)
        for k in range(labels.NUM_STRUCTURES):
            t = truth[:, k] > 0
            self.pos[k] += np.bincount(q[t, k], minlength=_ROC_BINS)
            self.neg[k] += np.bincount(q[~t, k], minlength=_ROC_BINS)

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
        out = {}
        for k, name in enumerate(labels.STRUCTURE_NAMES):
            p, n = self.pos[k].sum(), self.neg[k].sum()
            if p == 0 or n == 0:
                continue
            # Thresholds from high to low: a pixel is positive when its bin >= threshold.
            tpr = np.concatenate([[0.0], np.cumsum(self.pos[k][::-1]) / p])
            fpr = np.concatenate([[0.0], np.cumsum(self.neg[k][::-1]) / n])
            out[name] = (fpr, tpr, float(np.trapezoid(tpr, fpr)))
        return out


class Evaluator:
    """Evaluates a model on one split; see the module docstring for protocols and metric keys.

    Attributes (filled by `run`):
        rows: per-image dicts for a CSV (id, size, per-structure Jaccard and pixel counts).
        examples: the first `num_examples` images with truth and prediction, for pictures.
        confusion_matrix: int64 [6, 6] (rows truth, columns prediction), eval resolution.
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
            eval_cfg: `config.eval` (`split`, `batch_size`, `threshold`, `opening`,
                `restrict_to_lesion`, `batch_stats_bn`, optional `tta`, `thesis_protocol`).
            head: 'softmax' | 'sigmoid'; None = `model.head`.
            batch_size: global eval batch; None = `eval_cfg.batch_size`.
            split: None = `eval_cfg.split`.
            thesis_protocol: None = `eval_cfg.thesis_protocol` (default False).
            tta: None = `eval_cfg.tta` (default False). Not used by the thesis protocol.
            num_examples: images to keep in `examples` for pictures.
            mesh: data mesh; None = `sharding.make_mesh()`.
            seed: seed of the thesis protocol's random crops and batch order.
        """
        self.model = model
        self.data_cfg = data_cfg
        self.head = head or getattr(model, "head", "softmax")
        config = ml_collections.ConfigDict({"model": {"head": self.head}, "eval": eval_cfg})
        self.settings = inference.PostprocessSettings.from_config(config, tta=tta)
        self.batch_size = int(batch_size or eval_cfg.batch_size)
        self.split = split or eval_cfg.get("split", "validation")
        self.thesis_protocol = bool(
            eval_cfg.get("thesis_protocol", False) if thesis_protocol is None else thesis_protocol
        )
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        # Thesis defect 3 alone (`eval.batch_stats_bn`, set by configs/thesis.py): BatchNorm on
        # each batch's statistics, but a normal softmax and the default data.
        self.batch_stats_bn = bool(eval_cfg.get("batch_stats_bn", False))
        if self.thesis_protocol:
            if self.head != "softmax":
                raise ValueError("The thesis protocol needs the softmax head (batch-axis softmax).")
            self.predict_fn = inference.create_thesis_predict_fn(model)
        elif self.batch_stats_bn:
            self.predict_fn = inference.create_batch_stats_predict_fn(model, head=self.head)
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
        seg = metrics.SegmentationMetrics()
        thesis = metrics.ThesisMetrics()
        roc = _RocAccumulator()
        at_original = []
        if self.thesis_protocol:
            images = self._thesis_images(variables)
        else:
            images = self._default_images(variables)
        for item in images:
            self._score_eval_resolution(item, thesis, roc)
            pred, truth = item["full_prediction"], item["full_truth"]
            counts = _confusion_counts(pred, truth)
            seg.update(counts)
            at_original.append(float(item["at_original"]))
            self._add_row(item, counts)
            if len(self.examples) < self.num_examples:
                self.examples.append(EvalExample(item["id"], item["full_image"], truth, pred))
        if seg.num_images == 0:
            raise ValueError(f"split {self.split!r}: no images were evaluated")
        out = seg.finalize()
        for key, value in thesis.finalize().items():
            if key.startswith("thesis_"):
                metric, name = key.split("/", 1)
                key = f"thesis/{metric[len('thesis_') :]}/{name}"
            else:
                key = f"thesis/{key}"
            out[key] = value
        self.confusion_matrix = thesis.confusion_matrix.copy()
        self.roc_curves = roc.curves()
        aucs = []
        for name in labels.STRUCTURE_NAMES:
            auc = self.roc_curves[name][2] if name in self.roc_curves else math.nan
            out[f"roc_auc/{name}"] = auc
            aucs.append(auc)
        finite = [a for a in aucs if not math.isnan(a)]
        out["roc_auc/mean"] = float(np.mean(finite)) if finite else math.nan
        out["isic2018/at_original_resolution"] = float(np.mean(at_original))
        out["thesis_protocol"] = float(self.thesis_protocol)
        out["tta"] = float(self.settings.tta and not self.thesis_protocol)
        return {k: float(v) for k, v in out.items()}

    def _score_eval_resolution(self, item: dict, thesis, roc: _RocAccumulator) -> None:
        probs, structures, lesion = item["probs"], item["structures"], item["lesion"]
        if self.head == "softmax":
            pred6 = postprocess.predict_classes_softmax(
                probs,
                lesion if item["restrict"] else None,
                None if self.settings.opening_sizes is None else (1, *self.settings.opening_sizes),
            )
            scores6 = probs
            scores5 = probs[..., 1:]
        else:
            pred5 = inference.probabilities_to_masks(
                probs,
                head="sigmoid",
                threshold=self.settings.threshold,
                opening_sizes=self.settings.opening_sizes,
                lesion=lesion if item["restrict"] else None,
            )
            pred6 = metrics.thesis_ground_truth(pred5, None)
            scores5 = probs
            scores6 = np.concatenate([1.0 - probs.max(-1, keepdims=True), probs], axis=-1)
        thesis.update(pred6, metrics.thesis_ground_truth(structures, lesion), scores6)
        roc.update(scores5.reshape(-1, labels.NUM_STRUCTURES), structures.reshape(-1, 5))

    def _add_row(self, item: dict, counts: Mapping[str, np.ndarray]) -> None:
        row: dict[str, Any] = {
            "id": item["id"],
            "height": int(item["full_truth"].shape[0]),
            "width": int(item["full_truth"].shape[1]),
        }
        for k, name in enumerate(labels.STRUCTURE_NAMES):
            tp, fp, fn = (int(counts[c][0, k]) for c in ("tp", "fp", "fn"))
            union = tp + fp + fn
            row[f"jaccard/{name}"] = tp / union if union else math.nan
            row[f"truth_pixels/{name}"] = tp + fn
            row[f"predicted_pixels/{name}"] = tp + fp
        self.rows.append(row)

    def _default_images(self, variables: dict) -> Iterator[dict]:
        """Per image: eval-resolution probabilities and truth, and dataset-resolution masks."""
        import tensorflow_datasets as tfds

        from dermseg_jax.data import pipeline

        data_dir = pipeline.resolve_data_dir(self.data_cfg)
        raw, _ = pipeline.read_split(data_dir, self.split)
        raw_iter = iter(tfds.as_numpy(raw))
        batches = pipeline.create_eval_dataset(
            self.data_cfg, split=self.split, batch_size=self.batch_size
        )
        s = self.settings
        for batch in batches:
            probs = self._predict(variables, batch)
            for i in range(len(probs)):
                if not np.any(batch["valid"][i]):
                    continue
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
                full = inference.full_size_masks(
                    probs[i],
                    box,
                    (h, w),
                    stored,
                    head=self.head,
                    threshold=s.threshold,
                    opening_sizes=s.opening_sizes,
                )
                yield {
                    "id": ident,
                    "probs": probs[i, :h, :w],
                    "structures": batch["structures"][i, :h, :w],
                    "lesion": batch["lesion"][i, :h, :w],
                    "restrict": False,
                    "full_prediction": full,
                    "full_truth": (example["structures"] != 0).astype(np.uint8),
                    "full_image": example["image"],
                    "at_original": tuple(stored) == original,
                }

    def _predict(self, variables: dict, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        images = np.asarray(batch["image"])
        real = np.asarray(batch["valid"]).reshape(len(images), -1).any(axis=1)
        if self.batch_stats_bn:
            # Batch statistics: padded images would change them, so only the real ones go in.
            probs = np.zeros(images.shape[:3] + (_channels(self.head),), np.float32)
            probs[real] = np.asarray(self.predict_fn(variables, images[real]))
            return probs
        n = len(images)
        if n < self.batch_size:
            # A short last batch keeps the compiled shape: pad with zero images.
            images = np.concatenate(
                [images, np.zeros((self.batch_size - n, *images.shape[1:]), images.dtype)]
            )
        lo = jax.process_index() * self.batch_size // jax.process_count()
        hi = (jax.process_index() + 1) * self.batch_size // jax.process_count()
        sharded = sharding.shard_batch({"image": images[lo:hi]}, self.mesh)["image"]
        return np.asarray(jax.device_get(self.predict_fn(variables, sharded)))[:n]

    def _thesis_images(self, variables: dict) -> Iterator[dict]:
        """The thesis notebook's test loop (module docstring), image by image."""
        opening6 = (1, *(self.settings.opening_sizes or (1,) * labels.NUM_STRUCTURES))
        for batch in thesis_eval_batches(
            self.data_cfg, split=self.split, batch_size=self.batch_size, seed=self.seed
        ):
            # Only the real images: a padded batch would change the batch statistics and the
            # batch-axis softmax (the notebook's last batch is simply smaller).
            scores = np.asarray(self.predict_fn(variables, batch["image"]))
            for i in range(len(scores)):
                lesion = batch["lesion"][i]
                structures = batch["structures"][i]
                pred6 = postprocess.predict_classes_softmax(scores[i], lesion, opening6)
                yield {
                    "id": _text(batch["id"][i]),
                    "probs": scores[i],
                    "structures": structures,
                    "lesion": lesion,
                    "restrict": True,
                    "full_prediction": pred6[..., 1:],
                    "full_truth": (structures != 0).astype(np.uint8),
                    "full_image": _display_image(batch["image"][i]),
                    "at_original": False,
                }


def thesis_eval_batches(
    data_cfg: ml_collections.ConfigDict, *, split: str, batch_size: int, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """The thesis notebook's test loader: shuffled, one random crop per image, last batch short.

    Ground-truth lesion crop ('mask'; 'auto' where an example has no mask), shorter side to
    `resize_shorter` with `resize_method`, one random `eval_size` square crop, no flips, no
    colour step, the eval normalisation (`eval_normalization`, else 'none' for the thesis'
    training-only 'thesis_wrap': its test images are plain [0, 1]).

    Args:
        data_cfg: `config.data`.
        split: split name.
        batch_size: images per batch (thesis: 2); the last batch holds the rest.
        seed: seed of the order and of the crops.

    Returns:
        Iterator of numpy batches: image [b, E, E, 3], structures uint8 [b, E, E, 5], lesion
        uint8 [b, E, E], valid, label, id.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from dermseg_jax.data import pipeline

    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.lesion_crop = "mask"
    cfg.color_jitter = (0.0, 0.0, 0.0, 0.0)
    cfg.flip = False
    cfg.crop_size = int(data_cfg.eval_size)
    eval_norm = data_cfg.get("eval_normalization", None)
    cfg.normalization = eval_norm or (
        "none" if data_cfg.normalization == "thesis_wrap" else data_cfg.normalization
    )
    raw, num = pipeline.read_split(pipeline.resolve_data_dir(cfg), split)
    example_fn = pipeline.train_example_fn(cfg)
    base = tf.constant([seed, 0], tf.int64)

    def fn(index, example):
        out = example_fn(example, tf.random.experimental.stateless_fold_in(base, index))
        out["id"] = example["id"]
        return out

    dataset = raw.enumerate().shuffle(num, seed=seed).map(fn).batch(batch_size)
    return iter(tfds.as_numpy(dataset))


def _display_image(image: np.ndarray) -> np.ndarray:
    # Pictures only: stretch whatever the normalisation produced to 8 bits.
    image = np.asarray(image, np.float32)
    lo, hi = float(image.min()), float(image.max())
    if 0.0 <= lo and hi <= 1.0:
        return np.rint(image * 255).astype(np.uint8)
    return np.rint((image - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)


def _confusion_counts(pred: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """`metrics.eval_counts` of one image on the host: full-size masks never go to a device."""
    p, t = pred != 0, truth != 0
    tp = np.count_nonzero(p & t, axis=(0, 1))
    fp = np.count_nonzero(p & ~t, axis=(0, 1))
    fn = np.count_nonzero(~p & t, axis=(0, 1))
    tn = p.shape[0] * p.shape[1] - tp - fp - fn
    values = (tp, fp, fn, tn)
    return {k: v[None].astype(np.int64) for k, v in zip(metrics.COUNT_KEYS, values, strict=True)}


def _channels(head: str) -> int:
    return labels.NUM_CLASSES if head == "softmax" else labels.NUM_STRUCTURES


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
