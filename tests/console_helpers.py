"""Helpers of the console tests (and bench/console.py): the real `atoll console` process, a real headless
Chromium driven by Selenium (Debian's chromium + chromium-driver; nothing is downloaded), and a run folder
written round by round the way the ServerApp writes it (server/outputs.py, server/sitebook.py) with real signed
ledger records from each site's budget guard."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contract import Mechanism
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000")
_URL = re.compile(r"(https?://[^\s/]+)/(\?token=[A-Za-z0-9_\-]+)?")


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        return ("Debian's chromium and chromium-driver are not installed (apt-get install -y chromium "
                "chromium-driver; .ci/run does it) — the console's browser tests need them")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def new_browser(profile: Path):
    """A fresh headless Chromium (its own profile folder) under chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(120)
    return driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    why = browser_missing()
    if why:
        pytest.skip(why)
    driver = new_browser(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


class ConsoleProcess:
    """`python -m atoll.cli console ...` as a child process; ``url`` is the printed login URL (with token)."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 300.0) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        full_env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "atoll.cli", "console", "--port", "0", *args],
                                     cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)
        deadline = time.monotonic() + timeout
        self.url = self.base = ""
        while time.monotonic() < deadline:
            text = self.output()
            m = _URL.search(text.split("Open this address", 1)[-1]) if "Open this address" in text else None
            if m:
                self.base, self.url = m.group(1), m.group(0)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"atoll console exited ({self.proc.returncode}):\n{text}")
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"atoll console did not print its URL within {timeout:.0f} s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def save_screenshot(driver, name: str, tmp: Path) -> Path:
    """Screenshot of the whole page; into docs/ when ATOLL_CONSOLE_SCREENSHOTS=1 (README pictures), else tmp."""
    height = driver.execute_script("return Math.min(document.body.scrollHeight + 40, 1500)")
    driver.set_window_size(1200, max(800, int(height)))  # capped: the README pictures stay < 200 kB
    target = (REPO / "docs" if os.environ.get("ATOLL_CONSOLE_SCREENSHOTS") == "1" else tmp) / f"console-{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(target))
    driver.set_window_size(1280, 1000)
    return target


# ------------------------------------------------------------------------------------------------ a run folder
class RunWriter:
    """A run folder written round by round through server/outputs.RunOutputs and server/sitebook.RoundBook.

    Each site charges every round through its own BudgetGuard (signed, write-ahead) and the run's
    ConsortiumLedger accepts the signed round record (signature verified against the enrolled key), so the
    epsilons and budgets on the lead's page are real ones.
    """

    SIGMA, CLIP, Q, STEPS = 1.1, 1.0, 0.01, 20

    def __init__(self, root: Path, name: str, rounds: int, sites: list[str], budget: float = 8.0) -> None:
        from contract import Mechanism
        from privacy.guard import BudgetGuard
        from privacy.keys import ensure_site_key, load_private_key
        from privacy.ledger import SiteLedger
        from privacy.policy import SitePolicy
        from server.outputs import RunOutputs
        from server.settings import RunSettings

        self.root, self.name, self.sites = Path(root), name, sites
        keys = self.root / "consortium" / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        self.guards = {}
        for i, site in enumerate(sites):
            pem = self.root / site / "keys" / "site_ed25519.pem"
            (keys / f"{site}.pub").write_bytes(ensure_site_key(pem))
            ledger = SiteLedger(self.root / site / "state" / "ledger.jsonl", site=site,
                                signing_key=load_private_key(pem))
            policy = SitePolicy.from_table({"max_epsilon": budget + 2 * i}, "test policy")
            self.guards[site] = BudgetGuard(ledger, policy, num_patients=800 + 100 * i)
        self.runs_dir = self.root / "runs"
        settings = RunSettings(num_server_rounds=rounds, run_dir=str(self.runs_dir), run_name=name, keys_dir=str(keys), num_sites=len(sites), mechanism=Mechanism(steps=self.STEPS, noise_multiplier=self.SIGMA, clip_norm=self.CLIP, sample_rate=self.Q))
        self.out = RunOutputs.create(self.runs_dir, name, settings)
        # as the ServerApp does: a signed digest per round (round 0 = the initial weights), weights saved after it
        self.prev = self.out.digest(0, self._weights(0), [])
        self.out.save_weights(0, self._weights(0))

    @staticmethod
    def _weights(tag: int):
        import torch
        from flwr.app import ArrayRecord

        return ArrayRecord({"w": torch.full((2, 3), float(tag))})

    @property
    def run_dir(self) -> Path:
        return self.out.root

    def site_ledgers(self) -> list[Path]:
        return [g.ledger.path for g in self.guards.values()]

    def round(self, k: int, refuse: dict[str, tuple[str, str]] | None = None) -> None:
        import json
        import math

        from privacy.guard import RoundRequest
        from server.sitebook import RoundBook, SiteRound

        book = RoundBook(k)
        for j, site in enumerate(self.sites):
            if refuse and site in refuse:
                code, message = refuse[site]
                book.sites[site] = SiteRound(status="refused", code=code, message=message)
                continue
            res = self.guards[site].reserve(RoundRequest(self.name, k, Mechanism(noise_multiplier=self.SIGMA, clip_norm=self.CLIP, sample_rate=self.Q, steps=self.STEPS)),
                                            weights_in_sha256=f"{k:064x}")
            rec = self.guards[site].complete(res, update_sha256=f"{1000 * (j + 1) + k:064x}",
                                             num_examples=700 + 50 * j, server_prev_digest=self.prev)
            wired = json.loads(json.dumps(rec))
            self.out.ledger.accept(wired, site=site)
            book.accepted_records.append(wired)
            loss = 0.7 * math.exp(-0.08 * k) + 0.05 * j
            book.sites[site] = SiteRound(
                status="contributed", train={"num-examples": 700.0 + 50 * j, "train_loss": loss},
                val={"num-examples": 180.0, "val_loss": loss + 0.05, "val_accuracy": 0.6 + 0.3 * (1 - math.exp(-0.15 * k)),
                     "val_auc": 0.7 + 0.25 * (1 - math.exp(-0.2 * k)) - 0.02 * j},
                epsilon=float(rec["epsilon_after"]), delta=float(rec["delta"]))
        self.prev = self.out.digest(k, self._weights(k), book.accepted_records)
        self.out.save_weights(k, self._weights(k))
        self.out.record_round(book, train_wall_seconds=1.0)

    def finish(self, status: str = "completed", reason: str = "") -> None:
        self.out.finish(status, reason)


def wait_for(driver, css: str, timeout: float = 30.0):
    """The first element matching ``css`` once it exists (after a form post or a live update)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.CSS_SELECTOR, css))
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text[:2000]
        raise AssertionError(f"no {css!r} on {driver.current_url} after {timeout:.0f} s; the page says:\n{body}")
