"""Tests of dermseg_jax.data.thesis_eval: the thesis notebook's test loader."""

import numpy as np
import pytest
from test_evaluator import NUM_VAL, EvalFixture, build_eval_fixture

from dermseg_jax.data import augment, thesis_eval


@pytest.fixture(scope="session")
def eval_fixture(tmp_path_factory) -> EvalFixture:
    return build_eval_fixture(tmp_path_factory.getbasetemp() / "dermseg_eval_fixture")


def _batches(data_cfg, seed=5):
    return list(
        thesis_eval.thesis_eval_batches(data_cfg, split="validation", batch_size=2, seed=seed)
    )


def test_eval_normalization_rule():
    from dermseg_jax.configs import thesis, tiny

    config = thesis.get_config()
    assert config.data.normalization == "thesis_wrap"
    assert thesis_eval.eval_normalization(config.data) == "none"  # test images were [0, 1]
    config = tiny.get_config()
    config.data.normalization = "imagenet"
    assert thesis_eval.eval_normalization(config.data) == "imagenet"
    config.data.eval_normalization = "isic"
    assert thesis_eval.eval_normalization(config.data) == "isic"


def test_batches_are_the_notebooks_and_normalised(eval_fixture):
    data_cfg = eval_fixture.config().data
    plain = _batches(data_cfg)
    assert [len(b["id"]) for b in plain] == [2, NUM_VAL - 2]  # the last batch is short
    size = data_cfg.eval_size
    for batch in plain:
        assert batch["image"].shape[1:] == (size, size, 3)
        assert batch["structures"].shape[1:] == (size, size, 5)
        assert batch["lesion"].shape[1:] == (size, size)
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    # The same seed gives the same order and crops.
    again = _batches(data_cfg)
    for a, b in zip(plain, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    # The configured normalisation is applied to exactly those crops.
    data_cfg.normalization = "imagenet"
    mean, std = (np.asarray(v, np.float32) for v in augment.NORMALIZATION["imagenet"])
    for a, b in zip(plain, _batches(data_cfg), strict=True):
        assert list(a["id"]) == list(b["id"])
        expected = (a["image"] - mean) / std * a["valid"][..., None]
        np.testing.assert_allclose(b["image"], expected, atol=1e-5)
