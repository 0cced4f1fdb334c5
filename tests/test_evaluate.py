"""`atoll run evaluate` logic: the published matrix (policy filter, suppression), the heatmap, the kept updates,
and which evaluation replies count (signed by the enrolled site, over the weights sent). Milliseconds each; the
real Flower run is tests/test_evaluate_run.py."""

from __future__ import annotations

import json
import math
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from client.egress import EgressPolicy, TensorSpec, check_reply
from client.evaluation import sign_evaluation
from contract import TaskSpec, wire
from models import state_dict_sha256
from privacy.keys import ensure_site_key
from server.evaluate_heatmap import write_heatmap
from server.evaluate_matrix import (SMALL_COUNT, WITHHELD, Cell, EvaluationMatrix, ModelRow, evaluated_cell,
                                    headline_metric, table_lines)
from server.evaluate_run import ReplyJudge, chosen_round, EvaluationError, load_run_settings
from server.released_updates import last_released, released_path
from server.settings import RunSettings
from server.sitebook import SiteTrust

BINARY = TaskSpec()
MULTI = TaskSpec(classes=("normal", "bacterial", "viral"))
SEG = TaskSpec(kind="segmentation", spatial_dims=3, classes=(), labels=("anterior", "posterior"), size=(32, 48, 32))


def test_headline_metric_per_task_kind():
    assert headline_metric(BINARY) == "val_auc"
    assert headline_metric(MULTI) == "val_auc"
    assert headline_metric(SEG) == "val_dice"


def test_cell_keeps_what_the_site_released_and_marks_the_rest_withheld():
    released = {wire.NUM_EXAMPLES: 120.0, "val_loss": 0.4, "val_accuracy": 0.8, "train_loss": 9.0, "foo": 1.0}
    cell = evaluated_cell(BINARY, released, {})
    assert cell.metrics == {"val_loss": 0.4, "val_accuracy": 0.8}  # no train_loss, no unknown name
    assert cell.missing == {"val_auc": WITHHELD}                  # the policy does not release AUC
    assert cell.num_examples == 120


def test_cell_passes_the_sites_own_reason_codes_and_never_free_text():
    cell = evaluated_cell(BINARY, {wire.NUM_EXAMPLES: 40.0, "val_loss": 0.5, "val_accuracy": 1.0},
                          {"val_auc": "SINGLE_CLASS"})
    assert cell.missing == {"val_auc": "SINGLE_CLASS"}
    cell = evaluated_cell(BINARY, {wire.NUM_EXAMPLES: 40.0}, {"val_auc": "a path /srv/x"})
    assert cell.missing["val_auc"] == "NOT_FINITE"


@pytest.mark.parametrize("n", [1, 4])
def test_small_counts_are_suppressed_with_their_metrics(n):
    cell = evaluated_cell(BINARY, {wire.NUM_EXAMPLES: float(n), "val_loss": 0.1, "val_accuracy": 1.0,
                                   "val_auc": 1.0}, {})
    assert cell.num_examples == "<5"
    assert cell.metrics == {}
    assert cell.missing == {m: SMALL_COUNT for m in ("val_loss", "val_accuracy", "val_auc")}
    assert evaluated_cell(BINARY, {wire.NUM_EXAMPLES: 5.0, "val_auc": 0.7}, {}).metrics == {"val_auc": 0.7}


def test_multiclass_and_segmentation_cells_use_the_tasks_metric_names():
    multi = evaluated_cell(MULTI, {wire.NUM_EXAMPLES: 50.0, "val_auc": 0.6, "val_recall_viral": 0.5}, {})
    assert multi.metrics == {"val_auc": 0.6, "val_recall_viral": 0.5}
    assert multi.missing["val_recall_bacterial"] == WITHHELD
    seg = evaluated_cell(SEG, {wire.NUM_EXAMPLES: 9.0, "val_dice": 0.3, "val_dice_anterior": 0.2},
                         {"val_dice_posterior": "NO_DATA"})
    assert seg.metrics == {"val_dice": 0.3, "val_dice_anterior": 0.2}
    assert seg.missing == {"val_dice_posterior": "NO_DATA", "val_loss": WITHHELD}


def _matrix(task=BINARY) -> EvaluationMatrix:
    m = EvaluationMatrix(task, "run-x", 3, models=[ModelRow("global", "global", 3),
                                                  ModelRow("hospital-a local", "local", 3, site="hospital-a")])
    h = headline_metric(task)
    m.put("global", "hospital-a", evaluated_cell(task, {wire.NUM_EXAMPLES: 80.0, h: 0.91}, {}, signed=True))
    m.put("global", "hospital-b", evaluated_cell(task, {wire.NUM_EXAMPLES: 2.0, h: 0.5}, {}))
    m.put("hospital-a local", "hospital-a", evaluated_cell(task, {wire.NUM_EXAMPLES: 80.0, h: 0.95}, {}))
    m.put("hospital-a local", "hospital-b", Cell("refused", code="RUN_NOT_APPROVED", message="not approved"))
    m.sites.append("hospital-c")  # in the run's history, never answered
    return m


def test_matrix_json_is_model_by_site_by_metric_and_finite():
    doc = _matrix().as_dict()
    assert doc["sites"] == ["hospital-a", "hospital-b", "hospital-c"]
    assert list(doc["matrix"]) == ["global", "hospital-a local"]
    assert doc["matrix"]["global"]["hospital-a"]["metrics"] == {"val_auc": 0.91}
    small = doc["matrix"]["global"]["hospital-b"]
    assert (small["num_examples"], small["metrics"], small["missing"]["val_auc"]) == ("<5", {}, SMALL_COUNT)
    assert doc["matrix"]["hospital-a local"]["hospital-b"]["code"] == "RUN_NOT_APPROVED"
    assert doc["matrix"]["global"]["hospital-c"]["status"] == "no_reply"
    json.dumps(doc, allow_nan=False)  # the file never holds NaN
    lines = table_lines(doc)
    assert "0.910" in lines[2] and SMALL_COUNT[:14] in lines[2] and "NO_REPLY" in lines[2]
    assert "RUN_NOT_APPROVED"[:14] in lines[3]


@pytest.mark.parametrize("task", [BINARY, SEG])
def test_heatmap_svg_has_one_cell_per_model_and_site(tmp_path, task):
    m = _matrix(task)
    path = write_heatmap(m, tmp_path / "evaluation-heatmap", prefer_png=False)
    assert path.suffix == ".svg"
    root = ET.parse(path).getroot()
    ns = {"s": "http://www.w3.org/2000/svg"}
    rects = root.findall("s:rect", ns)
    assert len(rects) == 2 * 3
    texts = [t.text for t in root.findall("s:text", ns)]
    assert "0.910" in texts and "0.950" in texts and SMALL_COUNT in texts and "NO_REPLY" in texts
    assert headline_metric(task) in root.find("s:title", ns).text
    fills = {r.get("fill") for r in rects}
    assert "#d9d9d9" in fills and len(fills) >= 3  # grey for no value, colours for values


def test_last_released_takes_each_sites_latest_update_up_to_the_round(tmp_path):
    for rnd, site in ((1, "hospital-a"), (1, "hospital-b"), (2, "hospital-a"), (3, "hospital-a")):
        p = released_path(tmp_path, rnd, site)
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.zeros(1)}, p)
    got = {s: r for s, (r, _) in last_released(tmp_path, 2).items()}
    assert got == {"hospital-a": 2, "hospital-b": 1}
    assert last_released(tmp_path / "none", 5) == {}


def test_chosen_round_and_settings_round_trip(tmp_path):
    import dataclasses

    (tmp_path / "weights").mkdir()
    for r in (0, 1, 2):
        (tmp_path / "weights" / f"round-{r:03d}.pt").write_bytes(b"")
    assert chosen_round(tmp_path, 0) == 2 and chosen_round(tmp_path, 1) == 1
    with pytest.raises(EvaluationError, match="completed rounds: 1, 2"):
        chosen_round(tmp_path, 7)
    s = RunSettings(run_dir=str(tmp_path), task=SEG, num_server_rounds=4)
    (tmp_path / "settings.json").write_text(json.dumps(dataclasses.asdict(s)))
    assert load_run_settings(tmp_path) == s
    with pytest.raises(EvaluationError, match="not a run folder"):
        load_run_settings(tmp_path / "nope")


# --------------------------------------------------------------------------- which replies count

ARRAYS = ArrayRecord({"w": Array(np.arange(4, dtype=np.float32))})
SHA = state_dict_sha256(ARRAYS.to_torch_state_dict())


def _reply(node: int, site: str, auc: float, *, key: Path | None, sha: str = SHA, run: str = "run-x",
           tamper: bool = False) -> Message:
    content = RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 50.0, "val_auc": auc}),
                          wire.SITE: wire.site_record(site)})
    st = sign_evaluation(content, site=site, run_id=run, server_round=3, weights_sha256=sha, signing_key_path=key)
    if st is not None:
        content[wire.ATTESTATION] = wire.attestation_record(st)
    if tamper:
        content[wire.METRICS] = MetricRecord({wire.NUM_EXAMPLES: 50.0, "val_auc": 0.99})
    meta = Metadata(run_id=1, message_id=f"m-{node}-{time.monotonic_ns()}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="ask", group_id="1", created_at=time.time(), ttl=60.0,
                    message_type="evaluate")
    return Message(content=content, metadata=meta)


@pytest.fixture()
def enrolled(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    pems = {}
    for site in ("hospital-a", "hospital-b"):
        pems[site] = tmp_path / site / "site_ed25519.pem"
        (keys / f"{site}.pub").write_bytes(ensure_site_key(pems[site]))
    return keys, pems


def test_a_signed_reply_binds_its_node_and_an_unsigned_or_forged_one_does_not(enrolled):
    keys, pems = enrolled
    judge = ReplyJudge(SiteTrust(None), str(keys), "run-x", 3, BINARY)
    name, cell = judge.judge(_reply(11, "hospital-a", 0.8, key=pems["hospital-a"]), SHA)
    assert (name, cell.status, cell.signed, cell.metrics) == ("hospital-a", "evaluated", True, {"val_auc": 0.8})
    assert judge.trust.site_of(11) == "hospital-a"
    # a stranger naming hospital-b without its key, or signing with hospital-a's key as hospital-b
    for msg in (_reply(66, "hospital-b", 0.1, key=None), _reply(67, "hospital-b", 0.1, key=pems["hospital-a"])):
        name, cell = judge.judge(msg, SHA)
        assert name.startswith("node-") and cell.status == "ignored" and cell.code == "NOT_VERIFIED"
    # metrics changed after signing, other weights, another run: not the site's answer
    for msg in (_reply(12, "hospital-b", 0.3, key=pems["hospital-b"], tamper=True),
                _reply(12, "hospital-b", 0.3, key=pems["hospital-b"], sha="0" * 64),
                _reply(12, "hospital-b", 0.3, key=pems["hospital-b"], run="other-run")):
        assert judge.judge(msg, SHA)[1].code == "NOT_VERIFIED"
    # another node claiming the bound site with a valid signature: one site speaks from one node
    name, cell = judge.judge(_reply(13, "hospital-a", 0.2, key=pems["hospital-a"]), SHA)
    assert cell.status == "ignored" and cell.code == "NODE_NOT_ENROLLED"
    # the bound node again: counted; naming another site from it: ignored
    assert judge.judge(_reply(11, "hospital-a", 0.7, key=pems["hospital-a"]), SHA)[1].metrics == {"val_auc": 0.7}
    assert judge.judge(_reply(11, "hospital-b", 0.7, key=pems["hospital-b"]), SHA)[1].code == "NODE_NOT_SITE"


def test_the_evaluation_statement_passes_the_sites_egress_guard(enrolled):
    _, pems = enrolled
    msg = _reply(11, "hospital-a", 0.8, key=pems["hospital-a"])
    check_reply(msg.content, EgressPolicy((TensorSpec("w", (4,), "float32"),), frozenset({"val_auc", "num-examples"})))
    statement = wire.attestation_of(msg.content)
    assert set(statement) == {"kind", "site", "run_id", "server_round", "weights_sha256", "released_sha256",
                              "key_id", "sig"}
    assert not math.isnan(float(msg.content[wire.METRICS]["val_auc"]))


# --------------------------------------------------------------------------- `atoll run evaluate` (the CLI side)


@pytest.fixture()
def run_folder(tmp_path, monkeypatch):
    """A run folder with two completed rounds and a TLS connection whose address answers."""
    import dataclasses
    import socket

    root = tmp_path / "runs" / "first-run"
    (root / "weights").mkdir(parents=True)
    for r in (0, 1, 2):
        torch.save(ARRAYS.to_torch_state_dict(), root / "weights" / f"round-{r:03d}.pt")
    (root / "settings.json").write_text(json.dumps(dataclasses.asdict(RunSettings(run_dir=str(root.parent)))))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text(f'[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = '
                                          f'"127.0.0.1:{srv.getsockname()[1]}"\nroot-certificates = "/pki/ca.crt"\n')
    yield root
    srv.close()


def test_run_evaluate_checks_the_round_submits_the_evaluation_mode_and_prints_the_matrix(run_folder, monkeypatch,
                                                                                        capsys):
    import shlex

    import server.evaluate_cli as cli
    from atoll.cli import main
    from server.evaluate_run import write_outputs

    assert main(["run", "evaluate", str(run_folder), "--round", "5"]) == 2
    assert "completed rounds: 1, 2" in capsys.readouterr().err
    assert main(["run", "evaluate", str(run_folder), "--show"]) == 3
    calls = []

    def flwr_run(cmd):  # what the ServerApp in evaluation mode leaves in the run folder (server/evaluate_run.py)
        calls.append(cmd)
        cfg = dict(kv.split("=", 1) for kv in shlex.split(cmd[cmd.index("--run-config") + 1]))
        assert cfg["evaluate-run"] == str(run_folder) and cfg["evaluate-round"] == "2"
        m = _matrix()
        m.round = 2
        write_outputs(run_folder, m, evaluate_id=cfg["evaluate-id"])
        return 0

    monkeypatch.setattr(cli.subprocess, "call", flwr_run)
    assert main(["run", "evaluate", str(run_folder), "--round", "2", "--wait", "30"]) == 0
    out = capsys.readouterr().out
    assert calls[0][1:4] == ["run", cli.APP_DIR.as_posix(), "c"] and "0.910" in out and "evaluation.json" in out
    assert (run_folder / "evaluation-heatmap.svg").is_file() or (run_folder / "evaluation-heatmap.png").is_file()
    assert main(["run", "evaluate", str(run_folder), "--show"]) == 0 and "0.950" in capsys.readouterr().out


def test_under_secagg_only_the_global_model_is_evaluated_and_the_notes_say_why(run_folder):
    import dataclasses

    from server.evaluate_run import models_to_evaluate

    p = released_path(run_folder, 1, "hospital-a")
    p.parent.mkdir(parents=True)
    torch.save(ARRAYS.to_torch_state_dict(), p)
    plain = RunSettings(run_dir=str(run_folder.parent))
    rows, notes = models_to_evaluate(run_folder, plain, 2)
    assert [r.name for r, _ in rows] == ["global", "hospital-a local"] and rows[1][0].round == 1
    assert rows[0][0].weights_sha256 == SHA
    rows, notes = models_to_evaluate(run_folder, dataclasses.replace(plain, secagg=True), 2)
    assert [r.name for r, _ in rows] == ["global"] and "SecAgg+" in notes[0] and "never one site's" in notes[0]
