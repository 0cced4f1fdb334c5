"""A consortium on one machine with Flower's deployment engine: one SuperLink, one SuperNode per site.

Used by the deployment tests and benchmarks, and a faithful miniature of a real deployment: the
same `flower-superlink` / `flower-supernode` processes, the app submitted as a FAB with `flwr run`,
each SuperNode pointed at its own hospital's site config. Everything is isolated (own FLWR_HOME,
free ports, own working directory) and every process is killed on exit, also after a failure.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from client.allocator import site_env

BIN = Path(sys.executable).parent
# How long a spawned Flower process that is still alive may take to listen. Idle, a SuperNode listens in ~1.5 s;
# under a loaded CI worker one took more than 60 s, so the bound is generous: a dead process fails at once anyway.
STARTUP_TIMEOUT_S = 240.0
# What the SuperLink logs for each status question of `wait` (several a second): left out of `tail`, so that a
# failing test shows what the SuperLink did, not how often it was asked
_STATUS_POLL_NOISE = ("/v1/control/list-runs", "ControlServicer.ListRuns")
log = logging.getLogger("atoll.localnet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Flower's processes start each other by name (flower-superexec, flwr-clientapp): use this venv's.
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    return env


def process_tree(root: int) -> list[int]:
    """``root`` and every live process descended from it or in its session (Linux /proc; [root] elsewhere).

    Flower's SuperLink starts its SuperExec, and that the ServerApp process, in sessions of their own."""
    procs: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after the comm: state ppid pgrp session ...
        if fields[0] != "Z":
            procs[int(entry.name)] = (int(fields[1]), int(fields[3]))
    out, grew = {root} | {p for p, (_, sid) in procs.items() if sid == root}, True
    while grew:
        more = {p for p, (ppid, _) in procs.items() if ppid in out} - out
        out |= more
        grew = bool(more)
    return sorted(p for p in out if p in procs or p == root)


@dataclass
class LocalConsortium(AbstractContextManager):
    """`with LocalConsortium(app_dir, site_configs, insecure=True) as net: net.run(...)`.

    TLS material and node authentication keys can be given (tls_dir with ca.crt/server.pem/server.key;
    node_keys one private key path per site); insecure mode must be asked for explicitly.

    Tests may also give per-site extra `--node-config` entries (`node_configs`, one dict per site, next
    to `site-config`) and point the SuperNodes at another address than the SuperLink's own
    (`supernode_superlink_address`, e.g. a capturing proxy in front of it); the `flwr` CLI always
    talks to the SuperLink directly.
    """

    app_dir: Path
    site_configs: list[Path]
    insecure: bool = False
    tls: dict[str, Path] | None = None            # {"ca": ..., "cert": ..., "key": ...}
    node_keys: list[Path] | None = None           # per-site node-auth private keys (OpenSSH ECDSA)
    workdir: Path | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)
    node_configs: list[dict[str, str | int | float | bool]] | None = None  # extra entries, one dict per site
    supernode_superlink_address: str | None = None   # default: 127.0.0.1:<SuperLink port>
    # "process": each SuperNode runs in Flower's process isolation with `atoll-superexec`, so the site's own
    # installed Atoll checks every task's bundle against its approvals before any of its code runs
    isolation: str = "subprocess"
    superlink: subprocess.Popen | None = field(default=None, init=False)  # the SuperLink process running now
    # keep the SuperLink's state (nodes, runs) in a file, as a real deployment does (`--database`), so that a
    # restarted SuperLink still knows the SuperNodes (with the default in-memory state they cannot rejoin)
    persistent_state: bool = False

    def __post_init__(self) -> None:
        if not self.insecure and not self.tls:
            raise ValueError("a deployment needs TLS material (tls=...) or an explicit insecure=True")
        if self.isolation not in ("subprocess", "process"):
            raise ValueError(f"isolation must be 'subprocess' or 'process', got {self.isolation!r}")
        if self.insecure:
            log.warning("INSECURE local consortium: plaintext transport and no node authentication "
                        "(demo/test only; a real consortium uses TLS and enrolled node keys)")
        self._own_workdir = self.workdir is None
        self.workdir = Path(self.workdir or tempfile.mkdtemp(prefix="atoll-net-"))
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = flower_env(self.home)
        self._control = None  # Flower's Control API client, made on first use (run_status)

    # -- processes -------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        fh = open(log, "w")
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env or self.env, cwd=self.workdir,
                                start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def _transport_args(self, server: bool) -> list[str]:
        if self.insecure:
            return ["--insecure"]
        assert self.tls
        if server:
            return ["--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"]),
                    "--ssl-keyfile", str(self.tls["key"])]
        return ["--root-certificates", str(self.tls["ca"])]

    def start(self) -> "LocalConsortium":
        self._start_superlink("superlink")
        self._write_cli_config()
        if self.node_keys:
            for i, key in enumerate(self.node_keys):
                self.flwr(["supernode", "register", str(Path(str(key) + ".pub")), "local", "--name", f"site-{i}"],
                          check=True)
        for i, cfg in enumerate(self.site_configs):
            self.start_supernode(i, cfg)
        return self

    def _start_superlink(self, name: str) -> subprocess.Popen:
        args = [str(BIN / "flower-superlink"), *self._transport_args(True), "--host", "127.0.0.1",
                "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if self.node_keys:
            args.append("--enable-supernode-auth")
        if self.persistent_state:
            args += ["--database", str(self.workdir / "superlink-state.db")]
        proc = self._spawn(name, args)
        self.superlink = proc
        self._wait_port(self.port, name)
        return proc

    def kill_superlink(self) -> list[tuple[int, str]]:
        """SIGKILL the SuperLink and everything it started (its SuperExec, the ServerApp process): a crash of the
        consortium's host, no clean-up. Returns (pid, command) of each process killed."""
        killed = []
        for pid in process_tree(self.superlink.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
            killed.append((pid, " ".join(Path(c.decode(errors="replace")).name for c in cmd[:2] if c)))
        self.superlink.wait(timeout=30)
        return killed

    def restart_superlink(self) -> subprocess.Popen:
        """A new SuperLink on the same address (the SuperNodes reconnect to it on their own)."""
        n = sum(1 for k in self.logs if k.startswith("superlink"))
        return self._start_superlink(f"superlink-{n + 1}")

    def start_supernode(self, i: int, cfg: Path, key: Path | None = None) -> subprocess.Popen:
        superlink = self.supernode_superlink_address or f"127.0.0.1:{self.port}"
        runtime_port = free_port()
        args = [str(BIN / "flower-supernode"), *self._transport_args(False),
                "--superlink", superlink, "--host", "127.0.0.1", "--port", str(runtime_port),
                "--node-config", self.node_config_arg(i, cfg)]
        key = key or (self.node_keys[i] if self.node_keys else None)
        if key:
            args += ["--auth-supernode-private-key", str(key)]
        if self.isolation == "process":
            args += ["--isolation", "process"]
        # a site's processes (and the ClientApps they start, which train) run under the site's allocator
        env = site_env(self.env)
        node = self._spawn(f"supernode-{i}", args, env=env)
        if self.isolation == "process":
            self._wait_port(runtime_port, f"supernode-{i}")
            # the SuperNode's runtime API is plaintext on 127.0.0.1 (it never leaves the site's host)
            self._spawn(f"superexec-{i}", [str(BIN / "atoll-superexec"), "--runtime-api-address",
                                           f"127.0.0.1:{runtime_port}", "--insecure"], env=env)
        return node

    def node_config_arg(self, i: int, cfg: Path) -> str:
        """`--node-config` of site i: its site config plus the test's extra entries for that site."""
        entries: dict = {"site-config": str(Path(cfg).resolve())}
        if self.node_configs and i < len(self.node_configs):
            extra = self.node_configs[i] or {}
            if "site-config" in extra:
                raise ValueError("node_configs must not override site-config (give site_configs instead)")
            entries.update(extra)
        return " ".join(f"{k}={json.dumps(v)}" for k, v in entries.items())

    def _write_cli_config(self) -> None:
        lines = ["[superlink]", 'default = "local"', "", "[superlink.local]",
                 f'address = "127.0.0.1:{self.port}"']
        lines.append("insecure = true" if self.insecure else f'root-certificates = "{self.tls["ca"]}"')
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def _wait_port(self, port: int, name: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Wait until the process just spawned listens on `port`. A process that exits fails at once; one that is
        alive but slow (a loaded 2-core CI box took over 60 s to import the SuperNode's HTTP stack) gets
        `timeout` seconds."""
        end = time.time() + timeout
        while time.time() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            if self.procs and self.procs[-1].poll() is not None:
                raise RuntimeError(f"{name} exited early:\n{self.tail(name)}")
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not listen on {port} within {timeout}s:\n{self.tail(name)}")

    # -- Flower CLI --------------------------------------------------------------------------------
    def flwr(self, args: list[str], *, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        res = subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True,
                             text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def submit(self, run_config: dict) -> int:
        """`flwr run APP local --run-config ...`; returns the Flower run id."""
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        res = self.flwr(["run", str(self.app_dir), "local", "--run-config", overrides, "--format", "json"],
                        check=True)
        try:
            return int(json.loads(res.stdout)["run-id"])
        except (ValueError, KeyError):
            raise RuntimeError(f"flwr run did not start a run:\n{res.stdout}\n{res.stderr}") from None

    def run_status(self, run_id: int) -> str:
        """The run's status as `flwr ls` prints it (e.g. ``running``, ``finished:completed``), asked in-process.

        The same Control API request (ListRuns) the `flwr` CLI sends, through Flower's own client and interceptors,
        without starting a CLI process for each question: a `flwr ls` costs about 2 s of CPU (Python start-up and
        Flower's imports), and polling it once a second took a third of a 2-core machine away from the run."""
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

        if self._control is None:
            from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
            from flwr.supercore.control import ControlHttpClient
            from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

            self._control = ControlHttpClient.from_server_address(
                server_address=f"127.0.0.1:{self.port}", insecure=self.insecure,
                root_certificates=None if self.insecure else str(self.tls["ca"]),
                interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
        res = self._control.ListRuns(ListRunsRequest(run_id=run_id))
        runs = [run_from_proto(proto) for proto in res.run_dict.values()]
        if not runs:
            return ""
        status = runs[0].status
        return f"{status.status}:{status.sub_status}" if status.sub_status else status.status

    def wait(self, run_id: int, timeout: float = 600, poll: float = 0.5) -> str:
        """Poll the SuperLink until the run is finished; returns its status string (e.g. finished:completed)."""
        end = time.time() + timeout
        status, last = "", ""
        while time.time() < end:
            try:
                status = self.run_status(run_id)
            except Exception as exc:  # noqa: BLE001 - a SuperLink restarting or busy: ask again, report at the end
                last = f"{type(exc).__name__}: {exc}"[-2000:]
            else:
                if status.startswith("finished"):
                    return status
            time.sleep(poll)
        res = self.flwr(["ls", "--run-id", str(run_id), "--format", "json"])
        last = f"{last}\n{(res.stdout + res.stderr)[-2000:]}"
        raise TimeoutError(f"run {run_id} not finished after {timeout}s (last status {status!r}); "
                           f"last error and `flwr ls` output:\n{last}\nsuperlink log:\n{self.tail('superlink', 30)}")

    def tail(self, name: str, n: int = 60) -> str:
        path = self.logs.get(name)
        if not path or not path.exists():
            return ""
        lines = [line for line in path.read_text(errors="replace").splitlines()
                 if not any(noise in line for noise in _STATUS_POLL_NOISE)]
        return "\n".join(lines[-n:])

    # -- teardown ----------------------------------------------------------------------------------
    def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)

    def __enter__(self) -> "LocalConsortium":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_workdir and not exc[0]:
            shutil.rmtree(self.workdir, ignore_errors=True)
