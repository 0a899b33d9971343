"""Training-mode batch normalisation (optionally + ReLU): per-channel sums and a hand-written VJP.

Two things make XLA:CPU slow at the thesis' BatchNorm layers on large maps (128x128x256 and
61x61x704 at 128 px input), and this module avoids both:

1. Its tree-reduction pass rewrites every reduction whose reduced dimensions include one longer
   than 32 into a `reduce-window` of 32-wide windows followed by a small reduce. A
   `reduce-window` does not fuse with the elementwise expression it reduces, so each BatchNorm
   sum (of x - mean, of g * x_hat, ...) first wrote that expression out at full size and then
   read it back, on one core. `channel_sum` sums each image's rows in groups of 32 (every
   reduced dimension 32 long: fused, vectorised over C, parallel over rows), then sums the
   partials; an optimisation barrier between the two stops XLA from merging them back
   into the one reduction it would rewrite. On other backends it is a plain `jnp.sum`.
2. Differentiated op by op, `relu((x - mean) * inv_std * scale + bias)` gives the backward pass
   several activation-sized residuals and five reductions. `batch_norm` saves one, the
   normalised input x_hat (in x's dtype), rebuilds the ReLU mask from it exactly as the forward
   pass computed it, and forms the standard gradient
   dx = scale * inv_std / n * (n * g - sum(g) - x_hat * sum(g * x_hat)) with two sums.

Measured on 2 CPU cores (BatchNorm + ReLU, forward and backward, float32, s): [4, 128, 128, 256]
0.223 -> 0.098 (PyTorch's `BatchNorm2d` + ReLU: 0.168); [4, 61, 61, 704] 0.164 -> 0.058
(PyTorch 0.114); [24, 128, 128, 256] 1.29 -> 0.50. Values and gradients equal the op-by-op
formula's to float32 rounding (tests/test_batch_norm.py).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

# XLA's tree-reduction rewrite applies when a reduced dimension is longer than this (CPU).
_WINDOW = 32


def channel_sum(x: jax.Array) -> jax.Array:
    """Sum of `x` [N, ..., C] over all axes but the last, in x's dtype: [C].

    On the CPU a reduction with a reduced dimension longer than 32 is summed in two stages (the
    module docstring says why): each item's rows in groups of 32, then the partial sums. Groups
    stay within an item, so a batch sharded over devices is summed where it lies. Elsewhere, and
    when every reduced dimension is short enough for XLA to reduce it in one fused loop, it is
    `jnp.sum`.
    """
    rows = math.prod(x.shape[1:-1])  # per item
    short = all(d <= _WINDOW for d in x.shape[:-1])
    if jax.default_backend() != "cpu" or short or rows < _WINDOW:
        return jnp.sum(x, tuple(range(x.ndim - 1)))
    items = x.reshape(x.shape[0], rows, x.shape[-1])
    main = rows - rows % _WINDOW
    groups = items[:, :main].reshape(x.shape[0], main // _WINDOW, _WINDOW, -1)
    total = lax.optimization_barrier(groups.sum(2)).sum((0, 1))
    return total + items[:, main:].sum((0, 1)) if main < rows else total


def _forward(x, scale, bias, epsilon, relu):
    x32 = x.astype(jnp.float32)
    n = x.size // x.shape[-1]
    mean = channel_sum(x32) / n
    # Two-pass variance: E[x^2] - E[x]^2 loses digits that the parity tests see.
    var = channel_sum(jnp.square(x32 - mean)) / n
    inv_std = lax.rsqrt(var + epsilon)
    x_hat = ((x32 - mean) * inv_std).astype(x.dtype)
    y = _affine(x_hat, scale, bias)
    y = jnp.maximum(y, 0) if relu else y
    return y.astype(x.dtype), mean, var, x_hat, inv_std


def _affine(x_hat, scale, bias):
    return x_hat.astype(jnp.float32) * scale + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, relu: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalises `x` [..., C] with its own batch statistics over all axes but the last.

    Args:
        x: [..., C] in any float dtype; statistics and arithmetic are float32.
        scale: float32 [C].
        bias: float32 [C].
        epsilon: added to the variance.
        relu: apply max(., 0) to the result.

    Returns:
        (y in x's dtype, mean float32 [C], biased variance float32 [C]).
    """
    y, mean, var, _, _ = _forward(x, scale, bias, epsilon, relu)
    return y, mean, var


def _fwd(x, scale, bias, epsilon, relu):
    x, scale, bias = x.value, scale.value, bias.value
    y, mean, var, x_hat, inv_std = _forward(x, scale, bias, epsilon, relu)
    return (y, mean, var), (x_hat, scale, bias, inv_std)


def _bwd(epsilon, relu, residuals, cotangents):
    del epsilon  # inv_std already holds it
    x_hat, scale, bias, inv_std = residuals
    g, g_mean, g_var = cotangents
    n = x_hat.size // x_hat.shape[-1]
    if isinstance(g, SymbolicZero):
        g = jnp.zeros(x_hat.shape, jnp.float32)
    g = g.astype(jnp.float32)
    if relu:
        # The forward pass's own arithmetic, so that the mask matches it bit for bit.
        g = jnp.where(_affine(x_hat, scale, bias) > 0, g, 0.0)
    x_hat = x_hat.astype(jnp.float32)
    d_bias = channel_sum(g)
    d_scale = channel_sum(g * x_hat)
    dx = (scale * inv_std / n) * (n * g - d_bias - x_hat * d_scale)
    # d mean / dx = 1 / n; d var / dx = 2 (x - mean) / n (the mean's own term sums to zero).
    if not isinstance(g_mean, SymbolicZero):
        dx = dx + g_mean / n
    if not isinstance(g_var, SymbolicZero):
        dx = dx + (2.0 / n) * (g_var / inv_std) * x_hat
    return dx.astype(residuals[0].dtype), d_scale, d_bias


batch_norm.defvjp(_fwd, _bwd, symbolic_zeros=True)
