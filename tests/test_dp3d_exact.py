"""Exact per-sample gradient norms for every 3D layer type the segmentation network uses, against brute force.

DP-SGD's guarantee rests on each patient's gradient being clipped to C; a per-sample norm computed wrong (too small)
would under-clip and under-count epsilon. Each 3D layer type of ``basicunet`` / ``basicunet-small`` (Conv3d with
padding, GroupNorm on volumes, the non-trainable upsampling path: interpolation then Conv3d) and the whole network
are checked: Atoll's fast clipping (both norm methods, instantiated and ghost) and Opacus' hooks mode must give the
norms of single-example backward passes, one volume at a time. Transposed convolutions are refused by fast
clipping rather than assumed exact. The same holds for the 3D classifier (``resnet10``: 7x7x7 stem, residual blocks
with a strided 1x1x1 shortcut, max/average pooling, Linear head) and the demo's DP segmentation head
(``scalespace``: 1x1x1 convolutions over fixed features), layer by layer and as whole networks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from contract import TaskSpec
from models import build_loss, build_task_model
from privacy.fast_clipping import FastClipModule

TASK = TaskSpec(kind="segmentation", spatial_dims=3, classes=(), labels=("anterior", "posterior"), size=(16, 16, 16))
TASK_3CH = TaskSpec(kind="segmentation", spatial_dims=3, classes=(), labels=("a", "b"), size=(6, 6, 6), in_channels=3)
CLASSIFY = TaskSpec(kind="classification", spatial_dims=3, classes=("no", "yes"), size=(16, 16, 16))


def _brute_norms(model: nn.Module, x: torch.Tensor, loss_fn) -> torch.Tensor:
    norms = []
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(len(x)):
        grads = torch.autograd.grad(loss_fn(model(x[i:i + 1]), i), params)
        norms.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    return torch.stack(norms).float()


class _Up(nn.Module):
    """MONAI's non-trainable upsampling (interpolation) followed by a convolution, as in basicunet's decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)
        self.conv = nn.Conv3d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.up(x))


class _Residual(nn.Module):
    """A residual block as in MONAI's 3D ResNet: conv-norm-act-conv-norm plus a strided 1x1x1 conv shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(3, 4, 3, stride=2, padding=1, bias=False), nn.GroupNorm(2, 4), nn.ReLU(),
                                  nn.Conv3d(4, 4, 3, padding=1, bias=False), nn.GroupNorm(2, 4))
        self.short = nn.Sequential(nn.Conv3d(3, 4, 1, stride=2), nn.GroupNorm(2, 4))

    def forward(self, x):
        return torch.relu(self.body(x) + self.short(x))


class _PoolLinear(nn.Module):
    """The classifier end of a 3D network: max-pool, global average pool, linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1, bias=False)
        self.pool = nn.MaxPool3d(3, stride=2, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool3d(self.pool(self.conv(x)), 1), 1))


LAYERS = {
    "conv3d": lambda: nn.Conv3d(3, 4, 3, padding=1),
    "conv3d_strided": lambda: nn.Conv3d(3, 4, 2, stride=2),
    "conv3d_1x1": lambda: nn.Conv3d(3, 5, 1),
    "groupnorm3d": lambda: nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)),
    "upsample_conv3d": _Up,
    # the 3D classifier (resnet10): its 7x7x7 stem, residual blocks with strided shortcut, pooling and Linear head
    "conv3d_stem_7x7x7": lambda: nn.Conv3d(3, 4, 7, padding=3, bias=False),
    "residual_block3d": _Residual,
    "pool_linear3d": _PoolLinear,
    # the DP segmentation head (scalespace): 1x1x1 convolutions over fixed features
    "scalespace_head": lambda: build_task_model("scalespace", TASK_3CH),
}


@pytest.mark.parametrize("ghost", ["never", "always"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_per_sample_norms_of_each_3d_layer_are_exact(name: str, ghost: str) -> None:
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x = torch.randn(4, 3, 6, 6, 6)
    target = torch.randn_like(layer(x))

    def loss(out, i=None):
        t = target if i is None else target[i:i + 1]
        return ((out - t) ** 2).sum()

    brute = _brute_norms(layer, x, loss)
    fc = FastClipModule(layer, max_grad_norm=1e9, ghost=ghost)
    norms = fc.clip_backward(loss(fc(x)))
    torch.testing.assert_close(norms, brute, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("model_name", ["basicunet-small", "basicunet"])
def test_per_sample_norms_of_the_3d_segmentation_network_are_exact(model_name: str) -> None:
    """Whole network, with the task's own per-patient Dice + CE loss: fast clipping == hooks == brute force."""
    from opacus import GradSampleModule

    torch.manual_seed(1)
    model = build_task_model(model_name, TASK)
    x = torch.randn(3, 1, 16, 16, 16)
    y = torch.randint(0, 3, (3, 16, 16, 16))
    criterion = build_loss(TASK)("sum")
    brute = _brute_norms(model, x, lambda out, i: criterion(out, y[i:i + 1]))
    assert float(brute.min()) > 0
    for ghost in ("never", "always", "auto"):
        fc = FastClipModule(model, max_grad_norm=1e9, ghost=ghost)
        norms = fc.clip_backward(criterion(fc(x), y))
        torch.testing.assert_close(norms, brute, rtol=1e-3, atol=1e-6)
        fc.to_standard_module()
        for p in model.parameters():
            p.grad = None
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    criterion(gsm(x), y).backward()
    hooks = torch.sqrt(sum((p.grad_sample.flatten(1).double() ** 2).sum(1) for p in gsm.parameters()
                           if p.requires_grad)).float()
    torch.testing.assert_close(hooks, brute, rtol=1e-3, atol=1e-6)
    gsm._close()


def test_transposed_convolutions_are_refused_not_assumed_exact() -> None:
    with pytest.raises(NotImplementedError, match="ConvTranspose3d"):
        FastClipModule(nn.Sequential(nn.ConvTranspose3d(2, 2, 2, stride=2)), max_grad_norm=1.0)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("model_name, task, kw", [("resnet10", CLASSIFY, {"widen_factor": 0.125}),
                                                   ("scalespace", TASK, {})])
def test_per_sample_norms_of_the_3d_classifier_and_the_dp_segmenter_are_exact(model_name: str, task, kw) -> None:
    """Whole network (the 3D classifier, and the segmentation network the hippocampus demo trains under DP), with
    the task's loss: fast clipping (every norm method) and Opacus' hooks equal single-example backward passes."""
    from opacus import GradSampleModule

    torch.manual_seed(2)
    model = build_task_model(model_name, task, **kw)  # resnet10 at half its width: the same layers, cheaper
    # 16^3 keeps ResNet's last GroupNorms over more than a handful of values (at 8^3 they normalise 2 numbers and
    # the norms become ill-conditioned, ~1e3); "auto" picks ghost or instantiated norms per layer by cost.
    size = (16, 16, 16) if task.is_classification else (8, 8, 8)
    x = torch.randn(3, 1, *size)
    y = torch.randint(0, 2, (3,)) if task.is_classification else torch.randint(0, 3, (3, *size))
    criterion = build_loss(task)("sum")
    brute = _brute_norms(model, x, lambda out, i: criterion(out, y[i:i + 1]))
    assert float(brute.min()) > 0
    for ghost in ("never", "auto"):
        fc = FastClipModule(model, max_grad_norm=1e9, ghost=ghost)
        norms = fc.clip_backward(criterion(fc(x), y))
        torch.testing.assert_close(norms, brute, rtol=1e-3, atol=1e-6)
        fc.to_standard_module()
        for p in model.parameters():
            p.grad = None
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    criterion(gsm(x), y).backward()
    hooks = torch.sqrt(sum((p.grad_sample.flatten(1).double() ** 2).sum(1) for p in gsm.parameters()
                           if p.requires_grad)).float()
    torch.testing.assert_close(hooks, brute, rtol=1e-3, atol=1e-6)
    gsm._close()
