"""AtollNet: the small default network, designed for DP-SGD on a CPU.

Why a custom small net rather than a big MONAI one: under DP-SGD the noise added per step has the
dimension of the model, so a few tens of thousands of parameters learn far better per epsilon than
DenseNet121's seven million, and per-sample gradients (what Opacus clips) stay cheap. The design follows
the DP literature (Papernot et al. 2021, De et al. 2022): GroupNorm instead of BatchNorm (BatchNorm mixes
samples, which breaks per-sample clipping), no in-place operations (they break Opacus' backward hooks),
a few wide strided convolutions and a global average pool, so the same weights serve 28 px and 64 px
inputs and 2D or 3D volumes. It is built from MONAI's ``Convolution`` blocks.

Two choices are about DP-SGD on class-imbalanced data (README "Benchmarks", bench/utility.py):

* The input is centred and scaled inside the network: site preprocessing (``client.ingest.transforms``)
  hands over images in [0, 1], and a bias-free first convolution followed by GroupNorm learns slowly from an
  input whose mean is 0.6. ``input_range=(0, 1)`` maps that range to [-2, 2] with fixed constants (never
  statistics of a site's data, which would be an unaccounted release).
* The classifier has no bias. With per-patient clipping, once most per-sample gradients are clipped each
  sample pushes the logit bias by the same amount in its own class's direction, so the bias drifts toward the
  majority class for as long as training runs (on the demo consortium, 74 % pneumonia: every test image was
  predicted pneumonia at the 0.5 threshold although the AUC was 0.9). Without the bias the drift is much
  weaker; non-DP results are unchanged within seed-to-seed variation.
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
    input_range: the (low, high) range of the input pixels; the network first maps it to [-2, 2]
        (``(x - centre) / (width / 4)``, fixed constants). ``None`` feeds the input unchanged (for inputs
        that are already standardised).
    classifier_bias: give the final linear layer a bias (off by default; see the module docstring).
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
        input_range: tuple[float, float] | None = (0.0, 1.0),
        classifier_bias: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"AtollNet: spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if input_range is not None:
            lo, hi = (float(v) for v in input_range)
            if not hi > lo:
                raise ValueError(f"AtollNet: input_range must be (low, high) with high > low, got {input_range}")
            self.input_shift, self.input_scale = (lo + hi) / 2, (hi - lo) / 4
        else:
            self.input_shift, self.input_scale = 0.0, 1.0
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
        self.classifier = nn.Linear(cin, num_classes, bias=classifier_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # plain floats, not buffers: the state dict (what sites exchange and hash) holds only the weights
        x = (x - self.input_shift) / self.input_scale
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
