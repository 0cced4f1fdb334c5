"""Data of `atoll demo --task hippocampus`: three hospitals' MR DICOM exports written from the embedded MSD volumes.

The exports differ as real ones do, so that the site side meets what it would meet in practice:

* ``hospital-a``: one file per slice in slice order (Explicit VR Little Endian), labels as DICOM SEG;
* ``hospital-b``: one legacy-converted *enhanced multi-frame* MR file per series (highdicom's converter, per-frame
  positions in the functional groups), labels as DICOM SEG on the multi-frame image;
* ``hospital-c``: one file per slice under shuffled random names, RLE Lossless transfer syntax, labels as NIfTI
  masks named in a labels CSV by SeriesInstanceUID.

Two series are broken on purpose and must end in quarantine: a series with a missing slice at hospital A
(``SLICE_GAP``) and a mask of the wrong geometry at hospital C (``MASK_MISMATCH``). Subjects held out for the test
set (``heldout/``, NIfTI only) are never written into any hospital's export. Patient names and IDs are canaries.

Geometry: the NIfTI voxel ``(i, j, k)`` becomes column ``i``, row ``j`` of slice ``k``; positions and direction cosines
come from the NIfTI affine (RAS, converted to DICOM's LPS), so assembly by geometry must give back the NIfTI grid.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).parent / "data" / "msd_hippocampus"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
HELDOUT = "heldout"
LABELS = ("anterior", "posterior")
CANARY_NAME = "CANARY^HIPPO"
SEED = 11
FORMAT_VERSION = 1


def subjects() -> list[str]:
    """The embedded subject ids (``hippocampus_NNN``), sorted."""
    return sorted(p.name[: -len(".nii.gz")] for p in (DATA / "imagesTr").glob("*.nii.gz"))


def _uid(text: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix="1.2.826.0.1.3680043.10.1134.", entropy_srcs=[f"atoll-hippo|{text}"])


def load_subject(sid: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32 [X, Y, Z], label uint8 [X, Y, Z], RAS affine) of one embedded subject."""
    import nibabel as nib

    img = nib.load(DATA / "imagesTr" / f"{sid}.nii.gz")
    lab = nib.load(DATA / "labelsTr" / f"{sid}.nii.gz")
    return (np.asarray(img.dataobj, dtype=np.float32), np.asarray(lab.dataobj).astype(np.uint8),
            np.asarray(img.affine, dtype=np.float64))


def slice_datasets(image: np.ndarray, affine_ras: np.ndarray, *, patient_id: str, study_uid: str, series_uid: str,
                   frame_uid: str, tag: str) -> list[Any]:
    """One MR Image Storage dataset per slice ``k`` (pixels ``image[:, :, k].T``), stored as uint16 with a
    RescaleSlope so that the modality LUT gives back the original intensities."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    lps = np.diag([-1.0, -1.0, 1.0]) @ affine_ras[:3]
    col_step, row_step, slice_step = lps[:, 0], lps[:, 1], lps[:, 2]
    row_dir = col_step / np.linalg.norm(col_step)   # direction of increasing column index
    col_dir = row_step / np.linalg.norm(row_step)   # direction of increasing row index
    peak = float(image.max()) or 1.0
    slope = peak / 4000.0
    out = []
    for k in range(image.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        sop = _uid(f"{tag}|sop|{k}")
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.PatientID, ds.PatientName = patient_id, CANARY_NAME
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "", "1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, k + 1
        ds.Manufacturer = "Atoll demo"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "SP", "", "3D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 3.0, 8.0, 1, 3.0
        ds.SliceThickness = float(np.linalg.norm(slice_step))
        ds.ImagePositionPatient = [float(v) for v in lps @ np.array([0.0, 0.0, k, 1.0])]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))]
        ds.PositionReferenceIndicator = ""
        plane = image[:, :, k].T
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:.10g}", "0", "US"
        ds.PixelData = np.clip(np.round(plane / float(ds.RescaleSlope)), 0, 65535).astype(np.uint16).tobytes()
        ds.WindowCenter, ds.WindowWidth = f"{peak / 2:.6g}", f"{peak:.6g}"
        ds.BurnedInAnnotation = "NO"
        out.append(ds)
    return out


def _segment_descriptions() -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=name,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Hippocampus,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL) for i, name in enumerate(LABELS)]


def write_seg(path: Path, sources: list[Any], mask_frames: np.ndarray, tag: str) -> None:
    """DICOM SEG (binary, one segment per label) over ``sources``; ``mask_frames`` is [frames, rows, cols]."""
    import highdicom as hd

    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask_frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(), series_instance_uid=_uid(f"{tag}|seg-series"),
        series_number=100, sop_instance_uid=_uid(f"{tag}|seg"), instance_number=1, manufacturer="Atoll demo",
        manufacturer_model_name="hippocampus demo", software_versions="1", device_serial_number="0")
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)


def enhanced_mask_frames(enhanced: Any, slices: list[Any], mask_frames: np.ndarray) -> np.ndarray:
    """``mask_frames`` (one per legacy slice) in the frame order of ``enhanced``: the converter sorts frames itself,
    so frame ``i`` is matched to its slice by position."""
    where = {tuple(round(float(v), 3) for v in ds.ImagePositionPatient): k for k, ds in enumerate(slices)}
    order = [where[tuple(round(float(v), 3) for v in f.PlanePositionSequence[0].ImagePositionPatient)]
             for f in enhanced.PerFrameFunctionalGroupsSequence]
    return mask_frames[order]


def write_nifti_mask(path: Path, label: np.ndarray, affine_ras: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine_ras), path)


def _site_toml(name: str, *, nifti: bool, released: list[str]) -> str:
    labels_lines = ('labels_csv = "labels.csv"\nlabel_key = "SeriesInstanceUID"\nlabel_column = "mask"\n'
                    if nifti else "")
    return f"""# Site config of {name} (the demo writes it; a hospital owns and edits its own)
[site]
name = "{name}"
state_dir = "state"
secret_file = "pseudonym.secret"
signing_key = "keys/site_ed25519.pem"
device = "auto"

[data]
kind = "volumes"
task = "segmentation"
labels = {json.dumps(list(LABELS))}
dicom_dir = "dicom"
{labels_lines}modalities = ["MR"]
val_fraction = 0.2

[privacy]
max_epsilon = 20.0
accountant = "rdp"
noise_multiplier = [0.3, 10.0]
clip_norm = [0.1, 10.0]
local_steps = [1, 2000]
allow_non_dp = true
released_metrics = {json.dumps(released)}
"""


def split_subjects(n_heldout: int = 40) -> dict[str, list[str]]:
    """Seeded assignment of the embedded subjects: held-out test set, then three hospitals of different sizes."""
    ids = subjects()
    random.Random(SEED).shuffle(ids)
    held, rest = sorted(ids[:n_heldout]), ids[n_heldout:]
    cut = [0, round(len(rest) * 0.40), round(len(rest) * 0.72), len(rest)]
    return {HELDOUT: held, **{h: sorted(rest[cut[i]:cut[i + 1]]) for i, h in enumerate(HOSPITALS)}}


def generate(out: Path, *, n_heldout: int = 40, limit: int | None = None, released: list[str] | None = None) -> dict:
    """Write the three hospitals (+ held-out NIfTI) under ``out`` once; returns the manifest (``out/manifest.json``).

    ``limit`` keeps only the first ``limit`` subjects of each hospital (tests use tiny consortia).
    """
    out = Path(out)
    released = released or ["num-examples", "train_loss", "train_seconds", "val_loss", "val_dice", *(f"val_dice_{lab}" for lab in LABELS)]
    want = {"format": FORMAT_VERSION, "n_heldout": n_heldout, "limit": limit, "released": released}
    mpath = out / "manifest.json"
    if mpath.exists():
        manifest = json.loads(mpath.read_text())
        if {k: manifest.get(k) for k in want} == want:
            return manifest
        raise FileExistsError(f"{out} holds another demo consortium; use another --out")
    parts = split_subjects(n_heldout)
    if limit is not None:
        parts = {k: v[:limit] for k, v in parts.items()}
    manifest: dict[str, Any] = {**want, "hospitals": list(HOSPITALS), "subjects": {}, "broken": {}}
    held_dir = out / HELDOUT
    for sub in ("images", "labels"):  # the held-out set stays NIfTI, as the embedded files are
        (held_dir / sub).mkdir(parents=True, exist_ok=True)
        for sid in parts[HELDOUT]:
            shutil.copyfile(DATA / f"{sub}Tr" / f"{sid}.nii.gz", held_dir / sub / f"{sid}.nii.gz")
    manifest["subjects"][HELDOUT] = len(parts[HELDOUT])
    for h in HOSPITALS:
        manifest["subjects"][h] = len(parts[h])
        manifest["broken"][h] = _write_hospital(out / h, h, parts[h], released)
    mpath.write_text(json.dumps(manifest, indent=2))
    return manifest


def _write_hospital(root: Path, name: str, ids: list[str], released: list[str]) -> dict[str, str]:
    from pydicom.uid import RLELossless

    import highdicom as hd

    dicom = root / "dicom"
    dicom.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{SEED}|{name}")
    broken: dict[str, str] = {}
    rows: list[tuple[str, str]] = []
    for n, sid in enumerate(ids):
        image, label, aff = load_subject(sid)
        tag = f"{name}|{sid}"
        study, series, frame = _uid(f"{tag}|study"), _uid(f"{tag}|series"), _uid(f"{tag}|for")
        pid = f"{name.upper()}-{hashlib.sha256(tag.encode()).hexdigest()[:8]}"
        slices = slice_datasets(image, aff, patient_id=pid, study_uid=study, series_uid=series, frame_uid=frame,
                                tag=tag)
        mask_frames = np.stack([label[:, :, k].T for k in range(label.shape[2])])
        folder = dicom / f"{n:03d}"
        if name == "hospital-a":
            folder.mkdir(parents=True, exist_ok=True)
            for k, ds in enumerate(slices):
                ds.save_as(folder / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
            write_seg(folder / "SEG.dcm", slices, mask_frames, tag)
            if n == 1:  # broken: one slice lost in the export -> SLICE_GAP
                (folder / f"IM{len(slices) // 2:04d}.dcm").unlink()
                broken["missing_slice"] = folder.name
        elif name == "hospital-b":
            enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
                legacy_datasets=slices, series_instance_uid=_uid(f"{tag}|enh-series"), series_number=2,
                sop_instance_uid=_uid(f"{tag}|enh"), instance_number=1)
            folder.mkdir(parents=True, exist_ok=True)
            enhanced.save_as(folder / "MR.dcm")
            write_seg(folder / "SEG.dcm", [enhanced], enhanced_mask_frames(enhanced, slices, mask_frames), tag)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            for ds in slices:
                ds.compress(RLELossless)
                ds.save_as(folder / f"{rng.getrandbits(64):016x}", enforce_file_format=True)
            mask_rel = f"masks/{n:03d}.nii.gz"
            if n == 1:  # broken: a mask exported on another grid (one slice short) -> MASK_MISMATCH
                write_nifti_mask(root / mask_rel, label[:, :, :-1], aff)
                broken["mask_wrong_geometry"] = folder.name
            else:
                write_nifti_mask(root / mask_rel, label, aff)
            rows.append((series, mask_rel))
    if rows:
        with open(root / "labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["SeriesInstanceUID", "mask"])
            w.writerows(rows)
    secret = root / "pseudonym.secret"
    if not secret.exists():
        secret.write_text(hashlib.sha256(f"secret|{name}|{SEED}".encode()).hexdigest())
        os.chmod(secret, 0o600)
    (root / "site.toml").write_text(_site_toml(name, nifti=bool(rows), released=released))
    return broken
