"""The consortium's public-key infrastructure: its CA and the SuperLink's TLS certificate.

Flower's TLS authenticates the SuperLink to the SuperNodes (no mutual TLS); the SuperNodes are
authenticated separately, by their enrolled ECDSA keys (``client/enroll.py``, Flower node auth).
So the consortium needs exactly one private CA whose certificate every hospital pins
(``--root-certificates ca.crt``) and one server certificate for the SuperLink's host names/IPs.

X.509 through ``cryptography``, ECDSA P-384 keys, SHA-384 signatures. The CA lives 5 years and may
only sign end-entity certificates (path length 0); the server certificate lives 1 year by default
and is valid only for TLS server authentication on the names given. Private keys are created
0600, nothing is ever overwritten. Layout of the output folder::

    ca.crt      consortium CA certificate      -> sent to every site (public)
    ca.key      CA private key (0600)          -> keep offline; only needed to re-issue
    server.pem  SuperLink certificate (SANs)   -> SuperLink host
    server.key  SuperLink private key (0600)   -> SuperLink host

Why loopback names are in the server certificate by default: with ``--isolation subprocess``
(Flower's default) the SuperLink launches its own ``flower-superexec``, which connects back to
the SuperLink's ``--host:--port`` over TLS and verifies the certificate against ``ca.crt``;
``flwr.supercore.address.resolve_bind_address`` turns ``--host 0.0.0.0`` into ``127.0.0.1`` (and
``[::]`` into ``[::1]``). Without those SANs the SuperExec dies with "certificate is not valid
for '127.0.0.1'" and no ServerApp can run (checked on flwr 1.41). ``loopback=False``
(``--no-loopback``) leaves them out for a SuperLink bound to a named interface.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from privacy.keys import write_new_file

__all__ = [
    "CA_CERT", "CA_DAYS", "CA_KEY", "SERVER_CERT", "SERVER_DAYS", "SERVER_KEY", "LOOPBACK_HOSTS",
    "LOOPBACK_IPS", "CertificateInfo", "ConsortiumPKI", "PKIError", "certificate_fingerprint",
    "check_superlink_pki", "describe_certificate", "init_consortium", "register_site", "superlink_tls_args",
]

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CA_DAYS = 5 * 365
SERVER_DAYS = 365
MAX_DAYS = 10 * 365
LOOPBACK_HOSTS = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")
_CLOCK_SKEW = dt.timedelta(minutes=5)  # node auth already needs NTP; tolerate small skew
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class PKIError(ValueError):
    """Bad input or an unsafe file situation; the message names the file/option and what to do."""


PkiError = PKIError  # alias


@dataclass(frozen=True)
class ConsortiumPKI:
    """Paths of the consortium PKI files in one folder (and, after ``init_consortium``, its names)."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    not_after: dt.datetime | None = None

    @classmethod
    def at(cls, out: str | Path) -> "ConsortiumPKI":
        """The standard file layout under ``out`` (nothing is read)."""
        o = Path(out).expanduser().resolve()
        return cls(o, o / CA_CERT, o / CA_KEY, o / SERVER_CERT, o / SERVER_KEY)

    def files(self) -> tuple[Path, Path, Path, Path]:
        return (self.ca_cert, self.ca_key, self.server_cert, self.server_key)


@dataclass(frozen=True)
class CertificateInfo:
    """What an operator checks about a certificate (no key material)."""

    subject: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    sha256_fingerprint: str
    is_ca: bool


def _validate_dns_name(name: str) -> str:
    n = name.strip().rstrip(".").lower()
    if not n or len(n) > 253 or not all(_DNS_LABEL.match(p) for p in n.split(".")):
        raise PKIError(f"--host {name!r} is not a valid DNS name (letters, digits, '-' and '.'; "
                       "give IP addresses with --ip)")
    return n


def _validate_ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(addr.strip())
    except ValueError:
        raise PKIError(f"--ip {addr!r} is not an IPv4 or IPv6 address") from None


def _validate_days(days: int, option: str) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise PKIError(f"{option} must be a whole number of days between 1 and {MAX_DAYS}, got {days!r}")
    return days


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def init_consortium(out: str | Path, hosts: Sequence[str] = (), ips: Sequence[str] = (), *,
                    days: int = SERVER_DAYS, ca_days: int = CA_DAYS, loopback: bool = True,
                    organization: str = "Atoll consortium") -> ConsortiumPKI:
    """Create the consortium CA and the SuperLink's TLS certificate and key in ``out``.

    Parameters
    ----------
    out : folder for ca.crt, ca.key, server.pem, server.key (created 0700 if absent). Refused if any
        of these already exists there, so an existing CA is never silently replaced.
    hosts, ips : DNS names and IP addresses the SuperNodes use to reach the SuperLink (SANs).
    days : server certificate validity (default 365; at most the CA's).
    ca_days : CA validity (default 5 years).
    loopback : also certify ``localhost``, ``127.0.0.1``, ``::1`` (needed by the SuperLink's own
        SuperExec when it binds 0.0.0.0; see the module docstring).

    Returns
    -------
    ConsortiumPKI with the paths written, the certified names and the server certificate's expiry.
    """
    days = _validate_days(days, "--days")
    ca_days = _validate_days(ca_days, "--ca-days")
    if days > ca_days:
        raise PKIError(f"--days ({days}) must not exceed the CA's lifetime ({ca_days} days)")
    host_list = list(dict.fromkeys(_validate_dns_name(h) for h in hosts))
    ip_list = list(dict.fromkeys(_validate_ip(i) for i in ips))
    if loopback:
        host_list += [h for h in LOOPBACK_HOSTS if h not in host_list]
        ip_list += [a for a in map(ipaddress.ip_address, LOOPBACK_IPS) if a not in ip_list]
    if not host_list and not ip_list:
        raise PKIError("name the SuperLink's address with --host NAME and/or --ip ADDR (what the hospitals' "
                       "SuperNodes will connect to, e.g. --host superlink.example.org --ip 10.0.0.5)")

    pki = ConsortiumPKI.at(out)
    existing = [p.name for p in pki.files() if p.exists()]
    if existing:
        raise PKIError(f"{pki.out} already holds {', '.join(existing)}; refusing to overwrite consortium keys. "
                       "Choose an empty folder, or move the old files away first")
    if pki.out.exists() and not pki.out.is_dir():
        raise PKIError(f"--out {pki.out} exists and is not a folder")
    pki.out.mkdir(mode=0o700, parents=True, exist_ok=True)

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
        .add_extension(_key_usage(cert_sign=True), critical=True)
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
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    outputs = [(pki.ca_key, _key_pem(ca_key), 0o600), (pki.server_key, _key_pem(server_key), 0o600),
               (pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644),
               (pki.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)]
    written: list[Path] = []
    try:
        for path, data, mode in outputs:
            write_new_file(path, data, mode)
            written.append(path)
    except OSError as exc:
        for path in written:  # leave no half-made PKI behind
            path.unlink(missing_ok=True)
        raise PKIError(f"cannot write {path}: {exc.strerror or exc}") from None
    return ConsortiumPKI(pki.out, pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key, tuple(host_list),
                         tuple(str(a) for a in ip_list), not_after)


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PKIError(f"{what} {path} is missing; create the consortium's TLS material with "
                       "`atoll consortium init --out DIR --host NAME`") from None
    except ValueError:
        raise PKIError(f"{what} {path} is not a PEM X.509 certificate") from None


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER certificate as ``AA:BB:..`` (``openssl x509 -fingerprint -sha256``)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def describe_certificate(path: str | Path) -> CertificateInfo:
    """Read a PEM certificate and return the facts an operator checks."""
    cert = _load_cert(Path(path), "certificate")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(i) for i in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertificateInfo(cert.subject.rfc4514_string(), dns, ips, cert.not_valid_before_utc,
                           cert.not_valid_after_utc, certificate_fingerprint(cert), is_ca)


def check_superlink_pki(pki_dir: str | Path, *, now: dt.datetime | None = None) -> ConsortiumPKI:
    """Check what the SuperLink needs before launching it; raise :class:`PKIError` otherwise.

    Files present; private key not readable by group/others; key matches the certificate;
    certificate signed by the CA and within its validity period (as is the CA). ``ca.key`` is
    deliberately not required: it should live offline.
    """
    pki = ConsortiumPKI.at(pki_dir)
    ca = _load_cert(pki.ca_cert, "CA certificate")
    srv = _load_cert(pki.server_cert, "SuperLink certificate")
    if not pki.server_key.is_file():
        raise PKIError(f"SuperLink private key {pki.server_key} is missing")
    mode = stat.S_IMODE(pki.server_key.stat().st_mode)
    if mode & 0o077:
        raise PKIError(f"SuperLink private key {pki.server_key} is readable by other users (mode {mode:o}); "
                       f"run `chmod 600 {pki.server_key}`")
    try:
        key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise PKIError(f"{pki.server_key} is not an unencrypted PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != srv.public_key().public_bytes(*spki):
        raise PKIError(f"{pki.server_key} does not belong to the certificate {pki.server_cert}")
    try:
        srv.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError(f"{pki.server_cert} was not issued by the CA in {pki.ca_cert}; "
                       "the SuperNodes would reject it") from None
    now = now or dt.datetime.now(dt.timezone.utc)
    for cert, path in ((ca, pki.ca_cert), (srv, pki.server_cert)):
        if now < cert.not_valid_before_utc:
            raise PKIError(f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
                           "check this machine's clock")
        if now > cert.not_valid_after_utc:
            raise PKIError(f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; issue new TLS material "
                           "(`atoll consortium init --out NEW_DIR`) and send the new ca.crt to the sites")
    return pki


def superlink_tls_args(pki_dir: str | Path, *, node_auth: bool = True) -> list[str]:
    """``flower-superlink`` flags for TLS from ``pki_dir`` (+ ``--enable-supernode-auth`` unless ``node_auth=False``).

    Node authentication is on by default because a deployment admits only enrolled sites, and
    Flower refuses it without TLS, so the two go together. The files are checked first
    (:func:`check_superlink_pki`); only ca.crt, server.pem and server.key must be on the host.
    """
    pki = check_superlink_pki(pki_dir)
    args = ["--ssl-ca-certfile", str(pki.ca_cert), "--ssl-certfile", str(pki.server_cert),
            "--ssl-keyfile", str(pki.server_key)]
    if node_auth:
        args.append("--enable-supernode-auth")
    return args


def register_site(keys_dir: str | Path, name: str, *, node_id: int | None, ledger_key: str | Path,
                  card: str | Path | None = None):
    """Bind site ``name`` in the consortium registry (``keys_dir/registry.json``, :mod:`privacy.registry`).

    ``node_id``: the Flower node id its node key was registered under (``flwr supernode register --format json``);
    ``ledger_key``: the site's Ed25519 ledger public key (``site_ed25519.pub``), enrolled as ``keys_dir/<name>.pub``;
    ``card``: its dataset card (``atoll site check --card``), whose training counts bound its FedAvg weight and its
    delta. Refuses a different ledger key already enrolled under ``name`` and a node id already bound to another
    site. Returns the registry entry.
    """
    import json

    from privacy.keys import KeyFileError, key_id, load_public_key, write_public_key
    from privacy.registry import RegistryError, SiteEntry, SiteRegistry, card_counts

    keys = Path(keys_dir)
    keys.mkdir(parents=True, exist_ok=True)
    try:
        pub = load_public_key(ledger_key)
        write_public_key(pub, keys / f"{name}.pub")
    except KeyFileError as exc:
        raise PKIError(f"--ledger-key: {exc}") from None
    examples = patients = None
    if card is not None:
        try:
            examples, patients = card_counts(json.loads(Path(card).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise PKIError(f"--card {card}: {exc}") from None
    registry = SiteRegistry.load(keys) or SiteRegistry(keys / "registry.json")
    entry = SiteEntry(name, node_id=node_id, ledger_key_id=key_id(pub), train_examples=examples,
                      train_patients=patients)
    try:
        registry.bind(entry)
    except RegistryError as exc:
        raise PKIError(str(exc)) from None
    return entry
