"""Make MONAI networks usable by Opacus (per-sample gradients).

Opacus needs three things MONAI's defaults break:
1. no BatchNorm (it mixes samples in a batch, so a "per-sample" gradient is not per sample):
   replaced by GroupNorm with Opacus' own ``ModuleValidator.fix``;
2. no in-place activations: an in-place ReLU overwrites a hooked module's output, which Opacus'
   full backward hooks refuse ("a view ... is being modified inplace");
3. no in-place residual additions (MONAI ``ResNetBlock``/``ResNetBottleneck`` do ``out += residual``
   on the output of a norm layer), for the same reason.
(2) is fixed by switching ``inplace`` off on every module that has it; (3) by re-classing the blocks to
subclasses whose ``forward`` adds out of place — parameters, buffers and state-dict keys are unchanged,
so weights stay interchangeable with the plain MONAI network.
"""

from __future__ import annotations

import torch
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from opacus.validators import ModuleValidator
from torch import nn


class _OutOfPlaceResNetBlock(ResNetBlock):
    """MONAI ResNetBlock with ``out = out + residual`` instead of ``out += residual``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.act(out + residual)


class _OutOfPlaceResNetBottleneck(ResNetBottleneck):
    """MONAI ResNetBottleneck with an out-of-place residual addition."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.act(out + residual)


_OUT_OF_PLACE: dict[type, type] = {
    ResNetBlock: _OutOfPlaceResNetBlock,
    ResNetBottleneck: _OutOfPlaceResNetBottleneck,
}


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Return ``model`` fixed for Opacus: GroupNorm for BatchNorm, nothing in place.

    Raises ``ValueError`` naming the offending modules when Opacus still reports problems.
    """
    if not ModuleValidator.is_valid(model):
        model = ModuleValidator.fix(model)
    for module in model.modules():
        if hasattr(module, "inplace") and isinstance(module.inplace, bool):
            module.inplace = False
        new_cls = _OUT_OF_PLACE.get(type(module))
        if new_cls is not None:
            module.__class__ = new_cls
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model is not Opacus-compatible after fixing: {errors}")
    return model
