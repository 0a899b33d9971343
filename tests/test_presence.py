"""Tests of the presence gate (dermseg_jax.presence): the head, its loss in the train step, the
gate in the one mask decision, tiles, and the joint fit of gate and pixel thresholds."""

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dermseg_jax import (
    inference,
    losses,
    models,
    postprocess,
    presence,
    sharding,
    thresholds,
    tiling,
    trainer,
)
from dermseg_jax.configs import tiny

jax.config.update("jax_disable_most_optimizations", True)


def _model_cfg(**overrides):
    cfg = dict(
        head="sigmoid",
        width=0.0625,
        aspp_rates=(2, 3, 4),
        dropout_rate=0.0,
        bn_momentum=0.9,
        dtype="float32",
        presence_head=True,
    )
    return ml_collections.ConfigDict({**cfg, **overrides})


def test_targets_count_only_valid_pixels():
    structures = np.zeros((2, 4, 4, 5), np.uint8)
    structures[0, 0, 0, 1] = 1  # in the padding of image 0
    structures[1, 2, 2, 3] = 1
    valid = np.ones((2, 4, 4), np.float32)
    valid[0, 0, 0] = 0
    targets = presence.presence_targets({"structures": structures, "valid": valid})
    np.testing.assert_array_equal(targets, [[0, 0, 0, 0, 0], [0, 0, 0, 1, 0]])


def test_the_head_returns_one_presence_logit_per_structure_and_trains_with_the_decoder():
    model = models.create_model(_model_cfg())
    x = jnp.zeros((2, 80, 80, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    logits, gate = models.split_outputs(model.apply(variables, x, train=False))
    assert logits.shape == (2, 80, 80, 5) and gate.shape == (2, 5)
    groups = models.param_groups(variables["params"])
    assert set(jax.tree.leaves(groups["presence"])) == {"decoder"}
    # Shapes for checkpoints and loading come from the config field.
    abstract = models.abstract_variables(_model_cfg())
    assert jax.tree.map(np.shape, abstract["params"]["presence"]) == jax.tree.map(
        np.shape, variables["params"]["presence"]
    )
    assert "presence" not in models.abstract_variables(_model_cfg(presence_head=False))["params"]
    with pytest.raises(ValueError, match="sigmoid head"):
        models.create_model(_model_cfg(head="softmax")).init(jax.random.key(0), x, train=False)


def test_train_step_adds_the_weighted_presence_loss():
    config = tiny.get_config()
    config.model.update(head="sigmoid", presence_head=True, dropout_rate=0.0)
    config.loss.name = "bce"
    size = config.data.crop_size
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.random((2, size, size, 3), np.float32),
        "structures": (rng.random((2, size, size, 5)) < 0.01).astype(np.uint8),
        "valid": np.ones((2, size, size), np.float32),
    }
    batch["structures"][1, ..., 2] = 0  # a structure absent from one image
    mesh = sharding.make_mesh()
    with jax.set_mesh(mesh):
        state = trainer.create_train_state(config, jax.random.key(0), mesh)
        sharded = sharding.shard_batch(batch, mesh)
        loss_at = {}
        for weight in (0.0, 1.0, 2.0):
            loss_cfg = ml_collections.ConfigDict(
                {**config.loss.to_dict(), "presence_weight": weight}
            )
            step = functools.partial(trainer.train_step, loss_cfg=loss_cfg, class_weights=None)
            _, metrics = jax.jit(step)(state, sharded)
            loss_at[weight] = float(metrics["loss"])
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        outputs, _ = state.apply_fn(
            variables, sharded["image"], train=True, mutable=["batch_stats"]
        )
    logits, gate = models.split_outputs(outputs)
    segmentation = float(losses.compute_loss(config.loss, logits, batch))
    expected = float(presence.presence_loss(gate, batch))
    assert loss_at[0.0] == pytest.approx(segmentation, rel=1e-5)
    assert loss_at[1.0] - loss_at[0.0] == pytest.approx(expected, rel=1e-4)
    assert loss_at[2.0] - loss_at[0.0] == pytest.approx(2 * expected, rel=1e-4)


def test_predict_fn_returns_presence_probabilities_also_under_tta():
    model = models.create_model(_model_cfg())
    x = jax.random.uniform(jax.random.key(1), (2, 80, 80, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    probs, gate = inference.create_predict_fn(model, head="sigmoid")(variables, x)
    _, gate_tta = inference.create_predict_fn(model, head="sigmoid", tta=True)(variables, x)
    _, raw = models.split_outputs(model.apply(variables, x, train=False))
    np.testing.assert_allclose(gate, jax.nn.sigmoid(raw), rtol=1e-6)
    flipped = [model.apply(variables, jnp.flip(x, a), train=False)[1] for a in (2, 1)]
    mean = (jax.nn.sigmoid(raw) + sum(jax.nn.sigmoid(f) for f in flipped)) / 3
    np.testing.assert_allclose(gate_tta, mean, rtol=1e-5)
    assert probs.shape == (2, 80, 80, 5)


def test_the_gate_empties_only_structures_below_their_cut_off():
    scores = np.full((6, 7, 5), 0.9, np.float32)
    kwargs = {"head": "sigmoid", "threshold": 0.5}
    ungated = postprocess.decide_masks(scores, **kwargs)
    gated = postprocess.decide_masks(
        scores,
        presence_probs=[0.1, 0.9, 0.5, 0.49, 0.0],
        presence_threshold=[0.2, 0.2, 0.5, 0.5, 0.0],
        **kwargs,
    )
    assert ungated[..., 1:].all()
    kept = gated[..., 1:].reshape(-1, 5).all(axis=0)
    assert kept.tolist() == [False, True, True, False, True]
    assert not gated[..., 1:].reshape(-1, 5)[:, [0, 3]].any()
    assert gated[..., 0].sum() == 0  # "others": where no structure is left (none here)
    # No presence values or no cut-offs: no gate.
    for args in ({"presence_probs": [0.0] * 5}, {"presence_threshold": [1.0] * 5}):
        np.testing.assert_array_equal(postprocess.decide_masks(scores, **kwargs, **args), ungated)
    assert presence.check_thresholds(0.3) == (0.3,) * 5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        presence.check_thresholds((0.1, 2.0, 0.1, 0.1, 0.1))


def test_tiles_give_the_largest_presence_over_the_tiles():
    settings = tiling.TileSettings(tile_size=80, stride=40)

    def predict(x):  # presence = the tile's mean brightness, per structure
        gate = np.repeat(x.mean(axis=(1, 2, 3))[:, None], 5, axis=1)
        return np.zeros((*x.shape[:3], 5), np.float32), gate

    image = np.zeros((200, 130, 3), np.float32)
    image[150:, 90:] = 1.0  # bright bottom-right corner
    _, gate = tiling.predict_tiles(predict, image, settings, batch_size=3)
    best = max(
        image[y : y + 80, x : x + 80].mean()
        for y in tiling.tile_starts(200, 80, 40)
        for x in tiling.tile_starts(130, 80, 40)
    )
    np.testing.assert_allclose(gate, np.full(5, best), rtol=1e-6)
    # The filler tiles of the last batch (all zeros) never count.
    _, gate = tiling.predict_tiles(predict, image[:80, :80] + 0.5, settings, batch_size=4)
    np.testing.assert_allclose(gate, np.full(5, 0.5), rtol=1e-6)


def _gated_images(seed, n=7):
    """Images where false positives come with low presence, so that a gate pays. Structures 0
    and 1 vary; 2..4 are never present and score 0 (they do not change the score)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 15 + 3 * i, 20 - i
        present = np.zeros(5, bool)
        present[:2] = rng.random(2) < 0.5
        truth = (rng.random((h, w, 5)) < 0.2) & present
        noise = rng.normal(0, 50, truth.shape)
        scores = np.clip(100 + 90 * truth + noise, 0, 255).astype(np.uint8)
        scores[..., 2:] = 0
        gate = np.where(present, rng.uniform(0.4, 1.0, 5), rng.uniform(0, 0.6, 5))
        out.append((scores, truth.astype(np.uint8), gate))
    return out


def _official_with_gate(images, cutoffs, gates):
    from dermseg_jax import metrics

    pairs = []
    for scores, truth, p in images:
        masks = postprocess.decide_masks(
            scores,
            head="sigmoid",
            threshold=cutoffs,
            presence_probs=p,
            presence_threshold=gates,
        )[..., 1:]
        pairs.append((truth, masks))
    return metrics.isic2018_task2_score(pairs)["overall"]


def test_joint_fit_of_gate_and_cut_off_is_the_global_optimum():
    images = _gated_images(0)
    hist = thresholds.ScoreHistograms()
    for scores, truth, p in images:
        hist.add(scores, truth, p)
    fitted = thresholds.fit(hist, gate=True)
    plain = thresholds.fit(hist)
    assert fitted.presence_thresholds is not None and plain.presence_thresholds is None
    assert fitted.score > plain.score  # the gate helps on these images
    # The fitted score is what the mask decision then scores.
    got = _official_with_gate(images, fitted.thresholds, fitted.presence_thresholds)
    assert got == pytest.approx(fitted.score)
    # No (gate, cut-off) pair of structures 0 and 1 does better: brute force from the raw
    # pixels (not the histograms), every cut-off level, every gate between two images.
    levels = np.arange(256)
    tp = np.zeros((2, len(images), 256))
    fp = np.zeros_like(tp)
    for i, (scores, truth, _) in enumerate(images):
        for k in (0, 1):
            above = scores[..., k].ravel()[:, None] > levels[None, :]
            positive = truth[..., k].ravel()[:, None] != 0
            tp[k, i] = (above & positive).mean(axis=0)
            fp[k, i] = (above & ~positive).mean(axis=0)
    positives = sum(t[..., :2].mean(axis=(0, 1)).sum() for _, t, _ in images)
    best = 0.0
    gates = [thresholds._gate_candidates(np.asarray([p[k] for *_, p in images])) for k in (0, 1)]
    for g0, g1 in itertools.product(*gates):
        keep = [np.asarray([p[k] >= g for *_, p in images], float) for k, g in ((0, g0), (1, g1))]
        tp0, fp0 = keep[0] @ tp[0], keep[0] @ fp[0]  # [256] each
        tp1, fp1 = keep[1] @ tp[1], keep[1] @ fp[1]
        score = (tp0[:, None] + tp1[None, :]) / (positives + fp0[:, None] + fp1[None, :])
        best = max(best, float(score.max()))
    assert fitted.score == pytest.approx(best, rel=1e-9)


def test_presence_values_must_come_for_every_image_or_none():
    hist = thresholds.ScoreHistograms(2)
    scores, truth = np.zeros((3, 3, 2), np.uint8), np.zeros((3, 3, 2), np.uint8)
    hist.add(scores, truth)
    with pytest.raises(ValueError, match="every image or for none"):
        hist.add(scores, truth, [0.5, 0.5])
    with pytest.raises(ValueError, match="presence of every image"):
        thresholds.fit(hist, gate=True)


def test_fitted_gate_is_stored_and_applied(tmp_path):
    fitted = thresholds.FittedThresholds((0.3,) * 5, 0.5, 0.4, 3, (0.0, 0.2, 0.0, 0.7, 0.1))
    thresholds.save(tmp_path, fitted, step=4)
    config = ml_collections.ConfigDict(
        {"model": {"head": "sigmoid"}, "eval": {"threshold": 0.5, "presence_threshold": None}}
    )
    assert thresholds.apply_fitted(config, tmp_path, 4)
    settings = inference.PostprocessSettings.from_config(config)
    assert settings.presence_threshold == fitted.presence_thresholds
    assert settings.threshold == fitted.thresholds


def test_export_to_torch_refuses_a_presence_head(tmp_path):
    from dermseg_jax import checkpointing, convert
    from dermseg_jax.errors import UserError

    model = models.create_model(_model_cfg())
    variables = model.init(jax.random.key(0), jnp.zeros((1, 80, 80, 3)), train=False)
    checkpointing.save_model(tmp_path / "model", variables, _model_cfg())
    with pytest.raises(UserError, match="presence head"):
        convert.export_to_torch(str(tmp_path / "model"), str(tmp_path / "out.pt"))
    assert not (tmp_path / "out.pt").exists()
