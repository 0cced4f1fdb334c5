"""README.md's walkthrough, run as written: every role's commands on 127.0.0.1, real Flower processes.

The blocks marked ``<!-- walkthrough: NAME [background] -->`` in README.md are run in order, each with bash in
one empty folder (HOME points into it, so ``~/.flwr`` is the walkthrough's own Flower config). A background block
is a long-running process (SuperLink, SuperNode) that a reader starts in another terminal: it is started here and
left running until the end. The only change to the text: the port numbers 8000, 9094 and 9095 become free ports,
so that parallel test runs do not collide. If a README command stops working, this test fails; edit both.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atoll.localnet import STARTUP_TIMEOUT_S, free_port
from conftest import REPO

pytestmark = pytest.mark.slow

BLOCK = re.compile(r"<!-- walkthrough: (?P<name>[\w-]+)(?P<bg> background)? -->\n```bash\n(?P<body>.*?)\n```",
                   re.DOTALL)
PORTS = (8000, 9094, 9095)


def walkthrough_blocks(readme: Path = REPO / "README.md") -> list[tuple[str, bool, str]]:
    """(name, runs in the background, bash text) of each marked block, in README order."""
    return [(m["name"], bool(m["bg"]), m["body"]) for m in BLOCK.finditer(readme.read_text(encoding="utf-8"))]


def test_the_readme_marks_every_role_of_the_walkthrough():
    names = [name for name, _, _ in walkthrough_blocks()]
    assert names == ["lead-init", "superlink", "sites-init", "lead-register", "sites-approve", "supernode-a",
                     "supernode-b", "lead-run", "lead-stop", "audit"]
    text = " ".join(body for _, _, body in walkthrough_blocks())
    for needed in ("--enable-supernode-auth", "--ssl-certfile", "--auth-supernode-private-key", "--port 9095",
                   "atoll site approve", "atoll run stop", "atoll audit verify", "atoll audit report",
                   "[superlink.my-consortium]", "--superlink my-consortium"):
        assert needed in text, needed


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = STARTUP_TIMEOUT_S) -> None:
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert proc.poll() is None, f"exited early:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on {port} after {timeout}s:\n{log.read_text()[-3000:]}")


def test_the_readme_walkthrough_runs_as_written(tmp_path):
    work, home = tmp_path / "walk", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    ports = {p: free_port() for p in PORTS}
    env = {k: v for k, v in os.environ.items() if k != "FLWR_HOME"}
    env.update(HOME=str(home), PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
               PYTHONPATH=str(REPO), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               PYTHONUNBUFFERED="1")
    background: list[subprocess.Popen] = []
    outputs: dict[str, str] = {}

    def substituted(body: str) -> str:
        for old, new in ports.items():
            body = re.sub(rf"\b{old}\b", str(new), body)
        return body

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], cwd=work, env=env, capture_output=True, text=True, timeout=60)

    try:
        for name, is_background, body in walkthrough_blocks():
            script = substituted(body)
            log = tmp_path / f"{name}.log"
            if is_background:
                proc = subprocess.Popen(["bash", "-c", script], cwd=work, env=env, stdout=open(log, "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
                background.append(proc)
                if name == "superlink":
                    _wait_port(ports[8000], proc, log)
                continue
            if name == "lead-run":  # both SuperNodes online before the lead starts (a reader sees them connect)
                end = time.time() + 120
                while flwr("supernode", "ls", "my-consortium").stdout.count("online") < 2:
                    assert time.time() < end, flwr("supernode", "ls", "my-consortium").stdout + "\n" + "\n".join(
                        (tmp_path / f"supernode-{s}.log").read_text()[-2000:] for s in "ab")
                    time.sleep(1)
            proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=work, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            background.append(proc)  # killed at the end should the test fail while it runs
            out, _ = proc.communicate(timeout=1800)
            res = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
            outputs[name] = res.stdout
            log.write_text(outputs[name])
            assert res.returncode == 0, (
                f"README walkthrough block {name!r} failed (exit {res.returncode}):\n{script}\n---\n"
                f"{outputs[name][-4000:]}\n--- superlink log:\n{(tmp_path / 'superlink.log').read_text()[-3000:]}")

        # what each role was promised, from the outputs and the run folders
        assert "my-consortium" in (home / ".flwr" / "config.toml").read_text()
        assert "run folder (on the SuperLink host): " + str(work / "runs" / "first-run") in outputs["lead-run"]
        assert "run first-run: completed" in outputs["lead-run"]
        first = work / "runs" / "first-run"
        history = json.loads((first / "history.json").read_text())
        assert [h["round"] for h in history] == [1, 2]
        for entry in history:
            assert sorted(entry["sites"]) == ["hospital-a", "hospital-b"]
            assert all(s["status"] == "contributed" for s in entry["sites"].values()), entry
        second = work / "runs" / "second-run"
        status = json.loads((second / "status.json").read_text())
        assert status["status"] == "stopped" and status["stopped_by"] == "lead" and status["stopped_at_round"] == 1
        assert len(json.loads((second / "history.json").read_text())) == 1
        assert "stopped by the lead at round 1 of 2" in outputs["lead-stop"]
        assert re.search(r"Flower says: (finished|running)", outputs["lead-stop"]), outputs["lead-stop"]
        audit = outputs["audit"]
        assert "run status: stopped — stopped by the lead at round 1 of 2" in audit
        assert "verdict: PASS" in audit and "missing from the server copy" not in audit, audit
        assert "report written" in audit and (work / "report.html").stat().st_size > 1000
        # the server recorded every round a site charged: one round record per site in the server's copy
        rounds = [json.loads(line) for line in (second / "ledger.jsonl").read_text().splitlines() if line.strip()]
        assert len(rounds) == 2

        # a plaintext SuperNode against this TLS SuperLink: with the documented --max-retries it stops, not loops
        plain_log = tmp_path / "plaintext-supernode.log"
        plain = subprocess.Popen(["flower-supernode", "--superlink", f"127.0.0.1:{ports[8000]}", "--insecure",
                                  "--port", str(free_port()), "--max-retries", "2", "--max-wait-time", "30",
                                  "--node-config", f'site-config="{work / "hospital-a" / "site.toml"}"'],
                                 cwd=work, env=env, stdout=open(plain_log, "w"), stderr=subprocess.STDOUT,
                                 start_new_session=True)  # its own SuperExec child would hold a pipe open
        background.append(plain)
        assert plain.wait(timeout=180) == 1, plain_log.read_text()[-3000:]
        assert "Exit Code: 305" in plain_log.read_text()
    finally:
        for proc in background:  # each its own process group: also what it started (SuperExec, ClientApps)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in background:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
