"""The three consoles on a real Flower simulation of the demo consortium: every page renders the real files, and
no canary planted in the DICOM headers (PatientName, PatientID, AccessionNumber), no DICOM UID and no data path
appears in any page's HTML."""

from __future__ import annotations

import re

import pytest

from atoll.demo import approve_run, prepare_site_keys
from atoll.demo_data import CANARY_ACCESSION, CANARY_ID, CANARY_NAME, HOSPITALS
from contract import Mechanism
from server.settings import RunSettings
from tests.console_helpers import ConsoleProcess, browser, wait_for  # noqa: F401 (fixture)
from tests.test_simulation import _simulate

pytestmark = pytest.mark.slow


def test_consoles_on_a_real_run_show_no_identifier(fresh_consortium, browser) -> None:
    from selenium.webdriver.common.by import By

    names = [h.name for h in HOSPITALS]
    configs = [fresh_consortium / n / "site.toml" for n in names]
    keys = prepare_site_keys(fresh_consortium, names)
    runs = fresh_consortium / "runs"
    settings = RunSettings(num_server_rounds=1, run_dir=str(runs), run_name="real", keys_dir=str(keys), num_sites=3, mechanism=Mechanism(steps=3))
    approve_run(configs, settings)
    outputs, _ = _simulate(configs, settings)
    assert outputs.status == "completed"
    ledgers = [fresh_consortium / n / "state" / "ledger.jsonl" for n in names]

    pages: dict[str, str] = {}
    consoles = [("site", ConsoleProcess("--site", str(configs[2]))),
                ("lead", ConsoleProcess("--runs", str(runs))),
                ("audit", ConsoleProcess("--audit", str(outputs.root), "--keys", str(keys),
                                         *sum((["--site-ledger", str(p)] for p in ledgers), [])))]
    try:
        for role, c in consoles:
            browser.get(c.url)
            pages[role] = browser.page_source
            if role == "site":
                assert "completed" in browser.find_element(By.ID, "rounds").text  # the real round, from its ledger
            if role == "lead":
                browser.get(c.base + "/runs/real")
                assert wait_for(browser, "#round-progress").text == "round 1 of 1"
                pages["lead-run"] = browser.page_source
                assert browser.find_element(By.ID, "sites").text.count("contributed") == 3
            if role == "audit":
                assert "PASS" in browser.find_element(By.ID, "verdict").text
                browser.get(c.base + "/report")
                pages["report"] = browser.page_source
    finally:
        for _, c in consoles:
            c.stop()
    for role, page in pages.items():
        for text in (CANARY_NAME, CANARY_ID, CANARY_ACCESSION, str(fresh_consortium), "P0000", ".dcm"):
            assert text not in page, (role, text)
        assert not re.search(r"\b1\.2\.826\.0\.1\.3680043\.", page), f"a DICOM UID on the {role} page"
