"""Networks by name, always returned Opacus-compatible (see ``models.compat``).

The registry maps a name to a builder taking ``spatial_dims, in_channels, num_classes, **kw``; extra
keyword arguments go to the MONAI constructor, so configuration stays data (a name plus a dict).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monai.networks import nets
from torch import nn

from contract.task import TaskSpec

from .atollnet import AtollNet
from .compat import make_dp_compatible
from .scalespace import ScaleSpaceSeg
from .scatternet import ScatterNet
from .wsconv import atollnet_ws

DEFAULT_MODEL = "atollnet"

_NO_INPLACE_RELU = ("relu", {"inplace": False})
Builder = Callable[..., nn.Module]


def _atollnet(spatial_dims: int, in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    return AtollNet(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, **kw)


def _atollnet_wide(spatial_dims: int, in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    kw.setdefault("channels", (32, 64, 128, 128))
    kw.setdefault("groups", 16)
    return _atollnet(spatial_dims, in_channels, num_classes, **kw)


def _atollnet_ws(spatial_dims: int, in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    # De et al. 2022: weight-standardised convolutions + GroupNorm. Its per-sample gradients go through Opacus'
    # functorch path, not fast clipping (models.wsconv says why); exactness: tests/test_features_models.py.
    return atollnet_ws(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, **kw)


def _scatternet(spatial_dims: int, in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    # Tramer & Boneh 2021: fixed kymatio scattering (J=2, L=8) + GroupNorm + a small CNN head (models.scatternet).
    if spatial_dims != 2:
        raise ValueError(f"model 'scatternet' works on 2D images only (kymatio Scattering2D); this task has "
                         f"spatial_dims={spatial_dims}: choose atollnet, atollnet-ws or resnet10 for volumes")
    return ScatterNet(in_channels=in_channels, num_classes=num_classes, **kw)


def _densenet121(spatial_dims: int, in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    kw.setdefault("act", _NO_INPLACE_RELU)
    kw.setdefault("norm", ("group", {"num_groups": 32}))
    return nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, **kw)


def _resnet(depth: int) -> Builder:
    def build(spatial_dims: int, in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
        kw.setdefault("act", _NO_INPLACE_RELU)
        # MONAI's ResNet only passes ``norm`` to its stem (its blocks keep BatchNorm): make_dp_compatible
        # swaps every remaining BatchNorm for GroupNorm.
        kw.setdefault("norm", ("group", {"num_groups": 32}))
        fn = getattr(nets, f"resnet{depth}")
        return fn(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=num_classes, **kw)

    return build


def _resnet10(spatial_dims: int, in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    # MONAI's ResNet-10 at a quarter of its width (16-32-64-128 channels, 0.9M parameters in 3D instead of 14M):
    # the small 3D classifier for DP-SGD, where every trainable parameter adds noise. The stem gets GroupNorm(8);
    # MONAI keeps BatchNorm in the blocks, which make_dp_compatible swaps for GroupNorm(min(32, C)), and the
    # residual blocks are re-classed to add out of place (models.compat). Per-sample norms of each of its 3D
    # layer types and of the whole network are checked against brute force in tests/test_dp3d_exact.py.
    kw.setdefault("widen_factor", 0.25)
    kw.setdefault("norm", ("group", {"num_groups": 8}))
    return _resnet(10)(spatial_dims, in_channels, num_classes, **kw)


def _basicunet(spatial_dims: int, in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    # "nontrainable" upsampling (interpolation + conv) instead of transposed convolutions, and GroupNorm: every
    # trainable layer is a Conv/GroupNorm, so per-sample gradients stay exact in Atoll's fast clipping.
    kw.setdefault("upsample", "nontrainable")
    kw.setdefault("norm", ("group", {"num_groups": 8}))
    kw.setdefault("act", ("LeakyReLU", {"negative_slope": 0.1, "inplace": False}))
    kw.setdefault("features", (16, 16, 32, 64, 128, 16))
    return nets.BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, **kw)


def _basicunet_small(spatial_dims: int, in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    # A quarter of basicunet's channels: the 3D demo and tests train it on CPU in minutes.
    kw.setdefault("features", (8, 8, 16, 32, 64, 8))
    kw.setdefault("norm", ("group", {"num_groups": 4}))
    return _basicunet(spatial_dims, in_channels, num_classes, **kw)


def _scalespace(spatial_dims: int, in_channels: int, num_classes: int, **kw: Any) -> nn.Module:
    # A few hundred trainable parameters on fixed features: what DP-SGD can train at sites of ~20 patients
    # (models.scalespace explains why a U-Net cannot).
    return ScaleSpaceSeg(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes, **kw)


_REGISTRY: dict[str, Builder] = {
    "atollnet": _atollnet,
    "atollnet-wide": _atollnet_wide,
    "atollnet-ws": _atollnet_ws,
    "scatternet": _scatternet,
    "densenet121": _densenet121,
    "resnet10": _resnet10,
    "resnet18": _resnet(18),
    "resnet34": _resnet(34),
    "basicunet": _basicunet,
    "basicunet-small": _basicunet_small,
    "scalespace": _scalespace,
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
#: networks TorchScript cannot compile (kymatio's scattering): `atoll run export` writes no models/model.ts for them
NOT_SCRIPTABLE = frozenset({"scatternet"})
#: networks whose builder takes the task's ``image_size`` (to check it and to prepare their fixed features)
_TAKES_IMAGE_SIZE = frozenset({"scatternet"})
#: which task kind each network serves (a classifier cannot segment, and the other way round)
MODEL_KINDS: dict[str, str] = {name: "segmentation" if name.startswith("basicunet") or name == "scalespace"
                               else "classification" for name in MODEL_NAMES}


def build_model(
    name: str = DEFAULT_MODEL,
    *,
    spatial_dims: int = 2,
    in_channels: int = 1,
    num_classes: int = 2,
    **kw: Any,
) -> nn.Module:
    """Build network ``name`` made DP-compatible (GroupNorm, nothing in place).

    Parameters
    ----------
    name: one of ``MODEL_NAMES``.
    spatial_dims: 2 (images) or 3 (volumes).
    in_channels, num_classes: input channels and number of output logits.
    **kw: passed to the underlying constructor (e.g. ``channels`` for AtollNet, ``growth_rate`` for DenseNet).

    Raises
    ------
    ValueError: unknown name, bad dimensions, or a network Opacus cannot handle.
    """
    builder = _REGISTRY.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
    return make_dp_compatible(builder(spatial_dims, in_channels, num_classes, **kw))


def build_task_model(name: str, task: TaskSpec, **kw: Any) -> nn.Module:
    """Network ``name`` for ``task``: its spatial dims, input channels and one output per class or label.

    Raises ``ValueError`` when the network does not serve the task's kind (e.g. a classifier for segmentation).
    """
    kind = MODEL_KINDS.get(name)
    if kind is not None and kind != task.kind:
        served = ", ".join(n for n, k in MODEL_KINDS.items() if k == task.kind)
        raise ValueError(f"model {name!r} is a {kind} network; a {task.kind} task needs one of {served}")
    if name in _TAKES_IMAGE_SIZE:
        kw.setdefault("image_size", tuple(task.size))
    return build_model(name, spatial_dims=task.spatial_dims, in_channels=task.in_channels,
                       num_classes=task.num_outputs, **kw)
