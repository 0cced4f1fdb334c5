"""``atoll consortium init`` and ``atoll consortium register``: the lead's trust set-up.

``init`` creates the consortium CA and the SuperLink's TLS material (:mod:`server.pki`).
``register`` admits one enrolled hospital: it checks the site's public key the way Flower will
(OpenSSH ECDSA on a NIST curve), makes the operator confirm the fingerprint the site read out
over a second channel, then runs Flower's own ``flwr supernode register``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.connections import ConnectionNotFound, resolve
from server.pki import CA_DAYS, SERVER_DAYS, PKIError, describe_certificate, init_consortium, superlink_tls_args

__all__ = ["RegisterError", "add_parser", "check_site_public_key", "register_command"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3  # as atoll.cli.EXIT_CODES
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_NIST = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # flwr.supercore.primitives.asymmetric.uses_nist_ec_curve


class RegisterError(Exception):
    """A user-facing registration problem; ``code`` is the exit code (atoll.cli.EXIT_CODES)."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def check_site_public_key(path: str | Path) -> tuple[str, str]:
    """Validate a site's OpenSSH public key as Flower will; return ``(key_line, fingerprint)``.

    The fingerprint is OpenSSH's ``SHA256:<base64>`` (as ``ssh-keygen -lf`` prints it), the same
    string ``atoll site enroll`` prints at the site.
    """
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise RegisterError(f"public key file {p} does not exist", EXIT_NOT_FOUND) from None
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise RegisterError(f"{p} is not an OpenSSH public key line (expected the site's node_auth_key.pub)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST):
        raise RegisterError(f"{p} is not an ECDSA key on a NIST curve; Flower node authentication rejects it")
    line = data.decode("ascii", "replace").strip()
    blob = base64.b64decode(line.split()[1])
    return line, "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _flwr_executable() -> str:
    beside = Path(sys.executable).with_name("flwr")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("flwr")
    if not found:
        raise RegisterError("the Flower CLI `flwr` is not installed in this environment")
    return found


def register_command(public_key: str | Path, name: str, superlink: str | None = None) -> list[str]:
    """The ``flwr supernode register`` command line for one site (Flower 1.41 syntax)."""
    cmd = [_flwr_executable(), "supernode", "register", str(Path(public_key).expanduser())]
    if superlink:
        cmd.append(superlink)
    return cmd + ["--name", name]


# ----------------------------------------------------------------------------- CLI
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``atoll consortium`` group (``init``, ``register``) under the top-level sub-commands."""
    consortium = subparsers.add_parser("consortium", help="consortium lead: TLS material, site registration")
    sub = consortium.add_subparsers(dest="consortium_command", metavar="COMMAND")
    consortium.set_defaults(func=lambda a: (consortium.print_help(), 2)[1])

    p = sub.add_parser(
        "init", help="create the consortium CA and the SuperLink's TLS certificate and key",
        description="Writes DIR/ca.crt (give it to every hospital), DIR/server.pem and DIR/server.key (for the "
                    "SuperLink host only) and DIR/ca.key (keep it offline; it is needed only to issue a new "
                    "server certificate). The certificate is valid for the --host names and --ip addresses "
                    "the hospitals' SuperNodes will use, plus localhost/127.0.0.1/::1 (the SuperLink's own "
                    "SuperExec connects there). Existing files are never overwritten.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the consortium's TLS material")
    p.add_argument("--host", action="append", default=[], metavar="NAME", help="DNS name of the SuperLink (repeatable)")
    p.add_argument("--ip", action="append", default=[], metavar="ADDR", help="IP address of the SuperLink (repeatable)")
    p.add_argument("--days", type=int, default=SERVER_DAYS,
                   help=f"server certificate validity in days (default {SERVER_DAYS})")
    p.add_argument("--ca-days", type=int, default=CA_DAYS, help=f"CA validity in days (default {CA_DAYS})")
    p.add_argument("--no-loopback", action="store_true",
                   help="leave localhost/127.0.0.1/::1 out (only for a SuperLink bound to a named interface)")
    p.set_defaults(func=_init)

    r = sub.add_parser(
        "register", help="admit an enrolled hospital's public key (runs `flwr supernode register`)",
        description="Check a hospital's node authentication public key and the fingerprint it read out to "
                    "you, then run `flwr supernode register` against the SuperLink connection.")
    r.add_argument("public_key", metavar="PUBLIC_KEY", help="the site's node_auth_key.pub")
    r.add_argument("--name", required=True, help="site label, e.g. hospital-a")
    r.add_argument("--fingerprint", default=None, help="SHA256:... fingerprint the site read out to you")
    r.add_argument("--yes", action="store_true", help="skip the fingerprint confirmation (verified another way)")
    r.add_argument("--superlink", default=None, metavar="NAME",
                   help="SuperLink connection: a [superlink.NAME] block in $FLWR_HOME/config.toml, as for "
                        "`atoll run start --superlink NAME` (default: that file's [superlink] default)")
    r.add_argument("--dry-run", action="store_true", help="print the flwr command instead of running it")
    r.add_argument("--keys-dir", default=None, metavar="DIR",
                   help="also bind the site in the consortium registry DIR/registry.json (the run's keys-dir): "
                        "the node id Flower assigns, the site's ledger key and its dataset card, so that only this "
                        "node can speak for this site")
    r.add_argument("--ledger-key", default=None, metavar="PUB", help="the site's site_ed25519.pub (with --keys-dir)")
    r.add_argument("--card", default=None, metavar="CARD", help="the site's dataset card JSON (with --keys-dir)")
    r.set_defaults(func=_register)


def _init(args: argparse.Namespace) -> int:
    try:
        pki = init_consortium(args.out, args.host, args.ip, days=args.days, ca_days=args.ca_days,
                              loopback=not args.no_loopback)
        ca = describe_certificate(pki.ca_cert)
        flags = superlink_tls_args(pki.out)
    except PKIError as exc:
        print(f"atoll consortium init: {exc}")
        return EXIT_USAGE
    except OSError as exc:
        print(f"atoll consortium init: cannot write to {args.out} ({exc.strerror or exc.__class__.__name__})")
        return EXIT_USAGE
    print(f"Consortium TLS material written to {pki.out}")
    print(f"  {pki.ca_cert.name:<11} CA certificate, valid until {ca.not_after:%Y-%m-%d}: "
          "send it to every hospital")
    print(f"  {pki.server_cert.name:<11} SuperLink certificate for {', '.join([*pki.hosts, *pki.ips])}, "
          f"valid until {pki.not_after:%Y-%m-%d}")
    print(f"  {pki.server_key.name:<11} SuperLink private key (0600): keep it on the SuperLink host only")
    print(f"  {pki.ca_key.name:<11} CA private key (0600): move it OFFLINE; needed only to re-issue server.pem")
    print()
    print("CA fingerprint (each hospital confirms it with you by phone before trusting ca.crt):")
    print(f"  SHA-256 {ca.sha256_fingerprint}")
    print()
    print("Start the SuperLink with TLS and node authentication:")
    print("  flower-superlink --host 0.0.0.0 --port 8000 " + " ".join(flags)
          + " --disable-runtime-dependency-installation --database /path/to/state.db")
    print("Expose only /v1/fleet/ of that port to the hospitals: the same port serves Flower's Control API,")
    print("which has no account authentication in open-source Flower (see docs/security.md).")
    print("Tell the Flower CLI where the SuperLink is: add to $FLWR_HOME/config.toml (default ~/.flwr/config.toml):")
    host = ([*args.host, *args.ip] or ["127.0.0.1"])[0]
    print(f'  [superlink.my-consortium]\n  address = "{host}:8000"\n  root-certificates = "{pki.ca_cert.resolve()}"')
    print("Then register each hospital's node key (from `atoll site enroll`):")
    print("  atoll consortium register HOSPITAL.pub --name HOSPITAL --fingerprint SHA256:... --superlink my-consortium")
    return EXIT_OK



def _register(args: argparse.Namespace) -> int:
    try:
        if not _NAME.match(args.name):
            raise RegisterError(f"--name {args.name!r} is not a valid site name (1-63 letters, digits, '.', '_' or '-')")
        line, fingerprint = check_site_public_key(args.public_key)
        print(f"Site {args.name!r} public key: {line.split()[0]}  {fingerprint}")
        if args.fingerprint is not None:
            if args.fingerprint.strip() != fingerprint:
                raise RegisterError(f"fingerprint mismatch: the key file has {fingerprint}, the site read out "
                                    f"{args.fingerprint.strip()}. Do NOT register it; ask the site to send its key again",
                                    EXIT_FAILED)
            print("Fingerprint confirmed.")
        elif not args.yes:
            raise RegisterError("confirm the key first: pass --fingerprint SHA256:... as read out by the site "
                                "(printed by `atoll site enroll`), or --yes if you verified it another way")
        if args.dry_run:  # shows the command; the connection is checked when it runs
            name = args.superlink
        else:  # an unknown name fails here, not as Flower's local simulation SuperLink on 127.0.0.1:39091
            conn = resolve(args.superlink)
            if conn.name != args.superlink:
                print(f"Connection: {conn.name!r} (the [superlink] default of {conn.path})")
            name = conn.name
        cmd = register_command(args.public_key, args.name, name)
    except ConnectionNotFound as exc:
        print(f"atoll consortium register: {exc}")
        return EXIT_NOT_FOUND
    except RegisterError as exc:
        print(f"atoll consortium register: {exc}")
        return exc.code
    if args.keys_dir and not args.ledger_key:
        print("atoll consortium register: --keys-dir needs --ledger-key (the site's site_ed25519.pub)")
        return EXIT_USAGE
    if args.keys_dir:
        cmd += ["--format", "json"]  # to read the node id Flower assigns
    if args.dry_run:
        print("Would run: " + " ".join(cmd))
        return EXIT_OK
    print("Running: " + " ".join(cmd))
    try:
        done = subprocess.run(cmd, check=False, **({"capture_output": True, "text": True} if args.keys_dir else {}))
    except OSError as exc:
        print(f"atoll consortium register: cannot run flwr ({exc.strerror or exc})")
        return EXIT_USAGE
    if args.keys_dir and done.returncode == 0:
        return _bind_in_registry(args, done.stdout)
    if done.returncode != 0:
        print(f"atoll consortium register: `flwr supernode register` failed (exit code {done.returncode}); check "
              f"the connection {name!r} in $FLWR_HOME/config.toml and that the SuperLink is running")
        return EXIT_FAILED
    return EXIT_OK


def _bind_in_registry(args: argparse.Namespace, flwr_json: str) -> int:
    """Bind the node id `flwr supernode register --format json` printed to the site in the registry."""
    import json

    from server.pki import register_site

    try:
        node_id = int(json.loads(flwr_json)["node-id"])
    except (ValueError, KeyError, TypeError):
        print(f"atoll consortium register: could not read the node id from flwr's output: {flwr_json[:200]!r}")
        return EXIT_FAILED
    try:
        entry = register_site(args.keys_dir, args.name, node_id=node_id, ledger_key=args.ledger_key, card=args.card)
    except PKIError as exc:
        print(f"atoll consortium register: the node is registered with the SuperLink (node id {node_id}) but not "
              f"bound in the registry: {exc}")
        return EXIT_FAILED
    print(f"Site {entry.name!r}: node {entry.node_id}, ledger key {entry.ledger_key_id}, card: "
          f"{entry.train_examples if entry.train_examples is not None else 'no'} training examples; "
          f"bound in {Path(args.keys_dir) / 'registry.json'}")
    return EXIT_OK
