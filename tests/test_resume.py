"""Crash-consistent resume, as logic: the checkpoint round trip, setting an unfinished round aside, the refusals.

The run folder is written by the real server.outputs.RunOutputs (signed digests, consortium ledger copy, weights,
history) and reopened by the real server.resume; the deployment test (tests/test_resume_deployment.py) kills real
processes around it.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM

from atoll.cli import main
from server import checkpoint as ck
from server.outputs import RunFolderError, RunOutputs
from server.resume import ResumeRefused, resume_run
from server.settings import RunSettings


def _settings(tmp_path, **kw) -> RunSettings:
    return RunSettings(**{"run_dir": str(tmp_path / "runs"), "run_name": "r1", "num_server_rounds": 3, **kw})


def _arrays(seed: int) -> ArrayRecord:
    g = torch.Generator().manual_seed(seed)
    return ArrayRecord({"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)})


def _append_line(path, rec: dict | bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(rec if isinstance(rec, bytes) else json.dumps(rec).encode() + b"\n")


class _Book:
    def __init__(self, rnd: int) -> None:
        self.rnd = rnd

    def as_dict(self) -> dict:
        return {"round": self.rnd, "sites": {"hospital-a": {"status": "contributed"}}, "aggregated": {}}


def _round(out: RunOutputs, settings, strategy, rnd: int, *, commit: bool = True) -> None:
    """What the ServerApp writes for one round: the site record, the signed digest, weights, history, checkpoint."""
    _append_line(out.root / "ledger.jsonl", {"site": "hospital-a", "seq": 2 * rnd - 1, "server_round": rnd})
    arrays = _arrays(rnd)
    out.digest(rnd, arrays, [])
    sha = out.save_weights(rnd, arrays)
    out.record_round(_Book(rnd), 1.0)
    if commit:
        out.commit(rnd, sha, strategy, settings)


def _started(tmp_path, strategy=None, **kw) -> tuple[RunOutputs, RunSettings, object]:
    settings = _settings(tmp_path, **kw)
    strategy = strategy or FedAvgM(server_momentum=0.9)
    out = RunOutputs.create(tmp_path / "runs", "r1", settings, flower_run_id=11)
    out.digest(0, _arrays(0), [])
    out.commit(0, out.save_weights(0, _arrays(0)), strategy, settings)
    return out, settings, strategy


def test_strategy_and_rng_state_round_trip(tmp_path):
    adam = FedAdam()
    adam.current_arrays = {"w": np.arange(6, dtype=np.float32).reshape(3, 2)}
    adam.m_t = {"w": np.full((3, 2), 0.25, dtype=np.float32)}
    adam.v_t = {"w": np.full((3, 2), 0.5, dtype=np.float32)}
    avgm = FedAvgM(server_momentum=0.9)
    avgm.current_arrays = _arrays(1)
    avgm.momentum_vector = [np.ones((3, 2), dtype=np.float32), np.zeros(2, dtype=np.float32)]
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    sha_a = ck.save_state(tmp_path / "a.pt", adam)
    sha_m = ck.save_state(tmp_path / "m.pt", avgm)
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)

    fresh_adam, fresh_avgm = FedAdam(), FedAvgM(server_momentum=0.9)
    state = ck.load_state(tmp_path / "a.pt", sha_a)
    ck.load_strategy_state(fresh_adam, state["strategy"])
    ck.load_strategy_state(fresh_avgm, ck.load_state(tmp_path / "m.pt", sha_m)["strategy"])
    ck.restore_rng(state["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want
    for name in ("current_arrays", "m_t", "v_t"):
        assert np.array_equal(getattr(fresh_adam, name)["w"], getattr(adam, name)["w"])
    assert fresh_avgm.current_arrays.to_torch_state_dict()["w"].equal(avgm.current_arrays.to_torch_state_dict()["w"])
    assert all(np.array_equal(a, b) for a, b in zip(fresh_avgm.momentum_vector, avgm.momentum_vector))
    with pytest.raises(ck.CheckpointError, match="does not match the SHA-256"):
        (tmp_path / "m.pt").write_bytes((tmp_path / "m.pt").read_bytes() + b"x")
        ck.load_state(tmp_path / "m.pt", sha_m)


def test_resume_sets_the_unfinished_round_aside_and_goes_on_from_the_checkpoint(tmp_path):
    out, settings, strategy = _started(tmp_path)
    _round(out, settings, strategy, 1)
    point = ck.read_checkpoint(out.root)
    assert point.round == 1 and point.weights == "round-001.pt" and point.history_rounds == 1
    committed = {f: (out.root / f).read_bytes() for f in ("digests.jsonl", "ledger.jsonl", "history.json")}
    strategy.momentum_vector = [np.full((3, 2), 7.0, dtype=np.float32)]  # changed after the commit: not restored
    _round(out, settings, strategy, 2, commit=False)       # killed after round 2's history, before its checkpoint
    _append_line(out.root / "ledger.jsonl", b'{"site": "hospital-a", "se')  # and a torn last line
    out.close()

    resumed = resume_run(tmp_path / "runs", "r1", settings, flower_run_id=12)
    root = resumed.outputs.root
    assert {f: (root / f).read_bytes() for f in committed} == committed
    assert resumed.outputs.history == json.loads(committed["history.json"])
    assert resumed.outputs.digests.last_hash == point.last_digest and len(resumed.outputs.digests.records) == 2
    assert not (root / "weights" / "round-002.pt").exists()
    aside = root / "resumed" / "1"
    assert (aside / "weights" / "round-002.pt").exists()
    assert json.loads((aside / "history.json").read_text())[0]["round"] == 2
    assert resumed.set_aside["ledger.jsonl"] == 2 and resumed.set_aside["digests.jsonl"] == 1
    log = [json.loads(line) for line in (root / "resumes.jsonl").read_text().splitlines()]
    assert log[-1]["from_round"] == 1 and log[-1]["previous_flower_run_id"] == 11
    assert resumed.state["strategy"]["momentum_vector"] is None  # round 1's state, not the unfinished round's
    assert json.loads((root / "server.json").read_text())["flower_run_id"] == 12
    # the resumed run is the same run: its next digest chains onto the committed one
    resumed.outputs.digest(2, _arrays(2), [])
    assert resumed.outputs.digests.records[-1]["prev"] == point.last_digest
    with pytest.raises(RunFolderError, match="another ServerApp"):  # one writer at a time
        resume_run(tmp_path / "runs", "r1", settings, flower_run_id=13)


def test_resume_refuses_what_would_not_be_the_same_run(tmp_path):
    out, settings, strategy = _started(tmp_path)
    _round(out, settings, strategy, 1)
    out.close()
    runs = tmp_path / "runs"
    with pytest.raises(ResumeRefused, match="settings differ.*num_server_rounds: 3 -> 4"):
        resume_run(runs, "r1", _settings(tmp_path, num_server_rounds=4), 2)
    with pytest.raises(ResumeRefused, match="no run 'r2'"):
        resume_run(runs, "r2", settings, 2)
    ledger = out.root / "ledger.jsonl"
    good = ledger.read_bytes()
    ledger.write_bytes(good.replace(b'"seq": 1', b'"seq": 9'))
    with pytest.raises(ResumeRefused, match="altered after round 1"):
        resume_run(runs, "r1", settings, 2)
    ledger.write_bytes(good)
    torch.save(_arrays(99).to_torch_state_dict(), out.weights_path(1))
    with pytest.raises(ResumeRefused, match="not the model the checkpoint committed"):
        resume_run(runs, "r1", settings, 2)
    out.save_weights(1, _arrays(1))
    (out.root / "status.json").write_text(json.dumps({"status": "completed", "rounds": 1}))
    with pytest.raises(ResumeRefused, match="completed"):
        resume_run(runs, "r1", settings, 2)
    (out.root / "status.json").write_text(json.dumps({"status": "stopped", "rounds": 1}))
    assert resume_run(runs, "r1", settings, 2).set_aside == {"status.json": True}  # a stopped run goes on


def test_start_refuses_an_existing_run_and_points_to_resume(tmp_path, monkeypatch, capsys):
    out, settings, strategy = _started(tmp_path)
    _round(out, settings, strategy, 1)
    out.finish("stopped", "round 2: only 1 site(s) contributed")
    before = {f: (out.root / f).read_bytes() for f in ("settings.json", "status.json", "history.json")}
    with pytest.raises(RunFolderError, match="atoll run resume"):
        RunOutputs.create(tmp_path / "runs", "r1", settings, flower_run_id=99)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))  # no connection needed: refused before it is looked up
    code = main(["run", "start", "--run-dir", str(tmp_path / "runs"), "--run-name", "r1"])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err and f"atoll run resume {out.root}" in err
    assert {f: (out.root / f).read_bytes() for f in before} == before


def test_resume_cli_resubmits_the_same_run(tmp_path, monkeypatch, capsys):
    import socket

    import server.run_cli as run_cli

    out, settings, strategy = _started(tmp_path, keys_dir="")
    _round(out, settings, strategy, 1)
    assert main(["run", "resume", str(out.root)]) == 1  # its ServerApp (this process) is alive: still running
    assert "still running" in capsys.readouterr().err
    (out.root / "server.json").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        (tmp_path / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = '
                                              f'"127.0.0.1:{srv.getsockname()[1]}"\ninsecure = true\n')
        monkeypatch.setenv("FLWR_HOME", str(tmp_path))
        calls: list = []
        monkeypatch.setattr(run_cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
        assert main(["run", "resume", str(out.root), "--allow-insecure-demo"]) == 0
    text = capsys.readouterr().out
    assert "resuming after round 1 of 3" in text and "rounds 2-3 to go" in text
    overrides = calls[0][calls[0].index("--run-config") + 1]
    assert 'resume=true' in overrides and 'run-name="r1"' in overrides
    # the run config it sends parses back to the run's own settings.json, so the ServerApp accepts it as the same run
    cfg = dict(kv.split("=", 1) for kv in overrides.split(" "))
    parsed = RunSettings.from_run_config({k: json.loads(v) for k, v in cfg.items()})
    from server.outputs import settings_json
    assert settings_json(parsed, "r1") == (out.root / "settings.json").read_text()
    (out.root / "status.json").write_text(json.dumps({"status": "completed", "rounds": 3}))
    assert main(["run", "resume", str(out.root)]) == 1
    assert "nothing to resume" in capsys.readouterr().err


def test_the_demo_finds_only_a_killed_run_with_its_own_settings(tmp_path):
    from server.resume import interrupted_run

    out, settings, strategy = _started(tmp_path)
    _round(out, settings, strategy, 1)
    runs = tmp_path / "runs"
    assert interrupted_run(runs, settings) is None  # its ServerApp (this process) still holds the folder
    out.close()
    name, point = interrupted_run(runs, settings)
    assert (name, point.round) == ("r1", 1)
    assert interrupted_run(runs, _settings(tmp_path, lr=0.01)) is None  # another demo configuration: a new run
    out.finish("completed")
    assert interrupted_run(runs, settings) is None
