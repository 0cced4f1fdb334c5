"""The audit report says what it did not check, fits a 1280 px window, and the docs link nothing absent."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from privacy.audit import verify_run
from privacy.report import chromium_command, find_chromium, render_report
from test_audit import RUN, SITES, make_consortium


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_consortium(tmp_path_factory.mktemp("layout"), rounds=4)


def test_without_site_ledgers_the_report_says_what_was_not_cross_checked(run_dir):
    page = render_report(verify_run(run_dir), run_dir)
    assert "not given" not in page
    assert page.count("no (server copy only)") == len(SITES)
    assert "not cross-checked against the site's own ledger" in page
    assert "every signature, chain link, cross-check and recomputation holds" not in page


def test_with_site_ledgers_nothing_is_flagged_as_unchecked(run_dir):
    ledgers = [run_dir.parent.parent / s / "state" / "ledger.jsonl" for s in SITES]
    page = render_report(verify_run(run_dir, ledgers), run_dir)
    assert "no (server copy only)" not in page and "not cross-checked" not in page


def test_the_report_shows_how_the_run_ended(run_dir, tmp_path):
    (run_dir / "status.json").write_text('{"status": "stopped", "reason": "stopped by the lead at round 2 of 4"}')
    try:
        page = render_report(verify_run(run_dir), run_dir)
    finally:
        (run_dir / "status.json").unlink()
    assert 'id="run-status">Run status: stopped — stopped by the lead at round 2 of 4' in page


def test_the_report_fits_a_1280_px_window(run_dir, tmp_path):
    """Rendered by headless Chromium at 1280 px, with a long run id (as `atoll run start` names runs, plus a study
    name): the mechanism table stays inside the page's column and the page needs no horizontal scroll."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); the HTML checks above still run")
    page = render_report(verify_run(run_dir), run_dir).replace(RUN, "run-20261201-095930-92142-pneumonia-study-2")
    # the report itself runs no script (its CSP forbids it): this copy measures the page and writes the figures down
    measure = ("var m = document.getElementById('mechanism').getBoundingClientRect().right, "
               "b = document.body.getBoundingClientRect().right, d = document.documentElement; "
               "document.body.insertAdjacentHTML('beforeend', '<p id=\"fit\">' + [m, b, d.scrollWidth, "
               "d.clientWidth].join(' ') + '</p>')")
    probe = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page).replace(
        "</body>", f"<script>{measure}</script></body>")
    html = tmp_path / "probe.html"
    html.write_text(probe, encoding="utf-8")
    res = subprocess.run(chromium_command(chromium, str(tmp_path / "profile"), "--window-size=1280,900",
                                          "--dump-dom", html.as_uri()), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-500:]
    table_right, body_right, scroll_width, client_width = map(
        float, re.findall(r'<p id="fit">([^<]+)</p>', res.stdout)[-1].split())
    assert table_right <= body_right + 1, f"the mechanism table ends at {table_right} px, the page at {body_right}"
    assert scroll_width <= client_width, f"the page is {scroll_width} px wide in a {client_width} px window"


def test_the_docs_link_only_files_in_the_repo():
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "docker" / "README.md"]:
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links {target}, absent from the repo"
        assert "DESIGN.md" not in text or (doc.parent / "DESIGN.md").exists(), f"{doc.name} names DESIGN.md"
