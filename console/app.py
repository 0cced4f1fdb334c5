"""The console's web app: one Starlette app per role, server-rendered Jinja2 pages behind :class:`ConsoleGuard`.

Roles: ``site`` (:class:`console.site_view.SiteConsole`), ``lead`` (:class:`console.lead_view.LeadConsole`),
``audit`` (:class:`console.audit_view.AuditConsole`). Each page reads the files the CLI uses at request time, so the
console is never a second source of truth. State-changing routes exist only for the site (Approve, Reject,
Revoke) and every one passes the guard's origin and CSRF checks first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from console.security import REPORT_CSP, Access, ConsoleGuard, SessionStore

HERE = Path(__file__).resolve().parent
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
ROLES = ("site", "lead", "audit")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda x: f"{100 * float(x):.0f}"
    return env


@dataclass
class Console:
    """What a running console holds: its role, the role's reader, the login secrets and sessions."""

    role: str
    view: Any
    access: Access
    sessions: SessionStore
    title: str


def _page(env: jinja2.Environment, console: Console, request: Request, name: str, status: int = 200,
          **context: Any) -> HTMLResponse:
    session = request.state.session
    flash, session.flash = list(session.flash), []
    body = env.get_template(name).render(role=console.role, title=console.title, csrf=session.csrf, flash=flash,
                                         **context)
    return HTMLResponse(body, status_code=status)


def _download(content: bytes, filename: str, media_type: str) -> Response:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename)[:150]
    return Response(content, media_type=media_type, headers={"content-disposition": f'attachment; filename="{safe}"'})


def _not_found(text: str = "not found") -> Response:
    return Response(text, status_code=404, media_type="text/plain; charset=utf-8")


# ---------------------------------------------------------------------------------------------------------- site
def _site_routes(env: jinja2.Environment, console: Console) -> list[Route]:
    from console.site_view import DecisionRefused

    view = console.view

    async def home(request: Request) -> Response:
        return _page(env, console, request, "site.html", **view.context())

    def decide(action: str):
        async def endpoint(request: Request) -> Response:
            digest = request.path_params["digest"]
            if not _HEX64.match(digest):
                return _not_found()
            form = await request.form()
            by, reason = form.get("by") or None, str(form.get("reason") or "")
            session = request.state.session
            try:
                if action == "approve":
                    rec = view.approve(digest, by)
                    session.flash.append(("ok", f"Approved run {digest[:12]} by {rec['by']} at {rec['at']} "
                                                "(recorded in this site's approval log)."))
                elif action == "reject":
                    view.reject(digest, by, reason)
                    session.flash.append(("ok", f"Rejected run {digest[:12]}; its manifest moved to "
                                                "inbox/rejected/."))
                else:
                    view.revoke(digest, by, reason)
                    session.flash.append(("ok", f"Approval of run {digest[:12]} revoked; further rounds of it "
                                                "will be refused."))
            except DecisionRefused as exc:
                return _page(env, console, request, "site.html", status=409, refused=str(exc), **view.context())
            return RedirectResponse("/", status_code=303)

        return endpoint

    return [Route("/", home),
            Route("/manifests/{digest}/approve", decide("approve"), methods=["POST"]),
            Route("/manifests/{digest}/reject", decide("reject"), methods=["POST"]),
            Route("/manifests/{digest}/revoke", decide("revoke"), methods=["POST"])]


# ---------------------------------------------------------------------------------------------------------- lead
def _lead_routes(env: jinja2.Environment, console: Console) -> list[Route]:
    view = console.view

    async def home(request: Request) -> Response:
        return _page(env, console, request, "lead.html", runs=view.runs())

    async def run(request: Request) -> Response:
        root = view.run_root(request.path_params["name"])
        if root is None:
            return _not_found("no such run folder")
        return _page(env, console, request, "lead_run.html", live=view.live(root))

    async def live(request: Request) -> Response:
        root = view.run_root(request.path_params["name"])
        if root is None:
            return _not_found("no such run folder")
        data = view.live(root)
        if request.query_params.get("v") == data["version"]:
            return Response(status_code=204, headers={"x-version": data["version"]})
        body = env.get_template("_live.html").render(live=data)
        return HTMLResponse(body, headers={"x-version": data["version"]})

    async def artifact(request: Request) -> Response:
        root = view.run_root(request.path_params["name"])
        got = view.artifact_bytes(root, request.path_params["file"]) if root is not None else None
        if got is None:
            return _not_found()
        return _download(got[0], got[1], "application/octet-stream")

    return [Route("/", home), Route("/runs/{name}", run), Route("/runs/{name}/live", live),
            Route("/runs/{name}/files/{file:path}", artifact)]


# ---------------------------------------------------------------------------------------------------------- audit
def _audit_routes(env: jinja2.Environment, console: Console) -> list[Route]:
    view = console.view

    async def home(request: Request) -> Response:
        return _page(env, console, request, "audit.html", **view.context())

    async def report(request: Request) -> Response:
        return HTMLResponse(view.report_html(), headers={"content-security-policy": REPORT_CSP})

    async def report_html(request: Request) -> Response:
        return _download(view.report_html().encode(), f"{view.run_dir.name}-privacy-report.html", "text/html")

    async def report_pdf(request: Request) -> Response:
        try:
            pdf = view.report_pdf()
        except ValueError as exc:
            return Response(str(exc), status_code=503, media_type="text/plain; charset=utf-8")
        return _download(pdf, f"{view.run_dir.name}-privacy-report.pdf", "application/pdf")

    async def ledger(request: Request) -> Response:
        got = view.ledger_file(request.path_params["index"])
        if got is None:
            return _not_found()
        return _download(got[0], got[1], "application/jsonl")

    return [Route("/", home), Route("/report", report), Route("/report.html", report_html),
            Route("/report.pdf", report_pdf), Route("/ledgers/{index}", ledger)]


ROUTES = {"site": _site_routes, "lead": _lead_routes, "audit": _audit_routes}


def build_app(console: Console, allowed_hosts: Iterable[str], scheme: str = "http",
              cookie_name: str = "atoll_console") -> ConsoleGuard:
    """The ASGI app of ``console`` (a Starlette app wrapped by the guard)."""
    env = _environment()
    routes = [*ROUTES[console.role](env, console), Mount("/static", StaticFiles(directory=str(HERE / "static")))]
    app = Starlette(routes=routes)

    def login_page(message: str, next_path: str) -> str:
        return env.get_template("login.html").render(
            role=console.role, title=console.title, message=message, next=next_path if next_path.startswith("/")
            else "/", password=console.access.password is not None, csrf="", flash=[])

    return ConsoleGuard(app, access=console.access, sessions=console.sessions, allowed_hosts=allowed_hosts,
                        scheme=scheme, login_page=login_page, cookie_name=cookie_name)
