"""``atoll console``: one web page per role, served by Atoll on this machine.

    atoll console --site site.toml          hospital site: data card, privacy budget, approve/reject runs
    atoll console --runs RUN_DIR            consortium lead: the runs, one run live
    atoll console --audit RUN_DIR/<run>     auditor: verification verdict, report, verified ledgers

At start it prints the address to open, with a random access token in it (as Jupyter does). It listens on
127.0.0.1 only unless ``--host`` says otherwise, and any other host requires TLS (``--tls-cert``/``--tls-key``).
Heavy imports stay inside :func:`run_console` so that ``atoll --help`` stays fast.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``atoll console`` (``sub`` = the top-level sub-parsers of ``atoll``)."""
    p = sub.add_parser(
        "console", help="web console: a page per role (site / lead / auditor)",
        description="Serves one web page for a role, from the same files the CLI uses, and prints the address "
                    "to open (with its access token). Site: the dataset card, the privacy budget over time, and "
                    "the run manifests in STATE_DIR/inbox/ to approve or reject. Lead: the run folders and one run "
                    "live. Auditor: `atoll audit verify`'s verdict, the report, the verified ledgers.")
    role = p.add_mutually_exclusive_group(required=True)
    role.add_argument("--site", metavar="SITE_TOML", help="hospital site: its site.toml")
    role.add_argument("--runs", metavar="DIR", help="consortium lead: the runs folder (RUN_DIR)")
    role.add_argument("--audit", metavar="RUN", help="auditor: one run's folder (RUN_DIR/<run>), read-only")
    p.add_argument("--site-ledger", action="append", default=[], metavar="FILE",
                   help="with --audit: a site's own ledger.jsonl to cross-check (repeat per site)")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="with --audit: enrolled site public keys (default as `atoll audit verify`)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (0 picks a free one; default 8765)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (default 127.0.0.1: this machine only); any other needs TLS")
    p.add_argument("--server-name", default=None,
                   help="the host name browsers use to reach a non-local console (checked against the Host "
                        "header; default: --host)")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="TLS certificate (required off 127.0.0.1)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="TLS private key (required off 127.0.0.1)")
    p.add_argument("--password-file", default=None, metavar="FILE",
                   help="log in with the password in FILE (first line, >= 12 characters, mode 0600) instead "
                        "of the access token")
    p.add_argument("--session-minutes", type=float, default=30.0,
                   help="a session ends after this many idle minutes (default 30; at most 8 hours in all)")
    p.set_defaults(func=run_console)


def _fail(msg: str) -> int:
    print(f"atoll console: {msg}", file=sys.stderr)
    return 2


def run_console(args: argparse.Namespace) -> int:
    from console.security import AuthSetupError, is_loopback, read_password_file

    if (args.site_ledger or args.keys) and not args.audit:
        return _fail("--site-ledger and --keys only apply with --audit")
    tls = bool(args.tls_cert or args.tls_key)
    if tls and not (args.tls_cert and args.tls_key):
        return _fail("TLS needs both --tls-cert and --tls-key")
    if not is_loopback(args.host) and not tls:
        return _fail(f"--host {args.host} would expose the console beyond this machine, which requires TLS: pass "
                     "--tls-cert CERT.pem --tls-key KEY.pem (or keep the default --host 127.0.0.1)")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path and not Path(path).is_file():
            return _fail(f"{flag} {path}: no such file")
    if not 0 <= args.port <= 65535:
        return _fail(f"--port must be 0..65535, got {args.port}")
    if args.session_minutes <= 0:
        return _fail("--session-minutes must be > 0")
    try:
        password = read_password_file(args.password_file) if args.password_file else None
    except AuthSetupError as exc:
        return _fail(str(exc))

    from console.app import Console
    from console.security import Access, SessionStore

    try:
        role, view, title = _view(args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        return _fail(str(exc))
    idle = args.session_minutes * 60
    console = Console(role, view, Access(password=password), SessionStore(idle=idle, lifetime=max(idle, 8 * 3600)),
                      title)
    return serve(console, host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key,
                 server_name=args.server_name)


def _view(args: argparse.Namespace):
    if args.site:
        from console.site_view import SiteConsole

        print("atoll console: reading the site's data and ledger (as `atoll site check` does)...", flush=True)
        view = SiteConsole.load(args.site)
        return "site", view, f"site {view.config.name}"
    if args.runs:
        from console.lead_view import LeadConsole

        return "lead", LeadConsole(args.runs), "consortium lead"
    from console.audit_view import AuditConsole

    view = AuditConsole(args.audit, args.site_ledger, args.keys)
    return "audit", view, f"auditor, run {view.run_dir.name}"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 lets the OS pick a free one."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def allowed_hosts(host: str, port: int, server_name: str | None) -> list[str]:
    from console.security import is_loopback

    names = {server_name or host.strip("[]")}
    if is_loopback(host):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    return [f"[{n}]:{port}" if ":" in n and not n.startswith("[") else f"{n}:{port}" for n in names]


def serve(console, *, host: str, port: int, tls_cert: str | None, tls_key: str | None,
          server_name: str | None) -> int:
    """Bind, print the address to open, and serve until interrupted (uvicorn; no access log: URLs hold tokens)."""
    import uvicorn

    from console.app import build_app

    try:
        sock = bind(host, port)
    except OSError as exc:
        return _fail(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port (0 = any free one)")
    actual = sock.getsockname()[1]
    scheme = "https" if tls_cert else "http"
    app = build_app(console, allowed_hosts(host, actual, server_name), scheme=scheme,
                    cookie_name=f"atoll_console_{actual}")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", server_header=False,
                            ssl_certfile=tls_cert, ssl_keyfile=tls_key, proxy_headers=False)
    name = server_name or (DEFAULT_HOST if host in ("0.0.0.0", "::") else host.strip("[]"))
    shown = f"[{name}]" if ":" in name else name
    base = f"{scheme}://{shown}:{actual}/"
    print(f"Atoll console ({console.title}) is running. Open this address in a browser on this machine:")
    if console.access.password is None:
        print(f"    {base}?token={console.access.token}", flush=True)
        print("The token in it is the login: keep it to yourself. Stop the console with Ctrl-C.", flush=True)
    else:
        print(f"    {base}", flush=True)
        print("Log in with the password from --password-file. Stop the console with Ctrl-C.", flush=True)
    if not tls_cert:
        print("(plain HTTP, bound to this machine only)", flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    return 0
