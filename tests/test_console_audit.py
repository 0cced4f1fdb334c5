"""The auditor's console page in a real headless Chromium: `atoll audit verify`'s verdict and findings, the
HTML report, and downloads of the report and of the verified ledgers; no path on any page."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from privacy.audit import verify_run
from tests.console_helpers import ConsoleProcess, RunWriter, browser, save_screenshot, wait_for  # noqa: F401

SITES = ["hospital-a", "hospital-b", "hospital-c"]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> RunWriter:
    w = RunWriter(tmp_path_factory.mktemp("audit"), "run-audit", rounds=3, sites=SITES)
    for k in (1, 2, 3):
        w.round(k)
    w.finish()
    return w


def _session(browser, console) -> httpx.Client:
    port = console.base.rsplit(":", 1)[1]
    cookie = browser.get_cookie(f"atoll_console_{port}")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    return httpx.Client(base_url=console.base, cookies={cookie["name"]: cookie["value"]}, timeout=120)


def test_clean_run_passes_and_files_download(consortium, browser) -> None:
    from selenium.webdriver.common.by import By

    w = consortium
    console = ConsoleProcess("--audit", str(w.run_dir), *sum((["--site-ledger", str(p)] for p in w.site_ledgers()), []))
    try:
        browser.get(console.url)
        assert "PASS" in browser.find_element(By.ID, "verdict").text
        rows = browser.find_element(By.ID, "audit-sites").text
        assert all(s in rows for s in SITES) and rows.count("cross-checked") == 3
        assert browser.find_element(By.ID, "no-findings")
        page = browser.page_source
        assert str(w.root) not in page
        browser.find_element(By.ID, "report-link").click()
        assert "Atoll privacy report" in wait_for(browser, "h1").text
        assert "PASS" in browser.find_element(By.ID, "verdict").text
        assert str(w.root) not in browser.page_source  # the report's own "from <path>" line is relabelled
        client = _session(browser, console)
        html = client.get("/report.html")
        assert html.status_code == 200 and "attachment" in html.headers["content-disposition"]
        assert "epsilon-chart" in html.text and str(w.root) not in html.text
        server = client.get("/ledgers/server")
        assert server.content == (w.run_dir / "ledger.jsonl").read_bytes()
        for i, path in enumerate(w.site_ledgers()):
            got = client.get(f"/ledgers/{i}")
            assert got.content == path.read_bytes()
            assert f'filename="{SITES[i]}-ledger.jsonl"' in got.headers["content-disposition"]
        assert client.get("/ledgers/7").status_code == 404 and client.get("/ledgers/-1").status_code == 404
        pdf = client.get("/report.pdf")
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    finally:
        console.stop()


def test_tampered_ledger_fails_with_each_finding(consortium, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    root = tmp_path / "copy"
    shutil.copytree(consortium.root, root)
    run_dir = root / "runs" / "run-audit"
    ledgers = [root / s / "state" / "ledger.jsonl" for s in SITES]
    lines = ledgers[1].read_text().splitlines()
    rec = json.loads(lines[-1])
    rec["epsilon_after"] = 0.01  # an under-count, after signing
    lines[-1] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    ledgers[1].write_text("\n".join(lines) + "\n")
    expected = verify_run(run_dir, ledgers)
    assert not expected.ok
    console = ConsoleProcess("--audit", str(run_dir), *sum((["--site-ledger", str(p)] for p in ledgers), []))
    try:
        browser.get(console.url)
        assert "FAIL" in browser.find_element(By.ID, "verdict").text
        rows = browser.find_elements(By.CSS_SELECTOR, "#findings tr.finding-error")
        assert len(rows) == len(expected.errors)
        cells = [[td.text for td in r.find_elements(By.TAG_NAME, "td")] for r in rows]
        fields = {(c[1], c[6]) for c in cells}
        assert ("hospital-b", "sig") in fields  # the altered record no longer verifies: site and field named
        assert all(c[3] != "—" for c in cells if (c[1], c[6]) == ("hospital-b", "sig"))  # and its line
        assert any(c[2] == "site ledger of hospital-b" for c in cells)
        page = browser.page_source
        assert str(root) not in page and str(tmp_path) not in page
        save_screenshot(browser, "audit", tmp_path)
    finally:
        console.stop()
