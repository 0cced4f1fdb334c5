"""ScaleSpaceSeg: a small trainable per-voxel head on fixed scale-space and position features, for DP segmentation.

Why not a U-Net under DP-SGD at a site of ~20 patients: the noise DP-SGD adds to every step has the dimension of
the trainable parameters (norm ~ sigma * C * sqrt(d) / expected batch), while the clipped signal is at most C. With
a few dozen patients per hospital (the hippocampus demo's sites train on 14 to 25), a 340k-parameter BasicUNet
gets a noise ~100 times its signal per step, every weight is a random walk, and the model ends up predicting
background everywhere (README "hippocampus demo"). The remedy from the DP literature (Tramer & Boneh, "Differentially
Private Learning Needs Better Features (or Much More Data)", ICLR 2021: fixed ScatterNet features + a small model
beat end-to-end CNNs under DP) is to move the work into *fixed, data-independent* features and train only a few
hundred parameters.

Fixed features (no parameters, identical at every site, nothing computed from any site's data):

* the (z-scored) intensity smoothed with Gaussians of ``sigmas`` voxels (MONAI's ``separable_filtering`` and
  ``gaussian_1d``): intensity at several scales, i.e. local context up to ~2 sigma;
* the scale-normalised gradient magnitude at each scale (edges: where tissue classes meet);
* the normalised voxel coordinates and their squares: on a task grid that the sites all preprocess alike
  (orientation, spacing and a centred crop), where a structure sits is itself a strong cue; squares let the head
  express a centred ellipsoid.

The trainable part is a per-voxel MLP of 1 x 1 x 1 convolutions (MONAI ``Convolution`` blocks), whose per-sample
gradient norms fast clipping computes exactly (tests/test_dp3d_exact.py). The Gaussian kernels are non-persistent
buffers: they move with the model but are not in the state dict, which holds only what sites train and exchange.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from torch import nn


def _gradient_magnitude(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """|grad x| by central differences (edge-replicated), per channel."""
    sq = torch.zeros_like(x)
    for axis in range(2, 2 + spatial_dims):
        n = x.shape[axis]
        if n < 3:
            continue
        fwd = x.narrow(axis, 2, n - 2) - x.narrow(axis, 0, n - 2)
        d = torch.cat([fwd.narrow(axis, 0, 1), fwd, fwd.narrow(axis, n - 3, 1)], dim=axis) / 2
        sq = sq + d * d
    return torch.sqrt(sq + 1e-6)


def _coordinates(shape: Sequence[int], like: torch.Tensor) -> list[torch.Tensor]:
    """Normalised coordinates in [-1, 1] along each spatial axis, broadcast to [B, 1, *shape]."""
    out = []
    b = like.shape[0]
    for axis, n in enumerate(shape):
        c = torch.linspace(-1.0, 1.0, n, device=like.device, dtype=like.dtype)
        view = [1] * len(shape)
        view[axis] = n
        out.append(c.view(1, 1, *view).expand(b, 1, *shape))
    return out


class ScaleSpaceSeg(nn.Module):
    """Fixed multi-scale intensity, edge and position features -> trainable per-voxel MLP -> class logits.

    Parameters
    ----------
    spatial_dims: 2 or 3.
    in_channels: image channels (each gets its own scale-space features).
    num_classes: output logits per voxel (background first for a segmentation task).
    sigmas: Gaussian scales in voxels; the intensity at each scale and its gradient magnitude are features.
    hidden: widths of the hidden 1 x 1 convolutions (LeakyReLU after each).
    positions: add the normalised coordinates and their squares as features.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, num_classes: int = 3,
                 sigmas: Sequence[float] = (1.0, 2.0, 4.0), hidden: Sequence[int] = (16,),
                 positions: bool = True) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"ScaleSpaceSeg: spatial_dims must be 2 or 3, got {spatial_dims}")
        if any(float(s) <= 0 for s in sigmas):
            raise ValueError(f"ScaleSpaceSeg: sigmas must be > 0, got {tuple(sigmas)}")
        self.spatial_dims = spatial_dims
        self.positions = positions
        self._n_scales = len(sigmas)
        self._sigmas = tuple(float(s) for s in sigmas)
        for i, s in enumerate(sigmas):
            self.register_buffer(f"_kernel{i}", gaussian_1d(torch.tensor(float(s)), truncated=3.0, normalize=True),
                                 persistent=False)
        features = in_channels * (1 + 2 * len(sigmas)) + (2 * spatial_dims if positions else 0)
        layers: list[nn.Module] = []
        cin = features
        for width in hidden:
            layers.append(Convolution(spatial_dims, cin, width, kernel_size=1, bias=True,
                                      act=("leakyrelu", {"negative_slope": 0.1, "inplace": False})))
            cin = width
        layers.append(Convolution(spatial_dims, cin, num_classes, kernel_size=1, bias=True, conv_only=True))
        self.head = nn.Sequential(*layers)
        self.num_features = features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed feature map [B, num_features, *spatial] of an image batch (no trainable parameter)."""
        feats = [x]
        for i in range(self._n_scales):
            k = getattr(self, f"_kernel{i}")
            smooth = separable_filtering(x, [k] * self.spatial_dims, mode="replicate")
            # scale-normalised gradient (sigma * |grad|, Lindeberg): comparable magnitudes at every scale
            feats += [smooth, float(self._sigmas[i]) * _gradient_magnitude(smooth, self.spatial_dims)]
        if self.positions:
            coords = _coordinates(x.shape[2:], x)
            feats += coords + [c * c for c in coords]
        return torch.cat(feats, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
