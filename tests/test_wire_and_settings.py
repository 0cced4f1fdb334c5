"""The round config both sides parse, and the lead's run settings, reject bad values by name."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from atoll.wire import RoundConfig
from server.settings import RunSettings, SettingsError


def test_round_config_round_trips_through_a_flower_record():
    cfg = RoundConfig(run_id="r1", server_round=2, local_steps=7, lr=0.1, dp=False)
    assert RoundConfig.from_record(cfg.to_record()) == cfg


def test_round_config_names_the_missing_or_mistyped_field():
    with pytest.raises(ValueError, match="run-id"):
        RoundConfig.from_record(ConfigRecord({"server-round": 1}))
    rec = RoundConfig(run_id="r", server_round=1).to_record()
    rec["local-steps"] = "many"
    with pytest.raises(ValueError, match="local-steps"):
        RoundConfig.from_record(rec)


def test_settings_from_flower_run_config(tmp_path):
    s = RunSettings.from_run_config({"num-server-rounds": 2, "run-dir": str(tmp_path), "lr": 1, "dp": False})
    assert s.num_server_rounds == 2 and s.lr == 1.0 and s.dp is False
    rc = s.round_config("run-x", 2)
    assert rc.run_id == "run-x" and rc.server_round == 2 and rc.lr == 1.0


@pytest.mark.parametrize("key,value,match", [
    ("num-server-rounds", 0, "num-server-rounds"),
    ("lr", "fast", "lr"),
    ("dp", 1, "dp"),
    ("run-dir", "relative/dir", "absolute"),
    ("noise-multiplier", 0.0, "noise-multiplier"),
])
def test_bad_settings_are_rejected_before_any_round(tmp_path, key, value, match):
    cfg = {"run-dir": str(tmp_path), key: value}
    with pytest.raises(SettingsError, match=match):
        RunSettings.from_run_config(cfg)


def test_lead_manifest_is_the_one_sites_recompute(tmp_path):
    """`atoll run manifest` with its defaults = what the sites recompute from what the ServerApp sends."""
    from atoll.cli import main
    from client.approval import load_manifest, manifest_hash
    from client.manifest import build_run_manifest

    out = tmp_path / "run-manifest.json"
    assert main(["run", "manifest", "--out", str(out), "--rounds", "4", "--local-steps", "7"]) == 0
    sent = RunSettings(run_dir="/srv/runs", num_server_rounds=4, local_steps=7)
    site_view = build_run_manifest(sent.round_config("any", 3))
    assert manifest_hash(load_manifest(out)) == manifest_hash(site_view)
    other = build_run_manifest(RunSettings(run_dir="/srv/runs", num_server_rounds=4, local_steps=8).round_config("any", 3))
    assert manifest_hash(other) != manifest_hash(site_view), "a changed DP parameter needs a new approval"
    masked = tmp_path / "masked.json"
    assert main(["run", "manifest", "--out", str(masked), "--rounds", "4", "--local-steps", "7", "--secagg"]) == 0
    secagg_view = build_run_manifest(RunSettings(run_dir="/srv/runs", num_server_rounds=4, local_steps=7,
                                                 secagg=True).round_config("any", 3))
    assert manifest_hash(load_manifest(masked)) == manifest_hash(secagg_view) != manifest_hash(site_view)


def test_round_config_defaults_are_the_run_settings_defaults():
    """A field missing from a round's config must not silently fall back to a different recipe."""
    from dataclasses import fields

    settings = RunSettings()
    for f in fields(RoundConfig):
        if f.name in ("run_id", "server_round", "num_rounds", "prev_digest"):  # per run / per round, not a setting
            continue
        assert f.default == getattr(settings, f.name), f.name
