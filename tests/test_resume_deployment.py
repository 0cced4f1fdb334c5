"""The consortium's host dies mid-round (SIGKILL of the real SuperLink and ServerApp processes) and the lead resumes.

Deployment engine on 127.0.0.1 (atoll.localnet): one SuperLink, two SuperNodes. Round 1 completes and is committed;
while the sites train round 2 the SuperLink, its SuperExec and the ServerApp process are killed without clean-up.
A new SuperLink starts on the same address, the SuperNodes reconnect, and `atoll run resume RUN_FOLDER` submits the
same run again. Then: `atoll audit verify` passes, each (site, round) has exactly one round record in the consortium
ledger, and every site's epsilon is at least that of the same rounds uninterrupted and at most that plus one
round's charge (privacy.accounting computes the uninterrupted value; no second deployment is run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atoll.demo import approve_run, prepare_site_keys
from atoll.demo_data import HOSPITALS
from atoll.localnet import LocalConsortium, process_tree
from conftest import REPO
from contract import Mechanism
from privacy.accounting import compute_epsilon
from privacy.audit import verify_run
from server.settings import RunSettings

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finding the processes needs /proc")]


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_for(what: str, cond, timeout: float, net: LocalConsortium, poll: float = 0.1) -> None:
    end = time.time() + timeout
    while not cond():
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {what}\n--- superlink ---\n{net.tail('superlink', 40)}")
        time.sleep(poll)


def test_superlink_and_serverapp_killed_mid_round_resume_as_the_same_run(fresh_consortium, tmp_path):
    names = [h.name for h in HOSPITALS[:2]]
    configs = [fresh_consortium / n / "site.toml" for n in names]
    ledgers = {n: fresh_consortium / n / "state" / "ledger.jsonl" for n in names}
    keys = prepare_site_keys(fresh_consortium, names)
    runs = tmp_path / "runs"
    settings = RunSettings(run_dir=str(runs), run_name="crash", keys_dir=str(keys), num_server_rounds=2,
                           num_sites=2, min_sites=2, round_timeout=900.0, mechanism=Mechanism(steps=5))
    approve_run(configs, settings)
    root = runs / "crash"
    transcript: list[str] = []
    t0 = time.time()

    def say(line: str) -> None:
        transcript.append(f"[{time.time() - t0:6.1f} s] {line}")

    def site_state(rnd: int) -> dict[str, str]:
        out = {}
        for n, p in ledgers.items():
            mine = [r for r in _records(p) if r.get("run_id") == "crash" and r.get("server_round") == rnd]
            out[n] = ("completed" if any(r["type"] == "round" for r in mine) else
                      "reserved" if any(r["type"] == "reservation" for r in mine) else "not started")
        return out

    with LocalConsortium(REPO, configs, insecure=True, workdir=tmp_path / "net", persistent_state=True) as net:
        net.submit(settings.to_run_config())
        committed = lambda: (root / "checkpoint.json").exists() and json.loads(
            (root / "checkpoint.json").read_text())["round"] == 1
        _wait_for("round 1 to be committed", committed, 900, net)
        _wait_for("a site to reserve round 2", lambda: set(site_state(2).values()) != {"not started"}, 900, net)
        killed = net.kill_superlink()
        say(f"SIGKILL during round 2 ({', '.join(f'{n}: {s}' for n, s in site_state(2).items())}): "
            + "; ".join(f"{cmd} (pid {pid})" for pid, cmd in killed))
        assert any("flwr-serverapp" in cmd for _, cmd in killed), killed
        assert not (root / "status.json").exists()
        # the sites stay up: a ClientApp already training round 2 finishes it (its reply has nowhere to go). The
        # lead's SuperLink comes back after that, as after a host reboot
        _wait_for("the sites' round-2 ClientApps to end", lambda: not any(
            "flwr-clientapp" in _cmdline(pid) for node in net.procs if "supernode" in " ".join(map(str, node.args))
            for pid in process_tree(node.pid)), 600, net, poll=0.5)  # a /proc scan per poll: not 10 a second
        say(f"sites after the kill: {', '.join(f'{n}: {s}' for n, s in site_state(2).items())}")
        net.restart_superlink()
        say("a new SuperLink listens on the same address")
        for i, cfg in enumerate(configs):  # a SuperNode gives up after its connection retries (flower-supernode
            node = next(p for p in net.procs if p.args[-1:] and str(cfg.resolve()) in " ".join(map(str, p.args)))
            if node.poll() is not None:      # --max-retries/--max-wait-time); the site's admin starts it again
                net.start_supernode(i, cfg)
                say(f"{names[i]}: its SuperNode had given up reconnecting; started again (same site state)")
        env = {**net.env, "PYTHONPATH": str(REPO)}
        res = subprocess.run([sys.executable, "-m", "atoll.cli", "run", "resume", str(root), "--superlink", "local",
                              "--allow-insecure-demo"], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        say("$ atoll run resume " + root.name + "\n" + "\n".join(
            line for line in res.stdout.splitlines() if not line.startswith("$ ")))
        _wait_for("the resumed run to finish", lambda: (root / "status.json").exists(), 900, net)
    status = json.loads((root / "status.json").read_text())
    assert status["status"] == "completed", status
    resumed_log = [json.loads(line) for line in (root / "resumes.jsonl").read_text().splitlines()]
    assert [e["from_round"] for e in resumed_log] == [1]
    say(f"resumed after round 1; set aside: {resumed_log[0]['set_aside'] or 'nothing'}; status {status['status']}")

    result = verify_run(root, list(ledgers.values()), keys)
    assert result.ok, "\n".join(str(f) for f in result.errors)
    say(f"atoll audit verify: {'PASS' if result.ok else 'FAIL'}")
    server_rounds = [(r["site"], r["server_round"]) for r in _records(root / "ledger.jsonl")]
    assert sorted(server_rounds) == sorted((n, k) for n in names for k in (1, 2)), server_rounds
    for n, path in ledgers.items():
        mine = [r for r in _records(path) if r.get("run_id") == "crash"]
        final = [r for r in mine if r["type"] == "round"][-1]
        charge = tuple(final["charge"])
        clean = compute_epsilon([charge] * 2, final["delta"])
        worst = compute_epsilon([charge] * 3, final["delta"])
        eps = final["epsilon_after"]
        say(f"{n}: epsilon {eps:.4f} (uninterrupted {clean:.4f}, bound {worst:.4f}); "
            f"{sum(r['type'] == 'reservation' for r in mine)} reservation(s), "
            f"{sum(r['type'] == 'round' for r in mine)} round record(s)")
        assert clean - 1e-9 <= eps <= worst + 1e-9
    print("\n".join(transcript))
    if os.environ.get("ATOLL_RESUME_TRANSCRIPT"):
        Path(os.environ["ATOLL_RESUME_TRANSCRIPT"]).write_text("\n".join(transcript) + "\n")


def test_the_demo_killed_mid_run_resumes_when_run_again(fresh_consortium):
    """`atoll demo` SIGKILLed (with its Ray workers) after round 1 of 2; the same command again resumes it."""
    import signal

    out = fresh_consortium  # the demo's own folder layout, data and caches already written (a private copy)
    cmd = [sys.executable, "-m", "atoll.cli", "demo", "--out", str(out), "--rounds", "2", "--local-steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def round_1_committed() -> bool:
        return any(json.loads(p.read_text()).get("round") == 1 for p in (out / "runs").glob("*/checkpoint.json"))

    try:
        end = time.time() + 900
        while not round_1_committed():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < end, "round 1 of the demo was not committed in time"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    [killed] = [p.parent for p in (out / "runs").glob("*/checkpoint.json")]
    assert not (killed / "status.json").exists()

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"RESUMING the interrupted demo run {killed.name} after round 1 of 2" in again.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"] == killed.name and summary["rounds"] == 2 and summary["status"] == "completed"
    assert [h["round"] for h in summary["history"]] == [1, 2]
    result = verify_run(killed, [out / h / "state" / "ledger.jsonl" for h in summary["sites"]],
                        out / "consortium" / "keys")
    assert result.ok, "\n".join(str(f) for f in result.errors)
