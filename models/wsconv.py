"""Weight-standardised convolutions (Qiao et al. 2019) and the WS + GroupNorm variant of AtollNet.

Why: De et al. 2022 ("Unlocking high-accuracy differentially private image classification through scale") found
weight standardisation + GroupNorm one of the changes that let DP-SGD train deeper networks well: each output
filter is used as ``(w - mean(w)) / std(w)`` over its fan-in, so the scale of the raw weights — which DP-SGD's
noise inflates step after step — does not change what the layer computes.

DP-SGD route (privacy.dpsgd): the trainable parameter is the RAW weight ``w``, and the per-sample gradient that must
be clipped is the gradient with respect to ``w`` — the conv's gradient with respect to the standardised weight,
pulled back through the standardisation (which depends on ``w``). Atoll's fast clipping (privacy.fast_clipping)
computes plain Conv gradients only and does not recognise these layers (``unsupported_layers`` lists them), so
``grad_sample_mode="auto"`` routes a network containing them to Opacus' ``hooks`` mode, where Opacus has no grad
sampler for this class and computes its per-sample gradients with functorch (``vmap`` of the layer's own forward:
the standardisation included, hence exact). tests/test_features_models.py checks the norms against one backward
pass per example. Forcing ``bk`` on such a network is refused by fast clipping, never run inexactly.
"""

from __future__ import annotations

import torch
from torch import nn

from .atollnet import AtollNet

#: added to the variance: a filter whose raw weights are all equal (variance 0) must not divide by zero
WS_EPS = 1e-5


def standardize_weight(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """``(w - mean) / sqrt(var + eps)`` per output filter, over its fan-in (all dims but the first)."""
    w = weight.flatten(1)  # written to stay TorchScript-compatible (the exported bundle scripts the network)
    mean = w.mean(dim=1, keepdim=True)
    var = w.var(dim=1, keepdim=True, unbiased=False)
    return ((w - mean) / torch.sqrt(var + eps)).view_as(weight)


class _WSMixin:
    """Forward of a torch ConvNd with the standardised weight; parameters and state-dict keys unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self._conv_forward(x, standardize_weight(self.weight), self.bias)  # type: ignore[attr-defined]


class WSConv1d(_WSMixin, nn.Conv1d):
    """Weight-standardised Conv1d."""


class WSConv2d(_WSMixin, nn.Conv2d):
    """Weight-standardised Conv2d."""


class WSConv3d(_WSMixin, nn.Conv3d):
    """Weight-standardised Conv3d."""


_WS_CLASSES: dict[type, type] = {nn.Conv1d: WSConv1d, nn.Conv2d: WSConv2d, nn.Conv3d: WSConv3d}
WS_LAYERS: tuple[type[nn.Module], ...] = tuple(_WS_CLASSES.values())


def weight_standardize(model: nn.Module) -> nn.Module:
    """Re-class every plain Conv1d/2d/3d of ``model`` to its weight-standardised subclass, in place.

    Only ``forward`` changes (as models.compat does for MONAI's residual blocks): parameters and state-dict keys stay,
    so the weights load into the plain network and the other way round (with a different function, of course)."""
    for m in model.modules():
        cls = _WS_CLASSES.get(type(m))
        if cls is not None:
            if m.padding_mode != "zeros":
                raise ValueError(f"weight standardisation: {type(m).__name__} with padding_mode={m.padding_mode!r} "
                                 "is not supported")
            m.__class__ = cls
    return model


def atollnet_ws(spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 2, **kw) -> nn.Module:
    """AtollNet with weight-standardised convolutions; GroupNorm as in AtollNet (``norm_affine`` as given)."""
    return weight_standardize(AtollNet(spatial_dims=spatial_dims, in_channels=in_channels,
                                       num_classes=num_classes, **kw))


__all__ = ["WS_EPS", "WS_LAYERS", "WSConv1d", "WSConv2d", "WSConv3d", "atollnet_ws", "standardize_weight",
           "weight_standardize"]
