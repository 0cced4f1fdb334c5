"""Real Flower simulation runs of the ServerApp + ClientApp on the demo consortium."""

from __future__ import annotations

import json
import os
import re

import pytest
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from atoll import simulation
from contract import threshold
from atoll.demo import approve_run, prepare_site_keys
from atoll.demo_data import CANARY_ACCESSION, CANARY_ID, CANARY_NAME, HOSPITALS
from client.app import app as client_app
from client.runtime import SIM_SITE_CONFIGS_ENV
from contract import Mechanism
from server.app import run_consortium
from server.settings import RunSettings

pytestmark = pytest.mark.slow


class RecordingGrid:
    """Wraps the simulation's Grid and keeps every reply a site sent (the 'wire')."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.replies = []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, timeout=None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def _simulate(configs, settings):
    holder = {}
    app = ServerApp()

    @app.main()
    def _main(grid, context: Context):
        rec = RecordingGrid(grid)
        holder["outputs"] = run_consortium(rec, settings, context.run_id)
        holder["grid"] = rec

    os.environ[SIM_SITE_CONFIGS_ENV] = os.pathsep.join(str(c) for c in configs)
    simulation.run_sites(app, client_app, len(configs))  # the demo's resources: fair share of the cores, nice 0
    return holder["outputs"], holder["grid"]


def _wire_text(replies) -> str:
    """Everything a site sent, as text: metric and config values, array names, error reasons."""
    parts = []
    for m in replies:
        parts.append(str(m.metadata.src_node_id))
        if m.has_error():
            parts.append(str(m.error.reason))
            continue
        for name, rec in m.content.items():
            parts.append(name)
            if hasattr(rec, "items"):
                for k, v in rec.items():
                    parts.append(k)
                    if not hasattr(v, "numpy"):
                        parts.append(repr(v))
    return "\n".join(parts)


def test_two_round_simulation_trains_signs_and_leaks_nothing(fresh_consortium, tmp_path):
    names = [h.name for h in HOSPITALS]
    configs = [fresh_consortium / n / "site.toml" for n in names]
    keys = prepare_site_keys(fresh_consortium, names)
    settings = RunSettings(num_server_rounds=2, run_dir=str(tmp_path), run_name="sim", keys_dir=str(keys), num_sites=3, mechanism=Mechanism(steps=5))
    approve_run(configs, settings)
    outputs, grid = _simulate(configs, settings)
    history = outputs.history
    assert [h["round"] for h in history] == [1, 2]
    for entry in history:
        assert sorted(entry["sites"]) == sorted(names)
        for s in entry["sites"].values():
            assert s["status"] == "contributed", s
            # only what the demo policies list: the basic metrics and the suppressed validation threshold counts
            assert set(s["val"]) <= {"num-examples", "val_loss", "val_accuracy", "val_auc", *threshold.metric_keys()}
            assert all(v % 5 == 0 for k, v in s["val"].items() if k.startswith("val_threshold_counts")), s["val"]
    eps1 = {n: history[0]["sites"][n]["epsilon"] for n in names}
    eps2 = {n: history[1]["sites"][n]["epsilon"] for n in names}
    assert all(eps2[n] > eps1[n] > 0 for n in names), "epsilon accumulates across rounds"

    # PHI canaries planted in every DICOM header never cross the wire or reach the server's files.
    wire = _wire_text(grid.replies)
    server_files = "\n".join(p.read_text(errors="replace") for p in outputs.root.rglob("*.json*"))
    for text in (wire, server_files):
        site_paths = [str(fresh_consortium / n) for n in names]
        for canary in (CANARY_NAME, CANARY_ID, CANARY_ACCESSION, *site_paths):
            assert canary not in text
        assert not re.search(r"\b1\.2\.826\.0\.1\.3680043\.", text), "no DICOM UID may leave a site"
        assert "P0000" not in text and ".dcm" not in text


def _copy_sites(src, dst, names):
    import shutil

    for n in names:
        shutil.copytree(src / n, dst / n, ignore=shutil.ignore_patterns("state"))
    return [dst / n / "site.toml" for n in names]


def _edit_privacy(config, **changes):
    text = config.read_text()
    for key, value in changes.items():
        lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key} =")]
        at = lines.index("[privacy]") + 1
        lines.insert(at, f"{key} = {value}")
        text = "\n".join(lines) + "\n"
    config.write_text(text)


def test_refusing_sites_are_reported_and_the_run_goes_on_or_stops_clearly(demo_consortium, tmp_path):
    names = [h.name for h in HOSPITALS]
    configs = _copy_sites(demo_consortium, tmp_path / "sites", names)
    keys = prepare_site_keys(tmp_path / "sites", names)
    _edit_privacy(configs[1], max_epsilon=0.5)           # hospital-b: a budget one round would exceed
    # sigma 1, q 0.06 pinned: hospital-b's 0.5 budget must not fit one round, sigma 1 is outside [2, 10] below
    pinned = dict(mechanism=Mechanism(steps=3, noise_multiplier=1.0, sample_rate=0.06))
    settings = RunSettings(num_server_rounds=2, run_dir=str(tmp_path / "runs"), run_name="on", keys_dir=str(keys), num_sites=3, min_sites=1, **pinned)
    approve_run(configs[1:], settings)                    # hospital-a never approved this run
    outputs, grid = _simulate(configs, settings)
    assert [h["round"] for h in outputs.history] == [1, 2]
    for entry in outputs.history:
        sites = entry["sites"]
        assert sites["hospital-a"]["status"] == "refused" and sites["hospital-a"]["code"] == "RUN_NOT_APPROVED"
        assert sites["hospital-b"]["status"] == "refused" and sites["hospital-b"]["code"] == "BUDGET_EXCEEDED"
        assert "0.5" in sites["hospital-b"]["message"], "the lead sees the budget in the reason"
        assert sites["hospital-c"]["status"] == "contributed"
    status = json.loads((outputs.root / "status.json").read_text())
    assert status["status"] == "completed"
    ledger_b = (tmp_path / "sites" / "hospital-b" / "state" / "ledger.jsonl").read_text()
    assert "refus" in ledger_b, "the refusal is recorded in the site's own ledger"
    assert not (tmp_path / "sites" / "hospital-a" / "state" / "ledger.jsonl").exists() or \
        "reserv" not in (tmp_path / "sites" / "hospital-a" / "state" / "ledger.jsonl").read_text(), \
        "an unapproved run is refused before any privacy is reserved"

    # Too few sites left: the run stops at round 1 with a message naming why.
    _edit_privacy(configs[2], noise_multiplier="[2.0, 10.0]")   # hospital-c: sigma 1.0 is out of policy
    stop = RunSettings(num_server_rounds=2, run_dir=str(tmp_path / "runs"), run_name="stop", keys_dir=str(keys), num_sites=3, min_sites=2, **pinned)
    approve_run(configs, stop)
    outputs, _ = _simulate(configs, stop)
    status = json.loads((outputs.root / "status.json").read_text())
    assert status["status"] == "stopped"
    assert "min-sites is 2" in status["reason"] and "NOISE_OUT_OF_POLICY" in status["reason"]
    assert "BUDGET_EXCEEDED" in status["reason"]
