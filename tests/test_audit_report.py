"""`atoll audit report`: one self-contained HTML file, checked in a real headless Chromium."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import pytest

from privacy.audit import verify_run
from privacy.report import chromium_command, find_chromium, render_report
from test_audit import RUN, SITES, make_consortium


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report")
    run_dir = make_consortium(root, rounds=3)
    # the server's per-round history (what the server recorded of released metrics), as server/outputs.py writes it
    (run_dir / "history.json").write_text(json.dumps([
        {"round": r, "sites": {
            "hospital-a": {"status": "contributed", "train": {"num-examples": 800.0, "train_loss": 0.5 / r},
                           "val": {"val_auc": 0.8 + r / 100}},
            "hospital-b": {"status": "refused" if r == 3 else "contributed", "code": "BUDGET_EXCEEDED" if r == 3 else "",
                           "message": "site budget exhausted" if r == 3 else "", "train": {}, "val": {}}}}
        for r in (1, 2, 3)]))
    ledgers = [root / s / "state" / "ledger.jsonl" for s in SITES]
    from privacy.cli import add_audit_parser

    parser = argparse.ArgumentParser(prog="atoll audit")
    add_audit_parser(parser.add_subparsers(dest="cmd"))
    out = root / "report.html"
    args = parser.parse_args(["report", str(run_dir), "--out", str(out),
                              *[a for p in ledgers for a in ("--site-ledger", str(p))]])
    assert args.func(args) == 0
    return out, run_dir


def test_report_is_self_contained_and_complete(report) -> None:
    out, _ = report
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    # no network asset of any kind: the only URL is the SVG namespace identifier
    urls = set(re.findall(r"(?:https?:)?//[\w.-]+[^\s\"'<>)]*", page))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    assert page.count('<polyline class="series"') == 2 and page.count('class="budget"') == 2
    assert "PASS" in page and f"run {RUN}" in page
    for fragment in ("hospital-a", "hospital-b", "train_loss", "val_auc", "BUDGET_EXCEEDED", "dp_accounting RDP",
                     "train: train_loss", "released in the clear"):
        assert fragment in page, fragment


def test_report_escapes_untrusted_text(tmp_path: Path) -> None:
    run_dir = make_consortium(tmp_path, rounds=1, prior_run=False)
    (run_dir / "history.json").write_text(json.dumps([{"round": 1, "sites": {"hospital-a": {
        "status": "rejected", "code": "X", "message": "<script>alert(1)</script>", "train": {}, "val": {}}}}]))
    page = render_report(verify_run(run_dir), run_dir)
    assert "<script>" not in page and "&lt;script&gt;" in page


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium); the HTML is still checked above")
    return path


def test_report_renders_in_headless_chromium(report, chromium: str, tmp_path: Path) -> None:
    out, _ = report
    dom = subprocess.run(chromium_command(chromium, str(tmp_path / "profile"), "--dump-dom", out.as_uri()),
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-500:]
    assert 'id="epsilon-chart"' in dom.stdout and "<circle" in dom.stdout and 'id="findings"' in dom.stdout
    shot = tmp_path / "report.png"
    run = subprocess.run(chromium_command(chromium, str(tmp_path / "profile2"), "--window-size=1200,1600",
                                          f"--screenshot={shot}", out.as_uri()),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-500:]
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000  # a blank page compresses to a few kB


def test_report_prints_to_pdf(report, chromium: str, tmp_path: Path) -> None:
    from privacy.report import print_pdf

    out, _ = report
    pdf = tmp_path / "report.pdf"
    assert print_pdf(out, pdf) is None
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 10_000
