"""`atoll run status --watch`: site states, epsilon against budgets, round times and ETA from a real run folder."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import pytest

from server.run_cli import server_state
from server.run_watch import run_view, view_lines, watch
from tests.console_helpers import RunWriter


@pytest.fixture()
def running(tmp_path):
    """Round 1: three sites contribute; round 2: hospital-c refuses, hospital-b does not answer (dropped)."""
    w = RunWriter(tmp_path, "watched", rounds=4, sites=["hospital-a", "hospital-b", "hospital-c"])
    w.round(1)
    w.sites = ["hospital-a", "hospital-c"]
    w.round(2, refuse={"hospital-c": ("BUDGET_EXHAUSTED", "projected epsilon 9.1 exceeds the budget 8")})
    weights = w.run_dir / "weights"
    t0 = time.time() - 1000
    for k, t in ((0, t0), (1, t0 + 300), (2, t0 + 700)):  # rounds of 300 s and 400 s
        os.utime(weights / f"round-{k:03d}.pt", (t, t))
    return w


def test_view_states_budgets_and_eta(running):
    now = time.time()
    v = run_view(running.run_dir, server_state(running.run_dir), now=now)
    assert (v["status"], v["round"], v["rounds"]) == ("running", 2, 4)
    a, b, c = (v["sites"][s] for s in ("hospital-a", "hospital-b", "hospital-c"))
    assert a["state"] == "training" and "round 3 in flight" in a["reason"]
    assert b["state"] == "dropped" and "last answered round 1" in b["reason"]
    assert c["state"] == "refused" and "BUDGET_EXHAUSTED" in c["reason"]
    ledger = [json.loads(x) for x in (running.run_dir / "ledger.jsonl").read_text().splitlines()]
    last_a = [r for r in ledger if r["site"] == "hospital-a"][-1]
    assert a["epsilon"] == pytest.approx(last_a["epsilon_after"]) and a["budget"] == 8.0
    assert c["budget"] == 12.0 and c["epsilon"] is not None  # its round-1 spend stays shown
    assert v["round_seconds"] == pytest.approx([300, 400], abs=1)
    assert v["in_flight_seconds"] == pytest.approx(300, abs=2)
    assert v["eta_seconds"] == pytest.approx(350 * 2 - 300, abs=3)  # two rounds left, one under way for 300 s
    text = "\n".join(view_lines(v))
    assert "round 2 of 4, round 3 in flight for 5m00s; 5m50s per round, ETA 6m4" in text
    assert "hospital-c" in text and "of 12 (" in text and "accuracy" in text


def test_watch_follows_until_the_run_ends(running):
    out = io.StringIO()

    def finish_later():
        time.sleep(0.4)
        running.sites = ["hospital-a"]
        running.round(3)
        running.round(4)
        running.finish()

    t = threading.Thread(target=finish_later)
    t.start()
    v = watch(running.run_dir, server_state, interval=0.1, timeout=30, out=out)
    t.join()
    assert v["status"] == "completed" and v["round"] == 4
    text = out.getvalue()
    assert "round 2 of 4" in text and "run watched: completed — round 4 of 4" in text
    assert text.count("run watched:") >= 2  # reprinted as the run moved on, not once per tick


def _events(folder):
    """(tag, step, value) of every scalar in a folder of TensorBoard event files (TFRecord framing, tensorboardX's
    protobuf): read back independently of the writer."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for f in sorted(folder.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.append((v.tag, ev.step, v.simple_value))
    return out


def test_rounds_are_written_as_tensorboard_events(running):
    """RunOutputs.record_round writes each round's released metrics, epsilon and participation as scalars."""
    history = json.loads((running.run_dir / "history.json").read_text())
    ev = {(tag, step): value for tag, step, value in _events(running.run_dir / "tensorboard")}
    a1 = history[0]["sites"]["hospital-a"]
    assert ev[("site/hospital-a/val_auc", 1)] == pytest.approx(a1["val"]["val_auc"])
    assert ev[("site/hospital-a/train_loss", 1)] == pytest.approx(a1["train"]["train_loss"])
    assert ev[("site/hospital-a/epsilon", 2)] == pytest.approx(history[1]["sites"]["hospital-a"]["epsilon"])
    assert ev[("site/hospital-c/contributed", 1)] == 1.0 and ev[("site/hospital-c/contributed", 2)] == 0.0
    assert ("site/hospital-b/val_auc", 2) not in ev  # dropped in round 2: nothing invented
    assert ev[("round/train_wall_seconds", 2)] == 1.0


def test_demo_progress_reads_sites_ledgers(running):
    """The demo's bars: rounds aggregated, each site's completed rounds and the round it is training right now."""
    from contract import Mechanism
    from privacy.guard import RoundRequest
    from rich.console import Console

    from atoll.demo_progress import find_run, progress_state, round_progress

    ledgers = {s: running.root / s / "state" / "ledger.jsonl" for s in ("hospital-a", "hospital-b", "hospital-c")}
    assert find_run(running.runs_dir, 0.0) == running.run_dir
    w = running
    w.guards["hospital-a"].reserve(RoundRequest(w.name, 3, Mechanism(noise_multiplier=w.SIGMA, clip_norm=w.CLIP,
                                                                    sample_rate=w.Q, steps=w.STEPS)),
                                   weights_in_sha256="3" * 64)  # round 3 started at hospital-a, not finished
    st = progress_state(running.run_dir, ledgers)
    assert st["rounds_done"] == 2
    assert st["sites"]["hospital-a"] == {"done": 2, "training": 3, "refused": []}
    assert st["sites"]["hospital-c"] == {"done": 1, "training": None, "refused": [2]}
    assert st["sites"]["hospital-b"]["done"] == 1
    buf = io.StringIO()
    with round_progress(running.runs_dir, 4, ledgers, enabled=True, interval=0.05,
                        console=Console(file=buf, width=100, force_terminal=False)):
        os.utime(running.run_dir / "settings.json")  # as if created by this demo's ServerApp
        time.sleep(0.3)
    text = buf.getvalue()
    assert "hospital-a: training round 3" in text and "hospital-c: refused round 2" in text
    assert "rounds aggregated" in text and "2/4" in text
