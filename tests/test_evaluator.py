"""Tests of dermseg_jax.evaluator on a tiny synthetic set and a narrow random network.

`eval_fixture` (also used by test_evaluate_cli.py and test_predict.py) writes, once per session,
a raw ISIC 2018-layout synthetic set, its prepared TFDS copy and a model directory.
"""

import dataclasses
import math
import pathlib
import types

import jax
import numpy as np
import pytest

from dermseg_jax import labels, metrics

jax.config.update("jax_disable_most_optimizations", True)

NUM_VAL = 3


@dataclasses.dataclass(frozen=True)
class EvalFixture:
    raw_dir: pathlib.Path  # ISIC 2018 layout (images + truth PNGs)
    data_dir: pathlib.Path  # prepared TFDS directory
    model_dir: pathlib.Path  # checkpointing.save_model output

    @property
    def val_images(self) -> pathlib.Path:
        return self.raw_dir / "ISIC2018_Task1-2_Validation_Input"

    @property
    def val_truth(self) -> pathlib.Path:
        return self.raw_dir / "ISIC2018_Task2_Validation_GroundTruth"

    def config(self):
        from dermseg_jax.configs import tiny

        config = tiny.get_config()
        config.data.data_dir = str(self.data_dir)
        return config


def build_eval_fixture(root: pathlib.Path) -> EvalFixture:
    """Creates (or reuses) the synthetic data and a random narrow model under `root`."""
    from dermseg_jax import checkpointing, models
    from dermseg_jax.data import prepare, synthetic

    fixture = EvalFixture(root / "raw", root / "data", root / "model")
    if checkpointing.is_model_dir(fixture.model_dir):
        return fixture
    synthetic.write_dataset(fixture.raw_dir, n_train=2, n_val=NUM_VAL, n_test=0, image_size=96)
    prepare.prepare(
        "isic2018",
        fixture.raw_dir,
        fixture.data_dir,
        task1_dir=fixture.raw_dir,
        shorter_side=None,
        num_workers=2,
        progress=False,
    )
    config = fixture.config()
    model = models.create_model(config.model)
    size = config.data.eval_size
    variables = jax.jit(
        lambda rng: model.init(rng, np.zeros((1, size, size, 3), np.float32), train=False)
    )(jax.random.key(0))
    checkpointing.save_model(fixture.model_dir, variables, config.model)
    return fixture


@pytest.fixture(scope="session")
def eval_fixture(tmp_path_factory) -> EvalFixture:
    # A fixed folder under the session's base temp, so all test modules share one copy.
    return build_eval_fixture(tmp_path_factory.getbasetemp() / "dermseg_eval_fixture")


@pytest.fixture(scope="module")
def loaded(eval_fixture):
    import dermseg_jax

    model, variables = dermseg_jax.load_checkpoint(str(eval_fixture.model_dir))
    return types.SimpleNamespace(model=model, variables=variables), eval_fixture


def _evaluator(loaded, **kwargs):
    from dermseg_jax import evaluator

    run, fixture = loaded
    config = fixture.config()
    return evaluator.Evaluator(run.model, config.data, config.eval, **kwargs), run


def test_default_protocol_returns_every_metric_in_range(loaded):
    fixture = loaded[1]
    ev, run = _evaluator(loaded, num_examples=2)
    results = ev.run(run.variables)
    assert results["num_images"] == NUM_VAL
    assert results["isic2018/at_original_resolution"] == 1.0
    assert results["thesis_protocol"] == 0.0
    expected = ["isic2018/overall", "isic2018/macro", "isic2018/micro_average_dice",
                "thesis/jaccard/mean",
                "thesis/auc/mean", "micro_jaccard/pooled", "image_jaccard/mean", "jaccard/mean",
                "roc_auc/mean"]  # fmt: skip
    for name in labels.STRUCTURE_NAMES:
        expected += [f"{m}/{name}" for m in ("thesis/jaccard", "thesis/auc", "micro_jaccard",
                     "micro_dice", "image_jaccard", "isic2018/jaccard", "isic2018/dice",
                     "roc_auc")]  # fmt: skip
    missing = [k for k in expected if k not in results]
    assert not missing
    for key, value in results.items():
        assert isinstance(value, float), key
        if key.startswith(("num_images", "thesis/num_images")):
            continue
        assert math.isnan(value) or 0.0 <= value <= 1.0, (key, value)
    assert not math.isnan(results["isic2018/overall"])
    # Per-image rows and pictures' material.
    ids = sorted(p.stem for p in fixture.val_images.glob("*.jpg"))
    assert sorted(r["id"] for r in ev.rows) == ids  # every image exactly once
    assert len(ev.examples) == 2
    example = ev.examples[0]
    assert example.image.shape[:2] == example.truth.shape[:2] == example.prediction.shape[:2]
    # The confusion matrix counts every real eval-resolution pixel exactly once.
    assert ev.confusion_matrix.sum() > 0
    # The official score recomputed from the rows' full-size counts.
    ious = [r[f"jaccard/{labels.STRUCTURE_NAMES[2]}"] for r in ev.rows]
    assert all(math.isnan(v) or 0 <= v <= 1 for v in ious)


def test_dataset_resolution_metrics_match_the_official_formula(loaded):
    ev, run = _evaluator(loaded, num_examples=NUM_VAL)
    results = ev.run(run.variables)
    pairs = [(e.truth, e.prediction) for e in ev.examples]
    official = metrics.isic2018_task2_score(pairs)
    assert results["isic2018/overall"] == pytest.approx(official["overall"], abs=1e-12)
    for name in labels.STRUCTURE_NAMES:
        assert results[f"isic2018/jaccard/{name}"] == pytest.approx(
            official[name]["jaccard"], abs=1e-12
        )


def _thesis_jaccards(examples, shift: int) -> list[float]:
    """Per structure, the thesis' +1 Jaccard of the examples, with prediction channel k + shift
    scored against truth channel k (none left: an empty prediction)."""
    out = []
    for k in range(labels.NUM_STRUCTURES):
        values = []
        for e in examples:
            g = e.truth[..., k] > 0
            p = e.prediction[..., k + shift] > 0 if k + shift < 5 else np.zeros_like(g)
            inter, total = np.sum(p & g), np.sum(p) + np.sum(g)
            if total:
                values.append(inter / (total - inter + 1))
        out.append(float(np.mean(values)) if values else math.nan)
    return out


def test_thesis_protocol_jaccard_has_the_notebooks_channel_shift(loaded):
    ev, run = _evaluator(loaded, thesis_protocol=True, batch_size=2, num_examples=NUM_VAL, seed=3)
    results = ev.run(run.variables)
    assert results["thesis_protocol"] == 1.0 and results["num_images"] == NUM_VAL
    crop = loaded[1].config().data.eval_size
    for example in ev.examples:
        # One random crop of eval_size per image (shorter side resized to resize_shorter).
        assert example.truth.shape == (crop, crop, labels.NUM_STRUCTURES)
    # Defect 6: the thesis Jaccard of structure k scores the prediction of structure k + 1
    # (the examples hold the correct channels, which `jaccard/<s>` scores).
    shifted, correct = _thesis_jaccards(ev.examples, 1), _thesis_jaccards(ev.examples, 0)
    assert shifted != pytest.approx(correct, nan_ok=True)
    for k, name in enumerate(labels.STRUCTURE_NAMES):
        assert results[f"thesis/jaccard/{name}"] == pytest.approx(shifted[k], nan_ok=True)
        assert results[f"jaccard/{name}"] == pytest.approx(correct[k], nan_ok=True)
    # The same seed gives the same crops, order and batch mates: the result is reproducible.
    again = _evaluator(loaded, thesis_protocol=True, batch_size=2, seed=3)[0].run(run.variables)
    assert again["thesis/jaccard/mean"] == pytest.approx(
        results["thesis/jaccard/mean"], nan_ok=True
    )


def test_thesis_protocol_rejects_sigmoid_head(loaded):
    from dermseg_jax import evaluator

    run, fixture = loaded
    config = fixture.config()
    with pytest.raises(ValueError, match="softmax"):
        evaluator.Evaluator(
            run.model, config.data, config.eval, head="sigmoid", thesis_protocol=True
        )


def test_tiled_inference_feeds_training_scale_tiles_and_scores_every_image(loaded):
    import flax.linen as nn
    import jax.numpy as jnp

    from dermseg_jax import evaluator

    class OneStructure(nn.Module):
        """Pigment network everywhere, nothing else; has the variables an Evaluator reads."""

        head: str = "sigmoid"

        @nn.compact
        def __call__(self, x, *, train: bool):
            y = nn.BatchNorm(use_running_average=not train)(x[..., :1] * 0.0)
            return y + jnp.asarray([-5.0, -5.0, 5.0, -5.0, -5.0])

    fixture = loaded[1]
    config = fixture.config()
    config.eval.inference = "tiles"
    model = OneStructure()
    variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32), train=False)
    ev = evaluator.Evaluator(model, config.data, config.eval, num_examples=NUM_VAL)
    shapes = []
    predict = ev._predict
    ev._predict = lambda v, images: shapes.append(images.shape) or predict(v, images)
    results = ev.run(variables)
    assert results["num_images"] == NUM_VAL
    tile = config.data.crop_size
    assert shapes and set(shapes) == {(config.eval.batch_size, tile, tile, 3)}
    for example in ev.examples:  # the structure fills the crop; nothing else anywhere
        assert example.prediction[..., 2].any()
        assert not np.delete(example.prediction, 2, axis=-1).any()
