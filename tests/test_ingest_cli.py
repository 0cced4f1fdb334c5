"""``atoll site check``: the handler registered by ``client.site_check.add_parser``, called with parsed argv."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from client.site_check import EXIT_CONFIG, EXIT_NO_DATA, EXIT_OK, add_parser
from client.site_config import create_secret_file
from tests.dicom_factory import write_dicom, write_labels, write_site


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atoll")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_check_data_folder_writes_report_and_prints_card(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = write_site(tmp_path / "dicom", patients=6, images_per_patient=2)
    (tmp_path / "dicom" / "export.log").write_text("done")
    labels = write_labels(tmp_path / "labels.csv", recs[:-1])
    report = tmp_path / "out" / "report.json"
    code = run(["site", "check", "--data", str(tmp_path / "dicom"), "--labels", str(labels), "--report", str(report)])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "Dataset card" in out and "NOT_DICOM" in out and "NO_LABEL" in out
    body = json.loads(report.read_text())
    assert sorted(u["file"] for u in body["used"]) == sorted(r["file"] for r in recs[:-1])
    assert {(q["file"], q["reason"]) for q in body["quarantined"]} == {("export.log", "NOT_DICOM"),
                                                                      (recs[-1]["file"], "NO_LABEL")}
    assert body["card"]["images_used"] == 11


def test_check_without_labels_counts_every_decodable_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_site(tmp_path / "dicom", patients=2, images_per_patient=3)
    write_dicom(tmp_path / "dicom" / "ct.dcm", patient_id="X", modality="CT")
    assert run(["site", "check", "--data", str(tmp_path / "dicom"), "--modalities", "*",
                "--card", str(tmp_path / "card.json")]) == EXIT_OK
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["images_used"] == 7 and card["by_class"] == {"unlabelled": 7}
    assert "No labels given" in capsys.readouterr().out


def test_nothing_usable_exits_non_zero_with_a_clear_message(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "a.txt").write_text("not an image")
    assert run(["site", "check", "--data", str(tmp_path / "dicom")]) == EXIT_NO_DATA
    err = capsys.readouterr().err
    assert "no usable image" in err and "NOT_DICOM: 1" in err and "--report" in err


def test_config_file_and_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = write_site(tmp_path / "dicom", patients=3, images_per_patient=2)
    write_labels(tmp_path / "labels.csv", recs)
    create_secret_file(tmp_path / "pseudonym.secret")
    toml = tmp_path / "site.toml"
    toml.write_text('[site]\nname = "hospital-z"\nsecret_file = "pseudonym.secret"\n'
                    '[data]\ndicom_dir = "dicom"\nlabels_csv = "labels.csv"\n')
    assert run(["site", "check", "--config", str(toml)]) == EXIT_OK
    assert "site hospital-z" in capsys.readouterr().out
    assert (tmp_path / "state" / "cache").is_dir()  # default cache under <state_dir>

    toml.write_text(toml.read_text() + "image_sise = 32\n")
    assert run(["site", "check", "--config", str(toml)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "[data].image_sise: unknown key" in err and "Traceback" not in err

    assert run(["site", "check", "--config", str(toml), "--labels", "x.csv"]) == EXIT_CONFIG
    assert "--labels only applies with --data" in capsys.readouterr().err
    assert run(["site", "check", "--data", str(tmp_path / "nope")]) == EXIT_CONFIG
    assert "does not exist" in capsys.readouterr().err


def test_add_parser_reuses_an_existing_site_command() -> None:
    parser = argparse.ArgumentParser(prog="atoll")
    sub = parser.add_subparsers(dest="command", required=True)
    site = sub.add_parser("site")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    site_sub.add_parser("init").set_defaults(func=lambda a: 0)
    add_parser(sub)
    assert parser.parse_args(["site", "init"]).func(None) == 0
    assert parser.parse_args(["site", "check", "--data", "x"]).data == Path("x")
