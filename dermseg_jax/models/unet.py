"""The decoder, the head and the whole network: `InceptionUNet`.

encoder (Inception v3 to Mixed_5d) -> l1, l2, l3; ASPP(l2) ++ l3 -> decoder stages
l5 (deconv k3, concat l2), l6 (deconv k7, channel dropout, concat l1), l7 (deconv k7, conv,
conv1x1 head, BatchNorm on the logits). Each transposed convolution's output is sized to its
skip connection (and the last one to the input), which reproduces the thesis' output_padding
(1, 0, 1) at 128 and 256 and extends the network to any input size the encoder accepts.
`width` scales the ASPP and decoder channels; width 1.0 is the thesis network exactly.

`presence_head=True` (sigmoid head only; not in the thesis) adds `PresenceHead`: one logit per
structure for "present in this image", from the pooled bottleneck, and the network returns
`(logits, presence_logits)`; at inference a structure's mask is emptied when its presence
probability is below a threshold fitted on validation (`dermseg_jax.presence`).
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dermseg_jax.models.aspp import ASPP, check_rates
from dermseg_jax.models.inception_v3 import InceptionV3Encoder
from dermseg_jax.models.layers import (
    DTYPES,
    BatchNorm,
    Conv,
    ConvTranspose,
    resolve_dtype,
    resolve_kernels,
    xavier_normal,
)

HEAD_CHANNELS = {"softmax": 6, "sigmoid": 5}
# Smallest input side for which every default-rate layer is well defined; the contract
# (docs/design.md) promises H, W >= 75, torchvision's own minimum for Inception v3.
MIN_INPUT_SIZE = 75


def scaled(channels: int, width: float) -> int:
    """Channel count of a thesis layer with `channels` at the given width (>= 1)."""
    return max(1, int(round(channels * width)))


def encoder_sizes(side: int) -> tuple[int, int, int]:
    """Spatial sides of l1, l2, l3 for an input side (VALID stem arithmetic)."""
    l1 = (side - 3) // 2 + 1 - 2
    l2 = (l1 - 3) // 2 + 1 - 2
    l3 = (l2 - 3) // 2 + 1
    return l1, l2, l3


class UpStage(nn.Module):
    """Transposed conv (to `output_hw`) BN ReLU [Dropout2d] conv3x3 BN ReLU."""

    up_features: int
    features: int
    kernel_size: int
    dropout_rate: float = 0.0
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, output_hw: tuple[int, int], *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, kernels=self.kernels)
        bn = functools.partial(BatchNorm, momentum=self.bn_momentum, relu=True, **kw)
        x = ConvTranspose(self.up_features, self.kernel_size, name="deconv", **kw)(x, output_hw)
        x = bn(name="deconv_bn")(x, use_running_average=not train)
        if self.dropout_rate > 0:
            # Dropout2d: one draw per (image, channel), shared over H and W.
            x = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(x, deterministic=not train)
        x = Conv(
            self.features,
            (3, 3),
            padding=((1, 1), (1, 1)),
            kernel_init=xavier_normal,
            name="conv",
            **kw,
        )(x)
        return bn(name="conv_bn")(x, use_running_average=not train)


class Decoder(nn.Module):
    """Decoder stages l5, l6, l7 and the head (conv1x1 + BatchNorm on the logits)."""

    num_classes: int = 6
    width: float = 1.0
    dropout_rate: float = 0.5
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        l1: jax.Array,
        l2: jax.Array,
        output_hw: tuple[int, int],
        *,
        train: bool,
    ) -> jax.Array:
        """Decodes the bottleneck.

        Args:
            x: [N, h3, w3, C] ASPP outputs concatenated with l3.
            l1: [N, h1, w1, 64] skip features.
            l2: [N, h2, w2, 192] skip features.
            output_hw: (H, W) of the logits.
            train: batch statistics, running-stat updates and dropout.

        Returns:
            [N, H, W, num_classes] logits in the compute dtype.
        """
        w = self.width
        kw = dict(bn_momentum=self.bn_momentum, dtype=self.dtype, kernels=self.kernels)
        x = UpStage(scaled(800, w), scaled(512, w), 3, name="l5", **kw)(
            x, l2.shape[1:3], train=train
        )
        x = jnp.concatenate([x, l2.astype(x.dtype)], axis=-1)
        x = UpStage(
            scaled(704, w), scaled(256, w), 7, dropout_rate=self.dropout_rate, name="l6", **kw
        )(x, l1.shape[1:3], train=train)
        x = jnp.concatenate([x, l1.astype(x.dtype)], axis=-1)
        x = UpStage(scaled(256, w), scaled(256, w), 7, name="l7", **kw)(x, output_hw, train=train)
        head_kw = dict(dtype=self.dtype, kernels=self.kernels)
        x = Conv(self.num_classes, (1, 1), kernel_init=xavier_normal, name="head", **head_kw)(x)
        return BatchNorm(momentum=self.bn_momentum, name="head_bn", **head_kw)(
            x, use_running_average=not train
        )


class PresenceHead(nn.Module):
    """Image-level presence logits [N, K] from the bottleneck [N, h, w, C].

    Mean and max pooling over space (a structure covering 0.2 % of an image barely moves the
    mean, its strongest response moves the max), concatenated, then one dense layer; float32.
    """

    num_structures: int = 5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        pooled = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        return nn.Dense(self.num_structures, name="dense")(pooled)


class InceptionUNet(nn.Module):
    """The thesis' Inception-v3 U-Net with the dilated block, NHWC.

    Attributes:
        head: 'softmax' (6 channels: others + 5 structures) or 'sigmoid' (5 structures).
        width: multiplier of the ASPP and decoder channels (1.0 = thesis).
        aspp_rates: one dilation rate per ASPP branch (thesis (2, 3, 4)).
        dropout_rate: channel dropout in l6 (thesis 0.5).
        bn_momentum: Flax BatchNorm momentum = 1 - PyTorch momentum (thesis 0.992).
        dtype: compute dtype name, 'float32', 'bfloat16' or 'auto' (bfloat16 on GPU/TPU,
            float32 on the CPU: `layers.resolve_dtype`); parameters stay float32.
        kernels: 'xla', 'cpu_tuned' or 'auto' (`layers.resolve_kernels`); same function up to
            float rounding, same parameters.
        presence_head: add `PresenceHead` (sigmoid head only); the call then returns
            `(logits, presence_logits [N, 5])`.
    """

    head: str = "softmax"
    width: float = 1.0
    aspp_rates: Sequence[int] = (2, 3, 4)
    dropout_rate: float = 0.5
    bn_momentum: float = 0.992
    dtype: str = "float32"
    kernels: str = "auto"
    presence_head: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Segments a batch.

        Args:
            x: [N, H, W, 3] images in the network's input scale, H, W >= 75.
            train: batch statistics, running-stat updates (mutable 'batch_stats') and dropout
                (needs a 'dropout' rng when dropout_rate > 0).

        Returns:
            [N, H, W, C] float32 logits, C = 6 ('softmax') or 5 ('sigmoid'); with
            `presence_head`, `(logits, presence_logits [N, 5] float32)`.
        """
        if self.head not in HEAD_CHANNELS:
            raise ValueError(f"head must be one of {sorted(HEAD_CHANNELS)}, got {self.head!r}.")
        if self.presence_head and self.head != "sigmoid":
            raise ValueError("presence_head needs the sigmoid head (one presence per structure).")
        if self.width <= 0:
            raise ValueError(f"width must be > 0, got {self.width}.")
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3], got shape {x.shape}.")
        hw = tuple(x.shape[1:3])
        if min(hw) < MIN_INPUT_SIZE:
            raise ValueError(f"input H, W must be >= {MIN_INPUT_SIZE}, got {hw[0]}x{hw[1]}.")
        l2_hw = (encoder_sizes(hw[0])[1], encoder_sizes(hw[1])[1])
        check_rates(self.aspp_rates, l2_hw)
        dtype = DTYPES[resolve_dtype(self.dtype)]
        kernels = resolve_kernels(self.kernels)
        l1, l2, l3 = InceptionV3Encoder(self.bn_momentum, dtype, kernels, name="encoder")(
            x, train=train
        )
        a = ASPP(
            tuple(self.aspp_rates),
            scaled(256, self.width),
            bn_momentum=self.bn_momentum,
            dtype=dtype,
            kernels=kernels,
            name="aspp",
        )(l2, train=train)
        x = jnp.concatenate([a, l3], axis=-1)
        logits = Decoder(
            HEAD_CHANNELS[self.head],
            self.width,
            self.dropout_rate,
            self.bn_momentum,
            dtype,
            kernels=kernels,
            name="decoder",
        )(x, l1, l2, hw, train=train)
        # Losses and softmax want float32 even when the network computes in bfloat16.
        logits = logits.astype(jnp.float32)
        if self.presence_head:
            return logits, PresenceHead(HEAD_CHANNELS["sigmoid"], name="presence")(x)
        return logits
