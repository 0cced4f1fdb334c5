"""Augmentation multiplicity (De et al. 2022, "Unlocking high-accuracy differentially private image
classification through scale", section 3.1): each sampled image becomes K randomly augmented views.

``privacy.dpsgd`` averages the K views' per-sample gradients BEFORE clipping, so a sampled patient still
contributes ONE clipped term of norm <= C to a step's sum: the mechanism (and its privacy charge) is the one
without augmentation, only the gradient it clips is a better (lower-variance) estimate.

The views are computed here with batched torch ops driven by the caller's generator (the DP generator: OS
entropy unless ``reproducible_dp``), so the server cannot replay them from a seed it knows. MONAI's random
transforms (``RandFlip``, ``RandSpatialCrop``) draw from a numpy ``RandomState`` one sample at a time; a
batched op on the training device keeps a K-fold larger batch cheap and keeps every random draw on the one
DP generator.

* 2D images ``[M, C, H, W]``: random horizontal flip (p = 1/2) and a random shift by up to ``H // 8`` / ``W // 8``
  pixels with zero padding (pad then random crop back to the size, as for CIFAR-10 in De et al.).
* 3D volumes ``[M, C, D, H, W]``: an independent random flip along each spatial axis (p = 1/2).
"""

from __future__ import annotations

import torch

from contract.recipe import MAX_AUGMENT_MULTIPLICITY, check_multiplicity

__all__ = ["MAX_AUGMENT_MULTIPLICITY", "augment_views", "average_views", "check_multiplicity"]


def _flip(x: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Flip each sample of ``x`` along ``dim`` with probability 1/2."""
    coin = torch.rand(x.shape[0], generator=generator) < 0.5
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return torch.where(coin.to(x.device).view(shape), x.flip(dim), x)


def _shift_2d(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by a random (dy, dx) in [-H//8, H//8] x [-W//8, W//8], zero-filling what enters."""
    m, _, h, w = x.shape
    ph, pw = h // 8, w // 8
    if ph == 0 and pw == 0:
        return x
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    dy = torch.randint(0, 2 * ph + 1, (m,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pw + 1, (m,), generator=generator).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [M, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [M, W]
    out = padded[torch.arange(m, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # advanced indexing put the channel last: [M, H, W, C]


def augment_views(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, C, *spatial]`` -> ``[B*K, C, *spatial]``: rows ``b*K .. b*K+K-1`` are K random views of image b.

    ``k = 1`` returns ``x`` itself (no augmentation, the recipe without this option).
    """
    check_multiplicity(k)
    if k == 1 or x.shape[0] == 0:
        return x
    views = x.repeat_interleave(k, dim=0)
    spatial = x.ndim - 2
    if spatial == 2:
        return _shift_2d(_flip(views, 3, generator), generator)
    if spatial == 3:
        for dim in (2, 3, 4):
            views = _flip(views, dim, generator)
        return views
    raise ValueError(f"augmentation multiplicity needs 2D images or 3D volumes, got a tensor of shape {tuple(x.shape)}")


def average_views(grad_sample: torch.Tensor, k: int) -> torch.Tensor:
    """Per-view per-sample gradients ``[B*K, ...]`` -> the per-image mean over its K views ``[B, ...]``."""
    if k == 1:
        return grad_sample
    return grad_sample.view(grad_sample.shape[0] // k, k, *grad_sample.shape[1:]).mean(1)
