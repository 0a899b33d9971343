"""The encoder: torchvision's Inception v3 stem and Mixed_5b..5d, in Flax (NHWC).

Layer names, VALID paddings, bias-free convolutions and BatchNorm eps 1e-3 follow torchvision's
`Inception3` exactly, so its ImageNet weights and the thesis' weights load unchanged
(`convert_torch.py`). InceptionA's 3x3 average pool counts the padding (`count_include_pad`).
torchvision's `transform_input` is not applied: the thesis uses the network's children only.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dermseg_jax.models.layers import BatchNorm, Conv

# Stem layers in the thesis' groups: l1 (stride 2 features), l2 (after maxpool1), l3 (Mixed_5*).
L1_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3")
L2_LAYERS = ("Conv2d_3b_1x1", "Conv2d_4a_3x3")
L3_LAYERS = ("Mixed_5b", "Mixed_5c", "Mixed_5d")

# torchvision initialises Inception convs from N(0, 0.1) truncated at +-2 (i.e. +-20 sigma).
_conv_init = nn.initializers.normal(0.1)


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) + BatchNorm(eps 1e-3) + ReLU."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        pad = ((self.padding, self.padding),) * 2
        kw = dict(dtype=self.dtype, kernels=self.kernels)
        x = Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.stride, self.stride),
            padding=pad,
            use_bias=False,
            kernel_init=_conv_init,
            name="conv",
            **kw,
        )(x)
        return BatchNorm(momentum=self.bn_momentum, epsilon=1e-3, relu=True, name="bn", **kw)(
            x, use_running_average=not train
        )


class InceptionA(nn.Module):
    """torchvision's InceptionA block: 1x1, 5x5, double 3x3 and average-pool branches."""

    pool_features: int
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        def conv(features, kernel_size, padding, name):
            return BasicConv2d(
                features,
                kernel_size,
                padding=padding,
                bn_momentum=self.bn_momentum,
                dtype=self.dtype,
                kernels=self.kernels,
                name=name,
            )

        b1 = conv(64, 1, 0, "branch1x1")(x, train=train)
        b5 = conv(48, 1, 0, "branch5x5_1")(x, train=train)
        b5 = conv(64, 5, 2, "branch5x5_2")(b5, train=train)
        b3 = conv(64, 1, 0, "branch3x3dbl_1")(x, train=train)
        b3 = conv(96, 3, 1, "branch3x3dbl_2")(b3, train=train)
        b3 = conv(96, 3, 1, "branch3x3dbl_3")(b3, train=train)
        bp = nn.avg_pool(
            x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True
        )
        bp = conv(self.pool_features, 1, 0, "branch_pool")(bp, train=train)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionV3Encoder(nn.Module):
    """Inception v3 up to Mixed_5d; returns the features the U-Net taps, ordered by stride.

    Attributes:
        bn_momentum: Flax BatchNorm momentum (1 - PyTorch momentum).
        dtype: compute dtype.
        kernels: kernel set (`layers.KERNEL_CHOICES`).
    """

    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Runs the encoder.

        Args:
            x: [N, H, W, 3] images.
            train: use batch statistics and update running statistics.

        Returns:
            (l1 [N, h1, w1, 64], l2 [N, h2, w2, 192], l3 [N, h3, w3, 288]); at H = W = 128 the
            sizes are 61, 28 and 13.
        """
        kw = dict(bn_momentum=self.bn_momentum, dtype=self.dtype, kernels=self.kernels)
        x = x.astype(self.dtype)
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3", **kw)(x, train=train)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3", **kw)(x, train=train)
        l1 = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3", **kw)(x, train=train)
        x = nn.max_pool(l1, (3, 3), strides=(2, 2), padding="VALID")
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1", **kw)(x, train=train)
        l2 = BasicConv2d(192, 3, name="Conv2d_4a_3x3", **kw)(x, train=train)
        x = nn.max_pool(l2, (3, 3), strides=(2, 2), padding="VALID")
        x = InceptionA(32, name="Mixed_5b", **kw)(x, train=train)
        x = InceptionA(64, name="Mixed_5c", **kw)(x, train=train)
        l3 = InceptionA(64, name="Mixed_5d", **kw)(x, train=train)
        return l1, l2, l3
