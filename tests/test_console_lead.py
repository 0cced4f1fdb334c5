"""The lead's console page in a real headless Chromium: the run list, and one run that updates while it
progresses (rounds appended the way server/outputs.py writes them) without a full page reload."""

from __future__ import annotations

import time

import pytest

from tests.console_helpers import ConsoleProcess, RunWriter, browser, save_screenshot, wait_for  # noqa: F401

SITES = ["hospital-a", "hospital-b", "hospital-c"]
ROUNDS = 6


@pytest.fixture(scope="module")
def lead(tmp_path_factory):
    w = RunWriter(tmp_path_factory.mktemp("lead"), "run-live", rounds=ROUNDS, sites=SITES)
    old = RunWriter(w.root, "run-old", rounds=1, sites=SITES[:1])
    old.round(1)
    old.finish("stopped", "too few sites contributed in round 1 (1 < 2)")
    console = ConsoleProcess("--runs", str(w.runs_dir))
    yield w, console
    console.stop()


def _text(driver, css: str) -> str:
    """Text of the live panel's element, read in one script call: the panel may be swapped at any moment, so a
    found element can go stale before its text is read."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css)


def _round_text(driver) -> str:
    return _text(driver, "#round-progress")


def test_run_list_shows_each_run_with_status(lead, browser) -> None:
    from selenium.webdriver.common.by import By

    w, console = lead
    browser.get(console.url)
    table = browser.find_element(By.ID, "run-list").text
    assert "run-live" in table and "running" in table and f"0 of {ROUNDS}" in table
    assert "run-old" in table and "stopped — too few sites contributed" in table


def test_run_page_updates_while_the_run_progresses(lead, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    w, console = lead
    browser.get(console.base + "/runs/run-live")
    assert _round_text(browser) == f"round 0 of {ROUNDS}"
    browser.execute_script("window.__no_reload_marker = 42;")
    seen = []
    for k in range(1, ROUNDS + 1):
        refuse = {"hospital-c": ("BUDGET_EXCEEDED", "site budget exhausted: spent ε=7.91 of 8.00")} if k == 4 else None
        w.round(k, refuse=refuse)
        deadline = time.monotonic() + 30
        while _round_text(browser) != f"round {k} of {ROUNDS}":
            assert time.monotonic() < deadline, f"the page did not show round {k} within 30 s"
            time.sleep(0.2)
        seen.append(k)
        sites = _text(browser, "#sites")
        if k == 4:
            assert "refused" in sites and "BUDGET_EXCEEDED" in sites and "site budget exhausted" in sites
        else:
            assert sites.count("contributed") == 3
    assert seen == list(range(1, ROUNDS + 1))
    assert browser.execute_script("return window.__no_reload_marker;") == 42  # updated in place, never reloaded
    w.finish("completed")
    wait_for(browser, "#run-status.status-completed")
    assert _text(browser, "#run-status") == "completed"
    # epsilon per site against its budget, and one curve per metric with a line per site
    eps = set(browser.execute_script(
        "return Array.from(document.querySelectorAll('#sites td')).map(e => e.textContent);"))
    budgets = {f"{g.policy.max_epsilon:g}" for g in w.guards.values()}
    assert budgets <= eps
    for g in w.guards.values():
        assert f"{g.spent():.3f}" in eps  # the site's own lifetime epsilon, as its guard computes it
    assert browser.find_element(By.ID, "epsilon-chart").tag_name == "svg"
    for metric in ("val_auc", "val_accuracy", "train_loss"):
        chart = browser.find_element(By.ID, f"metric-{'val' if metric.startswith('val') else 'train'}-{metric}")
        assert len(chart.find_elements(By.TAG_NAME, "polyline")) >= 3
    links = browser.find_element(By.ID, "artifacts").text
    assert "Run history" in links
    save_screenshot(browser, "lead", tmp_path)


def test_files_appear_when_the_run_writes_them(lead, browser) -> None:
    from selenium.webdriver.common.by import By

    w, console = lead
    (w.run_dir / "evaluation.json").write_text('{"models": [], "sites": [], "metrics": {}}\n')
    (w.run_dir / "export").mkdir()
    (w.run_dir / "export" / "model.pt").write_bytes(b"weights")
    browser.get(console.base + "/runs/run-live")
    links = browser.find_element(By.ID, "artifacts").text
    assert "Evaluation matrix" in links and "Exported model" in links
    assert str(w.root) not in browser.page_source  # settings are shown without server paths
