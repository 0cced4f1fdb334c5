"""``atoll site probe``: why this site's SuperNode cannot reach the SuperLink, in one line.

A SuperNode started with ``--insecure`` against a TLS SuperLink (or with the wrong CA) only logs "Connection attempt
failed, retrying" and, by default, retries forever; with ``--max-retries`` it ends with exit code 305 "Server
disconnected without sending a response". Neither says why. This probe dials the address the way the SuperNode
does, once with TLS (checked against the consortium CA the site installed) and once in plaintext, and says which
transport the SuperLink speaks and whether the CA and the name match. Standard library only; nothing is sent but a
TLS ClientHello and an HTTP ``HEAD /`` (Flower 1.41's SuperLink serves its APIs over HTTP on one port).
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3  # as atoll.cli.EXIT_CODES
_HTTP_PROBE = b"HEAD / HTTP/1.1\r\nHost: superlink\r\nConnection: close\r\n\r\n"


def add_parser(site_sub: argparse._SubParsersAction) -> None:
    p = site_sub.add_parser(
        "probe", help="say why the SuperNode cannot reach the SuperLink (TLS or plaintext, CA, name)",
        description=__doc__.split("\n\n")[1])
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the address given to flower-supernode")
    p.add_argument("--root-certificates", metavar="CA_CERT", default=None,
                   help="the consortium ca.crt given to flower-supernode (default: none, as with --insecure)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="per connection attempt")
    p.set_defaults(func=run_probe)


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--superlink {address!r}: expected HOST:PORT, e.g. fl.example:8000")
    return host.strip("[]"), int(port)


def probe_tls(host: str, port: int, ca: Path | None, timeout: float) -> tuple[bool, str]:
    """(the SuperLink speaks TLS, what the handshake says about the CA and the name)."""
    loose = ssl.create_default_context()
    loose.check_hostname, loose.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                loose.wrap_socket(raw, server_hostname=host):
            pass
    except (ssl.SSLError, ConnectionResetError, socket.timeout, OSError) as exc:
        if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
            raise
        return False, f"no TLS handshake ({exc.__class__.__name__})"
    if ca is None:
        return True, "TLS (certificate not checked: no --root-certificates)"
    strict = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                strict.wrap_socket(raw, server_hostname=host):
            return True, f"TLS, certificate signed by {ca} and valid for {host!r}"
    except ssl.SSLCertVerificationError as exc:
        return True, f"TLS, but the certificate does not verify against {ca}: {exc.verify_message}"


def probe_plaintext(host: str, port: int, timeout: float) -> bool:
    """Whether the SuperLink answers HTTP in plaintext (a SuperLink started with --insecure)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(_HTTP_PROBE)
            data = s.recv(5)
    except OSError:
        return False
    return data == b"HTTP/"


def run_probe(args: argparse.Namespace) -> int:
    try:
        host, port = _split(args.superlink)
    except ValueError as exc:
        print(f"atoll site probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    ca = Path(args.root_certificates) if args.root_certificates else None
    if ca is not None and not ca.is_file():
        print(f"atoll site probe: --root-certificates {ca}: no such file", file=sys.stderr)
        return EXIT_NOT_FOUND
    if ca is not None:
        try:
            ssl.create_default_context(cafile=str(ca))
        except ssl.SSLError:
            print(f"atoll site probe: --root-certificates {ca} is not a PEM certificate (expected the consortium's "
                  "ca.crt)", file=sys.stderr)
            return EXIT_USAGE
    try:
        tls, detail = probe_tls(host, port, ca, args.timeout)
    except (ConnectionRefusedError, socket.gaierror) as exc:
        print(f"{args.superlink}: cannot connect ({exc.strerror or exc}): is the SuperLink running, and is this "
              "the address and port it listens on?")
        return EXIT_FAILED
    if tls:
        ok = ca is not None and "does not verify" not in detail
        print(f"{args.superlink}: the SuperLink speaks {detail}.")
        if ca is None:
            print("Start flower-supernode with --root-certificates CA_CERT (the consortium's ca.crt), not --insecure.")
        elif not ok:
            print("Use the consortium's own ca.crt (confirm its fingerprint with the lead), and the name or address "
                  "its certificate was issued for (`atoll consortium init --host/--ip`).")
        else:
            print("Transport is fine: a SuperNode with these flags connects; exit code 305 then means an "
                  "unregistered node key (`atoll consortium register`).")
        return EXIT_OK if ok else EXIT_FAILED
    if probe_plaintext(host, port, args.timeout):
        print(f"{args.superlink}: the SuperLink speaks plaintext (it was started with --insecure): a demo or test "
              "SuperLink. A consortium runs over TLS; a SuperNode reaches this one only with --insecure.")
        return EXIT_FAILED
    print(f"{args.superlink}: something listens but speaks neither TLS nor plaintext HTTP ({detail}); "
          "check the port.")
    return EXIT_FAILED
