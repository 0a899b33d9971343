"""The thesis' "ASPP" block: parallel dilated branches on the stride-4 features (l2).

Each branch is conv3x3(dilation d, padding d) BN ReLU, conv3x3(pad 1) BN ReLU,
conv3x3(stride 2, pad 0) BN ReLU, which brings l2 (28x28 at 128 input) to l3's size (13x13).
There is no 1x1 branch and no image pooling (unlike DeepLab's ASPP). Convolutions have bias,
Xavier-normal weights and zero biases; BatchNorm eps 1e-5.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dermseg_jax.models.layers import BatchNorm, Conv, xavier_normal


def check_rates(rates: Sequence[int], feature_hw: tuple[int, int]) -> None:
    """Rejects dilation rates that do not fit the feature map.

    With padding d, a rate d >= the map's side puts every off-centre tap into the padding at
    every position, so the branch silently degenerates into a 1x1 convolution.

    Args:
        rates: dilation rates, one per branch.
        feature_hw: (h, w) of the features the branches see (l2).

    Raises:
        ValueError: if a rate is not a positive int or is >= min(h, w).
    """
    if not rates:
        raise ValueError("aspp_rates is empty: the ASPP block needs at least one branch.")
    side = min(feature_hw)
    for rate in rates:
        if int(rate) != rate or rate < 1:
            raise ValueError(f"aspp_rates must be positive integers, got {tuple(rates)}.")
        if rate >= side:
            raise ValueError(
                f"ASPP dilation rate {rate} does not fit the {feature_hw[0]}x{feature_hw[1]} "
                f"feature map it is applied to (rates must be < {side}); use smaller "
                "aspp_rates or a larger input."
            )


class ASPPBranch(nn.Module):
    """One dilated branch: [N, h, w, C] -> [N, (h - 3) // 2 + 1, (w - 3) // 2 + 1, features]."""

    features: int
    rate: int
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        d = self.rate
        kw = dict(dtype=self.dtype, kernels=self.kernels)
        layers = (
            dict(kernel_dilation=(d, d), padding=((d, d), (d, d))),
            dict(padding=((1, 1), (1, 1))),
            dict(strides=(2, 2), padding="VALID"),
        )
        for i, kwargs in enumerate(layers, start=1):
            x = Conv(
                self.features,
                (3, 3),
                kernel_init=xavier_normal,
                name=f"conv{i}",
                **kwargs,
                **kw,
            )(x)
            x = BatchNorm(momentum=self.bn_momentum, epsilon=1e-5, relu=True, name=f"bn{i}", **kw)(
                x, use_running_average=not train
            )
        return x


class ASPP(nn.Module):
    """Parallel dilated branches `branch1..branchN`, concatenated in rate order.

    Attributes:
        rates: one dilation rate per branch (thesis (2, 3, 4)).
        features: channels per branch (thesis 256).
        bn_momentum: Flax BatchNorm momentum.
        dtype: compute dtype.
        kernels: kernel set (`layers.KERNEL_CHOICES`).
    """

    rates: Sequence[int] = (2, 3, 4)
    features: int = 256
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Applies the branches.

        Args:
            x: [N, h, w, C] features (l2).
            train: use batch statistics and update running statistics.

        Returns:
            [N, (h - 3) // 2 + 1, (w - 3) // 2 + 1, len(rates) * features].
        """
        check_rates(self.rates, x.shape[1:3])
        outs = [
            ASPPBranch(
                self.features,
                int(rate),
                bn_momentum=self.bn_momentum,
                dtype=self.dtype,
                kernels=self.kernels,
                name=f"branch{i}",
            )(x, train=train)
            for i, rate in enumerate(self.rates, start=1)
        ]
        return jnp.concatenate(outs, axis=-1)
