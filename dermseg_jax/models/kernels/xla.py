"""The plain kernels (`model.kernels='xla'`): XLA's own operations, differentiated by JAX.

No custom VJP, no `shard_map` and no scheduling dependence: on GPU and TPU the compiler sees
ordinary convolutions and reductions it can fuse and hand to cuDNN, and under `jax.jit` over a
data mesh the gradient all-reduce is the one XLA inserts. docs/kernels.md says why these forms.
"""

import jax
import jax.numpy as jnp
from jax import lax

DIMS = ("NHWC", "HWIO", "NHWC")

Pairs = tuple[tuple[int, int], tuple[int, int]]


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: Pairs,
    dilation: tuple[int, int],
) -> jax.Array:
    """Cross-correlation of NHWC `x` with an HWIO `kernel` (what `flax.linen.Conv` computes).

    Args:
        x: [N, H, W, C_in].
        kernel: [kh, kw, C_in, C_out].
        strides: (sh, sw).
        padding: ((top, bottom), (left, right)) zeros.
        dilation: kernel dilation (dh, dw).

    Returns:
        [N, H_out, W_out, C_out].
    """
    return lax.conv_general_dilated(
        x, kernel, strides, padding, rhs_dilation=dilation, dimension_numbers=DIMS
    )


def natural_size(size: int, stride: int, k: int) -> int:
    """Output side of a transposed convolution without output padding: (size - 1) * s + k."""
    return (size - 1) * stride + k


def conv_transpose(
    x: jax.Array, kernel: jax.Array, stride: int, output_hw: tuple[int, int]
) -> jax.Array:
    """PyTorch's `ConvTranspose2d(padding=0)` without bias, as one `lax.conv_transpose`.

    Args:
        x: [N, H, W, C_in].
        kernel: [k, k, C_out, C_in] (PyTorch's [C_in, C_out, k, k] transposed by (2, 3, 1, 0)).
        stride: s.
        output_hw: (H_out, W_out); beyond the natural (in - 1) * s + k: zeros at the
            bottom/right (PyTorch's `output_padding`), below it: cropped there.

    Returns:
        [N, H_out, W_out, C_out].
    """
    k = kernel.shape[0]
    padding = [
        (k - 1, k - 1 + out - natural_size(size, stride, k))
        for size, out in zip(x.shape[1:3], output_hw, strict=True)
    ]
    return lax.conv_transpose(
        x, kernel, (stride, stride), padding, dimension_numbers=DIMS, transpose_kernel=True
    )


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
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axes)
    # Two-pass variance: E[x^2] - E[x]^2 loses digits that the parity tests see.
    var = jnp.mean(jnp.square(x32 - mean), axes)
    y = (x32 - mean) * lax.rsqrt(var + epsilon) * scale + bias
    y = jnp.maximum(y, 0) if relu else y
    return y.astype(x.dtype), mean, var
