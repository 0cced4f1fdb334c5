"""`atoll console` at the HTTP level (a real console process): login, refusals, headers, sessions, TLS, CLI."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from console import manifests as mf
from tests.console_helpers import REPO, ConsoleProcess, RunWriter

SITES = ["hospital-a", "hospital-b", "hospital-c"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunWriter:
    w = RunWriter(tmp_path_factory.mktemp("lead"), "run-http", rounds=4, sites=SITES)
    for k in (1, 2):
        w.round(k)
    return w


@pytest.fixture(scope="module")
def lead(run):
    c = ConsoleProcess("--runs", str(run.runs_dir))
    yield c
    c.stop()


def _login(c: ConsoleProcess) -> httpx.Client:
    client = httpx.Client(base_url=c.base, follow_redirects=False, timeout=30)
    r = client.get(c.url)
    assert r.status_code == 303 and r.headers["location"] == "/"  # the token never stays in the page's URL
    return client


def test_without_or_with_a_wrong_token_nothing_is_shown(lead, run) -> None:
    for r in (httpx.get(f"{lead.base}/"), httpx.get(f"{lead.base}/runs/run-http"),
              httpx.get(f"{lead.base}/runs/run-http/live"), httpx.get(f"{lead.base}/?token=not-the-token"),
              httpx.get(f"{lead.base}/runs/run-http/files/history.json")):
        assert r.status_code == 401
        assert "run-http" not in r.text and "hospital-a" not in r.text and 'id="login"' in r.text
    r = httpx.get(f"{lead.base}/", cookies={f"atoll_console_{lead.base.rsplit(':', 1)[1]}": "forged-session"})
    assert r.status_code == 401


def test_login_cookie_and_security_headers(lead) -> None:
    client = httpx.Client(base_url=lead.base, follow_redirects=False)
    r = client.get(lead.url)
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie  # plain HTTP
    page = client.get("/")
    assert page.status_code == 200 and "run-http" in page.text
    for resp in (page, httpx.get(f"{lead.base}/"), httpx.get(f"{lead.base}/", headers={"host": "evil.example"})):
        h = resp.headers
        assert "frame-ancestors 'none'" in h["content-security-policy"]
        assert "script-src 'self'" in h["content-security-policy"] and "unsafe-inline" not in h["content-security-policy"]
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"
        assert h["referrer-policy"] == "same-origin" and h["cache-control"] == "no-store"
    assert "uvicorn" not in page.headers.get("server", "")


def test_foreign_host_header_is_refused(lead) -> None:
    """DNS rebinding: a foreign name pointed at 127.0.0.1 reaches the port but not the console."""
    client = _login(lead)
    r = client.get("/", headers={"host": "attacker.example:80"})
    assert r.status_code == 400 and "run-http" not in r.text


def test_state_changing_requests_need_origin_and_csrf(lead) -> None:
    client = _login(lead)
    page = client.get("/").text
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    origin = lead.base
    refused = [
        client.post("/logout", data={"csrf": csrf}),  # no Origin, no Referer
        client.post("/logout", data={"csrf": csrf}, headers={"origin": "http://127.0.0.1:1"}),  # another port
        client.post("/logout", data={"csrf": csrf}, headers={"origin": "null"}),
        client.post("/logout", data={"csrf": "wrong"}, headers={"origin": origin}),
        client.post("/logout", data={}, headers={"origin": origin}),
        client.post("/logout", data={"csrf": csrf}, headers={"origin": origin, "sec-fetch-site": "cross-site"}),
        client.post("/logout", json={"csrf": csrf}, headers={"origin": origin}),  # not a form
    ]
    assert [r.status_code for r in refused] == [403] * len(refused), [r.text for r in refused]
    assert client.get("/").status_code == 200  # still logged in: nothing above took effect
    ok = client.post("/logout", data={"csrf": csrf}, headers={"origin": origin})
    assert ok.status_code == 303
    assert client.get("/").status_code == 401  # the session is gone on the server


def test_no_path_traversal_and_only_offered_files(lead, run) -> None:
    client = _login(lead)
    assert client.get("/runs/run-http/files/history.json").status_code == 200
    for path in ("/runs/..%2F..%2Fetc/live", "/runs/run-http/files/../../consortium/keys/hospital-a.pub",
                 "/runs/run-http/files/ledger.jsonl", "/runs/run-http/files/settings.json", "/runs/nope"):
        assert client.get(path).status_code == 404, path


def test_sessions_expire(run) -> None:
    c = ConsoleProcess("--runs", str(run.runs_dir), "--session-minutes", "0.02")  # 1.2 s idle
    try:
        client = _login(c)
        assert client.get("/").status_code == 200
        time.sleep(2.0)
        assert client.get("/").status_code == 401
    finally:
        c.stop()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "atoll.cli", "console", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_refuses_public_host_without_tls_and_misused_flags(run, tmp_path) -> None:
    r = _cli("--runs", str(run.runs_dir), "--host", "0.0.0.0")
    assert r.returncode == 2 and "requires TLS" in r.stderr and "--tls-cert" in r.stderr
    r = _cli("--runs", str(run.runs_dir), "--site-ledger", "x.jsonl")
    assert r.returncode == 2 and "only apply with --audit" in r.stderr
    r = _cli("--runs", str(tmp_path / "absent"))
    assert r.returncode == 2 and "not a folder" in r.stderr and "Traceback" not in r.stderr
    weak = tmp_path / "pw"
    weak.write_text("a-long-enough-password\n")
    weak.chmod(0o644)
    r = _cli("--runs", str(run.runs_dir), "--password-file", str(weak))
    assert r.returncode == 2 and "chmod 600" in r.stderr


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_and_password_login(run, tmp_path) -> None:
    cert, key = _self_signed(tmp_path)
    pw = tmp_path / "console.pw"
    pw.write_text("correct horse battery staple\n")
    pw.chmod(0o600)
    c = ConsoleProcess("--runs", str(run.runs_dir), "--tls-cert", str(cert), "--tls-key", str(key),
                       "--password-file", str(pw))
    try:
        assert c.base.startswith("https://") and "token=" not in c.url
        client = httpx.Client(base_url=c.base, verify=ssl.create_default_context(cafile=str(cert)),
                              follow_redirects=False, timeout=30)
        assert client.get("/").status_code == 401
        assert client.get(f"/?token=anything").status_code == 401  # no token login in password mode
        bad = client.post("/login", data={"password": "wrong password!!", "next": "/"}, headers={"origin": c.base})
        assert bad.status_code == 401
        foreign = client.post("/login", data={"password": "correct horse battery staple", "next": "/"},
                              headers={"origin": "https://127.0.0.1:1"})
        assert foreign.status_code == 403
        ok = client.post("/login", data={"password": "correct horse battery staple", "next": "/"},
                         headers={"origin": c.base})
        assert ok.status_code == 303 and "Secure" in ok.headers["set-cookie"]
        assert client.get("/").status_code == 200
    finally:
        c.stop()


def test_manifest_fields_render_generically() -> None:
    """A section the manifest does not have today (the lead's `task`) shows up without code changes."""
    manifest = {"atoll_run_manifest": 2, "app_hash": "a" * 64, "model": "atollnet",
                "task": {"kind": "classification", "labels": ["normal", "pneumonia", "covid"], "spatial_dims": 2},
                "mechanism": {"dp": True, "noise_multiplier": 1.5, "clip_norm": 2.0, "sample_rate": 0.05,
                              "local_steps": 40, "accountant": "rdp"},
                "num_rounds": 5, "outputs": [{"name": "w", "shape": [2, 3], "dtype": "float32"}]}
    rows = {r.path: r for r in mf.rows(manifest)}
    assert rows["task"].value is None and rows["task.labels"].value == "normal, pneumonia, covid"
    assert rows["mechanism.accountant"].value == "rdp" and rows["outputs"].table == [
        {"name": "w", "shape": "[2, 3]", "dtype": "float32"}]
    old = {**manifest, "num_rounds": 3, "task": {"kind": "classification", "labels": ["normal", "pneumonia"]}}
    changed = {f for f, _, _ in mf.changes(old, manifest)}
    assert changed == {"num_rounds", "task.labels", "task.spatial_dims"}


def test_console_is_not_in_the_app_bundle_sites_approve() -> None:
    """The console composes both sides and sits on top: Flower's FAB (what sites hash) must not carry it."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))).namelist()
    assert any(n.startswith("client/") for n in names)
    assert not [n for n in names if n.startswith(("console/", "tests/", "docs/", "bench/"))]
