"""AtollNet: the small default network, designed for DP-SGD on a CPU.

Why a custom small net rather than a big MONAI one: under DP-SGD the noise added per step has the
dimension of the model, so a few tens of thousands of parameters learn far better per epsilon than
DenseNet121's seven million, and per-sample gradients (what Opacus clips) stay cheap. The design follows
the DP literature (Papernot et al. 2021, De et al. 2022): GroupNorm instead of BatchNorm (BatchNorm mixes
samples, which breaks per-sample clipping), no in-place operations (they break Opacus' backward hooks),
a few wide strided convolutions and a global average pool, so the same weights serve 28 px and 64 px
inputs and 2D or 3D volumes. It is built from MONAI's ``Convolution`` blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from torch import nn


class AtollNet(nn.Module):
    """Strided conv stack -> global average pool -> linear classifier.

    Parameters
    ----------
    spatial_dims: 2 for images, 3 for volumes.
    in_channels: input channels (1 for grey X-rays).
    num_classes: output logits.
    channels: output channels of each conv block; every block after the first halves the resolution.
    groups: GroupNorm groups per block (must divide each channel count).
    norm_affine: learn GroupNorm scale/shift. Off by default: under DP-SGD every trainable layer costs a
        per-sample-gradient computation in every step (for GroupNorm, a re-normalisation of its input), and on
        PneumoniaMNIST the affine terms bought nothing (same test AUC with and without, DP and non-DP).
    act: MONAI activation spec; never in-place.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = (16, 32, 64, 64),
        groups: int = 8,
        act: str | tuple = ("relu", {"inplace": False}),
        norm_affine: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"AtollNet: spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        blocks: list[nn.Module] = []
        cin = in_channels
        for i, cout in enumerate(channels):
            if cout % groups:
                raise ValueError(f"AtollNet: channels {cout} not divisible by groups={groups}")
            blocks.append(
                Convolution(
                    spatial_dims,
                    cin,
                    cout,
                    strides=1 if i == 0 else 2,
                    kernel_size=3,
                    act=act,
                    norm=("group", {"num_groups": groups, "affine": norm_affine}),
                    bias=False,
                )
            )
            cin = cout
        self.features = nn.Sequential(*blocks)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
