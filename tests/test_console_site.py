"""The site's console page in a real headless Chromium: log in, approve a pending manifest (the approval store
holds exactly what `atoll site approve` writes), refuse an over-budget run with its numbers, and refuse
requests without a session, with a wrong CSRF token or from a page served elsewhere; no identifier on any page."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

from atoll.cli import main as atoll
from atoll.demo_data import CANARY_ACCESSION, CANARY_ID, CANARY_NAME, read_header
from client.approval import ApprovalStore, load_manifest, manifest_hash
from tests.console_helpers import ConsoleProcess, browser, save_screenshot, wait_for  # noqa: F401 (fixture)

SITE = "hospital-c"  # the smallest demo hospital, with broken files in quarantine


@pytest.fixture(scope="module")
def site(demo_consortium, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("site") / SITE
    shutil.copytree(demo_consortium / SITE, root,
                    ignore=shutil.ignore_patterns("ledger.jsonl", "approvals.jsonl", "released", "inbox"))
    inbox = root / "state" / "inbox"
    inbox.mkdir(parents=True)
    # What the lead sends (`atoll run manifest`), copied into the site's inbox by its admin.
    assert atoll(["run", "manifest", "--out", str(inbox / "run-ok.json"), "--rounds", "3"]) == 0
    assert atoll(["run", "manifest", "--out", str(inbox / "run-greedy.json"), "--rounds", "40",
                  "--noise-multiplier", "0.7", "--local-steps", "300", "--sample-rate", "0.2"]) == 0
    assert atoll(["run", "manifest", "--out", str(inbox / "run-other.json"), "--rounds", "2"]) == 0
    spent = _earlier_run(root / "site.toml")
    console = ConsoleProcess("--site", str(root / "site.toml"))
    yield {"root": root, "inbox": inbox, "console": console, "state": root / "state", "pages": [], "spent": spent}
    console.stop()


def _earlier_run(config: Path) -> float:
    """An earlier run on this dataset, charged as the ClientApp charges it (the site's own guard and signed
    ledger, delta from its training patients): two completed rounds and one refused. Returns epsilon spent."""
    from client.ingest import build_site_dataset
    from client.runtime import open_site_ledger
    from client.site_config import load_site_config
    from contract import Mechanism
    from privacy.guard import BudgetGuard, BudgetRefused, RoundRequest

    cfg = load_site_config(config)
    guard = BudgetGuard(open_site_ledger(cfg), cfg.privacy, build_site_dataset(cfg).train.num_patients)
    for rnd in (1, 2):
        res = guard.reserve(RoundRequest("run-earlier", rnd, Mechanism(noise_multiplier=2.0, clip_norm=4.0, sample_rate=0.1, steps=100)), weights_in_sha256=f"{rnd:064x}")
        guard.complete(res, update_sha256=f"{rnd + 50:064x}")
    with pytest.raises(BudgetRefused):
        guard.reserve(RoundRequest("run-earlier", 3, Mechanism(noise_multiplier=0.1, clip_norm=4.0, sample_rate=0.1, steps=100)), weights_in_sha256="3" * 64)
    return guard.spent()


def _digest(path: Path) -> str:
    return manifest_hash(load_manifest(path))


def _keep(site: dict, driver) -> str:
    site["pages"].append(driver.page_source)
    return driver.page_source


def test_login_shows_card_budget_and_pending_runs(site, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(site["console"].url)
    assert "token=" not in browser.current_url  # redirected to the page without the token
    assert browser.find_element(By.ID, "site-name").text == SITE
    quarantine = browser.find_element(By.ID, "quarantine").text
    for reason in ("NOT_DICOM", "TRUNCATED", "BURNED_IN_ANNOTATION"):  # the demo's planted broken files
        assert reason in quarantine
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#quarantine td.exact")] == ["1", "1", "1"]
    assert browser.find_element(By.ID, "images-used").text == "932"
    assert browser.find_element(By.ID, "budget-chart").tag_name == "svg"
    assert browser.find_element(By.ID, "eps-budget").text == "8"
    assert browser.find_element(By.ID, "eps-spent").text == f"ε {site['spent']:.3f}"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#budget-chart circle")) == 2  # one point per charged round
    rounds = browser.find_element(By.ID, "rounds").text
    assert rounds.count("completed") == 2 and "refused [NOISE_OUT_OF_POLICY]" in rounds
    assert "model update (DP-SGD), num-examples, train_loss" in rounds  # what left the site, per round
    digests = {e.get_attribute("data-digest") for e in browser.find_elements(By.CSS_SELECTOR, "article.manifest")}
    assert digests == {_digest(site["inbox"] / f) for f in ("run-ok.json", "run-greedy.json", "run-other.json")}
    ok = browser.find_element(By.ID, f"manifest-{_digest(site['inbox'] / 'run-ok.json')[:12]}")
    assert "σ = 2.0, C = 4.0, q = 0.1, 100 steps per round" in ok.text and "app hash" in ok.text
    assert "Nothing was approved at this site before" in ok.text
    _keep(site, browser)


def test_over_budget_run_is_refused_with_the_numbers(site, browser) -> None:
    from selenium.webdriver.common.by import By

    digest = _digest(site["inbox"] / "run-greedy.json")
    card = browser.find_element(By.ID, f"manifest-{digest[:12]}")
    button = card.find_element(By.CSS_SELECTOR, "form.approve button")
    assert not button.is_enabled()
    assert "over budget" in card.find_element(By.CSS_SELECTOR, ".refusal").text
    # The server refuses it too, not just the disabled button.
    browser.execute_script("window.confirm = () => true; arguments[0].disabled = false; arguments[0].click();", button)
    refused = wait_for(browser, "#refused").text
    assert "over budget" in refused and f"spent ε={site['spent']:.3f} of its lifetime budget 8" in refused
    assert "40 round(s) × 300 steps at σ=0.7, q=0.2 would reach ε=" in refused
    assert not ApprovalStore(site["state"]).is_approved(digest)
    _keep(site, browser)


def test_approve_writes_what_atoll_site_approve_writes(site, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By

    path = site["inbox"] / "run-ok.json"
    digest = _digest(path)
    browser.get(site["console"].base + "/")
    card = browser.find_element(By.ID, f"manifest-{digest[:12]}")
    name = card.find_element(By.CSS_SELECTOR, "form.approve input[name=by]")
    name.clear()
    name.send_keys("Dr Console")
    browser.execute_script("window.confirm = () => true;")
    card.find_element(By.CSS_SELECTOR, "form.approve button").click()
    assert f"Approved run {digest[:12]} by Dr Console" in wait_for(browser, ".flash.ok").text
    store = ApprovalStore(site["state"])
    store.check_approved(load_manifest(path))  # what the ClientApp checks before each round: passes
    console_rec = store.records()[-1]
    # The same manifest approved with the CLI in another state folder: the same record, bar time and chain.
    assert atoll(["site", "approve", "--state-dir", str(tmp_path), "--manifest", str(path), "--yes",
                  "--by", "Dr Console"]) == 0
    cli_rec = ApprovalStore(tmp_path).records()[-1]
    assert set(console_rec) == set(cli_rec)
    assert {k: v for k, v in console_rec.items() if k not in ("at", "prev_sha256")} == \
        {k: v for k, v in cli_rec.items() if k not in ("at", "prev_sha256")}
    assert not browser.find_elements(By.ID, f"manifest-{digest[:12]}")  # no longer pending
    assert "approved" in browser.find_element(By.ID, "decisions").text
    # The next manifest shows what changed since this approval.
    other = browser.find_element(By.ID, f"manifest-{_digest(site['inbox'] / 'run-other.json')[:12]}")
    assert "num_rounds" in other.find_element(By.CSS_SELECTOR, "table.changes").text
    _keep(site, browser)
    save_screenshot(browser, "site", tmp_path)


def test_wrong_csrf_token_is_refused(site, browser) -> None:
    from selenium.webdriver.common.by import By

    digest = _digest(site["inbox"] / "run-other.json")
    browser.get(site["console"].base + "/")
    form = browser.find_element(By.CSS_SELECTOR, f"#manifest-{digest[:12]} form.reject")
    browser.execute_script("arguments[0].querySelector('input[name=csrf]').value = 'forged'; arguments[0].submit();",
                           form)
    assert "CSRF token is missing or wrong" in browser.find_element(By.TAG_NAME, "body").text
    assert (site["inbox"] / "run-other.json").exists()


def test_a_page_served_elsewhere_cannot_post(site, browser, tmp_path) -> None:
    """Another local web server's page (same host, other port: same *site* for cookies) posts a form with the
    right CSRF token to the console; the Origin check refuses it."""
    from selenium.webdriver.common.by import By

    digest = _digest(site["inbox"] / "run-other.json")
    browser.get(site["console"].base + "/")
    csrf = browser.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")
    page = (f'<!DOCTYPE html><html><body><form id="f" method="post" '
            f'action="{site["console"].base}/manifests/{digest}/reject"><input name="csrf" value="{csrf}">'
            '<input name="reason" value="forged"></form><script>document.getElementById("f").submit()</script>'
            "</body></html>").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "refused" in body and "another origin" in body
    finally:
        server.shutdown()
    assert (site["inbox"] / "run-other.json").exists()
    assert not (site["inbox"] / "rejected").exists()


def test_reject_moves_the_manifest_out_of_the_inbox(site, browser) -> None:
    from selenium.webdriver.common.by import By

    digest = _digest(site["inbox"] / "run-other.json")
    browser.get(site["console"].base + "/")
    form = browser.find_element(By.CSS_SELECTOR, f"#manifest-{digest[:12]} form.reject")
    form.find_element(By.NAME, "reason").send_keys("not this quarter")
    form.find_element(By.TAG_NAME, "button").click()
    assert f"Rejected run {digest[:12]}" in wait_for(browser, ".flash.ok").text
    assert not (site["inbox"] / "run-other.json").exists()
    line = json.loads((site["inbox"] / "rejected" / "rejections.jsonl").read_text().splitlines()[-1])
    assert line["manifest_sha256"] == digest and line["reason"] == "not this quarter"
    assert not ApprovalStore(site["state"]).is_approved(digest)
    _keep(site, browser)


def test_without_a_session_nothing_is_shown(site, browser) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(site["console"].base + "/")
    assert browser.find_element(By.ID, "login")
    assert SITE not in browser.page_source.split("<main>", 1)[1] and "manifest" not in browser.page_source
    browser.get(site["console"].base + "/?token=wrong-token")
    assert "not valid" in browser.find_element(By.ID, "login").text
    browser.get(site["console"].url)  # log in again for what follows
    assert browser.find_element(By.ID, "site-name").text == SITE


def test_no_identifier_on_any_page(site) -> None:
    dicom = sorted((site["root"] / "dicom").rglob("*.dcm"))[0]
    ds = read_header(dicom)
    forbidden = [CANARY_NAME, CANARY_ID, CANARY_ACCESSION, str(ds.PatientID), str(ds.SOPInstanceUID),
                 str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.AccessionNumber),
                 str(site["root"]), str(site["root"] / "dicom"), "P0000"]
    assert len(site["pages"]) >= 4
    for page in site["pages"]:
        for text in forbidden:
            assert text not in page, text
