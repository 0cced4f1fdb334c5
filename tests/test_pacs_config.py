"""[data.source] validation, the mirror readiness check and the dataset fingerprint (no PACS needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from client.pacs.errors import NoCompleteMirror
from client.pacs.fingerprint import dataset_fingerprint, site_dataset_fingerprint
from client.pacs.mirror import Manifest, Mirror, require_complete_mirror
from client.pacs.source import DicomWebSource, DimseSource
from client.site_config import ConfigError, create_secret_file, load_site_config
from dicom_factory import write_labels, write_site


def _toml(tmp_path: Path, source: str, data: str = 'modalities = ["CR", "DX"]\n') -> Path:
    if not (tmp_path / "pseudonym.secret").exists():
        create_secret_file(tmp_path / "pseudonym.secret")
    p = tmp_path / "site.toml"
    p.write_text(f'[site]\nname = "h"\nsecret_file = "pseudonym.secret"\n\n[data]\n{data}\n[data.source]\n{source}\n')
    return p


def _secret(tmp_path: Path, name: str, mode: int = 0o600) -> Path:
    p = tmp_path / name
    p.write_text("s3cret\n")
    os.chmod(p, mode)
    return p


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_site_config(path)
    return str(e.value)


def test_dicomweb_source_mirror_lives_in_state(tmp_path):
    _secret(tmp_path, "pw")
    cfg = load_site_config(_toml(tmp_path, 'kind = "dicomweb"\nurl = "https://pacs.example/dicom-web/"\n'
                                           'username = "atoll"\npassword_file = "pw"\nstudy_date = "20190101-"\n'
                                           'series_description = "PA*"'))
    assert isinstance(cfg.source, DicomWebSource)
    assert cfg.source.url == "https://pacs.example/dicom-web"
    assert cfg.source.query.modalities == ("CR", "DX")  # from [data].modalities
    assert cfg.source.query.study_date == "20190101-" and cfg.source.query.series_description == "PA*"
    assert cfg.dicom_dir == cfg.state_dir / "pacs" / "mirror"


def test_dimse_source_and_any_modality(tmp_path):
    cfg = load_site_config(_toml(tmp_path, 'kind = "dimse"\nhost = "pacs"\nport = 104\ncalled_ae = "PACS"\n'
                                           'calling_ae = "ATOLL"\nmove_port = 11113\nmodality = "*"'))
    assert isinstance(cfg.source, DimseSource)
    assert cfg.source.retrieve == "move" and cfg.source.move_port == 11113
    assert cfg.source.query.modalities == ()  # "*": the query names no modality


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_secret_readable_by_others_is_refused(tmp_path, mode):
    pw = _secret(tmp_path, "pw", mode)
    msg = _error(_toml(tmp_path, f'kind = "dicomweb"\nurl = "http://p/dicom-web"\nusername = "u"\npassword_file = "pw"'))
    assert "[data.source].password_file" in msg and str(tmp_path / "site.toml") in msg
    assert f"chmod 600 {pw}" in msg


@pytest.mark.parametrize("body, where, words", [
    ('kind = "dicomweb"\nurl = "http://p/dw"\nhots = "x"', "[data.source].hots", "unknown key"),
    ('kind = "dicomweb"\nurl = "http://p/dw"\nmove_port = 1', "[data.source].move_port", 'kind = "dimse"'),
    ('kind = "wado"\nurl = "http://p/dw"', "[data.source].kind", "dicomweb, dimse"),
    ('url = "http://p/dw"', "[data.source].kind", "missing required key"),
    ('kind = "dicomweb"\nurl = "http://u:pw@p/dw"', "[data.source].url", "password_file"),
    ('kind = "dicomweb"\nurl = "ftp://p/dw"', "[data.source].url", "http(s) URL"),
    ('kind = "dicomweb"\nurl = "http://p/dw"\nusername = "u"', "[data.source].password_file", "both"),
    ('kind = "dicomweb"\nurl = "http://p/dw"\nca_file = "site.toml"', "[data.source].ca_file", "https"),
    ('kind = "dicomweb"\nurl = "http://p/dw"\nstudy_date = "2019-2020"', "[data.source].study_date", "range"),
    ('kind = "dicomweb"\nurl = "http://p/dw"\nstudy_date = "20191301-"', "[data.source].study_date", "calendar"),
    ('kind = "dicomweb"\nurl = "http://p/dw"\ntimeout = "10"', "[data.source].timeout", "integer"),
    ('kind = "dimse"\nhost = "p"\nport = 104\ncalled_ae = "P"\ncalling_ae = "A"', "[data.source].move_port", "C-MOVE"),
    ('kind = "dimse"\nhost = "p"\nport = 104\ncalled_ae = "P"\ncalling_ae = "A"\nretrieve = "get"\nmove_port = 5',
     "[data.source].move_port", "only applies"),
    ('kind = "dimse"\nhost = "p"\nport = 104\ncalled_ae = "A_TITLE_LONGER_THAN_16"\ncalling_ae = "A"\n'
     'retrieve = "get"', "[data.source].called_ae", "16"),
])
def test_errors_name_the_key_and_the_fix(tmp_path, body, where, words):
    msg = _error(_toml(tmp_path, body))
    assert where in msg and words in msg and str(tmp_path / "site.toml") in msg


def test_dicom_dir_and_source_are_exclusive(tmp_path):
    (tmp_path / "dicom").mkdir()
    msg = _error(_toml(tmp_path, 'kind = "dicomweb"\nurl = "http://p/dw"', data='dicom_dir = "dicom"\n'))
    assert "[data].dicom_dir" in msg and "remove dicom_dir" in msg
    (tmp_path / "site.toml").write_text('[site]\nname = "h"\nsecret_file = "pseudonym.secret"\n[data]\n')
    msg = _error(tmp_path / "site.toml")
    assert "[data].dicom_dir" in msg and "[data.source]" in msg


def test_never_pulled_site_has_no_complete_mirror(tmp_path):
    cfg = load_site_config(_toml(tmp_path, 'kind = "dicomweb"\nurl = "http://p/dw"'))
    with pytest.raises(NoCompleteMirror) as e:
        require_complete_mirror(cfg)
    assert f"atoll site pull --config {cfg.path}" in str(e.value)
    assert "http" not in NoCompleteMirror.public and "/" not in NoCompleteMirror.public.replace("`atoll site pull`", "")


def test_site_check_on_a_never_pulled_site_says_to_pull(tmp_path, capsys):
    from atoll.cli import main

    toml = _toml(tmp_path, 'kind = "dicomweb"\nurl = "http://p/dw"')
    assert main(["site", "check", "--config", str(toml)]) == 2
    assert "atoll site pull --config" in capsys.readouterr().err


def test_interrupted_commit_is_finished_locally_and_tampering_is_refused(tmp_path):
    cfg = load_site_config(_toml(tmp_path, 'kind = "dicomweb"\nurl = "http://p/dw"'))
    m = Mirror(cfg.state_dir)
    m.ensure()
    m.stage("1.2.3", b"x")
    m.stage("1.2.4", b"y")
    manifest = Manifest(source="s", completed_at="t", instances={"1.2.3": ("1", "2"), "1.2.4": ("1", "2")})
    # A crash right after the journal was written: nothing moved yet, no manifest.
    from client.pacs.mirror import write_atomic
    import json

    write_atomic(m.journal_path, json.dumps(manifest.to_json()).encode())
    assert m.manifest() is None
    got = require_complete_mirror(cfg)  # finishes the commit without any PACS
    assert set(got.instances) == {"1.2.3", "1.2.4"} and not m.journal_path.exists()
    assert m.files(m.mirror) == {"1.2.3", "1.2.4"} and not m.files(m.incoming)
    (m.mirror / "1.2.3.dcm").unlink()
    with pytest.raises(NoCompleteMirror, match="1 file"):
        require_complete_mirror(cfg)


def test_fingerprint_is_keyed_sorted_and_changes_with_one_uid():
    uids = ["1.2.3.4", "1.2.3.10", "1.2.3.5"]
    a = dataset_fingerprint(b"k" * 32, uids)
    assert a == dataset_fingerprint(b"k" * 32, list(reversed(uids)) + ["1.2.3.4"])  # order and duplicates
    assert a != dataset_fingerprint(b"j" * 32, uids)  # another site's secret: unrelated
    assert a != dataset_fingerprint(b"k" * 32, uids[:2])  # one image fewer
    assert a != dataset_fingerprint(b"k" * 32, uids[:2] + ["1.2.3.6"])  # one replaced
    assert a.startswith("hmac-sha256:") and len(a) == len("hmac-sha256:") + 64
    assert not any(u in a for u in uids)


def test_folder_site_exposes_its_uids_and_fingerprint(tmp_path):
    from client.ingest import build_site_dataset
    from client.site_config import default_site_config

    records = write_site(tmp_path / "dicom", patients=4, images_per_patient=2)
    labels = write_labels(tmp_path / "labels.csv", records)
    cfg = default_site_config(tmp_path / "dicom", labels, state_dir=tmp_path / "state")
    ds = build_site_dataset(cfg)
    assert ds.sop_uids == tuple(sorted(r["sop"] for r in records))
    fp = site_dataset_fingerprint(cfg.secret_file, ds.sop_uids)
    assert fp == dataset_fingerprint(cfg.secret_file.read_bytes().strip(), [r["sop"] for r in records])


def test_check_instance_on_real_bytes():
    from client.pacs.verify import WRONG_INSTANCE, check_instance
    from pacs_helpers import instance

    sop, data = instance(1)
    import pydicom, io

    ds = pydicom.dcmread(io.BytesIO(data))
    where = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
    assert check_instance(data, {sop: where}, sop).problem is None
    other, _ = instance(2)
    assert check_instance(data, {other: where}, other).problem[0] == WRONG_INSTANCE  # another object than asked
    assert check_instance(data, {other: where}).problem[0] == WRONG_INSTANCE  # C-MOVE: not among those asked
    assert check_instance(data, {sop: ("1.2", "3.4")}, sop).problem[0] == WRONG_INSTANCE  # filed elsewhere
    assert check_instance(b"<html>login</html>", {sop: where}, sop).problem[0] == "NOT_DICOM"
    assert check_instance(data[: len(data) - 200], {sop: where}, sop).problem[0] in ("TRUNCATED", "CORRUPT_HEADER")
