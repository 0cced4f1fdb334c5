"""The cheaper routes of Atoll's fast clipping (privacy/fast_clipping.py) give the exact per-sample norms and
clipped sum: pointwise and few-position convolutions instantiated by one batched matmul, and deep convolutions
whose clipped sum is recomputed from their input and output gradient instead of held as per-sample gradients.

Each route is held to Opacus ``hooks`` (the brute-force per-sample gradients) on a small DenseNet — the
network these routes were written for (1x1 convs, 3x3 convs on 4x4 and 2x2 maps, GroupNorm, concatenation) —
with the clip norm at the median so that some samples are clipped and some are not. An under-estimated norm
would under-clip, and the epsilon the ledger records would be wrong.
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn import functional as F

from models import build_model
from privacy import fast_clipping as fcl

RTOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _small_densenet() -> nn.Module:
    torch.manual_seed(3)
    return build_model("densenet121", init_features=8, growth_rate=4, block_config=(2, 2, 2),
                       norm=("group", {"num_groups": 2}))


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    m = copy.deepcopy(model)
    gsm = GradSampleModule(m, batch_first=True, loss_reduction="sum", strict=True)
    nn.CrossEntropyLoss(reduction="sum")(gsm(x), y).backward()
    params = [p for p in m.parameters() if p.requires_grad]
    norms = torch.stack([p.grad_sample.reshape(len(x), -1).norm(dim=1) for p in params]).norm(dim=0)
    clip = float(norms.median())
    opt = DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
                      expected_batch_size=len(x), loss_reduction="mean")
    opt.pre_step()
    return norms, [p.grad.clone() for p in params], clip


@pytest.mark.parametrize("ghost", ["auto", "never"])
@pytest.mark.parametrize("recompute", ["auto", "always", "never"])
def test_small_densenet_norms_and_clipped_sum_equal_hooks(ghost: str, recompute: str) -> None:
    model = _small_densenet()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 32, 32, generator=g), torch.randint(0, 2, (6,), generator=g)
    ref_norms, ref_grads, clip = _reference(model, x, y)
    m = copy.deepcopy(model)
    fc, dp = fcl.make_private_bk(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=0.0,
                                 max_grad_norm=clip, expected_batch_size=len(x), ghost=ghost, recompute=recompute)
    dp.zero_grad(set_to_none=True)
    norms = fc.clip_backward(nn.CrossEntropyLoss(reduction="sum")(fc(x), y))
    torch.testing.assert_close(norms, ref_norms, rtol=RTOL, atol=0)
    dp.pre_step()
    for got, ref in zip([p.grad for p in m.parameters()], ref_grads, strict=True):
        assert float((got - ref).norm()) <= RTOL * float(ref.norm()) + 1e-12


@pytest.mark.parametrize("conv", [
    nn.Conv1d(3, 5, 1), nn.Conv2d(3, 5, 1, bias=False), nn.Conv3d(3, 5, 1),     # pointwise: one bmm
    nn.Conv2d(3, 5, 3, padding=1), nn.Conv3d(3, 5, 3, padding=1),               # few positions: unfold + bmm
    nn.Conv1d(3, 5, 3, stride=2, padding=1, dilation=2),
    nn.Conv2d(3, 5, 1, stride=2),                                               # strided 1x1: not pointwise
    nn.Conv2d(4, 6, 3, padding=1, groups=2),                                    # grouped: grouped kernel
], ids=lambda c: repr(c))
def test_per_sample_weight_routes_equal_the_grouped_kernel(conv: nn.Module) -> None:
    """Every route of ``conv_per_sample_weight_grads`` returns what the batch-grouped kernel returns, and
    their sum over the batch is the ordinary weight gradient."""
    torch.manual_seed(0)
    dims = conv.weight.dim() - 2
    a = torch.randn(4, conv.in_channels, *([4] * dims), requires_grad=True)
    out = conv(a)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    got = fcl.conv_per_sample_weight_grads(conv, a.detach(), g)
    ref = fcl._conv_weight_grad(conv, a.detach(), g, per_sample=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(0), conv.weight.grad, rtol=1e-5, atol=1e-5)


def test_pointwise_patches_are_a_view_equal_to_unfold() -> None:
    conv = nn.Conv2d(3, 5, 1)
    a = torch.randn(2, 3, 4, 4)
    patches = fcl.conv_patches(conv, a)
    assert patches.data_ptr() == a.data_ptr()  # no im2col copy
    torch.testing.assert_close(patches, F.unfold(a, 1))


def test_recompute_rule_holds_the_smaller_of_inputs_and_per_sample_grads() -> None:
    deep = nn.Conv2d(128, 32, 3, padding=1)  # 36,896 weights per sample vs (128 + 32) x 16 floats of a and g
    shallow = nn.Conv2d(1, 8, 3, padding=1)  # 80 weights per sample vs (1 + 8) x 1024 floats
    a_deep, g_deep = torch.zeros(2, 128, 4, 4), torch.zeros(2, 32, 4, 4)
    a_sh, g_sh = torch.zeros(2, 1, 32, 32), torch.zeros(2, 8, 32, 32)
    assert fcl.recompute_clipped_sum(deep, a_deep, g_deep)
    assert not fcl.recompute_clipped_sum(shallow, a_sh, g_sh)
    assert fcl.recompute_clipped_sum(shallow, a_sh, g_sh, "always")
    assert not fcl.recompute_clipped_sum(deep, a_deep, g_deep, "never")
    assert not fcl.recompute_clipped_sum(nn.GroupNorm(2, 8), a_sh, g_sh)  # only convs are recomputed
    # DenseNet121's 1x1 convs on 8x8 maps keep their per-sample gradients (65,664 per sample vs 40,960 floats of
    # a and g: within KEEP_FACTOR), which measured faster than a ghost norm plus a recomputed sum
    pointwise = nn.Conv2d(512, 128, 1)
    a_pw, g_pw = torch.zeros(2, 512, 8, 8), torch.zeros(2, 128, 8, 8)
    assert fcl.KEEP_FACTOR * (a_pw.numel() + g_pw.numel()) > 2 * 65_664 > a_pw.numel() + g_pw.numel()
    assert not fcl.recompute_clipped_sum(pointwise, a_pw, g_pw)
    # ... while a 3x3 conv in the same band (AtollNet's stride-2 32 -> 64: 18,560 per sample vs 9,408) recomputes
    strided = nn.Conv2d(32, 64, 3, stride=2, padding=1)
    a_st, g_st = torch.zeros(2, 32, 14, 14), torch.zeros(2, 64, 7, 7)
    assert a_st.numel() + g_st.numel() < 2 * 18_560 <= fcl.KEEP_FACTOR * (a_st.numel() + g_st.numel())
    assert fcl.recompute_clipped_sum(strided, a_st, g_st)


def test_recompute_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="recompute must be"):
        fcl.FastClipModule(nn.Linear(2, 2), max_grad_norm=1.0, recompute="sometimes")


@pytest.mark.parametrize("size", [2, 5])  # 4 positions: matrix-vector route; 25: ATen's GroupNorm kernel
@pytest.mark.parametrize("saved", [True, False])  # the forward's statistics, or recomputed from the input
def test_group_norm_per_sample_grads_equal_per_example_backward(size: int, saved: bool) -> None:
    torch.manual_seed(0)
    gn = nn.GroupNorm(3, 6)
    nn.init.normal_(gn.weight)
    a = (torch.randn(4, 6, size, size) * 2 + 1).requires_grad_()
    out = gn(a)
    g = torch.randn_like(out)
    stats = fcl.group_norm_stats(gn, out) if saved else None
    assert (stats is not None) == saved
    got = fcl.per_sample_grads(gn, a.detach(), g, stats)
    for i in range(len(a)):
        w, b = torch.autograd.grad((gn(a[i:i + 1]) * g[i:i + 1]).sum(), (gn.weight, gn.bias))
        torch.testing.assert_close(got[gn.weight][i], w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[gn.bias][i], b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Conv2d(3, 5, 3),
    nn.Conv2d(3, 5, (3, 2), padding=(2, 1), dilation=(2, 1)), nn.Conv1d(3, 5, 5, stride=3, padding=2),
    nn.Conv3d(3, 5, 3, padding=1),
], ids=lambda c: repr(c))
def test_input_gram_patch_products_equal_im2col(conv: nn.Module) -> None:
    """The Gram-matrix route of the ghost norm's ``<a_p, a_q>`` (strides, dilation, padding wider than the
    kernel reach, 1D/3D) equals the im2col products, and the ghost norm equals the instantiated one."""
    torch.manual_seed(0)
    dims = conv.weight.dim() - 2
    a = torch.randn(3, conv.in_channels, *([5] * dims))
    out_shape = fcl.conv_output_shape(conv, tuple(a.shape[2:]))
    assert out_shape == tuple(conv(a).shape[2:])
    patches = fcl.conv_patches(conv, a)
    torch.testing.assert_close(fcl.input_gram_patch_products(conv, a, out_shape),
                               torch.bmm(patches.transpose(1, 2), patches), rtol=1e-5, atol=1e-5)
    g = torch.randn(3, conv.out_channels, *out_shape)
    ref = fcl._conv_weight_grad(conv, a, g, per_sample=True).flatten(1).square().sum(1)
    torch.testing.assert_close(fcl.conv_ghost_sq_norm(conv, a, g), ref, rtol=1e-5, atol=1e-5)


def test_ghost_rule_on_densenet121_shapes() -> None:
    """The measured choices: a 3x3 conv (128 -> 32) on 8x8 or 4x4 maps is a ghost layer, on 16x16 it is
    instantiated; a strided stem never takes the Gram route."""
    conv = nn.Conv2d(128, 32, 3, padding=1, bias=False)
    for size, ghost in ((16, False), (8, True), (4, True), (2, True)):
        a, g = torch.zeros(1, 128, size, size), torch.zeros(1, 32, size, size)
        recomputed = fcl.recompute_clipped_sum(conv, a, g)
        assert recomputed is (size < 16)
        assert fcl.use_ghost(conv, g, in_shape=(size, size), recomputed=recomputed) is ghost, size
    stem = nn.Conv2d(1, 64, 7, stride=2, padding=3)
    assert not fcl._input_gram_route(stem, (64, 64), (32, 32))


class _InPlaceInside(nn.Module):
    """A non-root layer's output edited in place after the layer (``mul_``): the gradient hook, registered in
    the forward on the layer's own node, must still see the layer's output gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x))).mul_(3.0)))


def test_in_place_edit_of_a_non_root_output_keeps_exact_norms_and_clipped_sum() -> None:
    torch.manual_seed(0)
    model = _InPlaceInside()
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    per_example = [torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
                   for i in range(len(x))]
    ref_norms = torch.stack([torch.cat([g.flatten() for g in gs]).norm() for gs in per_example])
    clip = float(ref_norms.median())
    coef = (clip / (ref_norms + fcl.CLIP_EPS)).clamp(max=1.0)
    ref_sum = [sum(c * gs[k] for c, gs in zip(coef, per_example)) for k in range(len(per_example[0]))]
    fc = fcl.FastClipModule(model, max_grad_norm=clip)
    norms = fc.clip_backward(loss_fn(fc(x), y))
    torch.testing.assert_close(norms, ref_norms, rtol=RTOL, atol=0)
    for p, ref in zip(model.parameters(), ref_sum, strict=True):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-6)
