"""The demo consortium is a realistic set of PACS exports built from the embedded real X-rays."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pydicom

from atoll.demo_data import CANARY_ID, CANARY_NAME, HOSPITALS, generate_consortium, load_embedded


def _headers(root):
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((root / "dicom").rglob("IM*.dcm"))
            if p.parent.name != "P99990"]


def test_every_train_and_val_image_lands_in_exactly_one_hospital(demo_consortium):
    manifest = json.loads((demo_consortium / "consortium.json").read_text())
    data = load_embedded()
    total = sum(manifest["sites"][h.name]["images"] for h in HOSPITALS)
    assert total == len(data["train_images"]) + len(data["val_images"])
    assert manifest["sites"]["heldout-test"]["images"] == len(data["test_images"]) == 624


def test_hospitals_differ_in_size_and_class_balance(demo_consortium):
    manifest = json.loads((demo_consortium / "consortium.json").read_text())
    sizes = [manifest["sites"][h.name]["images"] for h in HOSPITALS]
    balance = [manifest["sites"][h.name]["pneumonia"] / manifest["sites"][h.name]["images"] for h in HOSPITALS]
    assert len(set(sizes)) == 3 and max(sizes) > 2 * min(sizes)
    assert max(balance) - min(balance) > 0.2


def test_patient_study_series_structure_and_plausible_headers(demo_consortium):
    hdrs = _headers(demo_consortium / "hospital-b")
    per_patient = Counter(h.PatientID for h in hdrs)
    assert max(per_patient.values()) > 1, "some patients must have several images"
    assert min(per_patient.values()) == 1
    studies_per_patient = {pid: len({h.StudyInstanceUID for h in hdrs if h.PatientID == pid})
                           for pid, n in per_patient.items() if n > 2}
    assert max(studies_per_patient.values()) >= 2, "some patients must have several studies"
    for h in hdrs[:50]:
        assert h.Modality == "CR" and h.BodyPartExamined == "CHEST"
        assert h.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
        assert len(h.PixelSpacing) == 2 and float(h.PixelSpacing[0]) > 0
        assert h.StudyDate and h.PatientBirthDate and h.StudyDate > h.PatientBirthDate
        assert str(h.PatientName).startswith(CANARY_NAME) and h.PatientID.startswith(CANARY_ID)
    assert len({h.SOPInstanceUID for h in hdrs}) == len(hdrs)


def test_pixels_round_trip_and_transfer_syntaxes_differ(demo_consortium):
    data = load_embedded()
    pool = np.concatenate([data["train_images"], data["val_images"]])
    syntaxes = set()
    for h in HOSPITALS:
        first = sorted((demo_consortium / h.name / "dicom").rglob("IM*.dcm"))[0]
        ds = pydicom.dcmread(first)
        syntaxes.add(ds.file_meta.TransferSyntaxUID)
        arr = ds.pixel_array
        assert arr.shape == (28, 28)
        assert (pool == arr).all(axis=(1, 2)).any(), "pixels must be one of the embedded real images"
    assert len(syntaxes) == 3


def test_labels_csv_matches_images_by_the_sites_key(demo_consortium):
    for h in HOSPITALS:
        rows = list(csv.DictReader(open(demo_consortium / h.name / "labels.csv")))
        keys = {r[h.label_key] for r in rows}
        hdrs = [x for x in _headers(demo_consortium / h.name) if x.BurnedInAnnotation == "NO"]
        hdr_keys = {str(getattr(x, h.label_key)) for x in hdrs}
        assert hdr_keys == keys, "every good image is labelled and every label names an image"
        assert set(r["pneumonia"] for r in rows) == {"0", "1"}


def test_generation_is_idempotent_and_deterministic(tmp_path, demo_consortium):
    again = generate_consortium(demo_consortium)
    assert again == json.loads((demo_consortium / "consortium.json").read_text())
    other = tmp_path / "c2"
    generate_consortium(other)
    a = sorted(p.relative_to(demo_consortium) for p in (demo_consortium / "hospital-c").rglob("*.dcm"))
    b = sorted(p.relative_to(other) for p in (other / "hospital-c").rglob("*.dcm"))
    assert a == b
    assert (demo_consortium / "hospital-c" / "labels.csv").read_bytes() == (other / "hospital-c" / "labels.csv").read_bytes()
