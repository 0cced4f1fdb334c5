"""The round config both sides parse, and the lead's run settings, reject bad values by name."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from contract import Mechanism, TaskSpec
from contract.wire import RoundConfig
from server.settings import RunSettings, SettingsError


def test_round_config_round_trips_through_a_flower_record():
    cfg = RoundConfig(run_id="r1", server_round=2, lr=0.1, mechanism=Mechanism(dp=False, steps=7),
                      task=TaskSpec(classes=("a", "b", "c"), size=(32, 32)))
    assert RoundConfig.from_record(cfg.to_record()) == cfg
    seg = RoundConfig(run_id="r1", server_round=1, model="basicunet",
                      task=TaskSpec(kind="segmentation", classes=(), labels=("anterior", "posterior"),
                                    spatial_dims=3, size=(32, 48, 32), spacing_mm=(1.0, 1.0, 1.5),
                                    orientation="RAS"))
    assert RoundConfig.from_record(seg.to_record()) == seg


def test_round_config_names_the_missing_or_mistyped_field():
    with pytest.raises(ValueError, match="run-id"):
        RoundConfig.from_record(ConfigRecord({"server-round": 1}))
    rec = RoundConfig(run_id="r", server_round=1).to_record()
    rec["local-steps"] = "many"
    with pytest.raises(ValueError, match="local-steps"):
        RoundConfig.from_record(rec)


def test_settings_from_flower_run_config(tmp_path):
    s = RunSettings.from_run_config({"num-server-rounds": 2, "run-dir": str(tmp_path), "lr": 1, "dp": False,
                                     "classes": "normal,viral,bacterial", "image-size": 32})
    assert s.num_server_rounds == 2 and s.lr == 1.0 and s.mechanism.dp is False
    assert s.task.classes == ("normal", "viral", "bacterial") and s.task.size == (32, 32)
    rc = s.round_config("run-x", 2)
    assert rc.run_id == "run-x" and rc.server_round == 2 and rc.lr == 1.0
    assert rc.task is s.task and rc.mechanism is s.mechanism  # one object, never a field-by-field copy
    assert RunSettings.from_run_config(s.to_run_config()) == s


@pytest.mark.parametrize("key,value,match", [
    ("num-server-rounds", 0, "num-server-rounds"),
    ("lr", "fast", "lr"),
    ("dp", 1, "dp"),
    ("run-dir", "relative/dir", "absolute"),
    ("noise-multiplier", 0.0, "noise-multiplier"),
    ("sample-rate", 1.5, "sample-rate"),
    ("local-steps", 0, "local-steps"),
    ("accountant", "gdp", "accountant"),
    ("task", "detection", "task"),
    ("classes", "pneumonia", "at least 2"),
    ("classes", "Normal,Pneumonia", "lowercase"),
    ("classes", "a,a", "distinct"),
    ("spatial-dims", 4, "spatial-dims"),
    ("image-size", "28,28,28", "image-size"),
    ("modalities", "CR;DX", "modality"),
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
    sent = RunSettings(run_dir="/srv/runs", num_server_rounds=4, mechanism=Mechanism(steps=7))
    site_view = build_run_manifest(sent.round_config("any", 3))
    assert manifest_hash(load_manifest(out)) == manifest_hash(site_view)
    other = build_run_manifest(RunSettings(run_dir="/srv/runs", num_server_rounds=4,
                                           mechanism=Mechanism(steps=8)).round_config("any", 3))
    assert manifest_hash(other) != manifest_hash(site_view), "a changed DP parameter needs a new approval"
    three = build_run_manifest(RunSettings(run_dir="/srv/runs", num_server_rounds=4, mechanism=Mechanism(steps=7),
                                           task=TaskSpec(classes=("normal", "viral", "bacterial"))
                                           ).round_config("any", 3))
    assert manifest_hash(three) != manifest_hash(site_view), "a changed task needs a new approval"
    assert three.task.to_manifest()["classes"] == ["normal", "viral", "bacterial"]
    assert load_manifest(out).to_dict()["task"] == {"kind": "classification", "spatial_dims": 2, "in_channels": 1,
                                                    "size": [28, 28], "modalities": [], "loss": "cross_entropy",
                                                    "classes": ["normal", "pneumonia"]}
    masked = tmp_path / "masked.json"
    assert main(["run", "manifest", "--out", str(masked), "--rounds", "4", "--local-steps", "7", "--secagg"]) == 0
    secagg_view = build_run_manifest(RunSettings(run_dir="/srv/runs", num_server_rounds=4, secagg=True,
                                                 mechanism=Mechanism(steps=7)).round_config("any", 3))
    assert manifest_hash(load_manifest(masked)) == manifest_hash(secagg_view) != manifest_hash(site_view)


def test_round_config_defaults_are_the_run_settings_defaults():
    """A field missing from a round's config must not silently fall back to a different recipe."""
    settings = RunSettings()
    bare = RoundConfig(run_id="r", server_round=1)
    for name in ("model", "lr", "batch_size", "seed", "secagg", "task", "mechanism"):
        assert getattr(bare, name) == getattr(settings, name), name
    minimal = RoundConfig.from_record(ConfigRecord({"run-id": "r", "server-round": 1}))
    assert (minimal.task, minimal.mechanism) == (settings.task, settings.mechanism)


def test_the_mechanism_and_task_are_spelt_out_once():
    """No module re-declares the mechanism's or the task's fields: every user holds the one type."""
    import dataclasses

    from client.approval import RunManifest, TrainingParams
    from privacy.guard import RoundRequest

    mech = {f.name for f in dataclasses.fields(Mechanism)} - {"dp"}
    task = {f.name for f in dataclasses.fields(TaskSpec)} - {"kind"}
    for cls in (RunSettings, RoundConfig, RoundRequest, RunManifest, TrainingParams):
        names = {f.name for f in dataclasses.fields(cls)}
        assert not names & mech, f"{cls.__name__} copies mechanism fields {names & mech}"
        assert not names & task - {"size"}, f"{cls.__name__} copies task fields {names & task}"


@pytest.mark.parametrize("changes,match", [
    ({"strategy": "fedprox"}, "with mu = 0 FedProx trains exactly like FedAvg"),
    ({"strategy": "fedavg", "proximal-mu": 0.1}, "applies to strategy \"fedprox\" only"),
    ({"strategy": "krum"}, "with 0 its robustness guarantee never applies"),
    ({"strategy": "bulyan"}, "num-malicious"),
    ({"strategy": "fedmedian", "num-malicious": 1}, "applies to krum, multikrum and bulyan only"),
])
def test_strategy_settings_that_would_silently_do_nothing_are_refused(tmp_path, changes, match):
    with pytest.raises(SettingsError, match=match):
        RunSettings.from_run_config({"run-dir": str(tmp_path), **changes})


def test_fedprox_and_krum_settings_reach_the_strategy_and_the_manifest(tmp_path):
    from client.approval import describe_manifest, manifest_hash
    from client.manifest import build_run_manifest
    from server.app import build_strategy

    prox = RunSettings.from_run_config({"run-dir": str(tmp_path), "strategy": "fedprox", "proximal-mu": 0.01})
    assert build_strategy(prox).proximal_mu == 0.01
    cfg = RoundConfig.from_record(prox.round_config("r", 1).to_record())
    assert (cfg.strategy, cfg.proximal_mu) == ("fedprox", 0.01)  # what the ClientApp trains with
    m = build_run_manifest(cfg)
    assert m.training.proximal_mu == 0.01 and m.aggregation.strategy == "fedprox"
    assert "FedProx proximal term mu=0.01" in describe_manifest(m)
    other = build_run_manifest(RunSettings.from_run_config({"run-dir": str(tmp_path), "strategy": "fedprox",
                                                            "proximal-mu": 0.1}).round_config("r", 1))
    assert manifest_hash(other) != manifest_hash(m), "a site approves the proximal weight"

    krum = RunSettings.from_run_config({"run-dir": str(tmp_path), "strategy": "krum", "num-malicious": 1,
                                        "min-sites": 5})
    assert build_strategy(krum).num_malicious_nodes == 1
    km = build_run_manifest(krum.round_config("r", 1))
    assert km.aggregation.to_dict() == {"strategy": "krum", "num_malicious": 1}
    assert "krum, tolerating 1 malicious site(s)" in describe_manifest(km)
    from server.robust import StrategyError

    with pytest.raises(StrategyError, match="n >= 2f \\+ 3"):  # three hospitals cannot tolerate one with Krum
        build_strategy(RunSettings.from_run_config({"run-dir": str(tmp_path), "strategy": "krum",
                                                    "num-malicious": 1, "min-sites": 3}))
