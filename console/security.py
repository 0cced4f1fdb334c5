"""The console's front door: login, sessions, CSRF, origin and host checks, security headers.

One ASGI middleware (:class:`ConsoleGuard`) wraps the whole app, so no page or action can forget a check:

* **Host** header must name this console (``127.0.0.1:PORT``, ``localhost:PORT`` ...): a page on another site
  that re-points its own DNS name at 127.0.0.1 (DNS rebinding) gets ``400``.
* **Login**: ``GET /?token=T`` with the random access token printed at start (as Jupyter does) or a ``POST
  /login`` with the password from ``--password-file`` opens a server-side session; the cookie holds only a random
  session id (HttpOnly, SameSite=Strict, Secure under TLS). Sessions expire after ``idle`` seconds without a
  request and ``lifetime`` seconds in all. Anything else without a valid session gets ``401`` and the login page.
* **State-changing requests** (every method but GET/HEAD) must come from a page this console served: the
  ``Origin`` header (or, without one, the ``Referer``) must be this console's origin, ``Sec-Fetch-Site`` (when the
  browser sends it) must be ``same-origin``, and the form field ``csrf`` (or header ``X-CSRF-Token``) must equal
  the session's CSRF token. Cookies on 127.0.0.1 are shared by every port and SameSite treats other ports as
  the same site, so a page served by any other local program would otherwise be able to post here.
* **Headers on every response**, refusals included: a strict CSP (no inline script, no framing), X-Frame-Options
  DENY, nosniff, ``Cache-Control: no-store`` and a referrer policy.

Referrer policy: ``same-origin``, not ``no-referrer``. Under ``no-referrer`` browsers send ``Origin: null`` on
a plain form POST (Fetch standard, "append a request Origin header"), which would make the origin check
useless; ``same-origin`` still sends nothing to any other origin. The token never stays in a page's URL: the
login redirects to the same path without it.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable
from urllib.parse import parse_qs, urlencode

SAFE_METHODS = frozenset({"GET", "HEAD"})
MAX_FORM_BYTES = 64 * 1024
DEFAULT_IDLE_SECONDS = 30 * 60
DEFAULT_LIFETIME_SECONDS = 8 * 3600

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# The audit report (privacy/report.py) is a self-contained file with inline styles and no script.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; base-uri 'none'"
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
    ("cache-control", "no-store"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("permissions-policy", "camera=(), microphone=(), geolocation=()"),
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AuthSetupError(ValueError):
    """The password file is missing, too weak or readable by others (message names the file and the fix)."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``: the only hosts the console may bind without TLS."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_password_file(path: str | Path) -> str:
    """The console password: the file's first line. Refused unless the file is private (0600) and >= 12 chars."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AuthSetupError(f"--password-file {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthSetupError(f"--password-file {p}: cannot read it ({exc.__class__.__name__})") from None
    if os.name == "posix" and st.st_mode & 0o077:
        raise AuthSetupError(f"--password-file {p} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                             f"run: chmod 600 {p}")
    password = (text.splitlines() or [""])[0].strip()
    if len(password) < 12:
        raise AuthSetupError(f"--password-file {p}: the password (first line) must have at least 12 characters")
    return password


@dataclass
class Session:
    sid: str
    csrf: str
    created: float
    last_seen: float
    flash: list[tuple[str, str]] = field(default_factory=list)  # (level, text) shown once on the next page


@dataclass
class SessionStore:
    """Server-side sessions in memory (a console restart logs everybody out, as it should)."""

    idle: float = DEFAULT_IDLE_SECONDS
    lifetime: float = DEFAULT_LIFETIME_SECONDS
    clock: Callable[[], float] = time.monotonic
    _sessions: dict[str, Session] = field(default_factory=dict)

    def create(self) -> Session:
        now = self.clock()
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        self._sessions[s.sid] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        """The live session with this id (its idle timer restarted), or None (unknown or expired: dropped)."""
        if not sid:
            return None
        s = self._sessions.get(sid)
        if s is None:
            return None
        now = self.clock()
        if now - s.last_seen > self.idle or now - s.created > self.lifetime:
            del self._sessions[sid]
            return None
        s.last_seen = now
        return s

    def drop(self, sid: str) -> None:
        self._sessions.pop(sid, None)


@dataclass
class Access:
    """How people log in: the access token (always set) and, optionally, a password instead of it."""

    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    password: str | None = None

    def token_ok(self, candidate: str) -> bool:
        return self.password is None and hmac.compare_digest(candidate.encode(), self.token.encode())

    def password_ok(self, candidate: str) -> bool:
        return self.password is not None and hmac.compare_digest(candidate.encode(), self.password.encode())


LoginPage = Callable[[str, str], str]  # (message, next_path) -> HTML


class ConsoleGuard:
    """ASGI middleware: every request passes the checks of the module docstring before reaching the app.

    Parameters
    ----------
    app: the console's Starlette app; it finds the session in ``scope["state"]["session"]``.
    access, sessions: login secrets and the session store.
    allowed_hosts: the ``host:port`` values the Host header may carry.
    scheme: ``http`` or ``https`` (the origin state-changing requests must come from).
    login_page: renders the login page (HTML) for a refusal.
    """

    def __init__(self, app: ASGIApp, *, access: Access, sessions: SessionStore, allowed_hosts: Iterable[str],
                 scheme: str, login_page: LoginPage, cookie_name: str = "atoll_console") -> None:
        self.app = app
        self.access = access
        self.sessions = sessions
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.scheme = scheme
        self.login_page = login_page
        self.cookie_name = cookie_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets
        send = _with_headers(send, scope)
        headers = _headers(scope)
        host = headers.get("host", "").lower()
        if host not in self.allowed_hosts:
            await _respond(send, 400, "text/plain; charset=utf-8",
                           b"this console answers only under its own address (Host header refused)")
            return
        method = scope["method"].upper()
        path = scope.get("path", "/")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        session = self.sessions.get(_cookie(headers, self.cookie_name))

        if method in SAFE_METHODS and "token" in query:
            if self.access.token_ok(query["token"][0]):
                await self._login_redirect(send, path, {k: v for k, v in query.items() if k != "token"})
                return
            await self._refuse_login(send, "This access token is not valid. Use the URL printed when the console "
                                           "started.", path)
            return
        if path == "/login" and method == "POST":
            await self._password_login(scope, receive, send, headers)
            return
        if session is None:
            if path.startswith("/static/"):
                await self.app(scope, receive, send)
                return
            await self._refuse_login(send, "Log in first: open the URL (with its token) that `atoll console` "
                                           "printed when it started." if self.access.password is None else
                                           "Log in with the console password.", path)
            return
        if method not in SAFE_METHODS:
            problem = self._origin_problem(headers)
            if problem is None:
                body, problem = await _read_form_body(receive, headers)
                if problem is None:
                    sent = headers.get("x-csrf-token") or _form_field(body, "csrf")
                    if not sent or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
                        problem = "the form's CSRF token is missing or wrong (reload the page and try again)"
            if problem is not None:
                await _respond(send, 403, "text/plain; charset=utf-8", f"refused: {problem}".encode())
                return
            receive = _replay(body)
            if path == "/logout":
                self.sessions.drop(session.sid)
                await _respond(send, 303, "text/plain; charset=utf-8", b"logged out",
                               [(b"location", b"/login"), (b"set-cookie", self._cookie("", 0).encode())])
                return
        scope.setdefault("state", {})["session"] = session
        await self.app(scope, receive, send)

    # ------------------------------------------------------------------ helpers
    def _origin_problem(self, headers: dict[str, str]) -> str | None:
        origin = f"{self.scheme}://{headers.get('host', '').lower()}"
        sent = headers.get("origin")
        if sent is not None:
            if sent.lower() != origin:
                return f"the request comes from a page of another origin ({sent[:80]}), not from this console"
        else:
            referer = headers.get("referer", "")
            if not (referer.lower() == origin or referer.lower().startswith(origin + "/")):
                return "the request carries neither Origin nor Referer of this console"
        fetch_site = headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            return f"the browser says the request is {fetch_site} (Sec-Fetch-Site), not same-origin"
        return None

    def _cookie(self, value: str, max_age: int) -> str:
        parts = [f"{self.cookie_name}={value}", "Path=/", "HttpOnly", "SameSite=Strict", f"Max-Age={max_age}"]
        if self.scheme == "https":
            parts.append("Secure")
        return "; ".join(parts)

    async def _login_redirect(self, send: Send, path: str, query: dict[str, list[str]]) -> None:
        s = self.sessions.create()
        target = (path if path.startswith("/") and not path.startswith("//") else "/")
        if query:
            target += "?" + urlencode(query, doseq=True)
        await _respond(send, 303, "text/plain; charset=utf-8", b"logged in",
                       [(b"location", target.encode()),
                        (b"set-cookie", self._cookie(s.sid, int(self.sessions.lifetime)).encode())])

    async def _refuse_login(self, send: Send, message: str, path: str) -> None:
        await _respond(send, 401, "text/html; charset=utf-8", self.login_page(message, path).encode())

    async def _password_login(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        problem = self._origin_problem(headers)
        body, read_problem = await _read_form_body(receive, headers)
        nxt = _form_field(body, "next") or "/"
        if problem or read_problem:
            await _respond(send, 403, "text/plain; charset=utf-8", f"refused: {problem or read_problem}".encode())
            return
        if not self.access.password_ok(_form_field(body, "password") or ""):
            await asyncio.sleep(1.0)  # slows guessing; the password file asks for >= 12 characters
            await self._refuse_login(send, "Wrong password.", nxt)
            return
        await self._login_redirect(send, nxt if nxt.startswith("/") else "/", {})


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope.get("headers", []):
        out[k.decode("latin-1").lower()] = v.decode("latin-1")
    return out


def _cookie(headers: dict[str, str], name: str) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    jar = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # noqa: BLE001 - a malformed cookie header is simply no session
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def _with_headers(send: Send, scope: Scope) -> Send:
    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            names = {k.lower() for k, _ in headers}
            if b"content-security-policy" not in names:
                headers.append((b"content-security-policy", CSP.encode()))
            for k, v in SECURITY_HEADERS:
                if k.encode() not in names:
                    headers.append((k.encode(), v.encode()))
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


async def _respond(send: Send, status: int, content_type: str, body: bytes,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


async def _read_form_body(receive: Receive, headers: dict[str, str]) -> tuple[bytes, str | None]:
    """The whole request body (at most :data:`MAX_FORM_BYTES`), and a problem if it is not a small plain form."""
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", "the client went away"
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return b"", f"the request body is larger than {MAX_FORM_BYTES} bytes"
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    if body and ctype != "application/x-www-form-urlencoded":
        return body, f"only plain HTML forms are accepted (got content type {ctype or 'none'!r})"
    return body, None


def _form_field(body: bytes, name: str) -> str | None:
    values = parse_qs(body.decode("utf-8", errors="replace")).get(name)
    return values[0] if values else None


def _replay(body: bytes) -> Receive:
    """A ``receive`` that hands the app the body the guard already read."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # like a real connection: nothing more until it closes
        return {"type": "http.disconnect"}

    return receive
