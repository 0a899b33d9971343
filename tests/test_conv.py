"""The CPU-tuned convolution (`models/kernels/conv.py`): the `after` ordering, bfloat16
gradients, and `layers.Conv` as `flax.linen.Conv`. Its parity with the plain XLA kernels, on 1
and 4 devices, is in tests/test_kernels.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dermseg_jax.models.kernels.conv import after, conv2d
from dermseg_jax.models.layers import Conv


def test_conv2d_in_bfloat16_returns_bfloat16_gradients():
    x = jnp.ones((1, 8, 8, 4), jnp.bfloat16)
    kernel = jnp.full((3, 3, 4, 2), 0.5, jnp.bfloat16)

    def loss(x, w):
        return conv2d(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1)).astype(jnp.float32).sum()

    dx, dk = jax.grad(loss, (0, 1))(x, kernel)
    assert dx.dtype == dk.dtype == jnp.bfloat16
    # Every interior pixel sees all 9 taps of 2 output channels: 9 * 2 * 0.5.
    assert float(dx[0, 4, 4, 0]) == 9.0
    # The centre tap sums 64 pixels of ones.
    assert float(dk[1, 1, 0, 0]) == 64.0


def test_after_keeps_the_value_and_adds_a_data_dependence():
    x = jnp.arange(6.0).reshape(2, 3) - 2.5
    dependency = jnp.full((2, 2, 2), 7.0)
    np.testing.assert_array_equal(after(x, dependency), x)
    # The dependence is real: XLA may not drop it, so it carries a non-finite value through.
    assert np.isnan(np.asarray(jax.jit(after)(x, dependency.at[0, 0, 0].set(jnp.inf)))).all()
    jaxpr = str(jax.make_jaxpr(after)(x, dependency))
    assert "slice" in jaxpr and "mul" in jaxpr


@pytest.mark.parametrize("kernels", ["xla", "cpu_tuned"])
@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), "VALID"])
def test_conv_module_is_flax_conv_with_the_same_parameters(padding, kernels):
    x = np.random.default_rng(0).normal(size=(2, 9, 9, 3)).astype(np.float32)
    flax_conv = nn.Conv(4, (3, 3), strides=(2, 2), padding=padding)
    ours = Conv(4, (3, 3), strides=(2, 2), padding=padding, kernels=kernels)
    params = flax_conv.init(jax.random.key(0), x)
    mine = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, params)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
    np.testing.assert_allclose(ours.apply(params, x), flax_conv.apply(params, x), atol=1e-5)
    no_bias = Conv(4, (1, 1), use_bias=False).init(jax.random.key(0), x)
    assert set(no_bias["params"]) == {"kernel"}
