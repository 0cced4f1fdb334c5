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


@pytest.fixture()
def fresh_consortium(demo_consortium, tmp_path) -> Path:
    """A private copy of the demo consortium: no privacy spent, no approvals, no released updates.

    Tests that train must not share one lifetime budget: a session's runs add up at each site and
    would eventually be refused for budget, depending on test order. The preprocessed cache is kept.
    """
    import shutil

    dst = tmp_path / "consortium"
    shutil.copytree(demo_consortium, dst,
                    ignore=shutil.ignore_patterns("ledger.jsonl", "approvals.jsonl", "released"))
    return dst
