"""Tests of dermseg_jax.thresholds: histogram scores equal the official scorer, the fit is the
global optimum, storage and use, and fitting reads the validation split only."""

import itertools

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from test_evaluator import EvalFixture, build_eval_fixture

from dermseg_jax import labels, metrics, postprocess, thresholds
from dermseg_jax.errors import UserError

jax.config.update("jax_disable_most_optimizations", True)


def _images(seed, num_structures=5, n=6):
    """Random uint8 scores correlated with random truth, images of different sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 20 + 7 * i, 31 - 2 * i
        truth = rng.random((h, w, num_structures)) < rng.uniform(0.0, 0.3, num_structures)
        noise = rng.normal(0, 60, truth.shape)
        scores = np.clip(90 + 80 * truth + noise, 0, 255).astype(np.uint8)
        out.append((scores, truth.astype(np.uint8)))
    return out


def _histograms(images, num_structures=5):
    hist = thresholds.ScoreHistograms(num_structures)
    for scores, truth in images:
        hist.add(scores, truth)
    return hist


def _official(images, cutoffs):
    pairs = []
    for scores, truth in images:
        masks = postprocess.decide_masks(scores, head="sigmoid", threshold=cutoffs)[..., 1:]
        pairs.append((truth, masks))
    return metrics.isic2018_task2_score(pairs)["overall"]


def test_histogram_score_equals_the_official_scorer():
    images = _images(0)
    hist = _histograms(images)
    rng = np.random.default_rng(1)
    for indices in [np.full(5, 127), np.full(5, 255), np.full(5, 0), rng.integers(0, 256, 5)]:
        cutoffs = thresholds.CANDIDATES[indices]
        assert thresholds.micro_score(hist, indices) == pytest.approx(_official(images, cutoffs))


def test_fit_is_the_global_optimum():
    images = _images(2, num_structures=2, n=4)
    hist = _histograms(images, 2)
    step = 5  # brute force on a coarse grid: the fit must be at least as good
    grid = [
        thresholds.micro_score(hist, np.asarray(ij))
        for ij in itertools.product(range(0, 256, step), repeat=2)
    ]
    fitted = thresholds.fit(hist)
    assert fitted.score >= max(grid) - 1e-12
    best = np.searchsorted(thresholds.CANDIDATES, fitted.thresholds)
    assert thresholds.micro_score(hist, best) == pytest.approx(fitted.score)
    # No single structure's cut-off can be improved.
    for k in range(2):
        for b in range(256):
            trial = best.copy()
            trial[k] = b
            assert thresholds.micro_score(hist, trial) <= fitted.score + 1e-12


def test_fit_beats_one_half_when_the_scores_are_shifted():
    images = [(np.clip(s.astype(int) + 70, 0, 255).astype(np.uint8), t) for s, t in _images(3)]
    fitted = thresholds.fit(_histograms(images))
    assert fitted.score > fitted.score_at_half + 0.05
    assert fitted.score == pytest.approx(_official(images, fitted.thresholds))
    assert fitted.score_at_half == pytest.approx(_official(images, 0.5))
    assert all(t > 0.5 for t in fitted.thresholds)


def _config(head="sigmoid", **evaluation):
    return ml_collections.ConfigDict(
        {"model": {"head": head}, "eval": {"threshold": 0.5, **evaluation}}
    )


def test_save_load_and_apply(tmp_path):
    fitted = thresholds.FittedThresholds((0.1, 0.2, 0.3, 0.4, 0.6), 0.5, 0.4, 3)
    path = thresholds.save(tmp_path, fitted, step=7)
    assert thresholds.load(tmp_path)["thresholds"] == list(fitted.thresholds)
    assert path.endswith(thresholds.THRESHOLDS_FILE)
    config = _config()
    assert thresholds.apply_fitted(config, tmp_path, 7)
    assert config.eval.threshold == fitted.thresholds
    for config, step in [
        (_config(), 8),  # fitted for another checkpoint
        (_config(fitted_thresholds=False), 7),  # overridden
        (_config(head="softmax"), 7),
    ]:
        assert not thresholds.apply_fitted(config, tmp_path, step)
        assert config.eval.threshold == 0.5
    assert not thresholds.apply_fitted(_config(), tmp_path / "missing", 7)


class _SigmoidPixelModel(nn.Module):
    head: str = "sigmoid"

    @nn.compact
    def __call__(self, x, *, train: bool):
        y = nn.Conv(labels.NUM_STRUCTURES, (3, 3))(x)
        return nn.BatchNorm(use_running_average=not train)(y)


@pytest.fixture(scope="session")
def eval_fixture(tmp_path_factory) -> EvalFixture:
    return build_eval_fixture(tmp_path_factory.getbasetemp() / "dermseg_eval_fixture")


def _evaluator(eval_fixture, **kwargs):
    from dermseg_jax import evaluator

    config = eval_fixture.config()
    model = _SigmoidPixelModel()
    variables = model.init(jax.random.key(3), np.zeros((1, 8, 8, 3), np.float32), train=False)
    for key, value in kwargs.items():
        config.eval[key] = value
    return evaluator.Evaluator(model, config.data, config.eval), variables, config


def test_fitting_reads_the_validation_split_only(eval_fixture, monkeypatch):
    from dermseg_jax.data import pipeline

    read = pipeline.read_split
    seen = []

    def only_validation(data_dir, split, *args, **kwargs):
        seen.append(split)
        if split != "validation":
            raise AssertionError(f"the {split!r} split was read while fitting thresholds")
        return read(data_dir, split, *args, **kwargs)

    monkeypatch.setattr(pipeline, "read_split", only_validation)
    ev, variables, config = _evaluator(eval_fixture)
    fitted = ev.fit_thresholds(variables)
    assert set(seen) == {"validation"} and fitted.num_images == 3
    # Evaluating with the fitted thresholds gives the fitted score, at least 0.5's.
    fitted_eval = ml_collections.ConfigDict(
        {**config.eval.to_dict(), "threshold": fitted.thresholds}
    )
    results = type(ev)(_SigmoidPixelModel(), config.data, fitted_eval).run(variables)
    assert results["isic2018/overall"] == pytest.approx(fitted.score)
    assert ev.run(variables)["isic2018/overall"] == pytest.approx(fitted.score_at_half)
    assert fitted.score >= fitted.score_at_half


def test_fitting_refuses_the_test_split(eval_fixture):
    ev, variables, _ = _evaluator(eval_fixture, split="test")
    with pytest.raises(UserError, match="validation split only"):
        ev.fit_thresholds(variables)


@pytest.fixture(scope="module")
def sigmoid_model_dir(eval_fixture, tmp_path_factory):
    """A model directory of a narrow random sigmoid-head network."""
    from dermseg_jax import checkpointing, models

    config = eval_fixture.config()
    config.model.head = "sigmoid"
    model = models.create_model(config.model)
    size = config.data.eval_size
    variables = jax.jit(
        lambda rng: model.init(rng, np.zeros((1, size, size, 3), np.float32), train=False)
    )(jax.random.key(0))
    directory = tmp_path_factory.mktemp("sigmoid") / "model"
    checkpointing.save_model(directory, variables, config.model)
    return directory


def _evaluate_cli(tmp_path, *args):
    import os
    import pathlib
    import subprocess
    import sys

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    return subprocess.run(
        [sys.executable, "-m", "dermseg_jax.evaluate", *args,
         f"--compilation_cache={tmp_path / 'jax_cache'}"],
        cwd=pathlib.Path(__file__).resolve().parents[1], env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip


def test_evaluate_cli_fits_stores_and_then_uses_thresholds(
    eval_fixture, sigmoid_model_dir, tmp_path
):
    data = f"--data={eval_fixture.data_dir}"
    model = f"--workdir={sigmoid_model_dir}"
    refused = _evaluate_cli(tmp_path, model, data, "--fit-thresholds", "--split=test")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--split=test: thresholds are fitted on the validation split only" in refused.stderr
    assert not (sigmoid_model_dir / thresholds.THRESHOLDS_FILE).exists()

    fitted = _evaluate_cli(tmp_path, model, data, "--fit-thresholds", "--num_examples=0")
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    record = thresholds.load(sigmoid_model_dir)
    assert record["step"] is None and len(record["thresholds"]) == labels.NUM_STRUCTURES
    import json

    report = json.loads((sigmoid_model_dir / "eval_validation_model.json").read_text())
    assert report["metrics"]["isic2018/overall"] == pytest.approx(record["isic2018/overall"])
    # Later loads (evaluate, predict) use them unless told not to.
    from dermseg_jax import loading

    run = loading.load_run(sigmoid_model_dir)
    assert run.config.eval.threshold == tuple(record["thresholds"])
