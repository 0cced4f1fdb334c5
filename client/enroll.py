"""Site enrolment: the SuperNode's node-authentication key pair and the consortium CA.

Flower 1.41 admits a SuperNode to a SuperLink started with ``--enable-supernode-auth``
only if the SuperNode signs its requests with an ECDSA key on a NIST curve whose public
key the lead registered (``flwr supernode register KEY.pub``). Flower loads the private
key with ``cryptography``'s ``load_ssh_private_key`` (``flwr/supernode/cli/flower_supernode.py``)
and the public key with ``load_ssh_public_key`` (``flwr/cli/supernode/register.py``), i.e.
the files ``ssh-keygen -t ecdsa -b 384`` writes. We write the same with ``cryptography``.

Layout of the enrolment directory ``DIR``::

    node_auth_key       OpenSSH ECDSA P-384 private key (0600); never leaves the site
    node_auth_key.pub   OpenSSH public key line; sent to the consortium lead
    ca.crt              consortium CA certificate (optional, installed with --ca)
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from privacy.keys import write_new_file

PRIVATE_KEY = "node_auth_key"
PUBLIC_KEY = "node_auth_key.pub"
CA_CERT = "ca.crt"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# The curves Flower accepts (flwr.supercore.primitives.asymmetric.uses_nist_ec_curve).
_NIST = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class EnrollError(Exception):
    """A user-facing enrolment problem (names the file or option and what to do)."""


@dataclass(frozen=True)
class Enrollment:
    """A site's enrolment material (paths and public facts only)."""

    root: Path
    name: str
    private_key: Path
    public_key: Path
    public_key_line: str
    fingerprint: str
    ca_cert: Path | None


def validate_site_name(name: str) -> str:
    """Site label shown to the consortium: 1-63 of ``A-Z a-z 0-9 . _ -`` (no PHI, no spaces)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise EnrollError(
            f"--name {name!r} is not a valid site name: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. hospital-a)"
        )
    return name


def public_key_fingerprint(public_key_line: str | bytes) -> str:
    """OpenSSH fingerprint ``SHA256:<base64>`` of a public key line (as ``ssh-keygen -lf`` prints)."""
    line = public_key_line.decode() if isinstance(public_key_line, bytes) else public_key_line
    parts = line.split()
    if len(parts) < 2:
        raise EnrollError("not an OpenSSH public key line ('<type> <base64> [comment]')")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise EnrollError("not an OpenSSH public key line (bad base64)") from None
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _check_ca_cert(path: Path) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise EnrollError(f"--ca {path} does not exist") from None
    except ValueError:
        raise EnrollError(f"--ca {path} is not a PEM X.509 certificate (expected the consortium's ca.crt)") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise EnrollError(f"--ca {path} is not a CA certificate (expected the consortium's ca.crt, not server.pem)")
    if _dt.datetime.now(_dt.timezone.utc) > cert.not_valid_after_utc:
        raise EnrollError(f"--ca {path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; ask the lead for the current ca.crt")
    return cert


def ca_fingerprint(path: str | Path) -> str:
    """SHA-256 fingerprint of a CA certificate (``AA:BB:..``), for confirmation by phone."""
    cert = _check_ca_cert(Path(path))
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _install_ca(root: Path, ca_cert: Path) -> Path:
    cert = _check_ca_cert(ca_cert)
    target = root / CA_CERT
    data = cert.public_bytes(serialization.Encoding.PEM)
    if target.exists():
        if target.read_bytes().strip() != data.strip():
            raise EnrollError(
                f"{target} already holds a different CA certificate; refusing to replace it. "
                "Move it away deliberately if the consortium re-issued its CA"
            )
        return target
    write_new_file(target, data, 0o644)
    return target


def load_enrollment(enroll_dir: str | Path) -> Enrollment:
    """Read an enrolment directory written by :func:`enroll_site`; raise :class:`EnrollError` if incomplete."""
    root = Path(enroll_dir).expanduser().resolve()
    priv, pub = root / PRIVATE_KEY, root / PUBLIC_KEY
    if not priv.is_file() or not pub.is_file():
        raise EnrollError(f"{root} holds no node authentication key; run `atoll site enroll --out {root} --name NAME`")
    line = pub.read_text(encoding="ascii").strip()
    parts = line.split()
    name = parts[2].removeprefix("atoll-site:") if len(parts) > 2 else ""
    ca = root / CA_CERT
    return Enrollment(root, name, priv, pub, line, public_key_fingerprint(line), ca if ca.is_file() else None)


def enroll_site(out_dir: str | Path, name: str, *, ca_cert: str | Path | None = None) -> tuple[Enrollment, bool]:
    """Create the site's node authentication key pair in ``out_dir`` (and install the CA).

    Returns ``(enrollment, created)``. An existing key pair is never overwritten: if one
    exists, ``created`` is False and only a missing ``ca.crt`` is installed (so a site can
    enrol first and receive the CA later); anything else raises :class:`EnrollError`.
    """
    name = validate_site_name(name)
    root = Path(out_dir).expanduser().resolve()
    priv, pub = root / PRIVATE_KEY, root / PUBLIC_KEY
    if priv.exists() or pub.exists():
        if ca_cert is None:
            raise EnrollError(
                f"{root} already holds a node authentication key; refusing to overwrite it "
                "(a new key must be registered again by the lead). Use another --out directory"
            )
        existing = load_enrollment(root)
        if existing.name and existing.name != name:
            raise EnrollError(f"{root} is already enrolled as site {existing.name!r}, not {name!r}")
        _install_ca(root, Path(ca_cert).expanduser())
        return load_enrollment(root), False
    if root.exists() and not root.is_dir():
        raise EnrollError(f"--out {root} exists and is not a directory")
    if ca_cert is not None:
        _check_ca_cert(Path(ca_cert).expanduser())  # fail before writing anything
    root.mkdir(mode=0o700, parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii") + f" atoll-site:{name}"
    write_new_file(priv, private_bytes, 0o600)
    try:
        write_new_file(pub, (public_line + "\n").encode("ascii"), 0o644)
        if ca_cert is not None:
            _install_ca(root, Path(ca_cert).expanduser())
    except (OSError, EnrollError):
        priv.unlink(missing_ok=True)
        pub.unlink(missing_ok=True)
        raise
    return load_enrollment(root), True


def _check_private_key(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise EnrollError(f"{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, UnsupportedAlgorithm, TypeError):
        raise EnrollError(f"{path} is not an unencrypted OpenSSH private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _NIST):
        raise EnrollError(f"{path} is not an ECDSA key on a NIST curve (Flower node authentication needs one)")


def supernode_auth_args(enroll_dir: str | Path, *, ca_cert: str | Path | None = None) -> list[str]:
    """``flower-supernode`` flags for TLS + node authentication from an enrolment directory.

    Includes ``--root-certificates`` because Flower refuses node authentication over an
    insecure channel; the CA is ``ca_cert`` if given, else ``DIR/ca.crt``. Raises
    :class:`EnrollError` if a file is missing, the key is group/world readable or not a
    NIST-curve ECDSA OpenSSH key, or the CA is not a valid CA certificate.
    """
    enrollment = load_enrollment(enroll_dir)
    _check_private_key(enrollment.private_key)
    ca = Path(ca_cert).expanduser().resolve() if ca_cert is not None else enrollment.ca_cert
    if ca is None:
        raise EnrollError(
            f"no consortium CA certificate in {enrollment.root}; install the lead's ca.crt with "
            f"`atoll site enroll --out {enrollment.root} --name NAME --ca ca.crt`"
        )
    _check_ca_cert(ca)
    return ["--root-certificates", str(ca), "--auth-supernode-private-key", str(enrollment.private_key)]


# ----------------------------------------------------------------------------- CLI
def _cmd_enroll(args: argparse.Namespace) -> int:
    try:
        enrollment, created = enroll_site(args.out, args.name, ca_cert=args.ca)
    except EnrollError as err:
        print(f"atoll site enroll: {err}")
        return 2
    except OSError as err:
        print(f"atoll site enroll: cannot write to {args.out}: {err.strerror}")
        return 2
    if created:
        print(f"Site {enrollment.name!r}: node authentication key pair created in {enrollment.root}")
        print(f"  private key  {enrollment.private_key}  (mode 0600; never send it anywhere)")
        print(f"  public key   {enrollment.public_key}")
    else:
        print(f"Site {enrollment.name!r}: existing key pair in {enrollment.root} kept (not regenerated)")
    if enrollment.ca_cert is not None:
        print(f"  consortium CA {enrollment.ca_cert}  SHA-256 {ca_fingerprint(enrollment.ca_cert)}")
        print("  -> confirm this CA fingerprint with the consortium lead by phone or in person.")
    print()
    print("Send the consortium lead this public key (it is not secret):")
    print(f"  {enrollment.public_key_line}")
    print("and confirm its fingerprint with them over a second channel (phone, in person):")
    print(f"  {enrollment.fingerprint}")
    print()
    print("The lead registers it with:")
    print(f"  atoll consortium register {PUBLIC_KEY} --name {enrollment.name} --fingerprint {enrollment.fingerprint}")
    print(f"  (which runs: flwr supernode register {PUBLIC_KEY} --name {enrollment.name})")
    if enrollment.ca_cert is None:
        print()
        print("Then install the consortium CA the lead sends you:")
        print(f"  atoll site enroll --out {enrollment.root} --name {enrollment.name} --ca ca.crt")
    return 0


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register ``enroll`` in the ``atoll site`` group (``subparsers`` = that group's sub-parsers)."""
    p = subparsers.add_parser(
        "enroll",
        help="create this site's node authentication key (and install the consortium CA)",
        description="Create the SuperNode's ECDSA P-384 node authentication key pair (OpenSSH format) "
        "and print what to send to the consortium lead. Never overwrites an existing key.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="enrolment directory (created 0700)")
    p.add_argument("--name", required=True, help="site label shown to the consortium, e.g. hospital-a")
    p.add_argument("--ca", metavar="CA_CERT", default=None, help="consortium ca.crt received from the lead")
    p.set_defaults(func=_cmd_enroll)
