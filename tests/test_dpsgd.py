"""privacy/dpsgd.py + privacy/ghost_conv.py: patient-level DP-SGD through Opacus.

The privacy-critical claims, each tested with the real Opacus step:
* a sampled batch holds at most one image per patient, patients are included with probability q;
* the pre-noise clipped sum changes by at most C when one patient (with many images) is added/removed,
  and an image-level batch would break that bound (so the test can fail);
* every grad-sample mode (Atoll's default included) produces the same clipped sum as Opacus' stock hooks;
  the custom per-sample gradients and norms equal Opacus' hooks to 1e-5;
* the noise has std sigma*C (divided by the expected batch), also on empty batches.
"""

from __future__ import annotations

import dataclasses

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn

from models import build_model
from privacy.dpsgd import (
    DEFAULT_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    OPTIMIZERS,
    LocalTrainResult,
    PatientSampler,
    PrivateStep,
    resolve_device,
    cross_entropy,
    resolve_grad_sample_mode,
    train_local,
)
from privacy.ghost_conv import FastConv1d, FastConv2d, FastConv3d, fast_layers, use_ghost
from contract import Mechanism

def _dp(sigma: float, clip: float, q: float) -> Mechanism:
    """A DP-SGD mechanism (σ, C, q); the step count is set per call (:func:`_mech`)."""
    return Mechanism(noise_multiplier=sigma, clip_norm=clip, sample_rate=q)


def _mech(dp: Mechanism | None, steps: int) -> Mechanism:
    """``dp`` with ``steps`` steps; ``None`` = a non-DP run of ``steps`` steps."""
    return dataclasses.replace(dp or Mechanism(dp=False), steps=steps)




# torch warns that the first layer's full backward hook fires although its input needs no gradient
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

@dataclass
class Split:
    images: torch.Tensor
    labels: torch.Tensor
    patients: torch.Tensor


class SmallNet(nn.Module):
    """Every layer kind the samplers handle: strided/dilated/biased convs, a grouped conv, GroupNorm, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1, bias=True)
        self.n1 = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2)
        self.c3 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=2, bias=False)
        self.c4 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)  # few positions: ghost norm
        self.fc = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.n1(self.c1(x)))
        x = torch.tanh(self.c4(torch.relu(self.c3(torch.relu(self.c2(x))))))
        return self.fc(x.mean((2, 3)))


def _clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, mode: str,
                 criterion=cross_entropy) -> torch.Tensor:
    """Pre-noise clipped sum of the real private step: sigma = 0, SGD lr = 0, expected batch 1 -> p.grad."""
    step = PrivateStep(
        model, torch.optim.SGD(model.parameters(), lr=0.0), _dp(0.0, clip, 0.5),
        expected_batch_size=1, grad_sample_mode=mode, criterion=criterion,
    )
    step.step(x, y)
    out = torch.cat([p.grad.flatten().clone() for p in model.parameters()])
    step.close()
    return out


def _patient_batch(data: Split, seed: int = 0) -> torch.Tensor:
    """Indices of a real sampler batch with q = 1 (every patient in, one image each)."""
    return PatientSampler(data.patients, 1.0, torch.Generator().manual_seed(seed)).sample()


# ---------------------------------------------------------------- sampling


def test_sampler_one_image_per_patient_and_rate_q() -> None:
    patients = torch.repeat_interleave(torch.arange(200), torch.randint(1, 6, (200,), generator=torch.Generator().manual_seed(1)))
    sampler = PatientSampler(patients, 0.1, torch.Generator().manual_seed(0))
    included = torch.zeros(200)
    sizes = []
    for _ in range(400):
        idx = sampler.sample()
        pats = patients[idx]
        assert len(pats.unique()) == len(pats)  # never two images of one patient in a step
        included[pats] += 1
        sizes.append(len(idx))
    rate = included.sum() / (400 * 200)
    assert abs(rate - 0.1) < 0.01  # 80,000 Bernoulli(0.1) trials: sd 0.001
    assert included.min() > 10  # every patient gets in, whatever its number of images
    assert min(sizes) < max(sizes)  # Poisson: the batch size varies


def test_sampler_picks_each_image_of_a_patient_uniformly() -> None:
    patients = torch.tensor([0, 1, 1, 1, 1, 2])
    sampler = PatientSampler(patients, 1.0, torch.Generator().manual_seed(0))
    counts = torch.zeros(6)
    for _ in range(2000):
        counts[sampler.sample()] += 1
    assert counts[0] == counts[5] == 2000
    assert all(abs(c - 500) < 100 for c in counts[1:5])


def test_sampler_can_be_empty() -> None:
    sampler = PatientSampler(torch.arange(10), 1e-9, torch.Generator().manual_seed(0))
    assert len(sampler.sample()) == 0


# ---------------------------------------------------------------- sensitivity (the privacy bound)


def _one_heavy_patient() -> tuple[Split, Split]:
    """Patient 0 has 16 near-identical images (aligned gradients); patients 1..7 one image each."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 16, 16, generator=g)
    heavy = base + 0.01 * torch.randn(16, 1, 16, 16, generator=g)
    others = torch.randn(7, 1, 16, 16, generator=g)
    with_p0 = Split(
        images=torch.cat([heavy, others]),
        labels=torch.cat([torch.ones(16, dtype=torch.long), torch.randint(0, 2, (7,), generator=g)]),
        patients=torch.cat([torch.zeros(16, dtype=torch.long), torch.arange(1, 8)]),
    )
    without = Split(with_p0.images[16:], with_p0.labels[16:], with_p0.patients[16:] - 1)
    return with_p0, without


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_patient_sensitivity_bounded_by_clip_norm(mode: str) -> None:
    clip = 0.01  # far below every per-sample gradient norm: all contributions are clipped to exactly C
    with_p0, without = _one_heavy_patient()
    torch.manual_seed(0)
    init = build_model("atollnet", channels=(8, 16), groups=4).state_dict()

    def run(data: Split, idx: torch.Tensor) -> torch.Tensor:
        model = build_model("atollnet", channels=(8, 16), groups=4)
        model.load_state_dict(init)
        return _clipped_sum(model, data.images[idx], data.labels[idx], clip, mode)

    s_with = run(with_p0, _patient_batch(with_p0))
    s_without = run(without, _patient_batch(without))
    assert (s_with - s_without).norm() <= clip * (1 + 1e-4)
    assert (s_with - s_without).norm() > 0.9 * clip  # patient 0 did contribute, clipped to C

    # An image-level batch (all of patient 0's images) breaks the bound: ~16 C.
    image_level = torch.arange(len(with_p0.labels))
    s_images = run(with_p0, image_level)
    assert (s_images - s_without).norm() > 8 * clip


def _one_heavy_patient_3d(kind: str) -> tuple[Split, Split]:
    """3D volumes: patient 0 has 6 copies of one volume (one label map or class: the same series exported six
    times, so their gradients align), patients 1..5 one volume each."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 1, 16, 16, 16, generator=g)
    heavy = base.expand(6, -1, -1, -1, -1).clone()
    others = torch.randn(5, 1, 16, 16, 16, generator=g)
    if kind == "segmentation":
        heavy_y = ((base[:, 0] > 0.5).long() + 2 * (base[:, 0] < -0.5).long()).expand(6, -1, -1, -1)
        labels = torch.cat([heavy_y, torch.randint(0, 3, (5, 16, 16, 16), generator=g)])
    else:
        labels = torch.cat([torch.ones(6, dtype=torch.long), torch.randint(0, 2, (5,), generator=g)])
    with_p0 = Split(images=torch.cat([heavy, others]), labels=labels,
                    patients=torch.cat([torch.zeros(6, dtype=torch.long), torch.arange(1, 6)]))
    without = Split(with_p0.images[6:], with_p0.labels[6:], with_p0.patients[6:] - 1)
    return with_p0, without


@pytest.mark.parametrize("mode", ["bk", "hooks"])  # Atoll's default and Opacus' stock; the 2D test covers every mode
@pytest.mark.parametrize("model_name", ["scalespace", "basicunet-small", "resnet10"])
def test_patient_sensitivity_bounded_by_clip_norm_on_3d_volumes(model_name: str, mode: str) -> None:
    """The 3D path: segmentation (the hippocampus demo's network and BasicUNet, per-patient Dice + CE) and 3D
    classification (resnet10). One sampled patient with many volumes moves the pre-noise sum by at most C."""
    from contract import TaskSpec
    from models import MODEL_KINDS, build_loss, build_task_model

    kind = MODEL_KINDS[model_name]
    task = TaskSpec(kind=kind, spatial_dims=3, size=(16, 16, 16), **(
        {"classes": (), "labels": ("a", "b"), "loss": "dice_ce_fg"} if kind == "segmentation"
        else {"classes": ("no", "yes")}))
    kw = {"basicunet-small": {"features": (2, 2, 4, 4, 4, 2), "norm": ("group", {"num_groups": 2})},
          "resnet10": {"widen_factor": 0.125}}.get(model_name, {})  # the same layers as the defaults, cheaper
    clip = 1e-4  # below every per-volume gradient norm: each contribution is clipped to exactly C
    with_p0, without = _one_heavy_patient_3d(kind)
    torch.manual_seed(0)
    init = build_task_model(model_name, task, **kw).state_dict()

    def run(data: Split, idx: torch.Tensor) -> torch.Tensor:
        model = build_task_model(model_name, task, **kw)
        model.load_state_dict(init)
        return _clipped_sum(model, data.images[idx], data.labels[idx], clip, mode, criterion=build_loss(task))

    s_with = run(with_p0, _patient_batch(with_p0))
    s_without = run(without, _patient_batch(without))
    assert (s_with - s_without).norm() <= clip * (1 + 1e-3)
    assert (s_with - s_without).norm() > 0.9 * clip
    s_volumes = run(with_p0, torch.arange(len(with_p0.patients)))  # volume-level batch: ~6 C, the bound breaks
    assert (s_volumes - s_without).norm() > 3 * clip


# ---------------------------------------------------------------- custom samplers == Opacus hooks


def _hooks_grad_samples(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    gsm = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    out = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    gsm.to_standard_module()
    for p in model.parameters():
        p.grad = None
    return out


def _models() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [
        ("small", SmallNet(), torch.randn(5, 1, 20, 20)),
        ("atollnet-3d", build_model("atollnet", spatial_dims=3, channels=(8, 16, 16), groups=4), torch.randn(5, 1, 12, 12, 12)),
        ("conv1d", nn.Sequential(nn.Conv1d(1, 4, 5, stride=2, padding=2), nn.ReLU(), nn.Conv1d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 14, 2)), torch.randn(5, 1, 32)),
    ]


@pytest.mark.parametrize("case", range(3))
def test_fast_grad_samples_equal_opacus_hooks(case: int) -> None:
    name, model, x = _models()[case]
    y = torch.randint(0, 2, (len(x),))
    ref = _hooks_grad_samples(model, x, y)
    with fast_layers(model, skip_weight_grad=True):
        assert any(isinstance(m, (FastConv1d, FastConv2d, FastConv3d)) for m in model.modules())
        got = _hooks_grad_samples(model, x, y)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6 * ref[n].abs().max().item(), msg=f"{name}:{n}")
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("case", range(3))
def test_ghost_norms_equal_opacus_hooks(case: int) -> None:
    name, model, x = _models()[case]
    y = torch.randint(0, 2, (len(x),))
    ref = _hooks_grad_samples(model, x, y)
    ref_norms = {n: g.reshape(len(x), -1).norm(dim=1) for n, g in ref.items()}
    with fast_layers(model, skip_weight_grad=False):
        gsm = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", use_ghost_clipping=True)
        nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
        got = {n: p._norm_sample.clone() for n, p in model.named_parameters()}
        total = gsm.get_norm_sample()
        gsm.to_standard_module()
    for n in ref_norms:
        torch.testing.assert_close(got[n], ref_norms[n], rtol=1e-5, atol=1e-7, msg=f"{name}:{n}")
    torch.testing.assert_close(total, torch.stack(list(ref_norms.values())).norm(dim=0), rtol=1e-5, atol=1e-7)


def test_small_net_exercises_both_norm_paths() -> None:
    net = SmallNet()
    assert use_ghost(net.c4, positions=9)  # 3x3 output, 144 x 32 weights: ghost
    assert not use_ghost(net.c1, positions=400)  # 20x20 output, 9 x 8 weights: instantiate
    assert not use_ghost(net.c3, positions=25)  # grouped conv: always instantiate


@pytest.mark.parametrize("mode", [m for m in GRAD_SAMPLE_MODES if m != "hooks"])
def test_every_mode_clips_like_opacus_hooks(mode: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 20, 20), torch.randint(0, 2, (6,))
    init = SmallNet().state_dict()
    sums = {}
    for m in ("hooks", mode):
        net = SmallNet()
        net.load_state_dict(init)
        sums[m] = _clipped_sum(net, x, y, clip=0.05, mode=m)
    torch.testing.assert_close(sums[mode], sums["hooks"], rtol=1e-5, atol=1e-5 * sums["hooks"].abs().max().item())


def test_bk_mode_is_the_fast_clipping_module_and_unhooks() -> None:
    """One book-keeping implementation (privacy.fast_clipping); closing the step leaves no hook behind."""
    from privacy.fast_clipping import FastClipModule

    model = SmallNet()
    step = PrivateStep(model, torch.optim.SGD(model.parameters(), lr=0.1), _dp(1.0, 1.0, 0.5),
                       expected_batch_size=2, grad_sample_mode="bk")
    assert isinstance(step.gsm, FastClipModule)
    assert step.step(torch.randn(3, 1, 20, 20), torch.tensor([0, 1, 0])) is not None
    assert step.step(torch.randn(0, 1, 20, 20), torch.zeros(0, dtype=torch.long)) is None  # empty: noise only
    step.close()
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_auto_mode_picks_bk_only_when_it_can_clip_every_layer() -> None:
    assert resolve_grad_sample_mode(build_model("atollnet")) == "bk"
    odd = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Flatten(), nn.Linear(144, 2))
    assert resolve_grad_sample_mode(odd) == "hooks"
    reflect = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(256, 2))
    assert resolve_grad_sample_mode(reflect) == "hooks"
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight  # weight tying: per-layer norms would under-estimate; Opacus' hooks sum the uses
    assert resolve_grad_sample_mode(nn.Sequential(a, nn.Tanh(), b)) == "hooks"
    with pytest.raises(ValueError, match="grad_sample_mode"):
        resolve_grad_sample_mode(odd, "turbo")


def test_bk_refuses_layers_it_cannot_clip() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(ValueError, match="LayerNorm"):
        PrivateStep(model, torch.optim.SGD(model.parameters(), 0.1), _dp(1, 1, 0.1), expected_batch_size=1, grad_sample_mode="bk")
    assert type(model[0]) is nn.Conv2d


# ---------------------------------------------------------------- noise


@pytest.mark.parametrize("mode", [DEFAULT_GRAD_SAMPLE_MODE, "hooks"])
@pytest.mark.parametrize("empty", [True, False])
def test_noise_std_is_sigma_c_over_expected_batch(mode: str, empty: bool) -> None:
    torch.manual_seed(0)
    model = build_model("atollnet")
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    sigma, clip, expected = 3.0, 2.0, 4
    step = PrivateStep(
        model, torch.optim.SGD(model.parameters(), lr=1.0), _dp(sigma, clip, 0.5),
        expected_batch_size=expected, grad_sample_mode=mode, generator=torch.Generator().manual_seed(1),
    )
    n = 0 if empty else 2
    loss = step.step(torch.randn(n, 1, 28, 28), torch.zeros(n, dtype=torch.long))
    step.close()
    assert (loss is None) == empty
    delta = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    # 60k coordinates: the std estimate is within ~1%; the clipped signal (norm <= 2C/4) is negligible
    assert abs(delta.std().item() / (sigma * clip / expected) - 1) < 0.03


# ---------------------------------------------------------------- train_local


def _toy(n_patients: int = 60, seed: int = 0) -> Split:
    """Bright vs dark 12x12 images, 1-3 images per patient, label per patient."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (n_patients,), generator=g)
    patients = torch.repeat_interleave(torch.arange(n_patients), counts)
    labels = (patients % 2).long()
    images = torch.randn(len(patients), 1, 12, 12, generator=g) * 0.5 + (labels.float() * 2 - 1).view(-1, 1, 1, 1)
    return Split(images, labels, patients)


def _accuracy(model: nn.Module, data: Split) -> float:
    model.eval()
    with torch.no_grad():
        return (model(data.images).argmax(1) == data.labels).float().mean().item()


@pytest.mark.parametrize("dp", [None, Mechanism(noise_multiplier=0.8, clip_norm=1.0, sample_rate=0.3)])
def test_train_local_learns_and_reports(dp: Mechanism | None) -> None:
    torch.manual_seed(0)
    data = _toy()
    model = build_model("atollnet", channels=(8, 16), groups=4)
    result = train_local(model, data, _mech(dp, 40), lr=3e-3, device="cpu", batch_size=16, seed=0, reproducible_dp=True)
    assert isinstance(result, LocalTrainResult)
    assert result.steps == 40 and result.mechanism == _mech(dp, 40) and result.num_examples == len(data.labels)
    assert math.isfinite(result.train_loss) and result.seconds > 0
    assert _accuracy(model, _toy(seed=1)) > 0.9
    # the model is handed back clean: no Opacus hooks/attributes, original layer classes
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(not hasattr(p, "grad_sample") and not hasattr(p, "_norm_sample") for p in model.parameters())
    assert type(model.features[0].conv) is nn.Conv2d and type(model.classifier) is nn.Linear


def test_dp_randomness_ignores_the_seed_unless_reproducible_dp() -> None:
    """A seed the server could know must not fix the noise or the sample (it could subtract / un-amplify)."""
    data = _toy()
    dp = _dp(1.0, 1.0, 0.2)
    init = build_model("atollnet", channels=(8, 16), groups=4).state_dict()

    def final(seed: int | None, dp: Mechanism | None, reproducible: bool) -> torch.Tensor:
        model = build_model("atollnet", channels=(8, 16), groups=4)
        model.load_state_dict(init)
        train_local(model, data, _mech(dp, 3), lr=1e-2, device="cpu", seed=seed, reproducible_dp=reproducible)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert not torch.equal(final(5, dp, False), final(5, dp, False))  # same seed, fresh OS entropy
    assert torch.equal(final(5, dp, True), final(5, dp, True))  # tests/benchmarks only
    assert not torch.equal(final(5, dp, True), final(6, dp, True))
    assert torch.equal(final(5, None, False), final(5, None, False))  # non-DP: the seed drives shuffling


def test_train_local_zero_steps_and_all_empty_batches() -> None:
    data = _toy()
    model = build_model("atollnet", channels=(8, 16), groups=4)
    w0 = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    with pytest.raises(ValueError, match="local-steps"):  # a mechanism of zero steps is not a round
        train_local(model, data, _mech(_dp(1, 1, 0.1), 0), lr=1e-3, device="cpu")
    r = train_local(model, data, _mech(_dp(1, 1, 1e-12), 3), lr=1e-3, device="cpu")
    assert r.steps == 3 and math.isnan(r.train_loss)  # no example seen, but noise steps taken
    assert r.empty_steps == 3 and r.all_batches_empty  # the caller names the missing loss (EMPTY_BATCHES)
    w1 = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(w0, w1) and torch.isfinite(w1).all()  # a finite, noise-only update to release
    # some steps empty, some not: the loss is the mean over the non-empty batches, and finite
    tiny = Split(data.images[:3], data.labels[:3], torch.arange(3))
    r = train_local(model, tiny, _mech(_dp(1, 1, 0.2), 12), lr=1e-3, device="cpu", seed=1, reproducible_dp=True)
    assert 0 < r.empty_steps < 12 and not r.all_batches_empty and math.isfinite(r.train_loss)


def test_train_local_rejects_bad_input() -> None:
    data = _toy()
    model = build_model("atollnet", channels=(8, 16), groups=4)
    with pytest.raises(ValueError, match="patients"):
        train_local(model, Split(data.images, data.labels, data.patients[:-1]), _mech(None, 1), lr=1e-3, device="cpu")
    with pytest.raises(ValueError, match="labels"):
        train_local(model, Split(data.images, data.labels.int(), data.patients), _mech(None, 1), lr=1e-3, device="cpu")
    with pytest.raises(ValueError, match="no images"):
        train_local(model, Split(data.images[:0], data.labels[:0], data.patients[:0]), _mech(None, 1), lr=1e-3, device="cpu")
    with pytest.raises(ValueError, match="lr"):
        train_local(model, data, _mech(None, 1), lr=float("nan"), device="cpu")
    for bad in [(1.0, 0.0, 0.1), (1.0, 1.0, 0.0), (1.0, 1.0, 1.5), (-1.0, 1.0, 0.1), (float("inf"), 1.0, 0.1)]:
        with pytest.raises(ValueError, match="DP mechanism"):
            train_local(model, data, _mech(_dp(*bad), 1), lr=1e-3, device="cpu")


def test_optimizer_choice_is_validated_and_used() -> None:
    data = _toy()
    assert OPTIMIZERS == ("sgd", "adam")

    def run(**kw) -> torch.Tensor:
        torch.manual_seed(0)
        model = build_model("atollnet", channels=(8, 16), groups=4)
        train_local(model, data, _mech(None, 2), lr=1e-2, device="cpu", seed=0, **kw)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    default = run()
    assert torch.equal(default, run(optimizer="sgd", momentum=0.9))  # the documented default
    assert not torch.equal(default, run(optimizer="adam"))
    assert not torch.equal(default, run(optimizer="sgd", momentum=0.0))
    model = build_model("atollnet", channels=(8, 16), groups=4)
    for kw, match in [({"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam, got 'rmsprop'"),
                      ({"optimizer": "SGD"}, "optimizer must be one of"),
                      ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\)"),
                      ({"momentum": -0.1}, "momentum"),
                      ({"momentum": float("nan")}, "momentum"),
                      ({"optimizer": "adam", "momentum": 0.5}, "momentum applies to optimizer 'sgd' only")]:
        with pytest.raises(ValueError, match=match):  # refused before any step: the weights do not move
            train_local(model, data, _mech(_dp(1.0, 1.0, 0.1), 1), lr=1e-2, device="cpu", **kw)


def test_device_falls_back_to_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("cuda") == torch.device("cpu")
        assert resolve_device("auto") == torch.device("cpu")


# ---------------------------------------------------------------- real data (slow)

# The embedded copy (CC BY 4.0, attribution in atoll/data/README.md), byte-identical to ../shared's.
PNEUMONIA = Path(__file__).resolve().parents[1] / "atoll" / "data" / "pneumoniamnist_28.npz"


@pytest.mark.slow
@pytest.mark.parametrize("dp", [None, Mechanism(noise_multiplier=1.0, clip_norm=4.0, sample_rate=256 / 4708)])
def test_pneumoniamnist_auc(dp: Mechanism | None) -> None:
    from sklearn.metrics import roc_auc_score

    d = np.load(PNEUMONIA)
    perm = np.random.default_rng(0).permutation(len(d["train_labels"]))  # train is sorted by class

    def prep(a: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(a).float() / 255).unsqueeze(1)  # [0, 1], as client.ingest hands it over

    train = Split(prep(d["train_images"][perm]), torch.from_numpy(d["train_labels"][perm, 0]).long(), torch.arange(len(perm)))
    torch.manual_seed(0)
    model = build_model()
    train_local(model, train, _mech(dp, 150), lr=0.05, device="cpu", seed=0, reproducible_dp=True)
    model.eval()
    with torch.no_grad():
        prob = model(prep(d["test_images"])).softmax(1)[:, 1].numpy()
    assert roc_auc_score(d["test_labels"][:, 0], prob) > (0.9 if dp is None else 0.85)


def test_the_proximal_term_is_data_free_post_processing_of_the_private_step() -> None:
    """FedProx at a site: after each DP-SGD step w <- w - lr*mu*(w - w0). With the same DP randomness the
    proximal run equals the plain run shrunk towards w0 — the clipped, noised per-patient sum is untouched, so
    each patient still contributes one clipped gradient per step and the privacy charge is the same."""
    data = _toy()
    init = build_model("atollnet", channels=(8, 16), groups=4).state_dict()
    w0 = torch.cat([v.flatten() for v in init.values()])

    def one_step(mu: float) -> torch.Tensor:
        model = build_model("atollnet", channels=(8, 16), groups=4)
        model.load_state_dict(init)
        train_local(model, data, _mech(_dp(1.0, 1.0, 0.3), 1), lr=0.1, device="cpu", seed=3, reproducible_dp=True,
                    momentum=0.0, proximal_mu=mu)
        return torch.cat([p.detach().flatten() for p in model.state_dict().values()])

    plain, prox = one_step(0.0), one_step(2.0)
    assert not torch.equal(plain, prox)
    assert torch.allclose(prox - w0, (1 - 0.1 * 2.0) * (plain - w0), atol=1e-6)
    with pytest.raises(ValueError, match="proximal_mu"):
        one_step(-1.0)


# ---------------------------------------------------------------- recipe options: augmentation multiplicity, EMA


def _one_heavy_patient_among_blank_ones() -> tuple[Split, Split]:
    """Patient 0 has 16 random images; patients 1..7 one all-zero image each. A zero image is its own flip and
    shift, so the other patients' clipped terms are the same in both runs whatever views are drawn: the
    difference of the two sums is patient 0's contribution alone."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 16, 16, generator=g)
    heavy = base + 0.01 * torch.randn(16, 1, 16, 16, generator=g)
    with_p0 = Split(
        images=torch.cat([heavy, torch.zeros(7, 1, 16, 16)]),
        labels=torch.cat([torch.ones(16, dtype=torch.long), torch.randint(0, 2, (7,), generator=g)]),
        patients=torch.cat([torch.zeros(16, dtype=torch.long), torch.arange(1, 8)]),
    )
    without = Split(with_p0.images[16:], with_p0.labels[16:], with_p0.patients[16:] - 1)
    return with_p0, without


def _clipped_sum_k(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float, mode: str, k: int,
                   seed: int = 5) -> torch.Tensor:
    """Pre-noise clipped sum of the real private step with K augmented views (sigma = 0, lr = 0)."""
    step = PrivateStep(
        model, torch.optim.SGD(model.parameters(), lr=0.0), _dp(0.0, clip, 0.5), expected_batch_size=1,
        grad_sample_mode=mode, augment_multiplicity=k, augment_generator=torch.Generator().manual_seed(seed),
    )
    step.step(x, y)
    out = torch.cat([p.grad.flatten().clone() for p in model.parameters()])
    step.close()
    return out


@pytest.mark.parametrize("mode", ["auto", "fast"])  # auto -> Opacus' hooks for K > 1
def test_augment_multiplicity_keeps_one_clipped_term_per_patient(mode: str, monkeypatch) -> None:
    """K = 4 views of the sampled image, averaged before clipping: adding or removing patient 0 (16 images)
    changes the pre-noise sum by at most C. Clipping the views separately (no averaging) breaks that."""
    clip, k = 0.01, 4
    with_p0, without = _one_heavy_patient_among_blank_ones()
    torch.manual_seed(0)
    init = build_model("atollnet", channels=(8, 16), groups=4).state_dict()

    def run(data: Split) -> torch.Tensor:
        model = build_model("atollnet", channels=(8, 16), groups=4)
        model.load_state_dict(init)
        idx = _patient_batch(data)
        return _clipped_sum_k(model, data.images[idx], data.labels[idx], clip, mode, k)

    diff = (run(with_p0) - run(without)).norm()
    assert 0.9 * clip < diff <= clip * (1 + 1e-4)

    import privacy.dpsgd as dpsgd  # the same step with each view clipped on its own: K terms of norm C

    monkeypatch.setattr(dpsgd, "average_views", lambda grad_sample, k: grad_sample)
    assert (run(with_p0) - run(without)).norm() > 1.5 * clip


def test_augmented_clipped_sum_is_the_clipped_mean_of_the_views() -> None:
    """The real step's pre-noise sum equals sum_i clip_C(mean_k g_ik), with g_ik Opacus' per-sample gradients of
    the same K views (drawn again from the same generator): exact, for any images."""
    clip, k = 0.05, 3
    data = _toy(n_patients=6)
    idx = _patient_batch(data)
    x, y = data.images[idx], data.labels[idx]
    torch.manual_seed(1)
    model = build_model("atollnet", channels=(8, 16), groups=4)
    init = {n: v.clone() for n, v in model.state_dict().items()}
    got = _clipped_sum_k(model, x, y, clip, "auto", k, seed=9)

    from privacy.augment import augment_views

    model.load_state_dict(init)
    views = augment_views(x, k, torch.Generator().manual_seed(9))
    gs = _hooks_grad_samples(model, views, y.repeat_interleave(k))
    per_image = torch.cat([g.reshape(len(x), k, -1).mean(1) for g in gs.values()], dim=1)  # [B, params]
    factor = (clip / (per_image.norm(dim=1) + 1e-6)).clamp(max=1.0)
    want = (factor[:, None] * per_image).sum(0)
    # _hooks_grad_samples keeps named-parameter order; the step's p.grad follows model.parameters(): the same
    assert torch.allclose(got, want, atol=1e-6)


def test_augment_views_are_random_flips_and_shifts_of_each_image() -> None:
    from privacy.augment import augment_views

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 16, 16)
    v = augment_views(x, 8, g)
    assert v.shape == (24, 1, 16, 16)
    assert torch.equal(augment_views(x, 1, g), x)  # K = 1: the recipe without the option
    assert len({tuple(v[i].flatten()[:40].tolist()) for i in range(8)}) > 1  # the views differ
    for i in range(3):  # every view of image i is a flip and/or shift (|d| <= 2) of image i, zero-filled
        for view in v[i * 8:(i + 1) * 8]:
            found = False
            for img in (x[i], x[i].flip(-1)):
                for dy in range(-2, 3):
                    for dx in range(-2, 3):
                        shifted = torch.zeros_like(img)
                        src = img[:, max(0, dy):16 + min(0, dy), max(0, dx):16 + min(0, dx)]
                        shifted[:, max(0, -dy):16 - max(0, dy), max(0, -dx):16 - max(0, dx)] = src
                        found |= torch.equal(shifted, view)
            assert found
    vol = torch.randn(2, 1, 4, 5, 6)
    for view in augment_views(vol, 4, g)[:4]:
        flips = [d for d in ((), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3))]
        assert any(torch.equal(vol[0].flip(f) if f else vol[0], view) for f in flips)


def test_recipe_options_keep_the_charge_and_are_validated() -> None:
    """K views and the EMA change what is clipped or released, never (sigma, q, steps): train_local reports the
    mechanism and the step count it was given, and an empty Poisson batch stays a noise-only step."""
    mech = _mech(_dp(1.0, 1.0, 0.3), 3)
    for k, d in ((4, 0.0), (1, 0.9), (4, 0.9)):
        model = build_model("atollnet", channels=(8, 16), groups=4)
        r = train_local(model, _toy(), mech, lr=0.1, device="cpu", augment_multiplicity=k, ema_decay=d)
        assert (r.steps, r.mechanism, r.empty_steps) == (3, mech, 0) and math.isfinite(r.train_loss)
    empty = train_local(build_model("atollnet", channels=(8, 16), groups=4), _toy(), _mech(_dp(1.0, 1.0, 1e-9), 2),
                        lr=0.1, device="cpu", augment_multiplicity=4)
    assert empty.all_batches_empty and empty.steps == 2
    model = build_model("atollnet", channels=(8, 16), groups=4)
    for kwargs, match in (({"augment_multiplicity": 0}, "augment_multiplicity"),
                          ({"augment_multiplicity": 33}, "augment_multiplicity"),
                          ({"ema_decay": 1.0}, "ema_decay"), ({"ema_decay": -0.1}, "ema_decay"),
                          ({"augment_multiplicity": 2, "grad_sample_mode": "bk"}, "cannot average")):
        with pytest.raises(ValueError, match=match):
            train_local(model, _toy(), mech, lr=0.1, device="cpu", **kwargs)


def test_ema_is_computed_from_the_released_dp_iterates_only() -> None:
    """With sigma huge every iterate is noise-dominated; the EMA run releases exactly
    e_T with e_0 = w_0, e_t = d e_(t-1) + (1-d) w_t over the iterates w_t of the same (reproducible) DP run —
    a function of released iterates only, no gradient or data — and reports the same charge."""
    data, d, steps = _toy(), 0.6, 3
    init = build_model("atollnet", channels=(8, 16), groups=4).state_dict()
    mech = _dp(1000.0, 1.0, 0.3)

    def weights(t: int, decay: float) -> tuple[torch.Tensor, LocalTrainResult]:
        model = build_model("atollnet", channels=(8, 16), groups=4)
        model.load_state_dict(init)
        r = train_local(model, data, _mech(mech, t), lr=0.1, device="cpu", seed=4, reproducible_dp=True,
                        ema_decay=decay)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), r

    w0 = torch.cat([init[n].flatten() for n, _ in build_model("atollnet", channels=(8, 16), groups=4)
                    .named_parameters()])
    ema = w0.clone()
    for t in range(1, steps + 1):  # w_t: the released last iterate of a t-step run (same randomness prefix)
        ema = d * ema + (1 - d) * weights(t, 0.0)[0]
    got, result = weights(steps, d)
    plain, plain_result = weights(steps, 0.0)
    assert (plain - w0).norm() > 10 * (got - ema).norm() / (1 - d)  # the noise moved the weights a lot
    assert torch.allclose(got, ema, atol=1e-5)
    assert (result.steps, result.mechanism) == (plain_result.steps, plain_result.mechanism)
