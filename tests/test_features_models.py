"""The "better features" networks: ``scatternet`` (fixed kymatio scattering + small CNN head) and ``atollnet-ws``
(weight-standardised convolutions + GroupNorm).

DP-SGD's guarantee rests on each patient's gradient being clipped to C, so the per-sample norm of every new layer
type is checked against brute force (one backward pass per example), on the route ``grad_sample_mode="auto"`` picks
for it: Atoll's fast clipping for ScatterNet's head, Opacus' hooks (functorch for the WS convolutions, which fast
clipping refuses rather than clip inexactly) for the WS network.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from contract import Mechanism, TaskSpec
from models import MODEL_KINDS, build_model, build_task_model
from models.scatternet import FEATURE_CACHE, scattering_channels
from models.wsconv import WSConv2d, WSConv3d, standardize_weight, weight_standardize
from privacy import fast_clipping
from privacy.dpsgd import resolve_grad_sample_mode, train_local
from privacy.fast_clipping import FastClipModule

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

XRAY = TaskSpec()  # the demo's task: 2D, 1 channel, 28 px, two classes


def _brute_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(len(x)):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum"),
                                    params)
        norms.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    return torch.stack(norms).float()


def _hooks_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    norms = torch.sqrt(sum((p.grad_sample.flatten(1).double() ** 2).sum(1) for p in gsm.parameters()
                           if p.requires_grad)).float()
    gsm.to_standard_module()
    for p in model.parameters():
        p.grad = None
    return norms


def _fast_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ghost: str) -> torch.Tensor:
    fc = FastClipModule(model, max_grad_norm=1e9, ghost=ghost)
    norms = fc.clip_backward(nn.functional.cross_entropy(fc(x), y, reduction="sum"))
    fc.to_standard_module()
    for p in model.parameters():
        p.grad = None
    return norms


# ------------------------------------------------------------------------------------------------ scatternet
def test_scatternet_builds_from_the_task_and_only_its_head_travels() -> None:
    task = TaskSpec(classes=("a", "b", "c"), in_channels=3, size=(32, 32))
    model = build_task_model("scatternet", task)
    assert MODEL_KINDS["scatternet"] == "classification"
    assert model.num_features == scattering_channels(3) == 3 * 81
    params = dict(model.named_parameters())
    assert set(model.state_dict()) == set(params)  # no kymatio filter or cache in what sites hash and exchange
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 3)
    f = model.features(x)
    assert f.shape == (2, 243, 8, 8) and not f.requires_grad
    # the features are fixed: another model (other weights) computes the same ones, and a cached image gives back
    # exactly what a fresh scattering computes
    FEATURE_CACHE.clear()
    other = build_task_model("scatternet", task)
    torch.testing.assert_close(other.features(x), f)
    assert len(FEATURE_CACHE) == 2
    torch.testing.assert_close(other.features(x.flip(0)), f.flip(0))


def test_scatternet_refuses_volumes_and_too_small_images_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="scatternet.*2D images only.*spatial_dims=3"):
        build_task_model("scatternet", TaskSpec(spatial_dims=3, size=(16, 16, 16)))
    with pytest.raises(ValueError, match="at least 16 px"):
        build_task_model("scatternet", TaskSpec(size=(8, 8)))
    with pytest.raises(ValueError, match="expects images"):
        build_model("scatternet", in_channels=1)(torch.rand(2, 3, 28, 28))


@pytest.mark.parametrize("ghost", ["never", "always", "auto"])
def test_scatternet_per_sample_norms_are_exact_on_its_fast_route(ghost: str) -> None:
    torch.manual_seed(0)
    model = build_task_model("scatternet", XRAY)
    assert resolve_grad_sample_mode(model) == "bk"  # fixed features + Conv/GroupNorm/Linear head: fast clipping
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 1, 0])
    brute = _brute_norms(model, x, y)
    assert float(brute.min()) > 0
    torch.testing.assert_close(_fast_norms(model, x, y, ghost), brute, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(_hooks_norms(model, x, y), brute, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- weight standardisation
def test_standardised_weight_has_zero_mean_unit_variance_per_filter_and_keeps_the_state_dict() -> None:
    w = torch.randn(5, 3, 3, 3) * 7 + 2
    ws = standardize_weight(w)
    torch.testing.assert_close(ws.mean((1, 2, 3)), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(ws.var((1, 2, 3), unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    plain, ws_net = build_model("atollnet"), build_model("atollnet-ws")
    assert set(plain.state_dict()) == set(ws_net.state_dict())
    assert sum(isinstance(m, WSConv2d) for m in ws_net.modules()) == 4
    ws_net.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 28, 28)
    assert not torch.allclose(ws_net(x), plain(x))  # same weights, standardised: another function
    torch.testing.assert_close(torch.jit.script(ws_net)(x), ws_net(x))  # `atoll run export` scripts it (model.ts)
    assert build_model("atollnet-ws", spatial_dims=3)(torch.rand(2, 1, 16, 16, 16)).shape == (2, 2)


class _WSBlock(nn.Module):
    """A WS conv (strided, padded) -> GroupNorm -> ReLU -> pool -> Linear, in 2D or 3D."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(3, 4, 3, stride=2, padding=1, bias=True)
        self.body = weight_standardize(nn.Sequential(conv, nn.GroupNorm(2, 4)))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.body(x)).flatten(2).mean(-1))


@pytest.mark.parametrize("dims", [2, 3])
def test_ws_layers_are_refused_by_fast_clipping_and_exact_on_opacus_hooks(dims: int) -> None:
    torch.manual_seed(1)
    model = _WSBlock(dims)
    assert isinstance(model.body[0], WSConv2d if dims == 2 else WSConv3d)
    assert any("WSConv" in b for b in fast_clipping.unsupported_layers(model))
    assert resolve_grad_sample_mode(model) == "hooks"
    with pytest.raises(NotImplementedError, match="WSConv"):
        FastClipModule(model, max_grad_norm=1.0)  # never a silently inexact clip
    x = torch.randn(4, 3, *([6] * dims))
    y = torch.tensor([0, 1, 0, 1])
    torch.testing.assert_close(_hooks_norms(model, x, y), _brute_norms(model, x, y), rtol=1e-4, atol=1e-6)


def test_atollnet_ws_per_sample_norms_are_exact_on_its_route() -> None:
    torch.manual_seed(2)
    model = build_task_model("atollnet-ws", XRAY)
    assert resolve_grad_sample_mode(model) == "hooks"
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([1, 0, 1, 1])
    brute = _brute_norms(model, x, y)
    assert float(brute.min()) > 0
    torch.testing.assert_close(_hooks_norms(model, x, y), brute, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------------------------ DP-SGD end to end
@dataclass
class _Data:
    images: torch.Tensor
    labels: torch.Tensor
    patients: torch.Tensor


@pytest.mark.parametrize("name", ["scatternet", "atollnet-ws"])
def test_a_dp_sgd_round_runs_through_train_local(name: str) -> None:
    torch.manual_seed(3)
    data = _Data(torch.rand(12, 1, 28, 28), torch.randint(0, 2, (12,)), torch.arange(12) // 2)
    model = build_task_model(name, XRAY)
    before = [p.detach().clone() for p in model.parameters()]
    mech = Mechanism(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.9, steps=2)
    result = train_local(model, data, mech, lr=0.05, device="cpu", seed=0, reproducible_dp=True)
    assert result.steps == 2 and result.empty_steps == 0
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
