"""The site's approval is enforced outside the code it approves (client/launcher.py), in a real deployment.

SuperNodes run in Flower's process isolation with `atoll-superexec`, so every ClientApp task goes through the
site's own installed `atoll-clientapp`: it hashes the task's bundle and checks it against the site's approvals
BEFORE installing or importing any of it. Three bundles are submitted to the same two hospitals:

1. Atoll's own app, approved: it trains and completes (the launcher runs approved bundles as flwr-clientapp does);
2. the poisoning fixture (tests/fixtures/poison_app), never approved;
3. a copy of Atoll whose ClientApp no longer calls its in-bundle approval check.

Both bad bundles plant a marker file at import time. They must be refused with RUN_NOT_APPROVED — the reason in
the lead's history — and the marker must not exist: none of their code ran next to the data. Under the default
isolation the poison fixture's code does run at the sites (tests/test_deployment_adversarial.py shows what it
then does), which is why a site must deploy this way (docs/security.md).
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest

from atoll.demo import approve_run, prepare_site_keys
from atoll.demo_data import HOSPITALS
from atoll.localnet import LocalConsortium
from client.approval import ApprovalStore, app_bundle_hash
from client.launcher import APP_PACKAGES
from conftest import REPO
from contract import Mechanism
from server.settings import RunSettings

pytestmark = pytest.mark.slow

NAMES = [h.name for h in HOSPITALS[:2]]
MARK = "import os as _os, pathlib as _pl; _pl.Path(_os.environ['ATOLL_TEST_MARKER']).touch()  # planted\n"


def _with_marker(path: Path) -> None:
    path.write_text(MARK + path.read_text())


def _poison_bundle(dest: Path) -> Path:
    import tomli_w

    src = REPO / "tests" / "fixtures" / "poison_app"
    app = tomllib.loads((src / "pyproject.toml").read_text())
    app["tool"]["flwr"]["app"]["config"] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    dest.mkdir(parents=True)
    shutil.copy2(src / "poison_client.py", dest / "poison_client.py")
    _with_marker(dest / "poison_client.py")
    (dest / "pyproject.toml").write_text(tomli_w.dumps(app))
    return dest


def _unchecked_bundle(dest: Path) -> Path:
    """Atoll with the in-bundle approval check deleted from the ClientApp (what a modified bundle would do)."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "tests",
                                                              "bench", "docs", "atoll-demo", ".pytest_cache"))
    app = dest / "client" / "app.py"
    text = app.read_text()
    check = "    manifest = _approved_manifest(site, cfg)\n"
    assert check in text, "the ClientApp's approval check moved: update this test"
    app.write_text(text.replace(check, "    manifest = build_run_manifest(cfg)  # check deleted\n"))
    _with_marker(app)
    return dest


def _run(net: LocalConsortium, settings: RunSettings, app_dir: Path) -> tuple[str, list]:
    net.app_dir = app_dir
    status = net.wait(net.submit(settings.to_run_config()), timeout=420)
    history = json.loads((Path(settings.run_dir) / settings.run_name / "history.json").read_text())
    return status, history


def test_only_approved_bundles_run_at_the_sites(fresh_consortium, tmp_path, monkeypatch):
    configs = [fresh_consortium / n / "site.toml" for n in NAMES]
    keys = prepare_site_keys(fresh_consortium, NAMES)
    marker = tmp_path / "bundle-code-ran"
    base = dict(run_dir=str(tmp_path / "runs"), keys_dir=str(keys), num_server_rounds=1, num_sites=2, min_sites=2,
                mechanism=Mechanism(steps=2))
    approve_run(configs, RunSettings(run_name="approved", **base))  # approves the manifest of Atoll's own app
    store = ApprovalStore(fresh_consortium / NAMES[0] / "state")
    assert store.approved_app_hashes() == {app_bundle_hash(REPO)}
    monkeypatch.setenv("ATOLL_TEST_MARKER", str(marker))
    net = LocalConsortium(REPO, configs, insecure=True, workdir=tmp_path / "net", isolation="process")
    with net:
        status, history = _run(net, RunSettings(run_name="approved", **base), REPO)
        assert status == "finished:completed", net.tail("superlink") + net.tail("superexec-0")
        assert all(s["status"] == "contributed" for s in history[0]["sites"].values()), history

        for name, bundle in (("poison", _poison_bundle(tmp_path / "poison")),
                             ("unchecked", _unchecked_bundle(tmp_path / "unchecked"))):
            assert app_bundle_hash(bundle) != app_bundle_hash(REPO)
            status, history = _run(net, RunSettings(run_name=name, **base), bundle)
            assert status == "finished:failed", (name, status)
            sites = history[0]["sites"]
            assert sorted(sites) == sorted(NAMES), (name, sites)
            for s in sites.values():
                assert s["status"] == "refused" and s["code"] == "RUN_NOT_APPROVED", (name, s)
                assert "is not approved at this site, so none of its code was run" in s["message"], (name, s)
            assert not marker.exists(), f"code of the unapproved {name} bundle ran at a site"
            assert "refused a bundle before running it" in net.tail("superexec-0", 400) + net.tail("supernode-0", 400)
    # the approved run's ledger records are there; the refused runs charged nothing
    for n in NAMES:
        ledger = (fresh_consortium / n / "state" / "ledger.jsonl").read_text().splitlines()
        assert sum(json.loads(line)["type"] == "reservation" for line in ledger) == 1


def test_app_packages_the_launcher_unloads_are_the_bundles() -> None:
    """The launcher unloads exactly the bundle's top-level packages before importing an approved ClientApp."""
    from tests.test_layering import _fab_files

    assert {f.split("/")[0] for f in _fab_files(REPO)} == set(APP_PACKAGES)
