"""``atoll site check`` and ingest on hostile or careless input: one clear line naming the file (and row), exit 2
for configuration/usage problems, a quarantine entry for one bad file, and never a traceback.

Also the first-look mode (``--data``): errors name the command-line flags, text labels say how to fix them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import pytest

from client.ingest import build_site_dataset
from client.site_check import EXIT_CONFIG, EXIT_NO_DATA, EXIT_OK, add_parser
from client.site_config import default_site_config
from tests.dicom_factory import write_labels, write_site


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atoll")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def check(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = run(["site", "check", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture()
def site(tmp_path: Path) -> tuple[Path, list[dict]]:
    recs = write_site(tmp_path / "dicom", patients=4, images_per_patient=2)
    return tmp_path / "dicom", recs


# ---------------------------------------------------------------------------------------------- 12.7 crashers


def test_a_data_folder_that_is_a_symlink_loop_is_a_one_line_config_error(tmp_path: Path, capsys) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, _, err = check(["--data", str(loop)], capsys)
    assert code == EXIT_CONFIG
    assert err.count("\n") == 1 and "--data" in err and str(loop) in err and "symbolic link loop" in err


def test_a_labels_csv_with_a_huge_line_names_the_file_and_row(site, tmp_path: Path, capsys) -> None:
    data, recs = site
    big = tmp_path / "big.csv"
    with big.open("w") as f:
        f.write("SOPInstanceUID,label\n")
        f.write(f"{recs[0]['sop']},0\n")
        f.write(f'{recs[1]["sop"]},"' + "x" * (2 * 1024 * 1024) + '"\n')
    code, _, err = check(["--data", str(data), "--labels", str(big)], capsys)
    assert code == EXIT_CONFIG
    assert err.count("\n") == 1 and f"{big}: row 3" in err and "longer than" in err
    assert "xxxxxxxxxx" not in err


def test_a_label_of_ten_to_the_thirty_is_quarantined_with_its_row(site, tmp_path: Path, capsys) -> None:
    data, recs = site
    labels = write_labels(tmp_path / "labels.csv", recs)
    lines = labels.read_text().splitlines()
    lines[1] = lines[1].split(",")[0] + "," + str(10**30)
    labels.write_text("\n".join(lines) + "\n")
    report = tmp_path / "report.json"
    code, out, _ = check(["--data", str(data), "--labels", str(labels), "--report", str(report)], capsys)
    assert code == EXIT_OK and "BAD_LABEL" in out
    bad = [q for q in json.loads(report.read_text())["quarantined"] if q["reason"] == "BAD_LABEL"]
    assert [q["file"] for q in bad] == [recs[0]["file"]]
    assert "labels.csv row 2" in bad[0]["detail"] and "not a class index (0..999)" in bad[0]["detail"]


@pytest.mark.parametrize("name, content, expect", [
    ("empty.csv", b"", "is empty"),
    ("nul.csv", b"SOPInstanceUID,label\n1.2.3,0\n1.2.\x004,1\n", "row 3"),
    ("latin1.csv", "SOPInstanceUID,label\n1.2.3,caf\u00e9\n".encode("latin-1"), "UTF-8"),
    ("dupe.csv", b"SOPInstanceUID,label,label\n1.2.3,0,1\n", "'label' appears 2 times"),
    ("utf16.csv", "SOPInstanceUID,label\n1.2.3,0\n".encode("utf-16"), "UTF-8"),
])
def test_odd_labels_files_are_one_line_config_errors(site, tmp_path: Path, capsys, name, content, expect) -> None:
    data, _ = site
    path = tmp_path / name
    path.write_bytes(content)
    code, _, err = check(["--data", str(data), "--labels", str(path)], capsys)
    assert code == EXIT_CONFIG, err
    assert err.count("\n") == 1 and str(path) in err and expect in err


def test_a_bom_semicolons_and_a_long_text_label_do_not_break_the_labels(site, tmp_path: Path, capsys) -> None:
    data, recs = site
    path = tmp_path / "bom.csv"
    rows = [f"{r['sop']};{r['label']}" for r in recs[:-1]] + [f"{recs[-1]['sop']};{'9' * 5000}"]
    path.write_bytes("\ufeffSOPInstanceUID;label\r\n".encode() + "\r\n".join(rows).encode() + b"\r\n")
    report = tmp_path / "r.json"
    code, out, err = check(["--data", str(data), "--labels", str(path), "--report", str(report)], capsys)
    assert code == EXIT_OK, err
    body = json.loads(report.read_text())
    assert len(body["used"]) == len(recs) - 1
    (bad,) = body["quarantined"]
    assert bad["reason"] == "BAD_LABEL" and len(bad["detail"]) < 300


def test_special_files_in_the_data_folder_are_quarantined_not_read(site, tmp_path: Path, capsys) -> None:
    data, recs = site
    os.mkfifo(data / "pipe.dcm")  # reading it would block forever
    (data / "loop.dcm").symlink_to(data / "loop.dcm")
    (data / "empty.dcm").write_bytes(b"")
    (data / "nul.dcm").write_bytes(b"\x00" * 4096)
    report = tmp_path / "r.json"
    code, _, _ = check(["--data", str(data), "--report", str(report)], capsys)
    assert code == EXIT_OK
    reasons = {q["file"]: q["reason"] for q in json.loads(report.read_text())["quarantined"]}
    assert reasons == {"pipe.dcm": "UNREADABLE", "loop.dcm": "UNREADABLE", "empty.dcm": "NOT_DICOM",
                       "nul.dcm": "NOT_DICOM"}


# ---------------------------------------------------------------------------------------------- 12.8 file names


CANARY = "CANARY-7Q3Z"


def test_a_file_name_that_is_not_utf8_is_quarantined_and_the_rest_is_used(site, tmp_path: Path, capsys,
                                                                             caplog) -> None:
    data, recs = site
    bad = data / os.fsdecode(CANARY.encode() + b"\xff\xfe.dcm")
    bad.write_bytes((data / recs[0]["file"]).read_bytes())
    sub = data / os.fsdecode(b"dir-\xe9")
    sub.mkdir()
    (sub / "x.dcm").write_bytes((data / recs[1]["file"]).read_bytes())
    labels = write_labels(tmp_path / "labels.csv", recs)
    cfg = default_site_config(data, labels, state_dir=tmp_path / "state")
    caplog.set_level("DEBUG")
    ds = build_site_dataset(cfg)
    assert len(ds.report["used"]) == len(recs)
    q = {x["reason"] for x in ds.report["quarantined"]}
    assert q == {"BAD_FILE_NAME"} and len(ds.report["quarantined"]) == 2
    assert ds.card["quarantined"]["by_reason"] == {"BAD_FILE_NAME": "<5"}
    json.dumps(ds.report, ensure_ascii=False).encode()  # the on-site report is writable as UTF-8
    public = json.dumps(ds.card) + caplog.text
    assert CANARY not in public and "\\udc" not in public
    # a second pass (from the caches) decides the same way
    again = build_site_dataset(cfg)
    assert {x["reason"] for x in again.report["quarantined"]} == {"BAD_FILE_NAME"}

    report = tmp_path / "r.json"
    code, out, _ = check(["--data", str(data), "--labels", str(labels), "--report", str(report)], capsys)
    assert code == EXIT_OK and "BAD_FILE_NAME" in out and CANARY not in out
    assert CANARY in report.read_text()  # on site, the admin can still find the file


# ---------------------------------------------------------------------------------------------- 14.8 first look


def test_first_look_errors_name_the_command_line_flags(site, tmp_path: Path, capsys) -> None:
    data, recs = site
    labels = write_labels(tmp_path / "labels.csv", recs)
    code, _, err = check(["--data", str(data), "--labels", str(labels), "--label-key", "AccessionNumber"], capsys)
    assert code == EXIT_CONFIG
    assert "--label-key" in err and "[data].label_key" not in err
    code, _, err = check(["--data", str(data), "--labels", str(labels), "--label-column", "diagnosis"], capsys)
    assert code == EXIT_CONFIG and "--label-column" in err and "[data]" not in err


def test_text_labels_without_classes_say_how_to_fix_it(site, tmp_path: Path, capsys) -> None:
    data, recs = site
    for r in recs:
        r["label"] = "pneumonia" if r["label"] else "normal"
    labels = write_labels(tmp_path / "labels.csv", recs)
    code, out, err = check(["--data", str(data), "--labels", str(labels)], capsys)
    assert code == EXIT_NO_DATA
    assert "--classes normal pneumonia" in err and "[data].classes" in err
    assert "site site" not in out
    code, out, err = check(["--data", str(data), "--labels", str(labels), "--classes", "normal", "pneumonia"],
                           capsys)
    assert code == EXIT_OK and "normal: " in out and "pneumonia: " in out


def test_the_no_usable_data_message_stays_free_of_label_values(site, tmp_path: Path) -> None:
    from client.ingest import NoUsableImagesError

    data, recs = site
    for r in recs:
        r["label"] = CANARY
    labels = write_labels(tmp_path / "labels.csv", recs)
    with pytest.raises(NoUsableImagesError) as exc:
        build_site_dataset(default_site_config(data, labels, state_dir=tmp_path / "state"))
    assert "[data].classes" in str(exc.value) and CANARY not in str(exc.value)


# ---------------------------------------------------------------------------------------------- 14.4 progress


def test_ingest_shows_progress_on_a_terminal_and_reports_quarantine_by_count(site, tmp_path: Path,
                                                                              caplog) -> None:
    from rich.console import Console

    from client.ingest.progress import ingest_progress

    data, recs = site
    (data / "junk.txt").write_text("not dicom")
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    cfg = default_site_config(data, None, state_dir=tmp_path / "state")
    caplog.set_level("INFO")
    with ingest_progress(enabled=True, console=console) as progress:
        build_site_dataset(cfg, progress=progress)
    shown = buf.getvalue()
    assert "Indexing" in shown and f"{len(recs) + 1}/{len(recs) + 1}" in shown
    assert "1 file quarantined (NOT_DICOM 1)" in caplog.text and "junk.txt" not in caplog.text
    assert "{}" not in caplog.text


def test_progress_is_quiet_off_a_terminal_and_with_quiet(site, capsys) -> None:
    data, _ = site
    code, _, err = check(["--data", str(data)], capsys)  # pytest's stderr is not a TTY
    assert code == EXIT_OK and "Indexing" not in err
    code, _, err = check(["--data", str(data), "--quiet"], capsys)
    assert code == EXIT_OK and err == ""


def test_a_site_with_a_non_utf8_file_name_still_trains_and_the_name_never_leaves(tmp_path: Path, caplog) -> None:
    """12.8 through the ClientApp: today every round of such a site is refused (SITE_ERROR)."""
    from contract import Mechanism, wire
    from client.app import train
    from tests.test_missing_metrics import _approved, _message, _site

    toml = _site(tmp_path, label_of=lambda p: p % 2)
    dicom = tmp_path / "dicom"
    some = next(dicom.rglob("*.dcm"))
    (dicom / os.fsdecode(CANARY.encode() + b"-\xff.dcm")).write_bytes(some.read_bytes())
    cfg = wire.RoundConfig(run_id="bad-name", server_round=1, mechanism=Mechanism(steps=2))
    ctx, arrays = _approved(toml, cfg)
    caplog.set_level("DEBUG")
    reply = train(_message("train", cfg, arrays), ctx)
    assert wire.refusal_of(reply.content) is None, wire.refusal_of(reply.content)
    sent = repr({k: dict(v) for k, v in reply.content.config_records.items()}) + repr(dict(reply.content[wire.METRICS]))
    assert CANARY not in sent and CANARY not in caplog.text
    assert "BAD_FILE_NAME 1" in caplog.text
