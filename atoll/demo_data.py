"""Write the embedded PneumoniaMNIST chest X-rays out as three hospitals' PACS exports.

Why DICOM and not arrays: the demo must exercise the same path a hospital uses (header indexing,
quarantine, pixel decoding, MONAI preprocessing), so each image becomes one DICOM file with a
patient -> study -> series structure and plausible headers. The hospitals differ as real ones do:
size, class balance, transfer syntax, label key, and a few broken files that must end in quarantine.

PatientName / PatientID / AccessionNumber carry *canary* values (``ZZCANARY``, ``ZZPID``, ``ZZACC``)
so tests can prove that nothing identifying leaves a site. The grouping of images into patients is
synthetic (the source data set has no patient ids); images of one patient share a class.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    UID,
    generate_uid,
)

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
LABEL_COLUMN = "pneumonia"
CANARY_NAME = "ZZCANARY"
CANARY_ID = "ZZPID"
CANARY_ACCESSION = "ZZACC"
LAYOUT_VERSION = 1


@dataclass(frozen=True)
class HospitalSpec:
    """How one synthetic hospital differs from the others."""

    name: str
    institution: str
    n_pneumonia: int
    n_normal: int
    transfer_syntax: UID
    label_key: str
    manufacturer: str
    max_epsilon: float


# Totals: train+val = 3883 pneumonia + 1349 normal. A is a large referral centre with many
# pneumonia cases, B a children's hospital with a more balanced case mix (its PACS exports RLE),
# C a small community hospital whose old PACS writes implicit-VR files and labels by accession number.
HOSPITALS: tuple[HospitalSpec, ...] = (
    HospitalSpec("hospital-a", "Aurora University Hospital", 2210, 390, ExplicitVRLittleEndian,
                 "SOPInstanceUID", "Philips", 10.0),
    HospitalSpec("hospital-b", "Bayside Children's Hospital", 1020, 680, RLELossless,
                 "SOPInstanceUID", "Siemens", 8.0),
    HospitalSpec("hospital-c", "Coral Coast Community Hospital", 653, 279, ImplicitVRLittleEndian,
                 "AccessionNumber", "Carestream", 8.0),
)
log = logging.getLogger("atoll.demo")
HELDOUT = "heldout-test"


def load_embedded() -> dict[str, np.ndarray]:
    """The packaged PneumoniaMNIST arrays (see atoll/data/README.md for source and licence)."""
    with resources.as_file(resources.files("atoll") / "data" / "pneumoniamnist_28.npz") as p:
        with np.load(p) as npz:
            return {k: npz[k] for k in npz.files}


def _uid(*parts: object) -> str:
    """Deterministic UID so a regenerated consortium is byte-identical (reproducible demos)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _patients(rng: np.random.Generator, n_images: int) -> list[int]:
    """Split n images into patients with 1-4 images each (most patients have one film)."""
    sizes: list[int] = []
    left = n_images
    while left > 0:
        k = int(min(left, rng.choice([1, 1, 1, 2, 2, 3, 4])))
        sizes.append(k)
        left -= k
    return sizes


def _dataset(img: np.ndarray, spec_name: str, institution: str, manufacturer: str, patient: int,
             study: int, series: int, instance: int, when: dt.date, birth: dt.date, sex: str,
             ts: UID, burned_in: bool = False) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = _uid(spec_name, patient, study, series, instance)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = _uid(spec_name, patient, study)
    ds.SeriesInstanceUID = _uid(spec_name, patient, study, series)
    ds.PatientName = f"{CANARY_NAME}^{spec_name.upper()}-{patient:05d}"
    ds.PatientID = f"{CANARY_ID}-{spec_name}-{patient:05d}"
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = sex
    ds.PatientAge = f"{max(1, (when - birth).days // 365):03d}Y"
    ds.AccessionNumber = f"{CANARY_ACCESSION}{spec_name[-1].upper()}{patient:05d}{study}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = "%02d%02d00" % (8 + instance % 10, (7 * patient) % 60)
    ds.StudyID = str(study + 1)
    ds.SeriesNumber = series + 1
    ds.InstanceNumber = instance + 1
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP"
    ds.StudyDescription = "XR CHEST 1 VIEW"
    ds.SeriesDescription = "CHEST AP"
    ds.InstitutionName = institution
    ds.Manufacturer = manufacturer
    # The source films (~1800 px at ~0.15 mm) were downsampled to 28 px: keep the physical field of view.
    ds.PixelSpacing = [9.6, 9.6]
    ds.ImagerPixelSpacing = [9.6, 9.6]
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 128
    ds.WindowWidth = 256
    ds.PixelData = np.ascontiguousarray(img, dtype=np.uint8).tobytes()
    if ts == RLELossless:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(RLELossless)
    else:
        ds.file_meta.TransferSyntaxUID = ts
    return ds


def _write_site(root: Path, spec: HospitalSpec, images: np.ndarray, labels: np.ndarray,
                seed: int, broken: bool) -> dict:
    """One hospital's PACS export: dicom/<patient>/<study>/<series>/IMnnnnn.dcm + labels.csv."""
    rng = np.random.default_rng(seed)
    dicom_dir = root / "dicom"
    rows: list[tuple[str, int]] = []
    n_patients = 0
    start = dt.date(2019, 1, 1)
    order = rng.permutation(len(images))
    images, labels = images[order], labels[order]
    idx = 0
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        pos = 0
        for size in _patients(rng, len(members)):
            patient = n_patients
            n_patients += 1
            birth = start - dt.timedelta(days=int(rng.integers(365, 6 * 365)))
            sex = "MF"[int(rng.integers(0, 2))]
            n_studies = 1 if size == 1 else int(rng.integers(1, 3))
            for k in range(size):
                study = k % n_studies
                when = start + dt.timedelta(days=int(rng.integers(0, 4 * 365)) + 30 * study)
                img = images[members[pos]]
                pos += 1
                ds = _dataset(img, spec.name, spec.institution, spec.manufacturer, patient, study, 0, k,
                              when, birth, sex, spec.transfer_syntax)
                path = dicom_dir / f"P{patient:05d}" / f"S{study + 1:02d}" / "SE01" / f"IM{k + 1:05d}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
                key = ds.SOPInstanceUID if spec.label_key == "SOPInstanceUID" else ds.AccessionNumber
                rows.append((str(key), cls))
                idx += 1
    if spec.label_key == "AccessionNumber":
        rows = sorted(set(rows))
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([spec.label_key, LABEL_COLUMN])
        w.writerows(rows)
    quarantine_expected = 0
    if broken:
        quarantine_expected = _plant_broken_files(dicom_dir, spec, images[0])
    return {"images": idx, "patients": n_patients, "pneumonia": int(labels.sum()),
            "normal": int((labels == 0).sum()), "broken_files": quarantine_expected}


def _plant_broken_files(dicom_dir: Path, spec: HospitalSpec, img: np.ndarray) -> int:
    """What a real PACS export contains besides good images: junk, truncation, burned-in text."""
    junk = dicom_dir / "EXPORT_LOG.txt"
    junk.write_text("export finished\n")
    good = sorted(dicom_dir.rglob("*.dcm"))[0].read_bytes()
    (dicom_dir / "P99990").mkdir(exist_ok=True)
    (dicom_dir / "P99990" / "IM00001.dcm").write_bytes(good[: len(good) // 2])
    burned = _dataset(img, spec.name, spec.institution, spec.manufacturer, 99991, 0, 0, 0,
                      dt.date(2021, 5, 4), dt.date(2018, 2, 2), "F", ExplicitVRLittleEndian, burned_in=True)
    (dicom_dir / "P99991").mkdir(exist_ok=True)
    burned.save_as(dicom_dir / "P99991" / "IM00001.dcm", enforce_file_format=True)
    return 3


def _write_secret(path: Path, spec_name: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        # Demo sites get a fixed secret so demo runs are reproducible; real sites use `atoll site init`.
        fh.write(hashlib.sha256(f"atoll-demo-secret:{spec_name}".encode()).hexdigest() + "\n")


def site_toml(spec: HospitalSpec, image_size: int) -> str:
    """The hospital-owned config for one demo site (relative paths resolve against its folder)."""
    return f"""# Site config for {spec.institution} (demo). Owned by the hospital, not the consortium.
[site]
name = "{spec.name}"
state_dir = "state"
secret_file = "pseudonym.secret"
signing_key = "keys/site_ed25519.pem"
device = "auto"

[data]
dicom_dir = "dicom"
labels_csv = "labels.csv"
label_key = "{spec.label_key}"
label_column = "{LABEL_COLUMN}"
task = "classification"
modalities = ["CR", "DX"]
cache_dir = "state/cache"
image_size = {image_size}
val_fraction = 0.2
seed = 0

[privacy]
max_epsilon = {spec.max_epsilon}
accountant = "rdp"
noise_multiplier = [0.5, 10.0]
clip_norm = [0.1, 10.0]
local_steps = [1, 2000]
allow_non_dp = true
released_metrics = ["num-examples", "train_loss", "train_seconds", "val_loss", "val_accuracy", "val_auc",
                    "val_threshold_counts"]
"""


def generate_consortium(out: Path, *, image_size: int = 28, seed: int = 0) -> dict:
    """Create DIR/hospital-{a,b,c} and DIR/heldout-test from the embedded data. Idempotent.

    Returns the manifest (also written to DIR/consortium.json). An existing, complete consortium
    of the same layout version is reused untouched so repeated demos keep their caches and ledgers.
    """
    out = Path(out)
    manifest_path = out / "consortium.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("layout_version") == LAYOUT_VERSION:
            return manifest
        raise FileExistsError(
            f"{out} holds a consortium of another layout version; choose another --out or delete it")
    data = load_embedded()
    images = np.concatenate([data["train_images"], data["val_images"]])
    labels = np.concatenate([data["train_labels"], data["val_labels"]]).reshape(-1).astype(int)
    rng = np.random.default_rng(seed)
    pos = rng.permutation(np.flatnonzero(labels == 1)).tolist()
    neg = rng.permutation(np.flatnonzero(labels == 0)).tolist()
    sites = {}
    for i, spec in enumerate(HOSPITALS):
        take = [pos.pop() for _ in range(spec.n_pneumonia)] + [neg.pop() for _ in range(spec.n_normal)]
        root = out / spec.name
        root.mkdir(parents=True, exist_ok=True)
        log.info("%s: writing its PACS export (%d DICOM files, labels keyed by %s) ...", spec.name, len(take),
                 spec.label_key)
        sites[spec.name] = _write_site(root, spec, images[take], labels[take], seed + 1 + i,
                                       broken=(spec.name == "hospital-c"))
        _write_secret(root / "pseudonym.secret", spec.name)
        (root / "site.toml").write_text(site_toml(spec, image_size))
    assert not pos and not neg, "hospital sizes must use every train+val image exactly once"
    test_spec = HospitalSpec(HELDOUT, "Held-out test (official PneumoniaMNIST test split)", 0, 0,
                             ExplicitVRLittleEndian, "SOPInstanceUID", "Various", 1.0)
    root = out / HELDOUT
    root.mkdir(parents=True, exist_ok=True)
    log.info("%s: writing the official test split (%d images, seen by no site) ...", HELDOUT, len(data["test_images"]))
    test_labels = data["test_labels"].reshape(-1).astype(int)
    sites[HELDOUT] = _write_site(root, test_spec, data["test_images"], test_labels, seed + 99, broken=False)
    _write_secret(root / "pseudonym.secret", HELDOUT)
    (root / "site.toml").write_text(site_toml(test_spec, image_size))
    manifest = {"layout_version": LAYOUT_VERSION, "source": "PneumoniaMNIST (MedMNIST v2, CC BY 4.0)",
                "sites": sites, "hospitals": [h.name for h in HOSPITALS], "heldout": HELDOUT,
                "label_column": LABEL_COLUMN}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def read_header(path: Path) -> Dataset:
    """Convenience for tests and the README: headers only."""
    return pydicom.dcmread(path, stop_before_pixels=True)
