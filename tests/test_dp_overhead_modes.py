"""The single-backward fast clipping (privacy/fast_clipping.py: Atoll's default ``bk`` mode of
privacy.dpsgd.PrivateStep) against Opacus' hooks mode, the reference.

A per-sample norm that comes out too small under-clips: the patient's contribution exceeds C and the epsilon
the ledger records is wrong. So every fast path is held to Opacus hooks' per-sample norms (1e-5 relative)
and to its clipped, summed, scaled gradient (noise 0), on the real AtollNet in 2D and 3D, with the clip norm
at the median sample norm so that some samples are clipped and some are not. The refusals (layers the fast
path cannot bound, weight tying, in-place edits, uncleared gradients) are tested too: each would otherwise
be a silent privacy bug.
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from models import build_model
from privacy.fast_clipping import FastClipModule, make_private_bk, recompute_clipped_sum, use_ghost

RTOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _batch(spatial_dims: int, n: int = 8, size: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1) + (size,) * spatial_dims
    return torch.randn(shape, generator=g), torch.randint(0, 2, (n,), generator=g)


def _model(spatial_dims: int = 2, name: str = "atollnet") -> nn.Module:
    torch.manual_seed(1)
    return build_model(name, spatial_dims=spatial_dims)


def _hooks_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float | None):
    """Opacus hooks: per-sample norms, and the clipped sum / batch with noise 0 (``DPOptimizer.pre_step``)."""
    m = copy.deepcopy(model)
    gsm = GradSampleModule(m, batch_first=True, loss_reduction="sum", strict=True)
    nn.CrossEntropyLoss(reduction="sum")(gsm(x), y).backward()
    params = [p for p in m.parameters() if p.requires_grad]
    norms = torch.stack([p.grad_sample.reshape(len(x), -1).norm(dim=1) for p in params]).norm(dim=0)
    clip = float(norms.median()) if clip is None else clip
    opt = DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
                      expected_batch_size=len(x), loss_reduction="mean")
    opt.pre_step()
    return norms, [p.grad.clone() for p in params], clip


def _assert_close(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    for a, r in zip(got, ref, strict=True):
        assert a.shape == r.shape
        assert float((a - r).norm()) <= RTOL * float(r.norm()) + 1e-12


@pytest.mark.parametrize("ghost", ["auto", "always", "never"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_bk_norms_and_clipped_sum_equal_hooks(spatial_dims: int, ghost: str) -> None:
    model = _model(spatial_dims)
    x, y = _batch(spatial_dims, size=12 if spatial_dims == 2 else 8)
    ref_norms, ref_grads, clip = _hooks_reference(model, x, y, None)
    assert (ref_norms > clip).any() and (ref_norms < clip).any()  # some clipped, some not

    m = copy.deepcopy(model)
    fc, dp = make_private_bk(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
                             expected_batch_size=len(x), ghost=ghost)
    dp.zero_grad(set_to_none=True)
    norms = fc.clip_backward(nn.CrossEntropyLoss(reduction="sum")(fc(x), y))
    torch.testing.assert_close(norms, ref_norms, rtol=RTOL, atol=0)
    dp.pre_step()
    _assert_close([p.grad for p in m.parameters()], ref_grads)


def test_auto_policy_mixes_ghost_and_instantiation_on_atollnet() -> None:
    """The 28 px demo net really exercises both paths: ghost for the last conv (T=16), instantiation for
    the first (T=784)."""
    model = _model()
    chosen: list[bool] = []
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        conv.register_forward_hook(lambda layer, inp, out: chosen.append(use_ghost(
            layer, out, in_shape=tuple(inp[0].shape[2:]), recomputed=recompute_clipped_sum(layer, inp[0], out))))
    model(_batch(2)[0])
    assert len(chosen) == 4 and chosen[0] is False and chosen[-1] is True


class _TwoRoots(nn.Module):
    """Two convs read the image (two backward roots), one conv with bias, a Linear on a 3D activation and a
    GroupNorm; ``unused`` never reaches the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1, bias=True)
        self.b = nn.Conv2d(1, 4, 5, stride=2, padding=2, dilation=1)
        self.norm = nn.GroupNorm(2, 8)
        self.seq = nn.Linear(7, 3)
        self.unused = nn.Linear(3, 3)
        self.head = nn.Linear(8 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = nn.functional.avg_pool2d(self.a(x), 2)
        h = torch.relu(self.norm(torch.cat([a, self.b(x)], 1)))  # [n, 8, 7, 7]
        s = self.seq(h.mean(2))  # Linear over [n, 8, 7] -> [n, 8, 3]
        self.unused(s.detach())
        return self.head(s.flatten(1))


def test_multiple_roots_bias_linear3d_and_unused_layer() -> None:
    torch.manual_seed(0)
    model = _TwoRoots()
    x, y = _batch(2, n=6, size=14)
    used = copy.deepcopy(model)
    used.unused.weight.requires_grad_(False)  # Opacus hooks cannot take a layer with no gradient
    used.unused.bias.requires_grad_(False)
    ref_norms, ref_grads, clip = _hooks_reference(used, x, y, None)
    m = copy.deepcopy(model)
    fc = FastClipModule(m, max_grad_norm=clip)
    norms = fc.clip_backward(nn.CrossEntropyLoss(reduction="sum")(fc(x), y))
    torch.testing.assert_close(norms, ref_norms, rtol=RTOL, atol=0)
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert torch.count_nonzero(grads.pop("unused.weight")) == 0 and torch.count_nonzero(grads.pop("unused.bias")) == 0
    ref = dict(zip([n for n, p in used.named_parameters() if p.requires_grad], ref_grads))
    _assert_close([g / len(x) for g in grads.values()], [ref[n] for n in grads])


def test_noise_is_opacus_gaussian_with_std_sigma_c_over_batch() -> None:
    model = _model()
    x, y = _batch(2, size=16)
    m = copy.deepcopy(model)
    sigma, clip, b = 2.0, 0.5, 16
    fc, dp = make_private_bk(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=sigma, max_grad_norm=clip,
                             expected_batch_size=b, generator=torch.Generator().manual_seed(3))
    dp.zero_grad(set_to_none=True)
    fc.clip_backward(nn.CrossEntropyLoss(reduction="sum")(fc(x), y))
    clean = torch.cat([p.grad.flatten() / b for p in m.parameters()])
    dp.pre_step()
    noise = torch.cat([p.grad.flatten() for p in m.parameters()]) - clean
    assert noise.numel() > 50_000
    assert abs(float(noise.std()) / (sigma * clip / b) - 1) < 0.02
    assert abs(float(noise.mean())) < 5 * sigma * clip / b / noise.numel() ** 0.5


def test_empty_batch_is_pure_noise() -> None:
    m = _model()
    fc, dp = make_private_bk(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                             expected_batch_size=4)
    dp.zero_grad(set_to_none=True)
    fc.zero_clipped_grads()
    dp.pre_step()
    assert all(torch.count_nonzero(p.grad) == 0 for p in m.parameters())


def test_refuses_layers_it_cannot_bound() -> None:
    with pytest.raises(NotImplementedError, match="BatchNorm2d"):
        FastClipModule(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), max_grad_norm=1.0)
    with pytest.raises(NotImplementedError, match="Embedding"):
        FastClipModule(nn.Sequential(nn.Embedding(4, 2)), max_grad_norm=1.0)
    with pytest.raises(NotImplementedError, match="padding_mode"):
        FastClipModule(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), max_grad_norm=1.0)


def test_refuses_weight_tying_inplace_edits_and_uncleared_grads() -> None:
    lin = nn.Linear(3, 3)
    tied = FastClipModule(nn.Sequential(lin, nn.Tanh(), lin), max_grad_norm=1.0)
    with pytest.raises(NotImplementedError, match="twice"):
        tied(torch.randn(2, 3))
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight  # one parameter in two layers: per-layer norms would under-estimate its norm
    with pytest.raises(NotImplementedError, match="shared"):
        FastClipModule(nn.Sequential(a, nn.Tanh(), b), max_grad_norm=1.0)

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).mul_(2)

    fc = FastClipModule(InPlace(), max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="in place"):
        fc.clip_backward(fc(torch.randn(2, 3)).sum())

    fc = FastClipModule(nn.Linear(3, 1), max_grad_norm=1.0)
    fc.clip_backward(fc(torch.randn(2, 3)).sum())
    with pytest.raises(RuntimeError, match="zero_grad"):
        fc.clip_backward(fc(torch.randn(2, 3)).sum())


def test_to_standard_module_unhooks() -> None:
    model = _model()
    fc = FastClipModule(model, max_grad_norm=1.0)
    hooked = sum(len(m._forward_hooks) for m in model.modules())
    assert hooked == len([m for m in model.modules() if any(True for _ in m.parameters(recurse=False))])
    assert fc.to_standard_module() is model
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
