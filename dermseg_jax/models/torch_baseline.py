"""The thesis network as a PyTorch `nn.Module` (NCHW), for parity tests and benchmarks.

A faithful rebuild of the thesis' `unet_inception` (model.py of the thesis repository): the
encoder is the first 10 children of torchvision's `inception_v3` (l1, l2, l3 with the same
Sequential indices, so the thesis' `l*.`, `a*.` and decoder keys load unchanged), ASPP branches
`a1..aN`, decoder `l5, l6, l7`. Differences, all optional: `width` scales ASPP/decoder channels
like the Flax model, `head='sigmoid'` gives 5 outputs, and the full torchvision network is not
kept under `inception.*` (the thesis' checkpoints hold it as 580 aliasing/unused keys: drop them
with `convert_torch.strip_inception_aliases` before `load_state_dict`).

Importing torchvision after TensorFlow segfaults the process, so this module refuses to be
imported once TensorFlow is loaded.
"""

import sys

if "tensorflow" in sys.modules:
    raise ImportError(
        "dermseg_jax.models.torch_baseline imports torchvision, which crashes (segfault) when "
        "TensorFlow is already imported in the same process; import torch_baseline (or "
        "torchvision) before tensorflow."
    )

from collections.abc import Sequence  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from dermseg_jax.models.unet import HEAD_CHANNELS, scaled  # noqa: E402


def _conv_bn_relu(cin, cout, momentum, **kwargs):
    return [nn.Conv2d(cin, cout, 3, **kwargs), nn.BatchNorm2d(cout, momentum=momentum), nn.ReLU()]


class InceptionUNetTorch(nn.Module):
    """The thesis network; input [N, 3, H, W] with H, W multiples of 8 and >= 32 (e.g. 128).

    Args:
        width: multiplier of ASPP and decoder channels (1.0 = thesis).
        head: 'softmax' (6 outputs) or 'sigmoid' (5).
        aspp_rates: one dilation rate per branch `a1..aN` (thesis (2, 3, 4)).
        dropout_rate: Dropout2d in l6 (thesis 0.5).
        bn_momentum: PyTorch BatchNorm momentum of every BatchNorm (thesis 0.008).
    """

    def __init__(
        self,
        width: float = 1.0,
        head: str = "softmax",
        aspp_rates: Sequence[int] = (2, 3, 4),
        dropout_rate: float = 0.5,
        bn_momentum: float = 0.008,
    ) -> None:
        super().__init__()
        if head not in HEAD_CHANNELS:
            raise ValueError(f"head must be one of {sorted(HEAD_CHANNELS)}, got {head!r}.")
        inception = torchvision.models.inception_v3(
            weights=None, aux_logits=False, init_weights=False
        )
        children = list(inception.children())
        self.l1 = nn.Sequential(*children[0:3])
        self.l2 = nn.Sequential(*children[3:6])
        self.l3 = nn.Sequential(*children[6:10])
        m = bn_momentum
        ca = scaled(256, width)
        self.aspp_rates = tuple(int(r) for r in aspp_rates)
        for i, d in enumerate(self.aspp_rates, start=1):
            layers = (
                _conv_bn_relu(192, ca, m, dilation=d, padding=d)
                + _conv_bn_relu(ca, ca, m, padding=1)
                + _conv_bn_relu(ca, ca, m, stride=2)
            )
            setattr(self, f"a{i}", nn.Sequential(*layers))
        c800, c512, c704, c256 = (scaled(c, width) for c in (800, 512, 704, 256))
        cin = len(self.aspp_rates) * ca + 288
        self.l5 = nn.Sequential(
            nn.ConvTranspose2d(cin, c800, 3, stride=2, output_padding=1),
            nn.BatchNorm2d(c800, momentum=m),
            nn.ReLU(),
            *_conv_bn_relu(c800, c512, m, padding=1),
        )
        self.l6 = nn.Sequential(
            nn.ConvTranspose2d(c512 + 192, c704, 7, stride=2),
            nn.BatchNorm2d(c704, momentum=m),
            nn.ReLU(),
            nn.Dropout2d(dropout_rate),
            *_conv_bn_relu(c704, c256, m, padding=1),
        )
        self.l7 = nn.Sequential(
            nn.ConvTranspose2d(c256 + 64, c256, 7, stride=2, output_padding=1),
            nn.BatchNorm2d(c256, momentum=m),
            nn.ReLU(),
            *_conv_bn_relu(c256, c256, m, padding=1),
            nn.Conv2d(c256, HEAD_CHANNELS[head], 1),
            nn.BatchNorm2d(HEAD_CHANNELS[head], momentum=m),
        )
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = m
        for name in [f"a{i}" for i in range(1, len(self.aspp_rates) + 1)] + ["l5", "l6", "l7"]:
            for module in getattr(self, name).modules():
                if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                    nn.init.xavier_normal_(module.weight)
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images [N, 3, H, W] to logits [N, C, H, W]."""
        l1 = self.l1(x)
        l2 = self.l2(l1)
        l3 = self.l3(l2)
        branches = [getattr(self, f"a{i}")(l2) for i in range(1, len(self.aspp_rates) + 1)]
        x = torch.cat(branches + [l3], dim=1)
        x = torch.cat((self.l5(x), l2), dim=1)
        x = torch.cat((self.l6(x), l1), dim=1)
        return self.l7(x)


def count_torch_params(model: nn.Module) -> int:
    """Parameters (not buffers) of a module: the thesis' "used by the forward pass" count."""
    return sum(p.numel() for p in model.parameters())
