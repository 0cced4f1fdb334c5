"""`atoll consortium init`: the lead creates the consortium's CA and the SuperLink's TLS material."""

from __future__ import annotations

import argparse
from pathlib import Path

from server.pki import CA_DAYS, SERVER_DAYS, PKIError, init_consortium, superlink_tls_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `atoll consortium init` under the top-level sub-commands."""
    consortium = subparsers.add_parser("consortium", help="consortium lead: TLS material for the SuperLink")
    sub = consortium.add_subparsers(dest="consortium_command", metavar="COMMAND")
    consortium.set_defaults(func=lambda a: (consortium.print_help(), 2)[1])
    p = sub.add_parser(
        "init", help="create the consortium CA and the SuperLink's TLS certificate and key",
        description="Writes DIR/ca.crt (give it to every hospital), DIR/server.pem and DIR/server.key (for the "
                    "SuperLink host only) and DIR/ca.key (keep it offline; it is needed only to issue a new "
                    "server certificate). The certificate is valid for the --host names and --ip addresses "
                    "the hospitals' SuperNodes will use. Existing files are never overwritten.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the consortium's TLS material")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="DNS name of the SuperLink (repeatable)")
    p.add_argument("--ip", action="append", default=[], metavar="ADDR",
                   help="IP address of the SuperLink (repeatable)")
    p.add_argument("--days", type=int, default=SERVER_DAYS,
                   help=f"server certificate validity in days (default {SERVER_DAYS}; CA: {CA_DAYS})")
    p.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    try:
        pki = init_consortium(Path(args.out), args.host, args.ip, days=args.days)
    except PKIError as exc:
        print(f"atoll consortium init: {exc}")
        return 2
    except OSError as exc:
        print(f"atoll consortium init: cannot write to {args.out} ({exc.strerror or exc.__class__.__name__})")
        return 2
    names = ", ".join([*pki.hosts, *pki.ips])
    print(f"Consortium TLS material written to {pki.out}")
    print(f"  {pki.ca_cert.name:<11} CA certificate (5 years): send it to every hospital")
    print(f"  {pki.server_cert.name:<11} SuperLink certificate for {names}, valid until "
          f"{pki.not_after:%Y-%m-%d}")
    print(f"  {pki.server_key.name:<11} SuperLink private key (0600): keep it on the SuperLink host only")
    print(f"  {pki.ca_key.name:<11} CA private key (0600): move it offline; needed only to re-issue server.pem")
    print("Start the SuperLink with TLS and node authentication:")
    print("  flower-superlink --host 0.0.0.0 --port 8000 " + " ".join(superlink_tls_args(pki.out))
          + " --disable-runtime-dependency-installation --database /path/to/state.db")
    print("Then register each hospital's node key (from `atoll site enroll`):")
    print("  flwr supernode register HOSPITAL.pub SUPERLINK-CONNECTION --name HOSPITAL")
    return 0
