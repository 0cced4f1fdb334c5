"""Issue 12, items 4-6 and 2 at deployment level: real Flower processes on 127.0.0.1.

A fourth SuperNode joins the three demo hospitals. It runs Atoll's honest ClientApp on a copy of hospital-c's data
and calls itself "hospital-c", but signs with its own key (it never got hospital-c's): the attacker of the issue
who got a node admitted and speaks as an honest site. The run must take nothing from it — no update, no history
entry under hospital-c, no evaluation metric in the averages — and the run folder the real ServerApp writes must
pass the anchored audit with the three honest sites' own ledgers (so the real ClientApp countersigned every digest).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from atoll.demo import approve_run, prepare_site_keys
from atoll.demo_data import HOSPITALS
from atoll.localnet import LocalConsortium
from conftest import REPO
from privacy.audit import verify_run
from contract import Mechanism
from server.settings import RunSettings

pytestmark = pytest.mark.slow
NAMES = [h.name for h in HOSPITALS]


def test_a_rogue_node_speaking_as_hospital_c_changes_nothing(fresh_consortium: Path, tmp_path: Path) -> None:
    configs = [fresh_consortium / n / "site.toml" for n in NAMES]
    keys = prepare_site_keys(fresh_consortium, NAMES)
    rogue = tmp_path / "rogue"
    shutil.copytree(fresh_consortium / "hospital-c", rogue,
                    ignore=shutil.ignore_patterns("site_ed25519.*", "ledger.jsonl", "approvals.jsonl", "released"))
    from privacy.keys import ensure_site_key

    ensure_site_key(rogue / "keys" / "site_ed25519.pem")  # its own key, not the enrolled one
    settings = RunSettings(run_dir=str(tmp_path / "runs"), run_name="rogue", keys_dir=str(keys), num_server_rounds=2, num_sites=4, min_sites=1, mechanism=Mechanism(steps=3))
    approve_run([*configs, rogue / "site.toml"], settings)  # the rogue site's admin approves, of course
    with LocalConsortium(REPO, [*configs, rogue / "site.toml"], insecure=True, workdir=tmp_path / "net") as net:
        status = net.wait(net.submit(settings.to_run_config()), timeout=600)
        assert status == "finished:completed", net.tail("superlink")

    run = tmp_path / "runs" / "rogue"
    history = json.loads((run / "history.json").read_text())
    assert [h["round"] for h in history] == [1, 2]
    for entry in history:
        sites = entry["sites"]
        assert all(sites[n]["status"] == "contributed" and "code" not in sites[n] for n in NAMES), sites
        others = [k for k in sites if k not in NAMES]
        assert len(others) == 1 and others[0].startswith("node-"), sites
        r = sites[others[0]]
        assert r["claimed_site"] == "hospital-c" and r["status"] == "rejected", r
        assert r["code"] in ("LEDGER_REJECTED", "NODE_NOT_ENROLLED"), r
        assert r["val"] == {} and r["train"] == {}, "nothing of the rogue's is recorded as hospital-c's or averaged"
        vals = [sites[n]["val"] for n in NAMES if "val_auc" in sites[n]["val"]]
        want = sum(v["val_auc"] * v["num-examples"] for v in vals) / sum(v["num-examples"] for v in vals)
        assert entry["aggregated"]["val_auc"] == pytest.approx(want, rel=1e-9)
    ledger = [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines()]
    assert sorted(r["site"] for r in ledger) == sorted(NAMES * 2)
    # the run folder as the real ServerApp wrote it passes the anchored audit with the honest sites' ledgers
    result = verify_run(run, [fresh_consortium / n / "state" / "ledger.jsonl" for n in NAMES], keys)
    assert result.ok, result.text()
    assert all(r.get("server_prev_digest") for r in ledger), "the real ClientApp countersigned every round"
