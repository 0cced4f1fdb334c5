"""Shared fixtures: the demo consortium (generated once per session) and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def demo_consortium(tmp_path_factory) -> Path:
    """Three hospitals' DICOM folders + held-out test, written from the embedded data (~7 s)."""
    from atoll.demo_data import generate_consortium

    root = tmp_path_factory.mktemp("consortium")
    generate_consortium(root)
    return root


def shared_data(sub: str) -> Path:
    """A folder of ../shared/data, or skip: it is absent on a fresh clone (licences keep it out of the repo)."""
    path = SHARED / "data" / sub
    if not path.is_dir():
        pytest.skip(f"{path} is absent (fresh clone without ../shared); these files are not redistributable here")
    return path


def copy_consortium(src: Path, dst: Path) -> Path:
    """A private copy of a consortium folder with no privacy spent, no approvals and no released updates."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ledger.jsonl", "approvals.jsonl", "released"))
    return dst


@pytest.fixture()
def fresh_consortium(demo_consortium, tmp_path) -> Path:
    """A private copy of the demo consortium: no privacy spent, no approvals, no released updates.

    Tests that train must not share one lifetime budget: a session's runs add up at each site and
    would eventually be refused for budget, depending on test order. The preprocessed cache is kept.
    """
    return copy_consortium(demo_consortium, tmp_path / "consortium")


@pytest.fixture(scope="module")
def module_consortium(demo_consortium, tmp_path_factory) -> Path:
    """One private copy of the demo consortium for the runs of one test module that share a deployment.

    A module that starts its SuperLink and SuperNodes once (a module-scoped LocalConsortium) points them at
    these sites; each test's runs then add up in the same site ledgers, as the runs of a real consortium do.
    """
    return copy_consortium(demo_consortium, tmp_path_factory.mktemp("module-consortium") / "consortium")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with a ``slow`` test (real Flower deployments, demos: 1-9 minutes each on a 2-core CI box) are
    collected first, every module kept whole and in its own order.

    With ``--dist loadscope`` (pyproject's addopts) xdist hands whole modules to the two workers one at a time,
    in collection order, as each runs dry: longest work first, short modules last, so neither worker idles
    while the other finishes a 9-minute walkthrough, and a module's fixtures (one TLS consortium, one browser
    session) start once."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: modules stay whole, in order
