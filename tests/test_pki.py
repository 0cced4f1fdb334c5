"""Consortium PKI: certificates Flower and a real TLS handshake accept; keys 0600; no overwrite."""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from server import consortium_cli
from server.pki import (
    ConsortiumPKI,
    PKIError,
    check_superlink_pki,
    describe_certificate,
    init_consortium,
    superlink_tls_args,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="atoll")
    consortium_cli.add_parser(parser.add_subparsers(dest="cmd", required=True))
    return parser.parse_args(["consortium", *argv])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ConsortiumPKI:
    return init_consortium(
        tmp_path_factory.mktemp("pki") / "consortium", hosts=["coord.example.org"], ips=["10.1.2.3"]
    )


def test_init_writes_ca_and_server_cert_with_private_keys_0600(pki: ConsortiumPKI) -> None:
    assert all(p.is_file() for p in pki.files())
    assert _mode(pki.ca_key) == 0o600 and _mode(pki.server_key) == 0o600
    assert _mode(pki.out) & 0o077 == 0

    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ExtendedKeyUsageOID.SERVER_AUTH in srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    srv.verify_directly_issued_by(ca)  # raises if the chain is broken

    ca_life = ca.not_valid_after_utc - ca.not_valid_before_utc
    srv_life = srv.not_valid_after_utc - srv.not_valid_before_utc
    assert dt.timedelta(days=5 * 365) <= ca_life <= dt.timedelta(days=5 * 365, hours=1)
    assert dt.timedelta(days=365) <= srv_life <= dt.timedelta(days=365, hours=1)


def test_server_certificate_names_given_hosts_and_loopback(pki: ConsortiumPKI) -> None:
    info = describe_certificate(pki.server_cert)
    assert set(info.dns_names) == {"coord.example.org", "localhost"}
    assert set(info.ip_addresses) == {"10.1.2.3", "127.0.0.1", "::1"}
    assert not info.is_ca and describe_certificate(pki.ca_cert).is_ca


def test_no_loopback_leaves_loopback_out(tmp_path: Path) -> None:
    pki = init_consortium(tmp_path / "p", hosts=["coord"], loopback=False)
    info = describe_certificate(pki.server_cert)
    assert info.dns_names == ("coord",) and info.ip_addresses == ()
    with pytest.raises(PKIError, match="--host NAME and/or --ip ADDR"):
        init_consortium(tmp_path / "q", loopback=False)


def test_refuses_to_overwrite_an_existing_pki(pki: ConsortiumPKI) -> None:
    before = {p: p.read_bytes() for p in pki.files()}
    with pytest.raises(PKIError, match="refusing to overwrite"):
        init_consortium(pki.out, hosts=["other"])
    assert {p: p.read_bytes() for p in pki.files()} == before


def test_refuses_when_only_one_file_exists(tmp_path: Path) -> None:
    (tmp_path / "server.key").write_text("keep me")
    with pytest.raises(PKIError, match="server.key"):
        init_consortium(tmp_path)
    assert (tmp_path / "server.key").read_text() == "keep me"
    assert not (tmp_path / "ca.key").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hosts": ["bad host"]}, "--host"),
        ({"hosts": ["-bad.example"]}, "--host"),
        ({"ips": ["10.0.0.300"]}, "--ip"),
        ({"days": 0}, "--days"),
        ({"days": 400, "ca_days": 300}, "must not exceed"),
        ({"ca_days": 99999}, "--ca-days"),
    ],
)
def test_bad_options_are_named(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(PKIError, match=match):
        init_consortium(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x" / "ca.key").exists()


def test_superlink_tls_args_are_accepted_by_flowers_own_parser_and_loader(pki: ConsortiumPKI) -> None:
    from flwr.common.args import try_obtain_server_certificates
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    flags = superlink_tls_args(pki.out)
    assert flags[-1] == "--enable-supernode-auth"
    assert "--enable-supernode-auth" not in superlink_tls_args(pki.out, node_auth=False)
    args = _parse_args_run_superlink().parse_args(flags)
    assert args.enable_supernode_auth and not args.insecure
    ca, cert, key = try_obtain_server_certificates(args)
    assert ca == pki.ca_cert.read_bytes() and cert == pki.server_cert.read_bytes()
    assert key == pki.server_key.read_bytes()


def _handshake(pki: ConsortiumPKI, server_hostname: str) -> None:
    """Serve one TLS handshake with server.pem and connect as a client trusting only ca.crt."""
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    cli_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with srv_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with cli_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                tls.sendall(b"x")
    finally:
        thread.join(timeout=10)
        listener.close()


@pytest.mark.parametrize("name", ["coord.example.org", "localhost", "127.0.0.1", "10.1.2.3"])
def test_real_tls_handshake_verifies_for_every_san(pki: ConsortiumPKI, name: str) -> None:
    _handshake(pki, name)


def test_real_tls_handshake_rejects_a_name_not_in_the_certificate(pki: ConsortiumPKI) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, "evil.example.org")


def test_check_rejects_group_readable_key(tmp_path: Path) -> None:
    pki = init_consortium(tmp_path / "p")
    pki.server_key.chmod(0o644)
    with pytest.raises(PKIError, match="chmod 600"):
        superlink_tls_args(pki.out)


def test_check_rejects_expired_certificate_and_foreign_ca(tmp_path: Path) -> None:
    a = init_consortium(tmp_path / "a", days=1)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)
    with pytest.raises(PKIError, match="expired"):
        check_superlink_pki(a.out, now=later)
    b = init_consortium(tmp_path / "b")
    a.ca_cert.write_bytes(b.ca_cert.read_bytes())  # server.pem of A against CA of B
    with pytest.raises(PKIError, match="not issued by the CA"):
        check_superlink_pki(a.out)


def test_check_does_not_need_the_offline_ca_key(tmp_path: Path) -> None:
    pki = init_consortium(tmp_path / "p")
    pki.ca_key.unlink()
    assert "--ssl-keyfile" in superlink_tls_args(pki.out)


def test_cli_init_prints_fingerprint_and_flags_then_refuses_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    args = _cli(["init", "--out", str(out), "--host", "coord", "--ip", "192.0.2.7"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert describe_certificate(out / "ca.crt").sha256_fingerprint in text
    assert "--enable-supernode-auth" in text and "OFFLINE" in text
    assert "coord" in text and "192.0.2.7" in text
    assert args.func(args) == 2
    text = capsys.readouterr().out
    assert "refusing to overwrite" in text and "Traceback" not in text


def test_cli_init_bad_ip_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _cli(["init", "--out", str(tmp_path / "x"), "--ip", "not-an-ip"])
    assert args.func(args) == 2
    assert "--ip 'not-an-ip'" in capsys.readouterr().out


def test_certificate_covers_the_address_the_superlinks_own_superexec_dials(pki: ConsortiumPKI) -> None:
    """flower-superlink --host 0.0.0.0 starts a SuperExec that dials resolve_bind_address(host:port) over TLS."""
    from flwr.supercore.address import resolve_bind_address

    info = describe_certificate(pki.server_cert)
    for bind, dialled in (("0.0.0.0", "127.0.0.1"), ("[::]", "[::1]")):
        assert resolve_bind_address(f"{bind}:8000") == f"{dialled}:8000"
        assert dialled.strip("[]") in info.ip_addresses
