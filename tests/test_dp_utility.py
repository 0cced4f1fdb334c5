"""Atoll's DP recipe learns: defaults agree everywhere, and patient-level DP-SGD on the embedded chest X-rays
beats the majority class at a small epsilon.

The failure this guards against is the one bench/utility.py showed before the recipe changed: under DP the
model predicted "pneumonia" for every test image (accuracy = the majority share, 0.625) while its AUC looked
fine. Accuracy at the 0.5 threshold is asserted, not only AUC.
"""

from __future__ import annotations

import dataclasses

import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from atoll.demo import DEMO_MODEL, demo_settings
from atoll.demo_data import load_embedded
from client.evaluation import evaluate_model
from models import build_model
from privacy.dpsgd import DEFAULT_MOMENTUM, DEFAULT_OPTIMIZER, train_local
from server.settings import RunSettings
from contract import Mechanism

def _dp(sigma: float, clip: float, q: float) -> Mechanism:
    """A DP-SGD mechanism (σ, C, q); the step count is set per call (:func:`_mech`)."""
    return Mechanism(noise_multiplier=sigma, clip_norm=clip, sample_rate=q)


def _mech(dp: Mechanism | None, steps: int) -> Mechanism:
    """``dp`` with ``steps`` steps; ``None`` = a non-DP run of ``steps`` steps."""
    return dataclasses.replace(dp or Mechanism(dp=False), steps=steps)


pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha"),
]
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Split:
    images: torch.Tensor
    labels: torch.Tensor
    patients: torch.Tensor


def test_recipe_defaults_agree_across_settings_pyproject_and_demo() -> None:
    """The lead's defaults live in RunSettings; pyproject's run config and `atoll demo` must not drift."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunSettings()
    from server.evaluate_run import EVALUATE_ID_KEY, EVALUATE_ROUND_KEY, EVALUATE_RUN_KEY  # evaluation mode's own

    evaluation_mode = {EVALUATE_RUN_KEY, EVALUATE_ROUND_KEY, EVALUATE_ID_KEY}
    assert {config[k] for k in evaluation_mode} == {"", 0}, "by default the ServerApp trains"
    config = {k: v for k, v in config.items() if k not in evaluation_mode}
    assert set(config) == set(defaults.to_run_config()), "pyproject's run config and RunSettings' keys differ"
    for key, value in defaults.to_run_config().items():
        assert config[key] == value, f"pyproject run config '{key}' = {config[key]!r} != RunSettings' {value!r}"
    demo = demo_settings(3, dp=True, run_dir=ROOT, keys_dir=ROOT, num_sites=3)
    assert (demo.task, demo.mechanism, demo.lr) == (defaults.task, defaults.mechanism, defaults.lr)
    # the demo's two documented recipe options (README "Recipe by recipe"), and nothing else of the recipe differs
    assert (demo.model, demo.server_options.decision_threshold) == (DEMO_MODEL, "validation") == ("scatternet",
                                                                                                   "validation")
    assert dataclasses.replace(demo.server_options, decision_threshold=defaults.server_options.decision_threshold) \
        == defaults.server_options
    assert demo_settings(3, dp=True, run_dir=ROOT, keys_dir=ROOT, num_sites=3,
                         overrides={"model": "atollnet"}).model == "atollnet", "--model still picks the network"
    assert (DEFAULT_OPTIMIZER, DEFAULT_MOMENTUM) == ("sgd", 0.9)


def test_demo_help_names_the_demos_network(capsys) -> None:
    """`atoll demo --help` says which network the X-ray demo trains (it differs from a lead's default run)."""
    from atoll.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    from atoll.demo3d import DEFAULTS as HIPPOCAMPUS_DEFAULTS

    assert f"default: {DEMO_MODEL} for the X-ray demo, {HIPPOCAMPUS_DEFAULTS['model']} for --task hippocampus" \
        in help_text, "the help names both demos' networks as the demos set them (it cannot import them: start-up)"


def _split(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 28, 28] -> [N, 1, 28, 28] in [0, 1] per image (as client.ingest's ScaleIntensityd)."""
    x = torch.from_numpy(images).float()
    lo, hi = x.amin((1, 2), keepdim=True), x.amax((1, 2), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).unsqueeze(1), torch.from_numpy(labels.reshape(-1)).long()


def test_dp_training_on_embedded_xrays_beats_the_majority_class() -> None:
    """Pooled training split (4708 images, one patient each), epsilon 2 at delta 1/(10 P), the default
    optimizer, lr and clip norm: held-out accuracy well above the 0.625 majority rate (~6 s)."""
    data = load_embedded()
    x, y = _split(data["train_images"], data["train_labels"])
    x_test, y_test = _split(data["test_images"], data["test_labels"])
    patients = len(y)
    q, steps, epsilon, delta = 0.03, 150, 2.0, 1 / (10 * patients)
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=q, steps=steps,
                                 accountant="rdp")
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    assert accountant.get_epsilon(delta) <= epsilon

    settings = RunSettings()
    torch.manual_seed(0)
    model = build_model()
    result = train_local(model, Split(x, y, torch.arange(patients)), _mech(_dp(sigma, settings.mechanism.clip_norm, q), steps), lr=settings.lr, device="cpu", seed=0, reproducible_dp=True)
    assert result.steps == steps
    m = evaluate_model(model, x_test, y_test, torch.device("cpu"))
    majority = max(float(y_test.float().mean()), 1 - float(y_test.float().mean()))
    assert majority == pytest.approx(0.625)
    # seeds 0-2 gave ACC 0.81-0.82 / AUC 0.92-0.93; the former recipe (Adam, classifier bias, raw [0, 1]
    # input) stayed at 0.625 here
    assert m["accuracy"] > majority + 0.10, m
    assert m["auc"] > 0.88, m
