"""Layers with PyTorch semantics that Flax does not provide: BatchNorm, ConvTranspose, Conv.

`BatchNorm` keeps Flax's variable names (`params/{scale,bias}`, `batch_stats/{mean,var}`) and
momentum convention (weight of the old running value, = 1 - PyTorch momentum), but updates the
running variance with the unbiased batch variance as `torch.nn.BatchNorm2d` does; Flax's own
BatchNorm uses the biased one, which drifts from PyTorch by a factor n / (n - 1) at 13x13 maps.
In training it normalises with `batch_norm.batch_norm` (fused ReLU, hand-written gradient).

`ConvTranspose` is PyTorch's `ConvTranspose2d` (padding 0) whose output size is set by the
caller: the thesis' `output_padding` generalised to any (also negative) amount, so a decoder
stage can be aligned to its skip connection at any input size. Its arithmetic lives in
`transposed_conv.py` (a fast sub-pixel form by default, `lax.conv_transpose` on request).

`Conv` is `flax.linen.Conv` (same parameter names, shapes and arithmetic) backed by
`conv.conv2d`, whose backward pass computes each kernel gradient together with the input
gradient instead of leaving XLA:CPU's scheduler to defer it (less memory).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dermseg_jax.models.batch_norm import batch_norm
from dermseg_jax.models.conv import conv2d
from dermseg_jax.models.transposed_conv import conv_transpose

# torch.nn.init.xavier_normal_ draws from an untruncated normal; JAX's glorot_normal truncates.
xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")


class BatchNorm(nn.Module):
    """Batch normalisation over all axes but the last, with PyTorch's running-stat update.

    Attributes:
        momentum: weight of the old running value (Flax convention; PyTorch m -> 1 - m).
        epsilon: added to the variance (1e-3 in torchvision's Inception, 1e-5 elsewhere).
        relu: apply ReLU to the result (every BatchNorm of the thesis network but the logits'
            is followed by one); in training it is part of `batch_norm.batch_norm`, whose
            hand-written gradient is much faster on the CPU than the op-by-op one.
        dtype: compute dtype of the output; statistics are always computed in float32.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    relu: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
        """Normalises `x` [..., C] with batch (training) or running (inference) statistics."""
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        if use_running_average:
            mul = scale * lax.rsqrt(ra_var.value + self.epsilon)
            y = x.astype(jnp.float32) * mul + (bias - ra_mean.value * mul)
            y = jnp.maximum(y, 0) if self.relu else y
            return y.astype(self.dtype)
        y, mean, var = batch_norm(x, scale, bias, self.epsilon, self.relu)
        if not self.is_initializing():
            n = x.size // features
            unbiased = var * (n / max(n - 1, 1))
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        return y.astype(self.dtype)


class ConvTranspose(nn.Module):
    """PyTorch `ConvTranspose2d(k, stride, padding=0)` with an explicit output size.

    The kernel is stored as [kh, kw, out, in] (PyTorch's [in, out, kh, kw] transposed by
    (2, 3, 1, 0)), as `lax.conv_transpose(..., transpose_kernel=True)` takes it. The natural
    output size is (in - 1) * stride + k; rows and columns beyond it receive only the bias
    (exactly PyTorch's `output_padding`), a smaller target crops the bottom/right edge.

    Attributes:
        features: output channels.
        kernel_size: square kernel side k.
        stride: stride s.
        dtype: compute dtype; parameters stay float32.
        implementation: 'subpixel' (default; its backward pass is far faster on CPU) or 'xla'
            (`lax.conv_transpose`); equal up to float rounding (`transposed_conv.py`).
    """

    features: int
    kernel_size: int
    stride: int = 2
    dtype: Any = jnp.float32
    implementation: str = "subpixel"

    @nn.compact
    def __call__(self, x: jax.Array, output_hw: tuple[int, int]) -> jax.Array:
        """Applies the transposed convolution.

        Args:
            x: [N, H, W, C_in].
            output_hw: (H_out, W_out) of the result.

        Returns:
            [N, H_out, W_out, features].
        """
        k, s = self.kernel_size, self.stride
        kernel = self.param(
            "kernel", xavier_normal, (k, k, self.features, x.shape[-1]), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = conv_transpose(
            x.astype(self.dtype), kernel.astype(self.dtype), s, output_hw, self.implementation
        )
        return y + bias.astype(self.dtype)


class Conv(nn.Module):
    """`nn.Conv` for NHWC images with explicit integer padding, backed by `conv.conv2d`.

    Parameters `kernel` [kh, kw, C_in, features] and `bias` [features] are `nn.Conv`'s, so
    checkpoints and the PyTorch conversion do not depend on which of the two built them.

    Attributes:
        features: output channels.
        kernel_size: (kh, kw).
        strides: (sh, sw).
        padding: ((top, bottom), (left, right)) zeros, or 'VALID'.
        kernel_dilation: (dh, dw).
        use_bias: add a bias (zeros at init).
        kernel_init: kernel initialiser.
        dtype: compute dtype; parameters stay float32.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "VALID"
    kernel_dilation: tuple[int, int] = (1, 1)
    use_bias: bool = True
    kernel_init: Any = xavier_normal
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[N, H, W, C_in] -> [N, H_out, W_out, features]."""
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        padding = ((0, 0), (0, 0)) if self.padding == "VALID" else self.padding
        padding = tuple(tuple(int(v) for v in pair) for pair in padding)
        y = conv2d(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            tuple(self.strides),
            padding,
            tuple(self.kernel_dilation),
        )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y
