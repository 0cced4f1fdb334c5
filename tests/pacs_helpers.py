"""Shared by the tests against a real Orthanc: the server fixtures, DICOM with PHI canaries, PACS site configs.

Orthanc runs on 127.0.0.1 with free HTTP and DICOM ports, a temporary storage folder and config, basic auth on, and
``DicomModalities`` naming Atoll's storage SCP (the C-MOVE target). ``DicomAlwaysAllowEcho``/``Store`` are off so
an unknown calling AE title gets a real A-ASSOCIATE-RJ (``orthanc_defaults`` keeps Orthanc's packaged defaults,
which accept the association and drop the query instead). The server is stopped when the test ends, pass or fail.
Tests skip, with the reason, only where the Debian packages are not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from atoll.orthanc import Orthanc, OrthancUnavailable, find_orthanc, free_port
from client.site_config import create_secret_file
from dicom_factory import make_dataset, uid

CANARIES = ("ZZCANARYNAME", "ZZCANARYPID", "ZZCANARYACC", "ZZCANARYDESC")
ATOLL_AE = "ATOLL"


def require_orthanc() -> None:
    try:
        find_orthanc()
    except OrthancUnavailable as e:
        pytest.skip(f"cannot test against a real PACS here: {e}")


def _server(tmp_path: Path, name: str, extra: dict[str, Any]) -> Iterator[Orthanc]:
    require_orthanc()
    move_port = free_port()
    pacs = Orthanc(tmp_path / name, modalities={"atoll": (ATOLL_AE, "127.0.0.1", move_port)}, extra=extra)
    pacs.move_port = move_port  # type: ignore[attr-defined]
    with pacs:
        yield pacs


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A fresh Orthanc that rejects associations from AE titles it does not know. Tests edit its storage area,
    so it caches no attachment and answers queries from its index alone."""
    yield from _server(tmp_path, "orthanc", {"DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False,
                                                 "MaximumStorageCacheSize": 0, "StorageAccessOnFind": "Never"})


@pytest.fixture
def orthanc_defaults(tmp_path: Path) -> Iterator[Orthanc]:
    """A fresh Orthanc with the packaged DICOM defaults (unknown AE: association accepted, C-FIND refused)."""
    yield from _server(tmp_path, "orthanc-defaults", {})


def instance(n: int, *, patient: int | None = None, series: str = "A", study_date: str = "20240105",
             modality: str = "CR", description: str = "CHEST PA") -> tuple[str, bytes]:
    """One CR image as Part 10 bytes, with PHI canaries in its header; returns (SOP Instance UID, bytes)."""
    p = n // 3 if patient is None else patient
    sop = str(uid(f"pacs-sop-{n}"))
    ds = make_dataset(patient_id=f"{CANARIES[1]}{p:03d}", patient_name=f"{CANARIES[0]}^P{p}", sop_uid=sop,
                      study_uid=uid(f"pacs-study-{p}"), series_uid=uid(f"pacs-series-{p}-{series}"),
                      accession=f"{CANARIES[2]}{p:03d}", modality=modality, study_date=study_date, seed=n,
                      extra={"StudyDescription": description, "SeriesDescription": "PA",
                             "InstitutionName": CANARIES[3]})
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return sop, buf.getvalue()


def load(pacs: Orthanc, numbers: range | list[int], **kw: Any) -> list[str]:
    """Upload instances ``numbers`` (REST), return their SOP Instance UIDs."""
    items = [instance(n, **kw) for n in numbers]
    counts = pacs.upload(data for _, data in items)
    assert counts == {"stored": len(items), "rejected": 0}, counts
    return [sop for sop, _ in items]


def _private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


def site(tmp_path: Path, source: str, *, labels: dict[str, int] | None = None, name: str = "site") -> Path:
    """A PACS site: site.toml with ``source`` as the body of [data.source], a secret, an optional labels CSV."""
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    if not (root / "pseudonym.secret").exists():
        create_secret_file(root / "pseudonym.secret")
    labels_line = ""
    if labels is not None:
        (root / "labels.csv").write_text("SOPInstanceUID,label\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
        labels_line = 'labels_csv = "labels.csv"\n'
    toml = root / "site.toml"
    toml.write_text(f'[site]\nname = "hospital-t"\nstate_dir = "state"\nsecret_file = "pseudonym.secret"\n\n'
                    f'[data]\n{labels_line}modalities = ["CR"]\n\n[data.source]\n{source}\n', encoding="utf-8")
    return toml


def dicomweb_site(tmp_path: Path, pacs: Orthanc, *, password: str | None = None, extra: str = "",
                  **kw: Any) -> Path:
    _private(tmp_path / "pacs.password", password if password is not None else pacs.password)
    return site(tmp_path, f'kind = "dicomweb"\nurl = "{pacs.dicomweb}"\nusername = "{pacs.username}"\n'
                          f'password_file = "{tmp_path / "pacs.password"}"\ntimeout = 10\n{extra}', **kw)


def dimse_site(tmp_path: Path, pacs: Orthanc, *, calling_ae: str = ATOLL_AE, retrieve: str = "move",
               extra: str = "", **kw: Any) -> Path:
    move = f"move_port = {pacs.move_port}\n" if retrieve == "move" else ""  # type: ignore[attr-defined]
    return site(tmp_path, f'kind = "dimse"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\ncalled_ae = "{pacs.aet}"\n'
                          f'calling_ae = "{calling_ae}"\nretrieve = "{retrieve}"\n{move}timeout = 10\n{extra}', **kw)


class Counting:
    """A pull progress that counts, and can run ``at(n)`` once after the n-th instance arrived."""

    def __init__(self, after: int | None = None, action: Any = None) -> None:
        self.total = self.to_fetch = self.fetched = 0
        self.after, self.action = after, action

    def listed(self, total: int, to_fetch: int) -> None:
        self.total, self.to_fetch = total, to_fetch

    def advance(self) -> None:
        self.fetched += 1
        if self.after is not None and self.fetched == self.after:
            self.action()


def assert_no_canary(text: str) -> None:
    for c in CANARIES:
        assert c not in text, f"PHI canary {c} leaked"


def swap_attachment(pacs: Orthanc, sop: str, keyword: str = "SOPInstanceUID") -> str:
    """Make the PACS hold another object under ``sop``: its stored file rewritten with a different ``keyword``
    UID of the same length (so Orthanc's stored offsets still fit); returns the impostor's UID."""
    import pydicom

    path = pacs.attachment_path(sop)
    ds = pydicom.dcmread(io.BytesIO(path.read_bytes()))
    old = str(ds.get(keyword))
    other = old[:-1] + ("1" if old[-1] != "1" else "2")
    setattr(ds, keyword, other)
    if keyword == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = other
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())
    return other
