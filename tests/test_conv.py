"""The fast convolution formulations equal XLA's textbook ones, values and gradients:
`conv.conv2d` (kernel gradient ordered before dx, behind `layers.Conv`) against
`lax.conv_general_dilated`, and the 'subpixel' transposed convolution against
`lax.conv_transpose`."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dermseg_jax.models.conv import after, conv2d
from dermseg_jax.models.layers import Conv
from dermseg_jax.models.transposed_conv import conv_transpose

DIMS = ("NHWC", "HWIO", "NHWC")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (kernel, stride, padding, dilation): the network's convolutions (3x3 same, stride-2 valid,
# dilated ASPP, 1x1, 5x5) and a few that only the general formula covers.
CASES = [
    (3, 1, 1, 1),
    (3, 2, 0, 1),
    (3, 1, 2, 2),
    (3, 1, 4, 4),
    (1, 1, 0, 1),
    (1, 2, 0, 1),
    (5, 1, 2, 1),
    (3, 2, 1, 1),
    (2, 3, 1, 2),
]


def _reference(x, kernel, stride, padding, dilation):
    pad = ((padding, padding), (padding, padding))
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), pad, rhs_dilation=(dilation, dilation), dimension_numbers=DIMS
    )


def _fast(x, kernel, stride, padding, dilation):
    pad = ((padding, padding), (padding, padding))
    return conv2d(x, kernel, (stride, stride), pad, (dilation, dilation))


@pytest.mark.parametrize(("k", "stride", "padding", "dilation"), CASES)
def test_conv2d_value_and_gradients_equal_lax(k, stride, padding, dilation):
    rng = np.random.default_rng(k * 100 + stride * 10 + dilation)
    x = rng.normal(size=(2, 11, 13, 5)).astype(np.float32)  # odd, non-square sides
    kernel = rng.normal(size=(k, k, 5, 7)).astype(np.float32)
    args = (stride, padding, dilation)
    expected = _reference(x, kernel, *args)
    cot = rng.normal(size=expected.shape).astype(np.float32)

    def loss(fn, x, kernel):
        return (fn(x, kernel, *args) * cot).sum()

    np.testing.assert_allclose(jax.jit(_fast, static_argnums=(2, 3, 4))(x, kernel, *args), expected)
    fast = jax.jit(jax.grad(lambda x, w: loss(_fast, x, w), (0, 1)))(x, kernel)
    ref = jax.grad(lambda x, w: loss(_reference, x, w), (0, 1))(x, kernel)
    for name, a, b in zip(("input", "kernel"), fast, ref, strict=True):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)


def test_conv2d_in_bfloat16_returns_bfloat16_gradients():
    x = jnp.ones((1, 8, 8, 4), jnp.bfloat16)
    kernel = jnp.full((3, 3, 4, 2), 0.5, jnp.bfloat16)
    dx, dk = jax.grad(lambda x, w: _fast(x, w, 1, 1, 1).astype(jnp.float32).sum(), (0, 1))(
        x, kernel
    )
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


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), "VALID"])
def test_conv_module_is_flax_conv_with_the_same_parameters(padding):
    x = np.random.default_rng(0).normal(size=(2, 9, 9, 3)).astype(np.float32)
    flax_conv = nn.Conv(4, (3, 3), strides=(2, 2), padding=padding)
    ours = Conv(4, (3, 3), strides=(2, 2), padding=padding)
    params = flax_conv.init(jax.random.key(0), x)
    mine = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, mine) == jax.tree.map(jnp.shape, params)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
    np.testing.assert_allclose(ours.apply(params, x), flax_conv.apply(params, x), atol=1e-5)
    no_bias = Conv(4, (1, 1), use_bias=False).init(jax.random.key(0), x)
    assert set(no_bias["params"]) == {"kernel"}


@pytest.mark.parametrize(("k", "stride"), [(3, 2), (7, 2), (4, 3)])
def test_subpixel_transposed_convolution_equals_lax_conv_transpose(k, stride):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(2, 9, 10, 4)).astype(np.float32)
    kernel = rng.normal(size=(k, k, 3, 4)).astype(np.float32)
    natural = (8 * stride + k, 9 * stride + k)
    # natural size, PyTorch's output_padding 1, cropped (odd skip sizes)
    for output_hw in [natural, (natural[0] + 1, natural[1] + 1), (natural[0] - 3, natural[1] - 3)]:
        cot = rng.normal(size=(2, *output_hw, 3)).astype(np.float32)

        def loss(x, kernel, impl, hw=output_hw, cot=cot):
            return (conv_transpose(x, kernel, stride, hw, impl) * cot).sum()

        np.testing.assert_allclose(
            conv_transpose(x, kernel, stride, output_hw, "subpixel"),
            conv_transpose(x, kernel, stride, output_hw, "xla"),
            atol=1e-4,
        )
        for fast, ref in zip(
            jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(x, kernel, "subpixel"),
            jax.grad(loss, (0, 1))(x, kernel, "xla"),
            strict=True,
        ):
            np.testing.assert_allclose(fast, ref, atol=1e-3, rtol=1e-5)


def test_gradients_under_a_four_device_data_mesh_equal_the_single_device_ones():
    # Per-shard backward passes (`conv.data_parallel_backward`) sum each kernel gradient once.
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from jax import lax
        from dermseg_jax import sharding
        from dermseg_jax.models.conv import conv2d
        from dermseg_jax.models.transposed_conv import conv_transpose
        DIMS = ("NHWC", "HWIO", "NHWC")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(4, 9, 9, 3)).astype(np.float32)
        w = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
        wt = rng.normal(size=(4, 4, 5, 3)).astype(np.float32)
        def ours(x, w, wt):
            y = conv2d(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1))
            return (conv_transpose(y[..., :3], wt, 2, (20, 20)) ** 2).sum()
        def ref(x, w, wt):
            y = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DIMS)
            return (conv_transpose(y[..., :3], wt, 2, (20, 20), "xla") ** 2).sum()
        expected = jax.grad(ref, (0, 1, 2))(x, w, wt)
        mesh = sharding.make_mesh()
        assert jax.device_count() == 4
        with jax.set_mesh(mesh):
            xs = sharding.shard_batch({"x": x}, mesh)["x"]
            got = jax.jit(jax.grad(ours, (0, 1, 2)))(xs, w, wt)
        for name, a, b in zip(("x", "kernel", "transposed kernel"), got, expected):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-3, err_msg=name)
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
