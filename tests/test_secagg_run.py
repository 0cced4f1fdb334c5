"""Atoll runs with `secagg = true`: Flower's SecAgg+ (ChaCha20 masks) carrying Atoll's rounds.

The simulations run the real ServerApp loop (`server.app.run_consortium`) and the real Atoll
ClientApp (`client.app.app`, whose `train` hands SecAgg+ messages to `client.secagg`) on the demo
hospitals in Flower's simulation engine. A thin test ClientApp around Atoll's keeps a copy of each
site's update before masking (to compare the aggregate with plain FedAvg) and can make one site
drop out in a chosen protocol stage.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid, ServerApp

from atoll import simulation
from atoll.demo import approve_run, prepare_site_keys
from atoll.demo_data import HOSPITALS
from client.runtime import SIM_SITE_CONFIGS_ENV
from privacy import secagg_prg
from contract import Mechanism
from server.app import main as server_main
from server.app import run_consortium
from server.settings import RunSettings, SettingsError

NAMES = [h.name for h in HOSPITALS]
MAX_WEIGHT = 10000.0          # RunSettings' default secagg-max-weight
TARGET, CLIP = 4194304, 8.0   # SecAggPlusWorkflow's default quantization_range and clipping_range


# -- harness ---------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _flowers_generator_restored(monkeypatch):
    """The simulated ServerApp runs in this process and installs the ChaCha20 generator there; other
    tests (tests/test_secagg_prg.py) expect Flower's own, so it is put back after each test."""
    for name in secagg_prg.PATCH_TARGETS:
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "pseudo_rand_gen", module.pseudo_rand_gen)


class RecordingGrid:
    """The simulation's Grid, keeping every message the server sent and every reply it received."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.sent, self.replies = [], []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def _stage(msg) -> str:
    if not msg.has_content() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return ""
    return str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))


def _site_app(capture_dir: str, drop_partition: int | None = None, drop_stage: str = ""):
    """Atoll's ClientApp, plus: a copy of each plain update before masking; one site drops in `drop_stage`."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def record_plain_updates(site) -> None:
        # client.app.train hands SecAgg+ messages to client.secagg with the module's `train`, which
        # then runs a plain Atoll round: wrapping that name sees the update the mod is about to mask.
        if getattr(site.train, "_records_to", None) == capture_dir:
            return
        original = site.train

        def recording(msg, context):
            reply = original(msg, context)
            content = reply.content if reply.has_content() else None
            if _stage(msg) == "" and content is not None and "arrays" in content.array_records:
                cfg = content.config_records.get("site")
                rnd = int(msg.content["config"]["server-round"])
                update = content["arrays"]
                dump = {"names": list(update.keys()), "values": [a.numpy() for a in update.values()],
                        "num_examples": float(content["metrics"]["num-examples"])}
                Path(capture_dir, f"{cfg['name']}-round-{rnd}.pkl").write_bytes(pickle.dumps(dump))
            return reply

        recording._records_to = capture_dir
        site.train = recording

    @app.train()
    def train(msg, context):
        import client.app as site

        record_plain_updates(site)
        if drop_partition == int(context.node_config["partition-id"]) and _stage(msg) == drop_stage:
            raise ConnectionError("the hospital's uplink went down")
        return site.app(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        import client.app as site

        return site.app(msg, context)

    return app


def _simulate(configs, settings, client_app):
    holder = {}
    app = ServerApp()

    @app.main()
    def _main(grid, context: Context):
        rec = RecordingGrid(grid)
        holder["grid"] = rec
        holder["outputs"] = run_consortium(rec, settings, context.run_id)

    os.environ[SIM_SITE_CONFIGS_ENV] = os.pathsep.join(str(c) for c in configs)
    simulation.run_sites(app, client_app, len(configs))  # the demo's resources: fair share of the cores, nice 0
    assert "outputs" in holder, "the ServerApp did not finish"
    return holder["outputs"], holder["grid"]


def _approve(configs, settings) -> None:
    """Each site approves the run, for the app code and model as they are now (other work may have
    changed them since this process first hashed them; the simulated sites compute them afresh)."""
    from client import manifest

    manifest.installed_app_hash.cache_clear()
    manifest._outputs.cache_clear()
    approve_run(configs, settings)


def _four_site_secagg_run(src: Path, tmp_path: Path, run_name: str) -> tuple[list[Path], Path, RunSettings]:
    """hospital-a..c plus hospital-d (a clone of c), enrolled keys, a capture folder, 1-round SecAgg+ settings."""
    configs = _sites(src, tmp_path / "sites", NAMES, extra="hospital-d")
    keys = prepare_site_keys(tmp_path / "sites", NAMES + ["hospital-d"])
    capture = tmp_path / "capture"
    capture.mkdir()
    settings = RunSettings(num_server_rounds=1, run_dir=str(tmp_path / "runs"), run_name=run_name, keys_dir=str(keys), num_sites=4, min_sites=2, secagg=True, mechanism=Mechanism(steps=3))
    return configs, capture, settings


def _sites(src: Path, dst: Path, names: list[str], extra: str | None = None) -> list[Path]:
    """Fresh copies of the demo sites (no privacy history); `extra` = a 4th site cloned from hospital-c."""
    for n in names:
        shutil.copytree(src / n, dst / n, ignore=shutil.ignore_patterns("state", "keys"))
    if extra:
        shutil.copytree(src / "hospital-c", dst / extra, ignore=shutil.ignore_patterns("state", "keys"))
        toml = dst / extra / "site.toml"
        toml.write_text(toml.read_text().replace('name = "hospital-c"', f'name = "{extra}"'))
        names = names + [extra]
    return [dst / n / "site.toml" for n in names]


def _captured(capture: Path, site: str, rnd: int) -> dict:
    return pickle.loads((capture / f"{site}-round-{rnd}.pkl").read_bytes())


def _weights(outputs, rnd: int) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(outputs.weights_path(rnd), weights_only=True).items()}


def _fedavg(updates: list[dict]) -> dict[str, np.ndarray]:
    total = sum(u["num_examples"] for u in updates)
    return {name: sum(u["num_examples"] * u["values"][i].astype(np.float64) for u in updates) / total
            for i, name in enumerate(updates[0]["names"])}


def _quantised(update: dict) -> list[np.ndarray]:
    """A site's update as SecAgg+ encodes it before masking (weight factor first; stochastic rounding)."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, parameters_multiply
    from flwr.common.secure_aggregation.quantization import quantize

    q_ratio = round(update["num_examples"] / MAX_WEIGHT * TARGET)
    scaled = parameters_multiply(update["values"], q_ratio / TARGET)
    return factor_combine(q_ratio, quantize(scaled, CLIP, TARGET))


def _masked_vectors(grid: RecordingGrid) -> dict[int, list[np.ndarray]]:
    from flwr.common import bytes_to_ndarray

    out = {}
    for msg in grid.replies:
        if not msg.has_error() and RECORD_KEY_CONFIGS in msg.content.config_records:
            rec = msg.content.config_records[RECORD_KEY_CONFIGS]
            if Key.MASKED_PARAMETERS in rec:
                out[msg.metadata.src_node_id] = [bytes_to_ndarray(b) for b in rec[Key.MASKED_PARAMETERS]]
    return out


def _verify_consortium_ledger(outputs, keys: Path, sites: list[str], rounds: int) -> None:
    """Every stored record is a signed 'round' record of a contributing site, verified independently here."""
    from privacy.keys import load_public_key
    from privacy.ledger import verify_record

    lines = [json.loads(x) for x in (outputs.root / "ledger.jsonl").read_text().splitlines() if x.strip()]
    assert sorted((r["site"], r["server_round"]) for r in lines) == sorted(
        (s, rnd) for s in sites for rnd in range(1, rounds + 1))
    for rec in lines:
        assert rec["type"] == "round" and rec["sig"]
        verify_record(rec, load_public_key(keys / f"{rec['site']}.pub"))


# -- a whole run under SecAgg+ ---------------------------------------------------------------------

@pytest.mark.slow
def test_secagg_run_completes_signs_and_aggregates_like_fedavg_without_seeing_an_update(demo_consortium, tmp_path):
    """3 demo sites, 2 rounds, secagg = true (~45 s)."""
    configs = _sites(demo_consortium, tmp_path / "sites", NAMES)
    keys = prepare_site_keys(tmp_path / "sites", NAMES)
    capture = tmp_path / "capture"
    capture.mkdir()
    settings = RunSettings(num_server_rounds=2, run_dir=str(tmp_path / "runs"), run_name="secagg", keys_dir=str(keys), num_sites=3, secagg=True, mechanism=Mechanism(steps=3))
    settings.check()
    _approve(configs, settings)
    outputs, grid = _simulate(configs, settings, _site_app(str(capture)))

    # The run folder looks like a plain run's.
    status = json.loads((outputs.root / "status.json").read_text())
    assert status == {"status": "completed", "reason": "", "rounds": 2}
    for rnd in (0, 1, 2):
        assert outputs.weights_path(rnd).exists()
    history = json.loads((outputs.root / "history.json").read_text())
    assert [h["round"] for h in history] == [1, 2]
    for entry in history:
        assert sorted(entry["sites"]) == sorted(NAMES)
        for s in entry["sites"].values():
            assert s["status"] == "contributed", s
            assert set(s["train"]) == {"num-examples", "train_loss", "train_seconds"}
            assert {"val_loss", "val_auc"} <= set(s["val"]), "evaluation still runs (unmasked)"
    eps1 = {n: history[0]["sites"][n]["epsilon"] for n in NAMES}
    eps2 = {n: history[1]["sites"][n]["epsilon"] for n in NAMES}
    assert all(eps2[n] > eps1[n] > 0 for n in NAMES), "each site's epsilon is recorded and accumulates"
    _verify_consortium_ledger(outputs, keys, NAMES, rounds=2)

    # The aggregate is plain weighted FedAvg of the sites' updates, up to SecAgg+ quantisation.
    for rnd in (1, 2):
        updates = [_captured(capture, n, rnd) for n in NAMES]
        assert [u["num_examples"] for u in updates] == [history[rnd - 1]["sites"][n]["train"]["num-examples"]
                                                        for n in NAMES]
        want, got = _fedavg(updates), _weights(outputs, rnd)
        assert list(got) == updates[0]["names"] and all(v.dtype == np.float32 for v in got.values())
        err = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        unweighted = {k: np.mean([u["values"][i] for u in updates], axis=0) for i, k in enumerate(want)}
        gap = max(float(np.abs(unweighted[k] - want[k]).max()) for k in want)
        print(f"round {rnd}: |aggregate - FedAvg| <= {err:.1e}; weighted vs unweighted mean: {gap:.1e}")
        assert err < 1e-4, f"round {rnd}: aggregate differs from FedAvg by {err}"
        assert gap > 10 * err, "the check could not tell weighted from unweighted averaging"

    # The server never held a site's unmasked update: only masked vectors and no array in the clear.
    assert not [m for m in grid.replies if m.has_content() and any(len(a) for a in m.content.array_records.values())]
    masked = _masked_vectors(grid)
    assert len(masked) == 3  # the last round's, one per site (dict keyed by node)
    plains = [_quantised(_captured(capture, n, 2)) for n in NAMES]
    for received in masked.values():
        for plain in plains:
            close = sum(int((np.abs(r.astype(np.int64) - p.astype(np.int64)) <= 1).sum())
                        for r, p in zip(received[1:], plain[1:]))
            assert close < 1e-3 * sum(p.size for p in plain[1:]), "an update reached the server unmasked"


# -- dropout ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_site_dropping_after_key_sharing_is_tolerated(demo_consortium, tmp_path):
    """4 sites; hospital-d shares its keys, then fails before sending its masked vector (~25-45 s).

    The round completes with the other three sites' aggregate, which is only possible if the server
    rebuilt the dropped site's key from the others' shares and removed the masks they added for it.
    """
    configs, capture, settings = _four_site_secagg_run(demo_consortium, tmp_path, "drop")
    _approve(configs, settings)
    outputs, grid = _simulate(configs, settings,
                              _site_app(str(capture), drop_partition=3, drop_stage=Stage.COLLECT_MASKED_VECTORS))

    assert json.loads((outputs.root / "status.json").read_text())["status"] == "completed"
    sites = outputs.history[0]["sites"]
    assert {n: sites[n]["status"] for n in NAMES} == dict.fromkeys(NAMES, "contributed")
    # A site that fails before naming itself is booked under its node id (as in a plain round).
    dropped_node = next(m.metadata.src_node_id for m in grid.replies if m.has_error())
    dropped = sites[f"node-{dropped_node}"]
    assert dropped["status"] == "error" and "ClientAppException" in dropped["message"], "the lead sees the failure"
    assert not (capture / "hospital-d-round-1.pkl").exists(), "the dropped site never trained"
    _verify_consortium_ledger(outputs, Path(settings.keys_dir), NAMES, rounds=1)

    # The server asked the survivors for the dropped site's key shares and removed its masks.
    unmask = [m for m in grid.sent if _stage(m) == Stage.UNMASK]
    assert len(unmask) == 3
    assert all(list(m.content.config_records[RECORD_KEY_CONFIGS][Key.DEAD_NODE_ID_LIST]) == [dropped_node]
               for m in unmask)
    updates = [_captured(capture, n, 1) for n in NAMES]
    want, got = _fedavg(updates), _weights(outputs, 1)
    err = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    assert err < 1e-4, f"aggregate differs from FedAvg of the three survivors by {err}"


# -- refusals under SecAgg+ ------------------------------------------------------------------------

@pytest.mark.slow
def test_refusing_and_early_dropping_sites_leave_the_protocol_and_the_lead_sees_why(demo_consortium, tmp_path):
    """4 sites: hospital-a never approved the run, hospital-d fails while keys are shared (~40 s).

    hospital-a takes part in the key exchange, then refuses when the round's config arrives: its
    refusal reaches history.json and it drops out like a failed site. hospital-d's failure in
    'share_keys' would fail the round in stock Flower 1.41; the workflow forgets it instead.
    """
    configs, capture, settings = _four_site_secagg_run(demo_consortium, tmp_path, "refuse")
    _approve(configs[1:], settings)
    outputs, grid = _simulate(configs, settings,
                              _site_app(str(capture), drop_partition=3, drop_stage=Stage.SHARE_KEYS))

    assert json.loads((outputs.root / "status.json").read_text())["status"] == "completed"
    sites = outputs.history[0]["sites"]
    assert sites["hospital-a"]["status"] == "refused" and sites["hospital-a"]["code"] == "RUN_NOT_APPROVED"
    assert "not approved" in sites["hospital-a"]["message"]
    assert sites["hospital-b"]["status"] == sites["hospital-c"]["status"] == "contributed"
    dropped_node = next(m.metadata.src_node_id for m in grid.replies if m.has_error())
    assert sites[f"node-{dropped_node}"]["status"] == "error"
    assert not [m for m in grid.sent if _stage(m) in (Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)
                and m.metadata.dst_node_id == dropped_node], "the early dropout was left out of the round"
    _verify_consortium_ledger(outputs, Path(settings.keys_dir), ["hospital-b", "hospital-c"], rounds=1)
    updates = [_captured(capture, n, 1) for n in ("hospital-b", "hospital-c")]
    want, got = _fedavg(updates), _weights(outputs, 1)
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-4


# -- settings the lead cannot combine with SecAgg+ -------------------------------------------------

@pytest.mark.parametrize("changes,key", [
    ({"strategy": "krum", "num_malicious": 1}, "strategy"),
    ({"strategy": "fedmedian"}, "strategy"),
    ({"strategy": "fedprox", "proximal_mu": 0.01}, "strategy"),
    ({"max_update_norm": 5.0}, "max-update-norm"),
    ({"min_sites": 1}, "min-sites"),
    ({"secagg_num_shares": 4.0}, "num_shares=4 is an even integer"),
    ({"secagg_num_shares": 3.0, "secagg_reconstruction_threshold": 3.0}, "less than num_shares"),
    ({"secagg_num_shares": 2.5}, "secagg-num-shares"),
    ({"secagg_reconstruction_threshold": 0.0}, "secagg-reconstruction-threshold"),
    ({"secagg_num_shares": 5.0, "num_sites": 3}, "num-sites is 3"),
    ({"secagg_max_weight": 0.0}, "secagg-max-weight"),
])
def test_secagg_refuses_settings_it_cannot_honour(changes, key):
    RunSettings(run_dir="/tmp/runs", secagg=False, **changes).check()  # fine without SecAgg+
    with pytest.raises(SettingsError) as err:
        RunSettings(run_dir="/tmp/runs", secagg=True, **changes).check()
    assert key in str(err.value)


@pytest.mark.parametrize("changes,params", [
    ({}, (1.0, 0.6)),
    ({"secagg_num_shares": 3.0, "secagg_reconstruction_threshold": 2.0}, (3, 2)),
    ({"secagg_num_shares": 0.8, "secagg_reconstruction_threshold": 1.0}, (0.8, 1.0)),
])
def test_secagg_parameters_as_flower_takes_them(changes, params):
    settings = RunSettings(run_dir="/tmp/runs", secagg=True, num_sites=4, **changes)
    settings.check()
    assert settings.secagg_parameters() == params
    assert [type(x) for x in settings.secagg_parameters()] == [type(x) for x in params]


def test_the_server_app_refuses_a_bad_secagg_setting_before_round_1():
    class NoGrid:
        def __getattr__(self, name):
            raise AssertionError(f"the ServerApp used the grid ({name}) despite a bad setting")

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"run-dir": "/tmp/runs", "secagg": True, "strategy": "bulyan",
                                  "num-malicious": 1})
    with pytest.raises(SettingsError, match="fedavg"):
        server_main(NoGrid(), context)


def test_pyproject_declares_the_secagg_settings_off_by_default():
    import tomllib

    config = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    app_config = config["tool"]["flwr"]["app"]["config"]
    declared = RunSettings.from_run_config({**app_config, "run-dir": "/tmp/runs"})
    assert declared.secagg is False
    for key in ("secagg", "secagg-num-shares", "secagg-reconstruction-threshold", "secagg-max-weight"):
        assert key in app_config
    assert declared == RunSettings(run_dir="/tmp/runs", run_name=declared.run_name)


def test_atoll_run_start_exposes_and_checks_secagg(capsys):
    from atoll.cli import main

    with pytest.raises(SystemExit):
        main(["run", "start", "--help"])
    assert "--secagg" in capsys.readouterr().out
    rc = main(["run", "start", "nowhere", "--run-dir", "/tmp/runs", "--secagg", "--secagg-num-shares", "4"])
    assert rc == 2
    assert "even integer" in capsys.readouterr().err


def test_a_protocol_reply_that_carries_the_update_in_the_clear_is_blocked():
    """The site's egress guard for SecAgg+ replies (client.secagg.check_protocol_reply)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    from client.egress import EgressBlocked
    from client.secagg import check_protocol_reply

    released = {"train_loss": 0.5, "ledger": "{}", "site": "hospital-a"}

    def reply(arrays=None, metrics=None, extra=None):
        content = RecordDict({
            RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: [b"\x00"]}),
            "fitres.parameters": ArrayRecord(arrays or {}),
            "fitres.metrics": ConfigRecord(metrics or released),
            "fitres.num_examples": MetricRecord({"num_examples": 10}),
            "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
        })
        for k, v in (extra or {}).items():
            content[k] = v
        return content

    check_protocol_reply(Stage.COLLECT_MASKED_VECTORS, reply(), released)
    with pytest.raises(EgressBlocked):
        check_protocol_reply(Stage.COLLECT_MASKED_VECTORS, reply(arrays={"w": Array(np.ones(3))}), released)
    with pytest.raises(EgressBlocked):
        check_protocol_reply(Stage.COLLECT_MASKED_VECTORS, reply(metrics={**released, "n_patients": 7.0}), released)
    with pytest.raises(EgressBlocked):
        check_protocol_reply(Stage.COLLECT_MASKED_VECTORS, reply(extra={"debug": ConfigRecord({"x": "y"})}), released)
    with pytest.raises(EgressBlocked):
        check_protocol_reply(Stage.SETUP, RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
            {Key.PUBLIC_KEY_1: b"a", Key.PUBLIC_KEY_2: b"b", "params": b"leak"})}), None)
    check_protocol_reply(Stage.SETUP, RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(
        {Key.PUBLIC_KEY_1: b"a", Key.PUBLIC_KEY_2: b"b"})}), None)


def test_the_screen_books_every_reply_and_keeps_only_admitted_protocol_replies_in_the_protocol():
    """server.secagg's per-stage screen, on hand-made replies (no simulation)."""
    import time

    from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord

    from server.secagg import _RoundScreen
    from server.sitebook import RoundBook

    def instruction(node: int) -> Message:
        return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS})}),
                       metadata=Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=node,
                                         reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0,
                                         message_type="train"))

    def masked(to: Message, site: str, record: dict) -> Message:
        return Message(RecordDict({
            RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: [b"\x00"]}),
            "fitres.parameters": ArrayRecord(),
            "fitres.metrics": ConfigRecord({"train_loss": 0.5, "ledger": json.dumps(record), "site": site}),
            "fitres.num_examples": MetricRecord({"num_examples": 40}),
            "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
        }), reply_to=to)

    class Ledger:  # stands in for privacy.ledger.ConsortiumLedger
        accepted = []

        def accept(self, record, site):
            if record.get("sig") != "good":
                raise ValueError(f"site {site!r}: signature does not verify")
            self.accepted.append(site)

    sent = [instruction(n) for n in (11, 22, 33, 44)]
    replies = [
        masked(sent[0], "hospital-a", {"sig": "good", "epsilon_after": 1.5, "delta": 1e-5}),
        masked(sent[1], "hospital-b", {"sig": "forged", "epsilon_after": 0.1, "delta": 1e-5}),
        Message(RecordDict({"refusal": ConfigRecord({"code": "BUDGET_EXCEEDED", "message": "budget 8 spent"}),
                            "site": ConfigRecord({"name": "hospital-c"})}), reply_to=sent[2]),
    ]  # node 44 never answers
    book = RoundBook(3, Ledger(), bind_updates=False)  # as server.app builds it under SecAgg+
    screen = _RoundScreen(book, 3)
    kept = screen(Stage.COLLECT_MASKED_VECTORS, sent, replies)

    assert [m.metadata.src_node_id for m in kept] == [11], "only the verified masked vector is summed"
    sites = book.as_dict()["sites"]
    assert sites["hospital-a"] == {"status": "contributed", "train": {"train_loss": 0.5, "num-examples": 40.0},
                                   "val": {}, "epsilon": 1.5, "delta": 1e-5}
    assert sites["hospital-b"]["status"] == "rejected" and sites["hospital-b"]["code"] == "LEDGER_REJECTED"
    assert sites["hospital-c"]["code"] == "BUDGET_EXCEEDED" and "budget 8" in sites["hospital-c"]["message"]
    assert sites["node-44"]["status"] == "error" and "no reply" in sites["node-44"]["message"]
    assert Ledger.accepted == ["hospital-a"]
    assert screen.dead == {"hospital-b", "hospital-c", "node-44"}, "their masks are removed from the sum"
    assert "1 of 4" in screen.problem
