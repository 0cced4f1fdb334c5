"""`atoll site probe` tells a plaintext SuperLink from a TLS one and a wrong CA from the right one (real processes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from atoll.localnet import BIN, LocalConsortium, free_port
from conftest import REPO

pytestmark = pytest.mark.slow


def _probe(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atoll.cli", "site", "probe", *argv], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_probe_names_the_transport_and_the_ca(tmp_path):
    from server.pki import init_consortium

    pki = init_consortium(tmp_path / "pki", ips=["127.0.0.1"])
    other = init_consortium(tmp_path / "other", ips=["127.0.0.1"])
    tls = {"ca": pki.ca_cert, "cert": pki.server_cert, "key": pki.server_key}
    with LocalConsortium(REPO, [], tls=tls, workdir=tmp_path / "tls") as net:
        address = f"127.0.0.1:{net.port}"
        right = _probe("--superlink", address, "--root-certificates", str(pki.ca_cert))
        assert right.returncode == 0 and "speaks TLS, certificate signed by" in right.stdout, right.stdout
        wrong = _probe("--superlink", address, "--root-certificates", str(other.ca_cert))
        assert wrong.returncode == 1 and "does not verify" in wrong.stdout, wrong.stdout
        none = _probe("--superlink", address)
        assert none.returncode == 1 and "not --insecure" in none.stdout, none.stdout
    with LocalConsortium(REPO, [], insecure=True, workdir=tmp_path / "plain") as net:
        plain = _probe("--superlink", f"127.0.0.1:{net.port}", "--root-certificates", str(pki.ca_cert))
        assert plain.returncode == 1 and "speaks plaintext" in plain.stdout, plain.stdout
    gone = _probe("--superlink", f"127.0.0.1:{free_port()}")
    assert gone.returncode == 1 and "cannot connect" in gone.stdout
    assert BIN.exists()
