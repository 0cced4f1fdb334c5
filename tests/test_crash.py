"""A ClientApp process killed mid-round (SIGKILL, no clean-up) leaves its reservation charged.

Real processes: flower-superlink + flower-supernode on 127.0.0.1, the SuperNode's `flwr-clientapp`
child is killed with SIGKILL while it trains, right after the write-ahead reservation reached the
site's disk. The site's next round (a new run, same SuperNode, fresh ClientApp process) must start
from a budget that includes the killed round.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from atoll.demo import approve_run, prepare_site_keys
from atoll.localnet import LocalConsortium
from conftest import REPO
from privacy.accounting import compute_epsilon
from contract import Mechanism
from server.settings import RunSettings

pytestmark = pytest.mark.slow


def _session_processes(sid: int, name: str) -> list[int]:
    """PIDs in session ``sid`` whose command line mentions ``name`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[3]) == sid and name in cmd:  # fields after the comm: state ppid pgrp session ...
            out.append(int(entry.name))
    return out


def _records(ledger: Path) -> list[dict]:
    if not ledger.exists():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines() if line.endswith("}")]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finding the ClientApp process needs Linux /proc")
def test_a_clientapp_killed_mid_round_leaves_its_reservation_charged(demo_consortium, tmp_path):
    site = tmp_path / "hospital-c"
    shutil.copytree(demo_consortium / "hospital-c", site, ignore=shutil.ignore_patterns("state"))
    cfg = site / "site.toml"
    # a long round (so the kill lands mid-training) needs room in this copy's lifetime budget
    cfg.write_text(re.sub(r"(?m)^max_epsilon = .*$", "max_epsilon = 1000.0", cfg.read_text()))
    keys = prepare_site_keys(tmp_path, ["hospital-c"])
    ledger = site / "state" / "ledger.jsonl"
    long_round = RunSettings(run_dir=str(tmp_path / "runs"), run_name="killed", keys_dir=str(keys), num_server_rounds=1, num_sites=1, min_sites=1, round_timeout=30.0, mechanism=Mechanism(steps=2000))
    short_round = RunSettings(run_dir=str(tmp_path / "runs"), run_name="after", keys_dir=str(keys), num_server_rounds=1, num_sites=1, min_sites=1, mechanism=Mechanism(steps=2))
    approve_run([cfg], long_round)
    approve_run([cfg], short_round)

    with LocalConsortium(REPO, [cfg], insecure=True, workdir=tmp_path / "net") as net:
        supernode = net.procs[-1]
        run_id = net.submit(long_round.to_run_config())
        deadline = time.time() + 240
        while not any(r["type"] == "reservation" and r["run_id"] == "killed" for r in _records(ledger)):
            assert time.time() < deadline, "no reservation was written:\n" + net.tail("supernode-0")
            time.sleep(0.05)
        victims = _session_processes(supernode.pid, "flwr-clientapp")
        assert victims, "the SuperNode's ClientApp process was not found"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_at = len(_records(ledger))
        status = net.wait(run_id, timeout=240)
        assert status == "finished:failed", status

        recs = _records(ledger)
        reservation = next(r for r in recs if r["type"] == "reservation" and r["run_id"] == "killed")
        assert not any(r["type"] == "round" and r["run_id"] == "killed" for r in recs), \
            "the ClientApp was killed before completing: no round record, no update released"
        assert len(recs) == killed_at, "nothing was written after the kill"
        out = tmp_path / "runs" / "killed"
        assert json.loads((out / "status.json").read_text())["status"] == "stopped"
        assert not (out / "ledger.jsonl").exists() or "hospital-c" not in (out / "ledger.jsonl").read_text()

        # the site's next round, in a new ClientApp process, starts from a budget including the killed round
        status = net.wait(net.submit(short_round.to_run_config()), timeout=240)
        assert status == "finished:completed", net.tail("superlink")

    killed_charge = tuple(reservation["charge"])
    assert killed_charge[2] == 2000
    delta = reservation["delta"]
    after = next(r for r in _records(ledger) if r["type"] == "round" and r["run_id"] == "after")
    killed_eps = compute_epsilon([killed_charge], delta)
    assert after["epsilon_before"] == pytest.approx(killed_eps, rel=1e-9)
    assert after["epsilon_after"] == pytest.approx(
        compute_epsilon([killed_charge, tuple(after["charge"])], delta), rel=1e-9)
    assert sum(h[2] for h in after["history"]) == 2000 + after["steps"], "the lifetime history holds the killed steps"
    history = json.loads((tmp_path / "runs" / "after" / "history.json").read_text())
    assert history[0]["sites"]["hospital-c"]["epsilon"] == pytest.approx(after["epsilon_after"], rel=1e-9)
