"""The site-side recipe options (augment-multiplicity, ema-decay) as data: run config -> round config -> the
manifest a site approves -> the privacy charge, which they must not change. (The training claims themselves —
one clipped term per patient with K views, the EMA as a function of released iterates — are in
tests/test_dpsgd.py, on the real Opacus step.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from client.approval import ManifestError, RunManifest, describe_manifest, manifest_hash
from client.manifest import build_run_manifest
from contract import TaskSpec
from contract.wire import RoundConfig
from privacy.guard import BudgetGuard, RoundRequest
from privacy.ledger import SiteLedger
from privacy.policy import SitePolicy
from server.settings import RunSettings, SettingsError

RUN_DIR = "/tmp/atoll-recipe-options-test"  # absolute, never created: check() only needs its form


def _settings(**kw) -> RunSettings:
    return RunSettings.from_run_config({"run-dir": RUN_DIR, **kw})


@pytest.mark.parametrize(("key", "value", "match"), [
    ("augment-multiplicity", 0, r"'augment-multiplicity' must be a whole number in \[1, 32\]"),
    ("augment-multiplicity", 33, "'augment-multiplicity' must be"),
    ("augment-multiplicity", 2.5, "'augment-multiplicity' must be int"),
    ("ema-decay", 1.0, r"'ema-decay' must be in \[0, 1\)"),
    ("ema-decay", -0.1, "'ema-decay' must be"),
    ("ema-decay", "0.9", "'ema-decay' must be float"),
])
def test_bad_recipe_values_are_refused_before_any_round(key: str, value, match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        _settings(**{key: value})


def test_augmentation_is_refused_for_segmentation() -> None:
    with pytest.raises(SettingsError, match="'augment-multiplicity' must be 1 for task 'segmentation'"):
        _settings(**{"augment-multiplicity": 4, "task": "segmentation", "labels": "hippocampus", "classes": ""})


def test_options_travel_to_the_site_and_into_the_manifest_it_approves() -> None:
    s = _settings(**{"augment-multiplicity": 4, "ema-decay": 0.95})
    cfg = RoundConfig.from_record(s.round_config("run-a", 2).to_record())  # what the ClientApp parses
    assert (cfg.augment_multiplicity, cfg.ema_decay) == (4, 0.95)
    manifest = build_run_manifest(cfg, app_hash="0" * 64)
    assert RunManifest.from_dict(manifest.to_dict()) == manifest
    assert manifest.training.to_dict()["augment_multiplicity"] == 4
    text = describe_manifest(manifest)
    assert "4 augmented views per image" in text and "moving average (decay 0.95)" in text
    # A site that approved the plain run has not approved these options (and vice versa).
    plain = build_run_manifest(RoundConfig.from_record(_settings().round_config("run-a", 2).to_record()),
                               app_hash="0" * 64)
    assert manifest_hash(plain) != manifest_hash(manifest)
    # Defaults stay out of the manifest: hashes approved before the options existed do not change.
    assert set(plain.training.to_dict()) == {"batch_size", "lr", "proximal_mu"}
    bad = manifest.to_dict()
    bad["training"]["ema_decay"] = 1.5
    with pytest.raises(ManifestError, match="training.ema_decay"):
        RunManifest.from_dict(bad)


def test_the_ledger_charges_the_same_epsilon_with_or_without_the_options(tmp_path: Path) -> None:
    """The charge is (sigma, q, steps) of the round's Mechanism; the options are training parameters, so the
    real budget guard writes the same write-ahead charge for a plain and an optioned round."""
    charged = []
    for i, kw in enumerate(({}, {"augment-multiplicity": 8, "ema-decay": 0.99})):
        cfg = RoundConfig.from_record(_settings(**kw).round_config("run-a", 1).to_record())
        guard = BudgetGuard(SiteLedger(tmp_path / f"s{i}" / "ledger.jsonl", site=f"site-{i}"),
                            SitePolicy.from_table({"max_epsilon": 50.0}), num_patients=500)
        res = guard.reserve(RoundRequest(cfg.run_id, cfg.server_round, cfg.mechanism), weights_in_sha256="a" * 64)
        charged.append((cfg.mechanism, res.epsilon_after, guard.history()))
    assert charged[0] == charged[1] and charged[0][1] > 0
    assert TaskSpec() == cfg.task
