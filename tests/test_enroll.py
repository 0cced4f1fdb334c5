"""Site enrolment keys: accepted by Flower's own key loaders; never overwritten; registration checks."""

from __future__ import annotations

import argparse
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from client import enroll
from client.enroll import EnrollError, enroll_site, load_enrollment, supernode_auth_args
from server import consortium_cli
from server.pki import init_consortium


def _site_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="atoll site")
    enroll.add_parser(parser.add_subparsers(dest="cmd", required=True))
    return parser.parse_args(argv)


def _consortium_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="atoll")
    consortium_cli.add_parser(parser.add_subparsers(dest="cmd", required=True))
    return parser.parse_args(["consortium", *argv])


@pytest.fixture(scope="module")
def ca_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_consortium(tmp_path_factory.mktemp("pki") / "c").ca_cert


def test_enroll_writes_openssh_p384_pair_private_0600(tmp_path: Path) -> None:
    e, created = enroll_site(tmp_path / "keys", "hospital-a")
    assert created
    assert stat.S_IMODE(e.private_key.stat().st_mode) == 0o600
    assert e.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert e.public_key_line.startswith("ecdsa-sha2-nistp384 ") and e.public_key_line.endswith("atoll-site:hospital-a")
    key = serialization.load_ssh_private_key(e.private_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert e.name == "hospital-a" and e.ca_cert is None


def test_flower_supernode_loads_the_private_key(tmp_path: Path) -> None:
    """The exact function flower-supernode uses for --auth-supernode-private-key."""
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode, _try_setup_client_authentication

    e, _ = enroll_site(tmp_path / "k", "hospital-b")
    args = _parse_args_run_supernode().parse_args(["--auth-supernode-private-key", str(e.private_key)])
    private, public = _try_setup_client_authentication(args)
    ours = serialization.load_ssh_public_key(e.public_key_line.encode())
    assert public.public_numbers() == ours.public_numbers()
    assert isinstance(private, ec.EllipticCurvePrivateKey)


def test_flower_cli_register_loads_the_public_key(tmp_path: Path) -> None:
    """The exact function `flwr supernode register` uses to read the .pub file."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    e, _ = enroll_site(tmp_path / "k", "hospital-c")
    pem = try_load_public_key(e.public_key)
    loaded = bytes_to_public_key(pem)
    private = serialization.load_ssh_private_key(e.private_key.read_bytes(), None)
    assert loaded.public_numbers() == private.public_key().public_numbers()


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    e, _ = enroll_site(tmp_path / "k", "hospital-a")
    out = subprocess.run(["ssh-keygen", "-lf", str(e.public_key)], capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == e.fingerprint
    # ssh-keygen also parses the private key (same format as `ssh-keygen -t ecdsa -b 384`)
    pub = subprocess.run(["ssh-keygen", "-y", "-f", str(e.private_key)], capture_output=True, text=True, check=True)
    assert pub.stdout.split()[:2] == e.public_key_line.split()[:2]


def test_enroll_never_overwrites_a_key(tmp_path: Path) -> None:
    e, _ = enroll_site(tmp_path / "k", "hospital-a")
    before = e.private_key.read_bytes()
    with pytest.raises(EnrollError, match="refusing to overwrite"):
        enroll_site(tmp_path / "k", "hospital-a")
    assert e.private_key.read_bytes() == before


def test_ca_can_be_installed_later_without_touching_the_key(tmp_path: Path, ca_cert: Path) -> None:
    e, _ = enroll_site(tmp_path / "k", "hospital-a")
    key = e.private_key.read_bytes()
    with pytest.raises(EnrollError, match="no consortium CA"):
        supernode_auth_args(e.root)
    e2, created = enroll_site(tmp_path / "k", "hospital-a", ca_cert=ca_cert)
    assert not created and e2.ca_cert is not None and e2.private_key.read_bytes() == key
    with pytest.raises(EnrollError, match="already enrolled as site 'hospital-a'"):
        enroll_site(tmp_path / "k", "hospital-z", ca_cert=ca_cert)


def test_a_different_ca_is_not_silently_replaced(tmp_path: Path, ca_cert: Path) -> None:
    enroll_site(tmp_path / "k", "hospital-a", ca_cert=ca_cert)
    other = init_consortium(tmp_path / "other").ca_cert
    with pytest.raises(EnrollError, match="different CA"):
        enroll_site(tmp_path / "k", "hospital-a", ca_cert=other)


def test_server_certificate_is_refused_as_ca(tmp_path: Path) -> None:
    pki = init_consortium(tmp_path / "pki")
    with pytest.raises(EnrollError, match="not a CA certificate"):
        enroll_site(tmp_path / "k", "hospital-a", ca_cert=pki.server_cert)
    assert not (tmp_path / "k" / "node_auth_key").exists()


@pytest.mark.parametrize("name", ["", "has space", "-lead", "x" * 64, "a/b", "ümlaut"])
def test_bad_site_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(EnrollError, match="--name"):
        enroll_site(tmp_path / "k", name)


def test_supernode_auth_args_parse_with_flower_and_check_key_mode(tmp_path: Path, ca_cert: Path) -> None:
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    e, _ = enroll_site(tmp_path / "k", "hospital-a", ca_cert=ca_cert)
    flags = supernode_auth_args(e.root)
    args = _parse_args_run_supernode().parse_args(["--superlink", "coord:8000", *flags])
    assert not args.insecure
    assert Path(args.root_certificates).read_bytes() == ca_cert.read_bytes()
    assert args.auth_supernode_private_key == str(e.private_key)
    e.private_key.chmod(0o640)
    with pytest.raises(EnrollError, match="chmod 600"):
        supernode_auth_args(e.root)


def test_supernode_auth_args_reject_a_non_nist_key(tmp_path: Path, ca_cert: Path) -> None:
    e, _ = enroll_site(tmp_path / "k", "hospital-a", ca_cert=ca_cert)
    e.private_key.chmod(0o600)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    e.private_key.write_bytes(
        rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    with pytest.raises(EnrollError, match="NIST curve"):
        supernode_auth_args(e.root)


def test_cli_enroll_prints_public_key_fingerprint_and_register_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _site_cli(["enroll", "--out", str(tmp_path / "k"), "--name", "hospital-a"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    e = load_enrollment(tmp_path / "k")
    assert e.public_key_line in out and e.fingerprint in out
    assert "flwr supernode register node_auth_key.pub --name hospital-a" in out
    assert "PRIVATE KEY" not in out  # the private key is never printed
    assert args.func(args) == 2
    assert "refusing to overwrite" in capsys.readouterr().out


def test_register_checks_fingerprint_before_calling_flwr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    e, _ = enroll_site(tmp_path / "k", "hospital-a")
    ok = _consortium_cli(["register", str(e.public_key), "--name", "hospital-a", "--fingerprint", e.fingerprint, "--dry-run"])
    assert ok.func(ok) == 0
    out = capsys.readouterr().out
    assert "Fingerprint confirmed" in out and f"supernode register {e.public_key} --name hospital-a" in out

    other, _ = enroll_site(tmp_path / "other", "hospital-b")
    bad = _consortium_cli(["register", str(e.public_key), "--name", "hospital-a", "--fingerprint", other.fingerprint])
    assert bad.func(bad) == 1  # refused (atoll.cli.EXIT_CODES)
    assert "fingerprint mismatch" in capsys.readouterr().out

    unconfirmed = _consortium_cli(["register", str(e.public_key), "--name", "hospital-a"])
    assert unconfirmed.func(unconfirmed) == 2
    assert "--fingerprint" in capsys.readouterr().out


def test_register_refuses_keys_flower_would_reject(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ed = tmp_path / "ed.pub"
    from cryptography.hazmat.primitives.asymmetric import ed25519

    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    args = _consortium_cli(["register", str(ed), "--name", "x", "--yes", "--dry-run"])
    assert args.func(args) == 2
    assert "NIST curve" in capsys.readouterr().out
    missing = _consortium_cli(["register", str(tmp_path / "nope.pub"), "--name", "x", "--yes"])
    assert missing.func(missing) == 3  # not found
    assert "does not exist" in capsys.readouterr().out


# ----------------------------------------------------------------------------- real processes
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_registered_site_joins_over_tls_and_unregistered_one_is_refused(tmp_path: Path) -> None:
    """flower-superlink with our TLS + node auth; `atoll consortium register` (real flwr CLI); SuperNodes."""
    import os
    import signal
    import sys
    import time

    from server.pki import superlink_tls_args

    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", FLWR_HOME=str(tmp_path / "home"),
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    pki = init_consortium(tmp_path / "pki")
    port = _free_port()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "c"\n[superlink.c]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{pki.ca_cert}"\n'
    )
    site, _ = enroll_site(tmp_path / "site", "hospital-a", ca_cert=pki.ca_cert)
    rogue, _ = enroll_site(tmp_path / "rogue", "rogue", ca_cert=pki.ca_cert)
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], log: str) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=open(tmp_path / log, "wb"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        return p

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bindir / "flwr"), *args], env=env, capture_output=True, text=True, timeout=60)

    try:
        start([str(bindir / "flower-superlink"), "--host", "0.0.0.0", "--port", str(port),
               *superlink_tls_args(pki.out), "--disable-runtime-dependency-installation"], "superlink.log")
        deadline = time.time() + 60
        while flwr("supernode", "ls").returncode != 0:
            assert time.time() < deadline, (tmp_path / "superlink.log").read_text()[-2000:]
            time.sleep(1)
        reg = subprocess.run([sys.executable, "-c", "import sys; from atoll.cli import main; sys.exit(main(sys.argv[1:]))",
                              "consortium", "register", str(site.public_key), "--name", "hospital-a",
                              "--fingerprint", site.fingerprint], env=env, capture_output=True, text=True, timeout=60)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        start([str(bindir / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--port", str(_free_port()),
               *supernode_auth_args(site.root)], "site.log")
        deadline = time.time() + 60
        while "online" not in flwr("supernode", "ls").stdout:
            assert time.time() < deadline, (tmp_path / "site.log").read_text()[-2000:]
            time.sleep(1)
        refused = start([str(bindir / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--port",
                         str(_free_port()), "--max-retries", "1", *supernode_auth_args(rogue.root)], "rogue.log")
        assert refused.wait(timeout=60) != 0
        assert "305" in (tmp_path / "rogue.log").read_text()
        # the SuperLink's own SuperExec (TLS to 127.0.0.1) is alive: the loopback SANs work
        assert "CERTIFICATE_VERIFY_FAILED" not in (tmp_path / "superlink.log").read_text()
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
