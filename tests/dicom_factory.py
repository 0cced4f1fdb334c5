"""Test-only generator of small, realistic DICOM Part 10 files (pydicom Dataset + FileMetaDataset).

Used by the ingest tests and by ``bench/ingest.py``; not product code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless, generate_uid

CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
CT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
US_STORAGE = UID("1.2.840.10008.5.1.4.1.1.6.1")
SOP_CLASS = {"CR": CR_STORAGE, "DX": DX_STORAGE, "CT": CT_STORAGE, "US": US_STORAGE}


def uid(seed: str) -> UID:
    """Deterministic UID from a seed (tests name UIDs by meaning, e.g. ``uid("sop-p1-3")``)."""
    return generate_uid(prefix="1.2.826.0.1.3680043.10.999.", entropy_srcs=[seed])


def make_dataset(
    *,
    patient_id: str = "P001",
    patient_name: str = "Doe^Jane",
    sop_uid: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    accession: str = "ACC0001",
    modality: str = "CR",
    rows: int = 28,
    columns: int = 28,
    photometric: str = "MONOCHROME2",
    pixels: np.ndarray | None = None,
    bits: int = 16,
    frames: int | None = None,
    burned_in: str | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    study_date: str = "20240102",
    transfer_syntax: UID = ExplicitVRLittleEndian,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> Dataset:
    """One image as a complete dataset (with File Meta). Pixels default to a smooth random-ish 2D pattern."""
    sop_uid = sop_uid or uid(f"sop-{patient_id}-{seed}")
    study_uid = study_uid or uid(f"study-{patient_id}")
    series_uid = series_uid or uid(f"series-{patient_id}")
    samples = 3 if photometric == "RGB" else 1
    if pixels is None:
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:rows, 0:columns]
        base = (np.sin(x / (3 + seed % 5)) + np.cos(y / 4)) * 400 + 1000 + rng.normal(0, 50, (rows, columns))
        shape: tuple[int, ...] = (rows, columns)
        if frames:
            base = np.stack([base + 100 * i for i in range(frames)])
            shape = (frames, rows, columns)
        if samples == 3:
            base = np.stack([base, base * 0.5, base * 0.25], axis=-1)
            shape = shape + (3,)
        top = 255 if bits == 8 else 4095
        pixels = np.clip(base, 0, top).reshape(shape)
    dtype = np.uint8 if bits == 8 else np.uint16
    pixels = pixels.astype(dtype)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS.get(modality, UID("1.2.840.10008.5.1.4.1.1.7"))
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.InstanceNumber = seed + 1
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits
    ds.BitsStored = 8 if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames:
        ds.NumberOfFrames = frames
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.PixelData = pixels.tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    return ds


def write_dicom(path: Path, **kw: Any) -> Path:
    """Write :func:`make_dataset` to ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    make_dataset(**kw).save_as(path, enforce_file_format=True)
    return path


def write_site(
    root: Path,
    *,
    patients: int = 6,
    images_per_patient: int = 3,
    modality: str = "CR",
    rows: int = 28,
    label_of: Any = None,
    rle_every: int = 0,
) -> list[dict[str, Any]]:
    """A small PACS-like export: ``root/<patient>/<study>/<n>.dcm``; returns one record per image.

    Records hold ``file`` (relative path), ``sop``, ``study``, ``series``, ``patient_id``, ``accession``,
    ``label`` (``label_of(patient_index)``; default alternating 0/1 by patient).
    """
    out = []
    for p in range(patients):
        pid = f"PAT{p:04d}"
        for i in range(images_per_patient):
            seed = p * 1000 + i
            sop = uid(f"sop-{pid}-{i}")
            rel = f"{pid}/S1/{i:03d}.dcm"
            ts = RLELossless if rle_every and (seed % rle_every == 0) else ExplicitVRLittleEndian
            write_dicom(root / rel, patient_id=pid, patient_name=f"Name^{pid}", sop_uid=sop,
                        study_uid=uid(f"study-{pid}"), series_uid=uid(f"series-{pid}"), accession=f"A{p:05d}",
                        modality=modality, rows=rows, columns=rows, seed=seed, transfer_syntax=ts)
            label = label_of(p) if label_of else p % 2
            out.append({"file": rel, "sop": str(sop), "study": str(uid(f"study-{pid}")),
                        "series": str(uid(f"series-{pid}")), "patient_id": pid, "accession": f"A{p:05d}",
                        "label": label})
    return out


def write_labels(path: Path, records: list[dict[str, Any]], key: str = "sop", column: str = "label",
                 header_key: str = "SOPInstanceUID") -> Path:
    """Labels CSV for ``records`` keyed by ``record[key]`` (de-duplicated)."""
    rows = {r[key]: r["label"] for r in records}
    path.write_text(f"{header_key},{column}\n" + "".join(f"{k},{v}\n" for k, v in rows.items()), encoding="utf-8")
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
