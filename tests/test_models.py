"""models/: networks by name, Opacus compatibility, canonical weight hashing, export."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from monai.networks import nets
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from models import MODEL_KINDS, MODEL_NAMES, build_model, export_model, load_exported, make_dp_compatible, state_dict_sha256
from privacy.dpsgd import PrivateStep
from contract import Mechanism

def _dp(sigma: float, clip: float, q: float) -> Mechanism:
    """A DP-SGD mechanism (σ, C, q); the step count is set per call (:func:`_mech`)."""
    return Mechanism(noise_multiplier=sigma, clip_norm=clip, sample_rate=q)



# torch warns that the first layer's full backward hook fires although its input needs no gradient
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

# Smallest input each network accepts (DenseNet/ResNet downsample 32x).
SIZE = {"atollnet": 16, "atollnet-wide": 16, "atollnet-ws": 16, "scatternet": 16, "densenet121": 32, "resnet10": 32, "resnet18": 32, "resnet34": 32}


def _one_dp_step(model: nn.Module, x: torch.Tensor, mode: str = "hooks") -> None:
    """One real Opacus DP-SGD step; asserts every weight moved and stayed finite."""
    before = [p.detach().clone() for p in model.parameters()]
    step = PrivateStep(
        model, torch.optim.SGD(model.parameters(), lr=0.1), _dp(1.0, 1.0, 0.5),
        expected_batch_size=2, grad_sample_mode=mode,
    )
    loss = step.step(x, torch.tensor([0, 1] * (len(x) // 2)))
    step.close()
    assert loss is not None and torch.isfinite(torch.tensor(loss))
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(p).all()
        assert not torch.equal(p, b)  # noise reaches every parameter


def test_required_names_present() -> None:
    assert {"atollnet", "densenet121", "resnet18"} <= set(MODEL_NAMES)


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if MODEL_KINDS[n] == "classification"])
def test_builds_2d_validates_and_takes_a_dp_step(name: str) -> None:
    model = build_model(name, spatial_dims=2, in_channels=1, num_classes=2)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) is True for m in model.modules())
    x = torch.randn(2, 1, SIZE[name], SIZE[name])
    assert model(x).shape == (2, 2)
    _one_dp_step(model, x)


@pytest.mark.parametrize("name", ["atollnet", "resnet10", "resnet18"])
def test_builds_3d_and_takes_a_dp_step(name: str) -> None:
    model = build_model(name, spatial_dims=3, num_classes=3)
    assert ModuleValidator.validate(model, strict=False) == []
    x = torch.randn(2, 1, 16, 16, 16)
    assert model(x).shape == (2, 3)
    _one_dp_step(model, x)


def test_scalespace_trains_only_its_small_head_on_fixed_features() -> None:
    """The DP segmentation network: a few hundred trainable parameters, all in the state dict (what sites hash and
    exchange); the fixed Gaussian kernels are not. Its features depend on the input and the grid only."""
    from contract import TaskSpec
    from models import build_task_model

    task = TaskSpec(kind="segmentation", spatial_dims=3, classes=(), labels=("a", "b"), size=(8, 12, 8))
    model = build_task_model("scalespace", task)
    assert MODEL_KINDS["scalespace"] == "segmentation" and MODEL_KINDS["resnet10"] == "classification"
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) < 1000
    assert set(model.state_dict()) == set(params)  # no buffer travels
    x = torch.randn(2, 1, 8, 12, 8)
    assert model(x).shape == (2, 3, 8, 12, 8)
    f1 = model.features(x)
    assert f1.shape[1] == model.num_features
    other = build_task_model("scalespace", task)  # other trained weights, same fixed features
    torch.testing.assert_close(other.features(x), f1)
    assert torch.isfinite(f1).all()
    with pytest.raises(ValueError, match="segmentation network"):
        build_task_model("scalespace", TaskSpec(kind="classification", classes=("a", "b")))


def test_default_net_takes_a_step_in_atolls_default_mode() -> None:
    from privacy.dpsgd import DEFAULT_GRAD_SAMPLE_MODE

    model = build_model()
    _one_dp_step(model, torch.randn(4, 1, 28, 28), mode=DEFAULT_GRAD_SAMPLE_MODE)
    assert type(model.features[0].conv) is nn.Conv2d  # layer classes restored after private training


def test_default_net_is_resolution_independent_and_small() -> None:
    model = build_model("atollnet")
    assert sum(p.numel() for p in model.parameters()) < 100_000
    assert model(torch.randn(2, 1, 28, 28)).shape == model(torch.randn(2, 1, 64, 64)).shape == (2, 2)


def test_atollnet_centres_its_input_range_and_has_no_classifier_bias() -> None:
    torch.manual_seed(0)
    model = build_model("atollnet")
    assert model.classifier.bias is None
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}  # weights only: no buffers
    raw = build_model("atollnet", input_range=None)
    raw.load_state_dict(model.state_dict())
    model.eval(), raw.eval()
    x = torch.rand(3, 1, 28, 28)  # client.ingest hands over [0, 1]
    torch.testing.assert_close(model(x), raw((x - 0.5) / 0.25))
    shifted = build_model("atollnet", input_range=(-1.0, 3.0))
    shifted.load_state_dict(model.state_dict())
    shifted.eval()
    torch.testing.assert_close(shifted(x), raw((x - 1.0) / 1.0))
    assert build_model("atollnet", classifier_bias=True).classifier.bias is not None
    with pytest.raises(ValueError, match="input_range"):
        build_model("atollnet", input_range=(1.0, 1.0))


def test_monai_resnet_needs_the_inplace_fix() -> None:
    """Without make_dp_compatible's out-of-place residual, Opacus' hooks fail on MONAI's ResNet."""
    raw = ModuleValidator.fix(nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=2))  # BN -> GN only
    gsm = GradSampleModule(raw, loss_reduction="sum")
    with pytest.raises(RuntimeError, match="inplace|in-place|view"):
        gsm(torch.randn(2, 1, 32, 32)).sum().backward()
    gsm.to_standard_module()
    fixed = make_dp_compatible(raw)
    gsm = GradSampleModule(fixed, loss_reduction="sum")
    gsm(torch.randn(2, 1, 32, 32)).sum().backward()
    assert all(p.grad_sample.shape[0] == 2 for p in fixed.parameters())


def test_make_dp_compatible_keeps_state_dict_keys() -> None:
    raw = nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=2, norm=("group", {"num_groups": 32}))
    keys = set(raw.state_dict())
    assert set(make_dp_compatible(raw).state_dict()) - keys == set()


def test_unknown_name_and_bad_dims_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'.*atollnet"):
        build_model("vgg")
    with pytest.raises(ValueError, match="spatial_dims"):
        build_model("atollnet", spatial_dims=4)


def test_state_dict_sha256_is_canonical() -> None:
    sd = {"b": torch.arange(4, dtype=torch.float32), "a": torch.ones(2, 2)}
    digest = state_dict_sha256(sd)
    assert digest == state_dict_sha256(dict(reversed(list(sd.items()))))  # order-independent
    # pinned: the canonical encoding is part of the ledger format and must not drift silently;
    # spelled out independently: per sorted name, len-prefixed JSON [name, dtype, shape], len-prefixed bytes
    h = hashlib.sha256()
    for name in ("a", "b"):
        t = sd[name]
        header = json.dumps([name, "float32", list(t.shape)]).encode()
        data = t.numpy().tobytes()
        h.update(len(header).to_bytes(8, "big") + header + len(data).to_bytes(8, "big") + data)
    assert digest == h.hexdigest() == "470c064ad8f058e19f6e0c01e7fb6da245394429e1da40821c5f2101928d7df5"
    last_bit = sd["b"].clone()
    last_bit[3] = torch.nextafter(last_bit[3], torch.tensor(9.0))
    changed = [
        {"b": sd["b"], "a2": sd["a"]},  # name
        {"b": sd["b"].double(), "a": sd["a"]},  # dtype
        {"b": sd["b"].reshape(2, 2), "a": sd["a"]},  # shape
        {"b": last_bit, "a": sd["a"]},  # last bit of one value
    ]
    assert len({state_dict_sha256(c) for c in changed} | {digest}) == 5


def test_state_dict_sha256_of_model_is_stable_and_weight_sensitive() -> None:
    torch.manual_seed(0)
    m = build_model()
    d = state_dict_sha256(m.state_dict())
    assert d == state_dict_sha256({k: v.clone() for k, v in m.state_dict().items()})
    with torch.no_grad():
        m.classifier.weight[0, 0] += 1
    assert state_dict_sha256(m.state_dict()) != d


def test_export_roundtrip_and_corruption(tmp_path) -> None:
    m = build_model("atollnet", num_classes=3)
    path = tmp_path / "out" / "model.pt"
    digest = export_model(m, path, name="atollnet", metadata={"spatial_dims": 2, "in_channels": 1, "num_classes": 3})
    loaded, meta = load_exported(path)
    assert meta["num_classes"] == 3
    assert state_dict_sha256(loaded.state_dict()) == digest == state_dict_sha256(m.state_dict())
    x = torch.randn(2, 1, 28, 28)
    m.eval(), loaded.eval()
    assert torch.equal(m(x), loaded(x))
    # tamper with one weight -> the recorded hash no longer matches
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["classifier.weight"] += 1
    torch.save(payload, path)
    with pytest.raises(ValueError, match="sha256"):
        load_exported(path)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.pt"):
        load_exported(tmp_path / "junk.pt")
