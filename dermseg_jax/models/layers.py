"""The layers with PyTorch semantics (Conv, ConvTranspose, BatchNorm) and the kernel switch.

This is the one place that chooses how the layers compute: `model.kernels` 'xla' (plain XLA
operations and JAX's autodiff, for GPU/TPU) or 'cpu_tuned' (`models/kernels/`: hand-written
backward passes for XLA:CPU), with 'auto' resolved from the target platform, and the compute
dtype, with 'auto' = bfloat16 on accelerators. Both kernel sets use the same parameters, so a
checkpoint trained with one runs with the other (docs/kernels.md).

`BatchNorm` keeps Flax's variable names and momentum convention but updates the running
variance with the unbiased batch variance, as `torch.nn.BatchNorm2d` does.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dermseg_jax.errors import UserError
from dermseg_jax.models.kernels import batch_norm, conv, transposed_conv, xla


class Kernels(NamedTuple):
    """The functions behind the layers (signatures: `kernels.xla`)."""

    conv2d: Any
    conv_transpose: Any
    batch_norm: Any


KERNELS = {
    "xla": Kernels(xla.conv2d, xla.conv_transpose, xla.batch_norm),
    "cpu_tuned": Kernels(conv.conv2d, transposed_conv.conv_transpose, batch_norm.batch_norm),
}
KERNEL_CHOICES = ("auto", *KERNELS)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)

# torch.nn.init.xavier_normal_ draws from an untruncated normal; JAX's glorot_normal truncates.
xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")


def _is_cpu(platform: str | None) -> bool:
    # jax.default_backend() says 'cpu' | 'gpu' | 'tpu'; jax.export names 'cpu' | 'cuda' | ...
    return (jax.default_backend() if platform is None else platform).lower() == "cpu"


def _resolve(field: str, value: str, choices: tuple, cpu: str, accelerator: str, platform):
    """`value` of `model.<field>` on `platform`: 'auto' -> `cpu` or `accelerator`."""
    if value not in choices:
        raise UserError(
            f"config model.{field}={value!r} is not one of {choices}",
            hint=f"pass --config.model.{field}=auto (or {', '.join(choices[1:])})",
        )
    if value != "auto":
        return value
    return cpu if _is_cpu(platform) else accelerator


def resolve_kernels(kernels: str, platform: str | None = None) -> str:
    """The kernel set `model.kernels` means on `platform` ('xla' or 'cpu_tuned').

    Args:
        kernels: 'auto' | 'xla' | 'cpu_tuned'.
        platform: 'cpu', 'gpu', 'cuda', 'rocm' or 'tpu'; None = `jax.default_backend()`.

    Returns:
        'cpu_tuned' for 'auto' on the CPU, 'xla' for 'auto' elsewhere, else `kernels`.
    """
    return _resolve("kernels", kernels, KERNEL_CHOICES, "cpu_tuned", "xla", platform)


def resolve_dtype(dtype: str, platform: str | None = None) -> str:
    """The compute dtype `model.dtype` means on `platform` ('float32' or 'bfloat16').

    Args:
        dtype: 'auto' | 'float32' | 'bfloat16'.
        platform: as in `resolve_kernels`.

    Returns:
        'float32' for 'auto' on the CPU, 'bfloat16' for 'auto' elsewhere, else `dtype`.
    """
    return _resolve("dtype", dtype, DTYPE_CHOICES, "float32", "bfloat16", platform)


def kernel_set(kernels: str) -> Kernels:
    """The functions of a kernel set name ('auto' resolved for `jax.default_backend()`)."""
    return KERNELS[resolve_kernels(kernels)]


class BatchNorm(nn.Module):
    """Batch normalisation over all axes but the last, with PyTorch's running-stat update.

    Attributes:
        momentum: weight of the old running value (Flax convention; PyTorch m -> 1 - m).
        epsilon: added to the variance (1e-3 in torchvision's Inception, 1e-5 elsewhere).
        relu: apply ReLU to the result (every BatchNorm of the thesis network but the logits'
            is followed by one; part of the kernel, so the CPU kernel fuses it).
        dtype: compute dtype of the output; statistics are always computed in float32.
        kernels: kernel set ('auto' | 'xla' | 'cpu_tuned').
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    relu: bool = False
    dtype: Any = jnp.float32
    kernels: str = "auto"

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
        normalise = kernel_set(self.kernels).batch_norm
        y, mean, var = normalise(x, scale, bias, self.epsilon, self.relu)
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
        kernels: kernel set ('auto' | 'xla' | 'cpu_tuned').
    """

    features: int
    kernel_size: int
    stride: int = 2
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, output_hw: tuple[int, int]) -> jax.Array:
        """Applies the transposed convolution.

        Args:
            x: [N, H, W, C_in].
            output_hw: (H_out, W_out) of the result.

        Returns:
            [N, H_out, W_out, features].
        """
        k = self.kernel_size
        kernel = self.param(
            "kernel", xavier_normal, (k, k, self.features, x.shape[-1]), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        output_hw = tuple(int(v) for v in output_hw)
        y = kernel_set(self.kernels).conv_transpose(
            x.astype(self.dtype), kernel.astype(self.dtype), int(self.stride), output_hw
        )
        return y + bias.astype(self.dtype)


class Conv(nn.Module):
    """`nn.Conv` for NHWC images with explicit integer padding, on the chosen kernel set.

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
        kernels: kernel set ('auto' | 'xla' | 'cpu_tuned').
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "VALID"
    kernel_dilation: tuple[int, int] = (1, 1)
    use_bias: bool = True
    kernel_init: Any = xavier_normal
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[N, H, W, C_in] -> [N, H_out, W_out, features]."""
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        padding = ((0, 0), (0, 0)) if self.padding == "VALID" else self.padding
        padding = tuple(tuple(int(v) for v in pair) for pair in padding)
        y = kernel_set(self.kernels).conv2d(
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
