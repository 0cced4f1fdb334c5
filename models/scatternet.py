"""ScatterNet: fixed wavelet-scattering features (kymatio) + GroupNorm + a small trainable CNN head, for 2D DP-SGD.

Why (Tramer & Boneh, "Differentially Private Learning Needs Better Features (or Much More Data)", ICLR 2021): under
DP-SGD the noise has the dimension of the trainable parameters and the clipped signal of each patient is at most C,
so a network that must *learn* its low-level filters from a few hundred patients per hospital spends most of its
budget on them. A scattering transform (Mallat; Bruna & Mallat 2013) gives translation-invariant, deformation-stable
edge and texture features with no parameter at all, and a small CNN on top of them learns more per epsilon. Their
recipe, kept here: ``Scattering2D(J=2, L=8)`` (81 channels per input channel at 1/4 resolution), then GroupNorm,
then a CNN.

Privacy: the features depend on the image and fixed wavelets only — nothing is computed from a site's data set, and
the normalisation is GroupNorm (per image), never dataset statistics (which would be an unaccounted release; Tramer
& Boneh spend part of the budget on them instead). The scattering has no trainable parameter, so DP-SGD clips and
noises only the head, and the per-sample gradients stay those of plain Conv/Linear layers (fast clipping, exact:
tests/test_features_models.py). The kymatio filters are kept OUT of the module tree (not buffers): the state dict,
which sites hash and exchange, holds only the trained head.

Speed: kymatio's torch backend is slow on small CPU batches (~0.3 s for 8 images of 28 px under load, most of it
fixed per-call overhead), and DP-SGD calls the network 100 times a round on a handful of images. The scattering is
deterministic, so its output is cached per image (keyed by the image's bytes; process memory only, bounded, never
released): each image is transformed once per process, which costs no privacy (a pure function of the input).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn

#: scattering scale and orientations of Tramer & Boneh's ScatterNet (81 channels per input channel)
DEFAULT_J, DEFAULT_L = 2, 8
#: bound on the process-wide feature cache (bytes of cached feature tensors)
CACHE_MAX_BYTES = 256 * 2**20


class _FeatureCache:
    """Least-recently-used map image bytes -> scattering features, bounded in bytes; thread-safe.

    ``functools.lru_cache`` cannot key on tensors nor bound by bytes, hence this small class."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        with self._lock:
            if key in self._data or size > self.max_bytes:
                return
            self._data[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._data.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._data)


FEATURE_CACHE = _FeatureCache(CACHE_MAX_BYTES)
_SCATTERINGS: dict[tuple[int, int, int, int], nn.Module] = {}
_SCATTERINGS_LOCK = threading.Lock()


def _scattering(j: int, l: int, h: int, w: int) -> nn.Module:
    """kymatio's Scattering2D for one image shape (built once per process: its filter bank takes a moment)."""
    key = (j, l, h, w)
    with _SCATTERINGS_LOCK:
        s = _SCATTERINGS.get(key)
        if s is None:
            from kymatio.torch import Scattering2D  # imported here: only sites training a ScatterNet pay for it

            s = _SCATTERINGS[key] = Scattering2D(J=j, shape=(h, w), L=l)
        return s


def scattering_channels(in_channels: int, j: int = DEFAULT_J, l: int = DEFAULT_L) -> int:
    """Feature channels of a second-order 2D scattering: ``in * (1 + J L + L^2 J (J - 1) / 2)`` (81 for J=2, L=8)."""
    return in_channels * (1 + j * l + l * l * j * (j - 1) // 2)


class ScatterNet(nn.Module):
    """Fixed 2D scattering (kymatio) -> GroupNorm (no affine) -> small CNN -> global average pool -> linear.

    Parameters
    ----------
    in_channels: image channels (each is scattered separately).
    num_classes: output logits.
    image_size: ``(H, W)`` the task feeds (checked here: each side must be at least ``2**(J+2)``); other sizes still
        work, the scattering for them is built on first use.
    j, l: scattering scale (features at 1/2**J resolution) and number of orientations.
    channels: output channels of the head's 3x3 convolutions; every one after the first halves the resolution.
    norm_groups: GroupNorm groups on the scattering features (must divide their channel count).
    groups: GroupNorm groups in the head (must divide each of ``channels``).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, image_size: Sequence[int] = (28, 28),
                 j: int = DEFAULT_J, l: int = DEFAULT_L, channels: Sequence[int] = (32, 32),
                 norm_groups: int = 27, groups: int = 8) -> None:
        super().__init__()
        if j < 1 or l < 1:
            raise ValueError(f"ScatterNet: J and L must be >= 1, got J={j}, L={l}")
        if len(image_size) != 2 or min(image_size) < 2 ** (j + 2):
            raise ValueError(f"ScatterNet: needs a 2D image of at least {2 ** (j + 2)} px a side for J={j}, got "
                             f"image size {tuple(image_size)}; use a larger image-size or a smaller J")
        if not channels:
            raise ValueError("ScatterNet: channels must name at least one head convolution")
        self.j, self.l, self.in_channels = int(j), int(l), int(in_channels)
        self.num_features = scattering_channels(in_channels, j, l)
        if self.num_features % norm_groups:
            raise ValueError(f"ScatterNet: norm_groups={norm_groups} must divide the {self.num_features} "
                             "scattering channels")
        _scattering(self.j, self.l, *image_size)  # fail at build time, not in the first round, if kymatio is missing
        self.norm = nn.GroupNorm(norm_groups, self.num_features, affine=False)
        blocks: list[nn.Module] = []
        cin = self.num_features
        for i, cout in enumerate(channels):
            if cout % groups:
                raise ValueError(f"ScatterNet: channels {cout} not divisible by groups={groups}")
            blocks.append(Convolution(2, cin, cout, strides=1 if i == 0 else 2, kernel_size=3, bias=False,
                                      act=("relu", {"inplace": False}),
                                      norm=("group", {"num_groups": groups, "affine": False})))
            cin = cout
        self.head = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes, bias=False)  # no bias: see models.atollnet's docstring

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed scattering features ``[B, num_features, H/2**J, W/2**J]`` (no gradient; cached per image)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ScatterNet expects images [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if min(h, w) < 2 ** (self.j + 2):
            raise ValueError(f"ScatterNet: image {h}x{w} is too small for J={self.j}")
        cpu = x.detach().to("cpu", torch.float32).contiguous()
        meta = (self.j, self.l, tuple(cpu.shape[1:]))
        keys = [(meta, row.numpy().tobytes()) for row in cpu]
        found = [FEATURE_CACHE.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            with torch.no_grad():
                new = _scattering(self.j, self.l, h, w)(cpu[missing])
            new = new.reshape(len(missing), -1, *new.shape[-2:])
            for i, f in zip(missing, new):
                found[i] = f.clone()  # own storage: a view would keep the whole batch alive in the cache
                FEATURE_CACHE.put(keys[i], found[i])
        if not found:
            return x.new_zeros((0, self.num_features, h // 2 ** self.j, w // 2 ** self.j))
        return torch.stack(found).to(device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.norm(self.features(x)))
        return self.classifier(torch.flatten(self.pool(z), 1))
