"""The CPU-tuned `batch_norm` (custom VJP) and `channel_sum` against the op-by-op formula and
NumPy (`models/kernels/batch_norm.py`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dermseg_jax import xla_options
from dermseg_jax.models.kernels.batch_norm import batch_norm, channel_sum
from dermseg_jax.models.layers import BatchNorm

EPS = 1e-3


def reference(x, scale, bias, relu):
    """Training-mode BatchNorm(+ReLU) written plainly; JAX derives its gradient."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, (0, 1, 2))
    var = jnp.mean(jnp.square(x32 - mean), (0, 1, 2))
    y = (x32 - mean) * jax.lax.rsqrt(var + EPS) * scale + bias
    return (jnp.maximum(y, 0) if relu else y).astype(x.dtype), mean, var


def inputs(dtype=jnp.float32, seed=0):
    kx, ks, kb, kw = jax.random.split(jax.random.key(seed), 4)
    # An offset mean and uneven scales, as conv outputs have.
    x = 3.0 + 2.0 * jax.random.normal(kx, (3, 5, 6, 4)) * jnp.array([1.0, 0.1, 5.0, 1.0])
    scale = 1.0 + 0.3 * jax.random.normal(ks, (4,))
    bias = 0.2 * jax.random.normal(kb, (4,))
    w = jax.random.normal(kw, x.shape)
    return x.astype(dtype), scale, bias, w


@pytest.mark.parametrize("relu", [False, True])
def test_values_and_statistics_match_the_formula(relu):
    x, scale, bias, _ = inputs()
    got = batch_norm(x, scale, bias, EPS, relu)
    want = reference(x, scale, bias, relu)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("use_stats", [False, True])
def test_gradients_match_autodiff_of_the_formula(relu, use_stats):
    x, scale, bias, w = inputs()

    def loss(fn):
        def f(x, scale, bias):
            y, mean, var = fn(x, scale, bias, relu)
            value = jnp.sum(y * w)
            # Cotangents for the statistics too (normally symbolic zeros: only the running
            # averages read them).
            return value + jnp.sum(mean * 0.7 - var * 1.3) if use_stats else value

        return f

    custom = jax.grad(loss(lambda *a: batch_norm(*a[:3], EPS, a[3])), argnums=(0, 1, 2))
    plain = jax.grad(loss(reference), argnums=(0, 1, 2))
    got, want = custom(x, scale, bias), plain(x, scale, bias)
    for name, g, w_ in zip(("x", "scale", "bias"), got, want, strict=True):
        np.testing.assert_allclose(g, w_, rtol=2e-4, atol=2e-5, err_msg=name)


def test_bfloat16_input_gives_bfloat16_output_and_float32_statistics():
    x, scale, bias, w = inputs(jnp.bfloat16)
    y, mean, var = batch_norm(x, scale, bias, EPS, True)
    assert (y.dtype, mean.dtype, var.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    dx = jax.grad(lambda x: jnp.sum(batch_norm(x, scale, bias, EPS, True)[0] * w))(x)
    want = jax.grad(lambda x: jnp.sum(reference(x, scale, bias, True)[0] * w))(
        x.astype(jnp.float32)
    )
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_allclose(dx.astype(jnp.float32), want, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("train", [True, False])
def test_fused_relu_module_equals_relu_after_batchnorm(train):
    x, *_ = inputs()
    fused = BatchNorm(epsilon=EPS, relu=True, kernels="cpu_tuned")
    plain = BatchNorm(epsilon=EPS, kernels="cpu_tuned")
    variables = fused.init(jax.random.key(0), x, use_running_average=False)
    variables = jax.tree.map(lambda v: v + 0.1, variables)  # non-trivial params and stats
    y_fused, stats_fused = fused.apply(
        variables, x, use_running_average=not train, mutable=["batch_stats"]
    )
    y_plain, stats_plain = plain.apply(
        variables, x, use_running_average=not train, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y_fused, nn.relu(y_plain), rtol=1e-6, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, stats_fused, stats_plain)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 37, 41, 5), (1, 64, 64, 3)])
def test_channel_sum_equals_a_float64_sum(shape):
    # (3, 37, 41, 5): 4551 rows, not a multiple of 32, so the remainder rows count too.
    x = np.random.default_rng(0).normal(3.0, 1.0, shape).astype(np.float32)
    got = jax.jit(channel_sum)(x)
    np.testing.assert_allclose(got, x.astype(np.float64).sum((0, 1, 2)), rtol=1e-6)


def test_channel_sum_reduces_an_expression_without_writing_it_out():
    # With the training step's CPU options, XLA's own reduction of a [4, 64, 64, 8] expression
    # writes the expression out first (a full-size temporary); channel_sum fuses it into the
    # sum (temporaries: the partials).
    x = jnp.ones((4, 64, 64, 8))
    options = xla_options.train_step_options("cpu")

    def temp_bytes(sum_fn):
        fn = jax.jit(lambda v: sum_fn(jnp.square(v - 1.5)), compiler_options=options)
        return fn.lower(x).compile().memory_analysis().temp_size_in_bytes

    assert jax.default_backend() == "cpu"
    assert temp_bytes(lambda v: jnp.sum(v, (0, 1, 2))) >= x.nbytes
    assert temp_bytes(channel_sum) < x.nbytes // 8
