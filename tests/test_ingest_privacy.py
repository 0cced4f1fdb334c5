"""No identifier leaves the data room: PHI canaries planted in headers and file names never reach the dataset card,
the CLI output, exception messages, or any log line at INFO or above (from any logger, pydicom's included)."""

from __future__ import annotations

import argparse
import json
import logging
import re
import stat
import warnings
from pathlib import Path

import pytest

from client.ingest import NoUsableImagesError, build_site_dataset
from client.ingest.card import format_card, suppress, suppress_group
from client.ingest.pseudonyms import Pseudonymizer
from client.site_check import add_parser
from client.site_config import default_site_config
from tests.dicom_factory import write_dicom, write_labels

CANARY_UID = "1.2.826.0.1.3680043.10.999.4242424242"
CANARIES = ["ZZCANARY", "4242424242", "19871231", "19550505"]


def _plant(root: Path) -> Path:
    """A site whose every identifier carries a canary: names, ids, UIDs, dates, folder and file names."""
    data = root / "ZZCANARYROOT" / "dicom"
    records = []
    for p in range(6):
        for i in range(2):
            sop = f"{CANARY_UID}.{p}.{i}"
            rel = f"ZZCANARYDIR_{p}/ZZCANARYFILE_{i}.dcm"
            write_dicom(data / rel, patient_id=f"ZZCANARYPID{p}", patient_name=f"ZZCANARY^NAME{p}", sop_uid=sop,
                        study_uid=f"{CANARY_UID}.{p}", series_uid=f"{CANARY_UID}.{p}.9", accession=f"ZZCANARYACC{p}",
                        study_date="19871231", seed=p * 10 + i,
                        extra={"PatientBirthDate": "19550505", "InstitutionName": "ZZCANARY Hospital"})
            records.append({"sop": sop, "label": p % 2})
    # broken files, each with canaries in the name and, where possible, in the header
    write_dicom(data / "ZZCANARYBURNED.dcm", patient_id="ZZCANARYPIDB", burned_in="YES", study_date="19871231")
    write_dicom(data / "ZZCANARYCT.dcm", patient_id="ZZCANARYPIDC", modality="CT")
    with warnings.catch_warnings():  # pydicom warns (quoting the value) when the factory sets the invalid UID
        warnings.simplefilter("ignore")
        write_dicom(data / "ZZCANARYBADUID.dcm", patient_id="ZZCANARYPIDU", sop_uid="ZZCANARY.not.a.uid")
    good = (data / "ZZCANARYDIR_0" / "ZZCANARYFILE_0.dcm").read_bytes()
    (data / "ZZCANARYCUT.dcm").write_bytes(good[: len(good) - 100])
    (data / "ZZCANARYNOTES.txt").write_text("ZZCANARY patient notes 19871231")
    records.append({"sop": f"{CANARY_UID}.unmatched", "label": 1})
    write_labels(root / "labels.csv", records)
    return data


def _assert_clean(text: str, where: str) -> None:
    for c in CANARIES:
        assert c not in text, f"canary {c!r} leaked into {where}: {text[:300]!r}"


def test_canaries_never_reach_card_logs_or_cli_output(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = _plant(tmp_path)
    caplog.clear()  # pydicom itself warns while the factory writes the invalid UID; only ingest is under test
    caplog.set_level(logging.DEBUG)  # capture everything; the rule is about INFO and above
    cfg = default_site_config(data, tmp_path / "labels.csv", state_dir=tmp_path / "state")
    ds = build_site_dataset(cfg)
    assert len(ds.train) + len(ds.val) == 12  # the planted site is usable
    reasons = {q["reason"] for q in ds.report["quarantined"]}
    assert {"BURNED_IN_ANNOTATION", "MODALITY_NOT_ALLOWED", "TRUNCATED", "NOT_DICOM"} <= reasons

    card_text = json.dumps(ds.card) + format_card(ds.card)
    _assert_clean(card_text, "the dataset card")
    assert not re.search(r"\d+\.\d+\.\d+\.\d+", card_text), "UID-like string in the card"
    assert not re.search(r"[0-9a-f]{16}", card_text), "pseudonym-like hex in the card"

    # second pass (cache) and the CLI, which prints the card and writes the report
    parser = argparse.ArgumentParser(prog="atoll")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["site", "check", "--data", str(data), "--labels", str(tmp_path / "labels.csv"),
                              "--report", str(tmp_path / "report.json"), "--card", str(tmp_path / "card.json")])
    assert args.func(args) == 0
    out = capsys.readouterr()
    _assert_clean(out.out + out.err, "CLI output")
    _assert_clean((tmp_path / "card.json").read_text(), "card.json")

    for rec in caplog.records:
        if rec.levelno >= logging.INFO:
            _assert_clean(rec.getMessage(), f"log record of {rec.name}")
    assert any(r.name.startswith("atoll.ingest") and r.levelno == logging.INFO for r in caplog.records)

    # the on-site report does hold file names (that is its purpose) and is private to the site
    report = tmp_path / "report.json"
    assert stat.S_IMODE(report.stat().st_mode) == 0o600
    assert "ZZCANARYFILE_0.dcm" in report.read_text()
    assert "ZZCANARYPID" not in report.read_text()  # raw PatientIDs never stored, only pseudonyms


def test_failure_message_and_logs_of_an_unusable_site_are_clean(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "ZZCANARYROOT"
    write_dicom(data / "ZZCANARYFILE.dcm", patient_id="ZZCANARYPID", burned_in="YES", study_date="19871231")
    (data / "ZZCANARY.txt").write_text("x")
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(NoUsableImagesError) as e:
        build_site_dataset(default_site_config(data, state_dir=tmp_path / "st"))
    _assert_clean(str(e.value), "the NoUsableImagesError message")
    _assert_clean(json.dumps(e.value.dataset.card), "the card")
    for rec in caplog.records:
        if rec.levelno >= logging.INFO:
            _assert_clean(rec.getMessage(), f"log record of {rec.name}")


def test_pseudonyms_are_keyed_stable_and_do_not_contain_the_id() -> None:
    a, b = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    assert a.patient("ZZCANARYPID") == a.patient(" ZZCANARYPID ")  # DICOM padding ignored
    assert a.patient("ZZCANARYPID") != b.patient("ZZCANARYPID")  # useless without the site secret
    assert a.patient("P1") != a.patient("P2")
    assert re.fullmatch(r"[0-9a-f]{64}", a.patient("ZZCANARYPID"))
    assert a.fingerprint() != b.fingerprint() and len(a.fingerprint()) == 16
    with pytest.raises(ValueError):
        Pseudonymizer(b"short")


def test_small_cell_suppression() -> None:
    assert suppress(0, 5) == 0 and suppress(4, 5) == "<5" and suppress(5, 5) == 5
    g = suppress_group({"CR": 120, "DX": 3, "CT": 40}, 5)
    assert g == {"CR": 120, "CT": "suppressed", "DX": "<5"}  # DX not recoverable from the total by subtraction
    assert suppress_group({"a": 1, "b": 2, "c": 50}, 5) == {"a": "<5", "b": "<5", "c": 50}
