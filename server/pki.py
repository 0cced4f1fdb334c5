"""The consortium's public-key infrastructure: its CA and the SuperLink's TLS certificate.

Flower's TLS authenticates the SuperLink to the SuperNodes (no mutual TLS); the SuperNodes are
authenticated separately, by their enrolled ECDSA keys (`client/enroll.py`, Flower node auth).
So the consortium needs exactly one private CA whose certificate every hospital pins
(`--root-certificates ca.crt`) and one server certificate for the SuperLink's host names/IPs.

X.509 through `cryptography`, ECDSA P-384 keys, SHA-384 signatures. The CA lives 5 years and may
only sign end-entity certificates (path length 0); the server certificate lives 1 year by default
and is valid only for TLS server authentication on the names given. Private keys are written
0600, nothing is ever overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT", "CA_DAYS", "CA_KEY", "SERVER_CERT", "SERVER_DAYS", "SERVER_KEY",
    "ConsortiumPKI", "PKIError", "init_consortium", "superlink_tls_args",
]

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CA_DAYS = 5 * 365
SERVER_DAYS = 365
_CLOCK_SKEW = dt.timedelta(minutes=5)
_HOST_RE = re.compile(r"^(?=.{1,253}$)(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class PKIError(ValueError):
    """Bad input or an unsafe file situation; the message says what to do."""


@dataclass(frozen=True)
class ConsortiumPKI:
    """Paths of what `init_consortium` wrote."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]
    ips: tuple[str, ...]
    not_after: dt.datetime

    @classmethod
    def at(cls, out: str | Path) -> "ConsortiumPKI":
        out = Path(out)
        return cls(out, out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY, (), (),
                   dt.datetime.min.replace(tzinfo=dt.timezone.utc))


def _check_names(hosts: Sequence[str], ips: Sequence[str]) -> tuple[list[str], list[ipaddress._BaseAddress]]:
    if not hosts and not ips:
        raise PKIError("name the SuperLink's address with --host NAME and/or --ip ADDR (what the hospitals' "
                       "SuperNodes will connect to, e.g. --host superlink.example.org --ip 10.0.0.5)")
    good_hosts = []
    for h in hosts:
        if not _HOST_RE.match(h):
            raise PKIError(f"--host {h!r} is not a valid DNS name (letters, digits, '-' and '.'; "
                           "give IP addresses with --ip)")
        good_hosts.append(h.lower())
    good_ips = []
    for a in ips:
        try:
            good_ips.append(ipaddress.ip_address(a))
        except ValueError:
            raise PKIError(f"--ip {a!r} is not an IPv4 or IPv6 address") from None
    return good_hosts, good_ips


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (no window with wider permissions); never overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)  # the umask may have narrowed it further; certificates stay world-readable


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_consortium(out: str | Path, hosts: Sequence[str] = (), ips: Sequence[str] = (), *,
                    days: int = SERVER_DAYS, ca_days: int = CA_DAYS,
                    organization: str = "Atoll consortium") -> ConsortiumPKI:
    """Create the consortium CA and the SuperLink's TLS certificate and key in `out`.

    Parameters
    ----------
    out : path
        Folder to write ca.crt, ca.key, server.pem, server.key into (created if absent). Refused if
        any of these already exists there.
    hosts, ips : sequences of str
        DNS names and IP addresses the SuperNodes use to reach the SuperLink (subject alt names).
    days : int
        Server certificate validity (default 365; at most the CA's).
    ca_days : int
        CA validity (default 5 years).

    Returns
    -------
    ConsortiumPKI
    """
    host_list, ip_list = _check_names(list(hosts), list(ips))
    if not 1 <= days <= ca_days:
        raise PKIError(f"--days must be between 1 and {ca_days} (the CA's lifetime), got {days}")
    out = Path(out)
    pki = ConsortiumPKI.at(out)
    existing = [p.name for p in (pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key) if p.exists()]
    if existing:
        raise PKIError(f"{out} already holds {', '.join(existing)}; refusing to overwrite consortium keys. "
                       "Choose an empty folder, or move the old files away first")
    out.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    san: list[x509.GeneralName] = [x509.DNSName(h) for h in host_list]
    san += [x509.IPAddress(a) for a in ip_list]
    common_name = host_list[0] if host_list else str(ip_list[0])
    not_after = now + dt.timedelta(days=days)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write_new(pki.ca_key, _key_pem(ca_key), 0o600)
    _write_new(pki.server_key, _key_pem(server_key), 0o600)
    _write_new(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_new(pki.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return ConsortiumPKI(out, pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key, tuple(host_list),
                         tuple(str(a) for a in ip_list), not_after)


def superlink_tls_args(pki_dir: str | Path, *, node_auth: bool = True) -> list[str]:
    """`flower-superlink` flags for TLS from `pki_dir` (+ `--enable-supernode-auth` unless node_auth=False).

    Only the CA certificate, server certificate and server key are needed on the SuperLink host;
    the CA key should not be there. Raises PKIError naming the missing file.
    """
    pki = ConsortiumPKI.at(Path(pki_dir).resolve())
    for path in (pki.ca_cert, pki.server_cert, pki.server_key):
        if not path.is_file():
            raise PKIError(f"{path} is missing; create the consortium's TLS material with "
                           f"`atoll consortium init --out {pki_dir} --host NAME`")
    args = ["--ssl-ca-certfile", str(pki.ca_cert), "--ssl-certfile", str(pki.server_cert),
            "--ssl-keyfile", str(pki.server_key)]
    if node_auth:
        args.append("--enable-supernode-auth")
    return args
