"""client.allocator: the site's training processes start under TCMalloc where it is installed, never by surprise.

The subprocess tests start a real Python under the environment ``site_env`` builds and read, from inside it,
which allocator it runs under; they skip (saying why) where TCMalloc is not installed (.ci/run installs it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client import allocator
from client.allocator import CHOICE_ENV, active_allocator, choice, site_env

ROOT = Path(__file__).resolve().parents[1]
_PROBE = "import json, sys; sys.path.insert(0, sys.argv[1]); from client.allocator import active_allocator; " \
         "print(json.dumps(active_allocator()))"


def _child_allocator(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT)], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert "cannot be preloaded" not in out.stderr, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


_needs_tcmalloc = pytest.mark.skipif(allocator.tcmalloc_library() is None,
                                     reason="TCMalloc is not installed (apt-get install libtcmalloc-minimal4)")


def test_choice_defaults_to_tcmalloc_and_names_a_bad_value() -> None:
    assert choice({}) == "tcmalloc"
    assert choice({CHOICE_ENV: "System "}) == "system"
    with pytest.raises(ValueError, match=f"{CHOICE_ENV}='jemalloc'.*tcmalloc, system"):
        choice({CHOICE_ENV: "jemalloc"})
    with pytest.raises(ValueError, match=CHOICE_ENV):
        site_env({CHOICE_ENV: "jemalloc"})


def test_site_env_preloads_the_library_once_and_keeps_other_preloads(monkeypatch) -> None:
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
    env = site_env({"LD_PRELOAD": "/opt/other.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == "/usr/lib/libtcmalloc_minimal.so.4 /opt/other.so"
    assert env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40  # no report per large 3D batch
    assert site_env(env)["LD_PRELOAD"] == env["LD_PRELOAD"]  # idempotent: a child's child is not preloaded twice
    base = {"LD_PRELOAD": "/opt/other.so"}
    site_env(base)
    assert base == {"LD_PRELOAD": "/opt/other.so"}  # a copy: the caller's mapping is untouched


def test_site_env_leaves_the_environment_alone_when_declined_or_not_installed(monkeypatch) -> None:
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
    declined = {CHOICE_ENV: "system", "PATH": "/bin"}
    assert site_env(declined) == declined
    monkeypatch.setattr(allocator, "tcmalloc_library", lambda: None)
    assert site_env({"PATH": "/bin"}) == {"PATH": "/bin"}


def test_active_allocator_reads_the_process_maps(tmp_path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n")
    assert active_allocator(maps) == "tcmalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert active_allocator(maps) == "system"
    assert active_allocator(tmp_path / "absent") == "unknown"


@_needs_tcmalloc
def test_a_process_started_with_the_site_env_runs_under_tcmalloc() -> None:
    import os

    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert _child_allocator(plain) == "system"
    assert _child_allocator(site_env(plain)) == "tcmalloc"
    assert _child_allocator(site_env({**plain, CHOICE_ENV: "system"})) == "system"


@_needs_tcmalloc
def test_local_consortium_starts_its_supernodes_under_the_site_allocator(tmp_path, monkeypatch) -> None:
    """A real local consortium: the SuperNode process (which starts the ClientApps that train) has TCMalloc
    mapped; the SuperLink, which trains nothing, keeps glibc's malloc."""
    from atoll import localnet

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    cfg = tmp_path / "site.toml"
    cfg.write_text("")  # read only when a task arrives; none does here
    with localnet.LocalConsortium(app_dir=tmp_path, site_configs=[cfg], insecure=True, workdir=tmp_path / "net") as net:
        superlink, supernode = net.superlink, net.procs[-1]
        assert supernode is not superlink and supernode.poll() is None
        assert active_allocator(_running_maps(supernode.pid)) == "tcmalloc"
        assert active_allocator(_running_maps(superlink.pid)) == "system"


def _running_maps(pid: int, timeout: float = 60.0) -> Path:
    """/proc/PID/maps once the interpreter runs (an extension module is mapped): right after exec the dynamic
    linker has not yet mapped the preloaded library, and a read then would say 'system' for any process."""
    maps = Path(f"/proc/{pid}/maps")
    deadline = time.monotonic() + timeout
    while ".cpython-" not in maps.read_text():
        assert time.monotonic() < deadline, f"process {pid} did not start its interpreter in {timeout} s"
        time.sleep(0.1)
    return maps
