"""The volume data kind on real MR: DICOM written by pydicom/highdicom from the embedded hippocampus NIfTI.

A series must come back as the NIfTI grid whatever the export looks like (one file per slice under shuffled names,
another transfer syntax, a multi-frame file), masks from DICOM SEG and NIfTI must land on the same voxels, each
broken series ends in quarantine with its own reason code, round 2 reads no DICOM at all, and no identifier reaches
the dataset card.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from atoll import demo_hippocampus as hippo
from client.ingest import NoUsableImagesError
from client.site_config import load_site_config
from client.volumes import build_volume_dataset
from client.volumes.reasons import VolumeReason
from contract.task import TaskSpec

pytestmark = pytest.mark.filterwarnings("ignore")

TASK = TaskSpec(kind="segmentation", spatial_dims=3, classes=(), labels=("anterior", "posterior"),
                size=(32, 48, 32), spacing_mm=(1.0, 1.0, 1.0), orientation="RAS", modalities=("MR",))
SUBJECTS = hippo.subjects()[:3]
CANARY_ID = "CANARY-PID-7731"


def _site(root: Path, *, labels_csv: bool = False, labels: bool = True) -> Path:
    secret = root / "pseudonym.secret"
    secret.write_text("ab" * 32)
    os.chmod(secret, 0o600)
    lines = ['[site]', 'name = "vol-test"', 'state_dir = "state"', 'secret_file = "pseudonym.secret"',
             'device = "cpu"', '', '[data]', 'kind = "volumes"', 'task = "segmentation"', 'dicom_dir = "dicom"',
             'modalities = ["MR"]', 'val_fraction = 0.0']
    if labels:
        lines.append('labels = ["anterior", "posterior"]')
    if labels_csv:
        lines += ['labels_csv = "labels.csv"', 'label_key = "SeriesInstanceUID"', 'label_column = "mask"']
    (root / "site.toml").write_text("\n".join(lines) + "\n")
    (root / "dicom").mkdir(exist_ok=True)
    return root / "site.toml"


def _slices(sid: str, tag: str, patient: str = CANARY_ID) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    image, label, aff = hippo.load_subject(sid)
    ds = hippo.slice_datasets(image, aff, patient_id=patient, study_uid=hippo._uid(f"{tag}st"),
                              series_uid=hippo._uid(f"{tag}se"), frame_uid=hippo._uid(f"{tag}for"), tag=tag)
    return ds, image, label, aff


def _native(cfg_path: Path):
    return build_volume_dataset(load_site_config(cfg_path), None)


def test_series_assembled_by_geometry_matches_the_nifti_grid_for_every_export_form(tmp_path: Path) -> None:
    """Shuffled names + RLE, one multi-frame file, and sorted names all give the NIfTI's voxels back."""
    import highdicom as hd
    from pydicom.uid import RLELossless

    cfg = _site(tmp_path, labels_csv=True)
    sid = SUBJECTS[0]
    rows = []
    # (a) one file per slice, shuffled random names, RLE Lossless, InstanceNumber scrambled; NIfTI mask
    sl, image, label, aff = _slices(sid, "a")
    rng = random.Random(0)
    for ds in sl:
        ds.InstanceNumber = rng.randint(1, 999)
        ds.compress(RLELossless)
        ds.save_as(tmp_path / "dicom" / f"x{rng.getrandbits(40):010x}", enforce_file_format=True)
    hippo.write_nifti_mask(tmp_path / "masks" / "a.nii.gz", label, aff)
    rows.append((sl[0].SeriesInstanceUID, "masks/a.nii.gz"))
    # (b) legacy-converted enhanced multi-frame MR + SEG on it
    sl_b, *_ = _slices(sid, "b", patient="OTHER-PATIENT")
    enh = hd.legacy.LegacyConvertedEnhancedMRImage(legacy_datasets=sl_b, series_instance_uid=hippo._uid("b-enh"),
                                                   series_number=2, sop_instance_uid=hippo._uid("b-enh-sop"),
                                                   instance_number=1)
    (tmp_path / "dicom" / "b").mkdir()
    enh.save_as(tmp_path / "dicom" / "b" / "MR.dcm")
    frames = np.stack([label[:, :, k].T for k in range(label.shape[2])])
    hippo.write_seg(tmp_path / "dicom" / "b" / "SEG.dcm", [enh], hippo.enhanced_mask_frames(enh, sl_b, frames), "b")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("SeriesInstanceUID", "mask"), *rows])

    ds = _native(cfg)
    assert ds.report["quarantined"] == []
    used = ds.report["used"]
    assert len(used) == 2 and {u["mask"] for u in used} == {"nifti", "seg"}
    for u in used:
        assert u["native_shape"] == [image.shape[2], image.shape[1], image.shape[0]]
        assert u["native_spacing_mm"] == [1.0, 1.0, 1.0]
        assert u["labels_present"] == [1, 2]

    # preprocessed: both exports give the same image and label map, equal to the NIfTI put through the same path
    full = build_volume_dataset(load_site_config(cfg), TASK)
    imgs = list(full.train.images)
    labs = list(full.train.labels)
    assert len(imgs) == 2
    np.testing.assert_allclose(imgs[0].numpy(), imgs[1].numpy(), atol=2e-2)
    assert (labs[0] == labs[1]).all()
    from client.volumes.transforms import build_volume_transform, preprocess_volume

    ref_img, ref_lab = preprocess_volume(image, aff, label.astype(np.int64), build_volume_transform(TASK))
    np.testing.assert_allclose(imgs[0].numpy(), ref_img.numpy(), atol=2e-2)  # uint16 + RescaleSlope quantisation
    assert (labs[0] == ref_lab).all() and int((ref_lab > 0).sum()) > 500


def _write(root: Path, sl: list, names: list[str] | None = None) -> None:
    folder = root / "dicom" / sl[0].SeriesInstanceUID[-8:]
    folder.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(sl):
        ds.save_as(folder / (names[k] if names else f"{k:03d}.dcm"), enforce_file_format=True)


def test_each_broken_series_is_quarantined_with_its_reason(tmp_path: Path) -> None:
    cfg = _site(tmp_path, labels=True)
    sid = SUBJECTS[1]
    expected: dict[str, str] = {}

    def series(tag: str, patient: str = CANARY_ID) -> list:
        sl, *_ = _slices(sid, tag, patient)
        return sl

    good = series("good")
    _write(tmp_path, good)
    image, label, aff = hippo.load_subject(sid)
    hippo.write_seg(tmp_path / "dicom" / "good-seg.dcm", good, np.stack([label[:, :, k].T for k in range(label.shape[2])]), "good")

    gap = series("gap")
    del gap[10]
    _write(tmp_path, gap)
    expected[gap[0].SeriesInstanceUID] = VolumeReason.SLICE_GAP

    dup = series("dup")
    extra = pydicom.Dataset()
    extra.update(dup[5])
    extra.file_meta = dup[5].file_meta
    extra.SOPInstanceUID = hippo._uid("dup-extra")
    _write(tmp_path, [*dup, extra])
    expected[dup[0].SeriesInstanceUID] = VolumeReason.DUPLICATE_POSITION

    tilt = series("tilt")
    tilt[3].ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    _write(tmp_path, tilt)
    expected[tilt[0].SeriesInstanceUID] = VolumeReason.INCONSISTENT_ORIENTATION

    spacing = series("spacing")
    spacing[4].PixelSpacing = [1.2, 1.0]
    _write(tmp_path, spacing)
    expected[spacing[0].SeriesInstanceUID] = VolumeReason.INCONSISTENT_SPACING

    mixed = series("mixed")
    mixed[7].PatientID = "SOMEONE-ELSE"
    _write(tmp_path, mixed)
    expected[mixed[0].SeriesInstanceUID] = VolumeReason.MIXED_SERIES

    few = series("few")[:2]
    _write(tmp_path, few)
    expected[few[0].SeriesInstanceUID] = VolumeReason.TOO_FEW_SLICES

    nomask = series("nomask")
    _write(tmp_path, nomask)
    expected[nomask[0].SeriesInstanceUID] = VolumeReason.NO_MASK

    shifted = series("shifted")  # SEG made on a grid shifted by 0.4 mm: not the image's grid
    _write(tmp_path, shifted)
    moved = [pydicom.Dataset(d) for d in shifted]
    for d, o in zip(moved, shifted):
        d.file_meta = o.file_meta
        d.ImagePositionPatient = [float(v) + 0.4 for v in o.ImagePositionPatient]
    hippo.write_seg(tmp_path / "dicom" / "shifted-seg.dcm", moved,
                    np.stack([label[:, :, k].T for k in range(label.shape[2])]), "shifted")
    expected[shifted[0].SeriesInstanceUID] = VolumeReason.MASK_MISMATCH

    ds = build_volume_dataset(load_site_config(cfg), TASK)
    assert len(ds.report["used"]) == 1 and ds.report["used"][0]["mask"] == "seg"
    got = {}
    for q in ds.report["quarantined"]:
        first = pydicom.dcmread(tmp_path / "dicom" / q["files"][0], stop_before_pixels=True)
        got[first.SeriesInstanceUID] = q["reason"]
        assert q["detail"]
    assert got == {k: v.value for k, v in expected.items()}
    card = json.dumps(ds.card)
    assert CANARY_ID not in card and "1.2.826" not in card and "dicom/" not in card
    assert ds.card["quarantined"]["by_reason"]  # counts per code (small ones suppressed)


def test_round_two_reads_no_dicom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _site(tmp_path, labels=True)
    sl, image, label, aff = _slices(SUBJECTS[2], "cache")
    _write(tmp_path, sl)
    hippo.write_seg(tmp_path / "dicom" / "seg.dcm", sl, np.stack([label[:, :, k].T for k in range(label.shape[2])]), "c")
    first = build_volume_dataset(load_site_config(cfg), TASK)
    assert first.report["cache"] == {"hits": 0, "misses": 1}

    def no_read(*a, **k):
        raise AssertionError("round 2 must not read DICOM")

    monkeypatch.setattr(pydicom, "dcmread", no_read)
    second = build_volume_dataset(load_site_config(cfg), TASK)
    assert second.report["cache"] == {"hits": 1, "misses": 0}
    assert (second.train.images == first.train.images).all() and (second.train.labels == first.train.labels).all()


def test_nifti_mask_values_must_be_the_sites_labels(tmp_path: Path) -> None:
    cfg = _site(tmp_path, labels_csv=True)
    sl, image, label, aff = _slices(SUBJECTS[0], "badval")
    _write(tmp_path, sl)
    bad = label.copy()
    bad[bad == 2] = 3  # a third structure the site does not name
    hippo.write_nifti_mask(tmp_path / "m.nii.gz", bad, aff)
    (tmp_path / "labels.csv").write_text(f"SeriesInstanceUID,mask\n{sl[0].SeriesInstanceUID},m.nii.gz\n")
    with pytest.raises(NoUsableImagesError, match="BAD_MASK: 1") as err:
        _native(cfg)
    ds = err.value.dataset
    assert [q["reason"] for q in ds.report["quarantined"]] == ["BAD_MASK"]
    assert "outside 0..2" in ds.report["quarantined"][0]["detail"]
    assert nib.load(tmp_path / "m.nii.gz").shape == image.shape


def test_site_check_volumes_reports_series(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from client.site_check import main

    sl, image, label, aff = _slices(SUBJECTS[0], "check")
    (tmp_path / "dicom").mkdir()
    _write(tmp_path, sl)
    hippo.write_seg(tmp_path / "dicom" / "seg.dcm", sl, np.stack([label[:, :, k].T for k in range(label.shape[2])]), "k")
    (tmp_path / "dicom" / "notes.txt").write_text("not DICOM")
    rc = main(["site", "check", "--data", str(tmp_path / "dicom"), "--volumes", "--modalities", "MR",
               "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "series used     <5" in out and "NOT_DICOM" in out
    report = json.loads((tmp_path / "r.json").read_text())
    (entry,) = report["used"]
    assert entry["native_shape"] == [image.shape[2], image.shape[1], image.shape[0]]
    assert entry["native_spacing_mm"] == [1.0, 1.0, 1.0] and len(entry["files"]) == image.shape[2]
    assert all(not f.startswith("/") for f in entry["files"])
    assert CANARY_ID not in out and CANARY_ID not in json.dumps(report["card"])
