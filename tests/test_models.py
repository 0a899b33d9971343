"""The Flax network: shapes at any input size, parameter counts, groups, config and layers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from dermseg_jax import create_model, sharding, trainer
from dermseg_jax.configs import tiny
from dermseg_jax.models import (
    GROUPS,
    InceptionUNet,
    InceptionV3Encoder,
    abstract_variables,
    count_params,
    param_groups,
    replace_encoder,
)
from dermseg_jax.models.layers import BatchNorm, ConvTranspose

jax.config.update("jax_disable_most_optimizations", True)

NARROW = InceptionUNet(width=0.125)
_narrow_infer = jax.jit(functools.partial(NARROW.apply, train=False))
THESIS_CFG = dict(head="softmax", width=1.0, aspp_rates=(2, 3, 4))


def _init(model, hw, batch=1):
    x = jnp.zeros((batch, *hw, 3), jnp.float32)
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)


@pytest.fixture(scope="module")
def narrow_variables():
    return _init(NARROW, (75, 75))


def test_thesis_network_has_the_thesis_parameter_counts():
    params = abstract_variables(THESIS_CFG)["params"]
    assert count_params(params) == 47_674_770
    groups = param_groups(params)
    per_group = dict.fromkeys(GROUPS, 0)
    for label, leaf in zip(jax.tree.leaves(groups), jax.tree.leaves(params), strict=True):
        per_group[label] += int(np.prod(leaf.shape))
    assert per_group == {
        "l1": 28_768,
        "l2": 143_904,
        "l3": 818_528,
        "aspp": 3 * 1_624_320,
        "decoder": 11_293_536 + 25_910_080 + 4_606_994,
    }
    decoder = params["decoder"]
    assert count_params(decoder["l5"]) == 11_293_536
    assert count_params(decoder["l6"]) == 25_910_080
    assert count_params({k: decoder[k] for k in ("l7", "head", "head_bn")}) == 4_606_994


def test_encoder_returns_features_by_stride():
    x = jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32)
    encoder = InceptionV3Encoder()
    variables = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), x)
    l1, l2, l3 = jax.eval_shape(functools.partial(encoder.apply, train=False), variables, x)
    assert (l1.shape, l2.shape, l3.shape) == ((2, 61, 61, 64), (2, 28, 28, 192), (2, 13, 13, 288))


@pytest.mark.parametrize("hw", [(75, 75), (97, 130), (300, 400)])
def test_logits_have_the_input_size_and_params_do_not_depend_on_it(narrow_variables, hw):
    x = jax.random.uniform(jax.random.key(1), (1, *hw, 3))
    logits = _narrow_infer(narrow_variables, x)
    assert logits.shape == (1, *hw, 6) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    shapes = jax.eval_shape(lambda: NARROW.init(jax.random.key(0), x, train=False))
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, narrow_variables)


@pytest.mark.parametrize(("head", "channels"), [("softmax", 6), ("sigmoid", 5)])
def test_heads(head, channels):
    model = InceptionUNet(head=head, width=0.125)
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    assert logits.shape == (2, 256, 256, channels)


def test_train_mode_updates_batch_stats_and_drops_whole_channels(narrow_variables):
    x = jax.random.uniform(jax.random.key(2), (2, 97, 97, 3))
    apply = jax.jit(
        functools.partial(
            NARROW.apply,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda module, _: isinstance(module, nn.Dropout),
        )
    )
    out_a, updates = apply(narrow_variables, x, rngs={"dropout": jax.random.key(0)})
    out_b, _ = apply(narrow_variables, x, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(out_a, out_b)
    old, new = narrow_variables["batch_stats"], updates["batch_stats"]
    assert jax.tree.structure(old) == jax.tree.structure(new)
    assert not np.allclose(old["decoder"]["head_bn"]["mean"], new["decoder"]["head_bn"]["mean"])
    # Dropout2d: a dropped (image, channel) is zero over the whole map; rate 0.5 drops ~half.
    (dropped,) = updates["intermediates"]["decoder"]["l6"]["Dropout_0"]["__call__"]
    assert dropped.shape[1:3] == (46, 46)  # l1 at 97 px
    zero_maps = np.mean(np.all(np.asarray(dropped) == 0, axis=(1, 2)))
    assert 0.3 < zero_maps < 0.7
    # Inference needs no rng and is deterministic.
    np.testing.assert_array_equal(
        _narrow_infer(narrow_variables, x), _narrow_infer(narrow_variables, x)
    )


def test_too_large_aspp_rates_and_too_small_inputs_are_rejected():
    x = jnp.zeros((1, 75, 75, 3))
    with pytest.raises(ValueError, match="rate 15 does not fit the 15x15 feature map"):
        InceptionUNet(width=0.125, aspp_rates=(2, 15)).init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match=">= 75, got 64x80"):
        NARROW.init(jax.random.key(0), jnp.zeros((1, 64, 80, 3)), train=False)


@pytest.mark.parametrize("width", [0.001, 0.3, 2.0])
def test_any_width_gives_positive_integer_channels(width):
    params = abstract_variables(dict(head="softmax", width=width, aspp_rates=(2,)))["params"]
    branch = params["aspp"]["branch1"]["conv1"]["kernel"].shape[-1]
    assert branch == max(1, round(256 * width)) and isinstance(branch, int)
    assert params["decoder"]["l5"]["deconv"]["kernel"].shape[2] == max(1, round(800 * width))


def test_create_model_reads_config_dicts_and_names_missing_fields():
    cfg = ml_collections.ConfigDict(
        dict(
            head="sigmoid",
            width=0.5,
            aspp_rates=[2, 3],
            dropout_rate=0.1,
            bn_momentum=0.9,
            dtype="bfloat16",
            other=1,
        )
    )
    model = create_model(cfg)
    assert (model.head, model.width, model.aspp_rates, model.dtype) == (
        "sigmoid",
        0.5,
        (2, 3),
        "bfloat16",
    )
    assert create_model(cfg.to_dict()) == model
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['dtype'\]"):
        create_model({k: v for k, v in cfg.to_dict().items() if k != "dtype"})


def test_bfloat16_computes_in_bfloat16_with_float32_params(narrow_variables):
    model = InceptionUNet(width=0.125, dtype="bfloat16")
    x = jax.random.uniform(jax.random.key(3), (1, 75, 75, 3))
    reference = _narrow_infer(narrow_variables, x)
    logits = jax.jit(functools.partial(model.apply, train=False))(narrow_variables, x)
    assert logits.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(narrow_variables))
    assert 0 < float(jnp.max(jnp.abs(logits - reference))) < 0.1 * float(jnp.std(reference)) + 0.1


def _losses_over_steps(config, batch, steps):
    mesh = sharding.make_mesh()
    with jax.set_mesh(mesh):
        state = trainer.create_train_state(config, jax.random.key(0), mesh)
        step = jax.jit(
            functools.partial(trainer.train_step, loss_cfg=config.loss, class_weights=None)
        )
        out = []
        for _ in range(steps):
            state, metrics = step(state, batch)
            out.append(float(metrics["loss"]))
    floats = [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    return np.array(out)


def test_bfloat16_training_tracks_the_float32_loss():
    config = tiny.get_config()
    size = config.data.crop_size
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 6, (4, size // 8, size // 8))
    batch = {
        "image": jnp.asarray(rng.random((4, size, size, 3), np.float32)),
        "label": jnp.asarray(np.repeat(np.repeat(coarse, 8, 1), 8, 2).astype(np.int32)),
    }
    float32 = _losses_over_steps(config, batch, 4)
    config.model.dtype = "bfloat16"
    bfloat16 = _losses_over_steps(config, batch, 4)
    assert float32[-1] < float32[0]  # the steps learn something
    np.testing.assert_allclose(bfloat16, float32, rtol=0.05)
    assert not np.array_equal(bfloat16, float32)  # and bfloat16 did compute


def test_param_groups_and_replace_encoder(narrow_variables):
    groups = param_groups(narrow_variables["params"])
    assert set(jax.tree.leaves(groups)) == set(GROUPS)
    encoder = jax.tree.map(
        np.ones_like, {c: {"encoder": v["encoder"]} for c, v in narrow_variables.items()}
    )
    merged = replace_encoder(narrow_variables, encoder)
    assert all(np.all(leaf == 1) for leaf in jax.tree.leaves(merged["params"]["encoder"]))
    assert merged["params"]["decoder"] is narrow_variables["params"]["decoder"]
    wrong = jax.tree.map(lambda a: a[..., :1], encoder)
    with pytest.raises(ValueError, match="encoder params differ"):
        replace_encoder(narrow_variables, wrong)


def test_batchnorm_updates_running_variance_like_pytorch():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(2, 5, 5, 4)).astype(np.float32)
    torch_bn = torch.nn.BatchNorm2d(4, momentum=0.1, eps=1e-3).train()
    expected = torch_bn(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
    bn = BatchNorm(momentum=0.9, epsilon=1e-3)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, expected.transpose(0, 2, 3, 1), atol=1e-5)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["mean"], torch_bn.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats["var"], torch_bn.running_var.numpy(), rtol=1e-5)


@pytest.mark.parametrize(("k", "size_in", "output_padding"), [(3, 5, 1), (7, 6, 0), (7, 4, 1)])
def test_conv_transpose_matches_pytorch_output_padding(k, size_in, output_padding):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(2, 3, size_in, size_in)).astype(np.float32)
    torch_layer = torch.nn.ConvTranspose2d(3, 4, k, stride=2, output_padding=output_padding)
    with torch.no_grad():
        torch_layer.bias.normal_()
        expected = torch_layer(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    out = expected.shape[1]
    params = {
        "kernel": torch_layer.weight.detach().numpy().transpose(2, 3, 1, 0),
        "bias": torch_layer.bias.detach().numpy(),
    }
    y = ConvTranspose(4, k).apply({"params": params}, x.transpose(0, 2, 3, 1), (out, out))
    np.testing.assert_allclose(y, expected, atol=1e-5)
    # A smaller target crops the bottom/right edge (odd skip sizes at other input sizes).
    cropped = ConvTranspose(4, k).apply({"params": params}, x.transpose(0, 2, 3, 1), (out - 2, out))
    np.testing.assert_allclose(cropped, expected[:, : out - 2], atol=1e-5)
