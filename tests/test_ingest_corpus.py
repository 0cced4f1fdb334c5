"""Robustness corpora: every file of pydicom's bundled test corpus and of ../shared/data/dicom_samples ends as an
image tensor or a quarantine entry, with no exception escaping; damaged copies likewise."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pydicom
import torch

from client.ingest import NoUsableImagesError, Reason, SiteDataset, build_site_dataset
from client.ingest.dataset import _decode, _quiet_pydicom
from client.ingest.index import iter_files, read_header
from client.ingest.pseudonyms import Pseudonymizer
from client.ingest.transforms import build_preprocess
from client.site_config import default_site_config
from tests.conftest import shared_data

PYDICOM_CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"


def _build(tmp_path: Path, data: Path) -> SiteDataset:
    cfg = default_site_config(data, state_dir=tmp_path / "state", modalities=("*",))
    try:
        return build_site_dataset(cfg)
    except NoUsableImagesError as e:
        return e.dataset


def _check_accounted(ds: SiteDataset, data: Path) -> collections.Counter:
    files = sorted(rel for rel, _ in iter_files(data))
    used = [u["file"] for u in ds.report["used"]]
    quarantined = [q["file"] for q in ds.report["quarantined"]]
    assert sorted(used + quarantined) == files, "every file must end used or quarantined, exactly once"
    assert all(q["reason"] in Reason.__members__ for q in ds.report["quarantined"])
    for split in (ds.train, ds.val):
        assert split.images.shape[1:] == (1, 28, 28) and bool(torch.isfinite(split.images).all())
    return collections.Counter(q["reason"] for q in ds.report["quarantined"])


def _decode_all(data: Path) -> dict[str, str]:
    """Run the pixel path on every file whose header is readable, regardless of policy checks (patient id,
    modality, duplicates), to show what the decoders handle. Returns file -> "ok" or reason."""
    pseudo = Pseudonymizer(b"k" * 32)
    pipeline = build_preprocess(28)
    out: dict[str, str] = {}
    with _quiet_pydicom():
        for rel, path in iter_files(data):
            facts, ds, raw = read_header(rel, path, pseudo, "classification")
            if facts.error is not None or facts.pixel_offset is None:
                continue
            result = _decode(facts, ds, raw, path, rel, pseudo, _Cfg(), pipeline)  # type: ignore[arg-type]
            out[rel] = "ok" if isinstance(result, torch.Tensor) else result[0]
    return out


class _Cfg:
    image_size = 28
    task = "classification"


def test_pydicom_bundled_corpus_every_file_accounted(tmp_path: Path) -> None:
    assert PYDICOM_CORPUS.is_dir()
    ds = _build(tmp_path, PYDICOM_CORPUS)
    counts = _check_accounted(ds, PYDICOM_CORPUS)
    assert len(ds.report["used"]) >= 40
    # object types without pixels, non-DICOM files and duplicated test instances are recognised as such
    assert counts[Reason.NOT_DICOM] >= 10 and counts[Reason.NO_PIXEL_DATA] >= 10 and counts[Reason.DUPLICATE] >= 10
    reasons = {q["file"]: q["reason"] for q in ds.report["quarantined"]}
    assert reasons["README.txt"] == Reason.NOT_DICOM
    assert reasons["badVR.dcm"] == Reason.BAD_GEOMETRY  # NumberOfFrames "1A"
    assert reasons["reportsi.dcm"] == Reason.NO_PIXEL_DATA  # structured report
    assert reasons["dicomdirtests/DICOMDIR"] == Reason.NO_PIXEL_DATA


def test_pydicom_corpus_decoders_cover_the_transfer_syntaxes(tmp_path: Path) -> None:
    decoded = _decode_all(PYDICOM_CORPUS)
    must_decode = [
        "CT_small.dcm",  # explicit VR little endian
        "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",  # implicit, big endian, deflated
        "MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm",  # RLE, multi-frame colour
        "JPGExtended.dcm", "SC_rgb_jpeg_dcmtk.dcm",  # JPEG extended / baseline YBR
        "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm",  # JPEG-LS
        "MR_small_jp2klossless.dcm", "GDCMJ2K_TextGBR.dcm", "693_J2KI.dcm",  # JPEG 2000
        "examples_palette.dcm", "examples_ybr_color.dcm",  # palette colour, 30-frame YBR ultrasound
        "dicomdirtests/77654033/CR1/6154",  # MONOCHROME1 CR without .dcm suffix
    ]
    assert [f for f in must_decode if decoded.get(f) != "ok"] == []
    assert decoded["MR_truncated.dcm"] == Reason.TRUNCATED
    assert sum(v == "ok" for v in decoded.values()) >= 60


def test_shared_samples_every_file_accounted_and_decoded(tmp_path: Path) -> None:
    data = shared_data("dicom_samples")
    ds = _build(tmp_path, data)
    _check_accounted(ds, data)
    decoded = _decode_all(data)
    expected_failures = {
        "liver_deflate.dcm": Reason.UNSUPPORTED_TRANSFER_SYNTAX,  # pydicom 3.0 has no decoder for it
        "liver_rle.dcm": Reason.DECODE_ERROR,  # 1-bit SEG in RLE: every decoder fails
        "emri_small_jpeg_2k_lossless_too_short.dcm": Reason.TRUNCATED,
    }
    for name, reason in expected_failures.items():
        assert decoded[name] == reason, name
    ok = sorted(f for f, v in decoded.items() if v == "ok")
    assert ok == sorted({p.name for p in data.glob("*.dcm")} - set(expected_failures))
    reasons = {q["file"]: q["reason"] for q in ds.report["quarantined"]}
    assert reasons["README.md"] == Reason.NOT_DICOM
    # most of these anonymised samples have an empty PatientID: no patient-level privacy unit, so not used
    assert reasons["emri_small.dcm"] == Reason.MISSING_PATIENT_ID
    assert {u["file"] for u in ds.report["used"]} >= {"RG1_J2KI.dcm", "US1_J2KI.dcm", "693_J2KR.dcm"}


def _damage(src: Path, out: Path, rng: np.random.Generator) -> list[Path]:
    raw = src.read_bytes()
    made = []
    stem = src.name.replace(".", "_")
    for frac in (0.1, 0.5, 0.9, 0.999):
        made.append(out / f"{stem}_cut{int(frac * 1000)}.dcm")
        made[-1].write_bytes(raw[: int(len(raw) * frac)])
    for k in range(3):
        b = bytearray(raw)
        for pos in rng.integers(132, len(b), 16):
            b[pos] ^= 1 << int(rng.integers(0, 8))
        made.append(out / f"{stem}_flip{k}.dcm")
        made[-1].write_bytes(bytes(b))
    made.append(out / f"{stem}_empty.dcm")
    made[-1].write_bytes(b"")
    return made


def test_damaged_copies_of_real_compressed_files_never_escape(tmp_path: Path) -> None:
    names = ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm",
             "SC_rgb_rle_2frame.dcm", "CT_small.dcm", "examples_palette.dcm"]
    data = tmp_path / "damaged"
    data.mkdir()
    rng = np.random.default_rng(1234)
    for n in names:
        _damage(PYDICOM_CORPUS / n, data, rng)
    ds = _build(tmp_path, data)
    counts = _check_accounted(ds, data)
    assert counts[Reason.TRUNCATED] >= len(names) and counts[Reason.NOT_DICOM] >= len(names)
    decoded = _decode_all(data)  # the pixel path alone, without the duplicate rule hiding most copies
    assert set(decoded.values()) <= {"ok"} | set(Reason.__members__)
