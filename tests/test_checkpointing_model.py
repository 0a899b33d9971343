"""Model directories: save_model / load_model / dermseg_jax.load_checkpoint, and their errors."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import dermseg_jax
from dermseg_jax import checkpointing
from dermseg_jax.errors import UserError
from dermseg_jax.models import abstract_variables

jax.config.update("jax_disable_most_optimizations", True)

MODEL_CFG = dict(
    head="sigmoid",
    width=0.125,
    aspp_rates=(2, 3, 4),
    dropout_rate=0.5,
    bn_momentum=0.992,
    dtype="float32",
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_variables(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract_variables(cfg)
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    variables = random_variables(MODEL_CFG)
    checkpointing.save_model(directory, variables, ml_collections.ConfigDict(MODEL_CFG))
    return directory, variables


def test_save_then_load_is_exact(saved):
    directory, variables = saved
    assert sorted(os.listdir(directory)) == ["model_config.json", "variables"]
    cfg, restored = checkpointing.load_model(directory)
    assert isinstance(cfg, ml_collections.ConfigDict) and cfg.to_dict() == MODEL_CFG
    assert jax.tree.structure(restored) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(restored), strict=True):
        assert isinstance(b, jax.Array) and np.array_equal(a, np.asarray(b))


def test_load_checkpoint_returns_a_runnable_model(saved):
    directory, _ = saved
    model, variables = dermseg_jax.load_checkpoint(directory)
    assert (model.head, model.width) == ("sigmoid", 0.125)
    x = jax.ShapeDtypeStruct((1, 96, 96, 3), jnp.float32)
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    assert logits.shape == (1, 96, 96, 5)


def test_existing_directory_is_not_overwritten_silently(saved):
    directory, variables = saved
    with pytest.raises(FileExistsError, match="already holds a model"):
        checkpointing.save_model(directory, variables, MODEL_CFG)
    with pytest.raises(ValueError, match=r"lack the collection\(s\) \['batch_stats'\]"):
        checkpointing.save_model(directory, {"params": variables["params"]}, MODEL_CFG)


def test_missing_or_broken_directories_fail_clearly(tmp_path, saved):
    with pytest.raises(UserError, match="nowhere: no such model directory"):
        checkpointing.load_model(tmp_path / "nowhere")
    with pytest.raises(UserError, match="model_config.json is missing"):
        checkpointing.load_model(tmp_path)
    with pytest.raises(UserError, match="neither a training workdir .* nor a model directory"):
        dermseg_jax.load_checkpoint(tmp_path)
    (tmp_path / "model_config.json").write_text("{not json")
    with pytest.raises(UserError, match="model_config.json is not valid JSON"):
        checkpointing.load_model(tmp_path)
    (tmp_path / "model_config.json").write_text(json.dumps(MODEL_CFG))
    with pytest.raises(UserError, match="variables/ is missing"):
        checkpointing.load_model(tmp_path)
    # The stored arrays do not fit a config that was edited to another width.
    directory, _ = saved
    os.symlink(directory / "variables", tmp_path / "variables")
    (tmp_path / "model_config.json").write_text(json.dumps(dict(MODEL_CFG, width=0.25)))
    with pytest.raises(UserError, match="does not fit model_config.json"):
        checkpointing.load_model(tmp_path)


def test_encoder_only_directories_load_but_are_not_inference_models(tmp_path):
    encoder = jax.tree.map(
        lambda s: np.zeros(s.shape, s.dtype), abstract_variables(encoder_only=True)
    )
    checkpointing.save_model(tmp_path, encoder, {"encoder_only": True})
    cfg, restored = checkpointing.load_model(tmp_path)
    assert cfg.encoder_only and set(restored["params"]) == {"encoder"}
    with pytest.raises(UserError, match="encoder weights only"):
        dermseg_jax.load_checkpoint(tmp_path)


def test_package_import_loads_neither_tensorflow_nor_torch():
    code = (
        "import sys, dermseg_jax, dermseg_jax.models, dermseg_jax.models.convert_torch\n"
        "print(sorted(m for m in ('tensorflow', 'torch', 'torchvision') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert dermseg_jax.CLASS_NAMES[0] == "others" and len(dermseg_jax.STRUCTURE_NAMES) == 5
