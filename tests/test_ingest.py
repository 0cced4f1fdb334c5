"""Site ingestion with real DICOM files written by pydicom: quarantine reasons, pixel path, split, cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydicom.uid import JPEG2000Lossless, RLELossless

from client.ingest import NoUsableImagesError, Reason, SiteDataset, build_site_dataset
from client.ingest.split import split_patients
from client.site_config import SiteConfig, default_site_config
from tests.dicom_factory import uid, write_dicom, write_labels, write_site


def cfg_for(tmp_path: Path, data: Path, labels: Path | None = None, **kw: Any) -> SiteConfig:
    return default_site_config(data, labels, state_dir=tmp_path / "state", **kw)


def reasons(ds: SiteDataset) -> dict[str, str]:
    return {q["file"]: q["reason"] for q in ds.report["quarantined"]}


def used_files(ds: SiteDataset) -> set[str]:
    return {u["file"] for u in ds.report["used"]}


def test_clean_site_is_fully_used_with_labels_and_tensors(tmp_path: Path) -> None:
    recs = write_site(tmp_path / "dicom", patients=8, images_per_patient=3, rle_every=2)
    ds = build_site_dataset(cfg_for(tmp_path, tmp_path / "dicom", write_labels(tmp_path / "labels.csv", recs)))
    assert ds.report["quarantined"] == []
    assert used_files(ds) == {r["file"] for r in recs}
    for split in (ds.train, ds.val):
        assert split.images.dtype == torch.float32 and split.images.shape[1:] == (1, 28, 28)
        assert split.labels.dtype == torch.int64 and split.patients.dtype == torch.int64
        assert float(split.images.min()) >= 0.0 and float(split.images.max()) <= 1.0
    assert len(ds.train) + len(ds.val) == 24
    # labels follow the CSV: patient p has label p % 2, and every image of a patient shares it
    by_file = {u["file"]: u["label"] for u in ds.report["used"]}
    assert all(by_file[r["file"]] == r["label"] for r in recs)
    assert ds.card["by_class"] == {"0": 12, "1": 12} and ds.card["images_used"] == 24


def test_split_is_by_patient_deterministic_and_stable_as_data_grows(tmp_path: Path) -> None:
    recs = write_site(tmp_path / "dicom", patients=30, images_per_patient=2)
    labels = write_labels(tmp_path / "labels.csv", recs)
    cfg = cfg_for(tmp_path, tmp_path / "dicom", labels)
    a, b = build_site_dataset(cfg), build_site_dataset(cfg)
    split_a = {u["patient"]: u["split"] for u in a.report["used"]}
    split_of_file = {}
    for u in a.report["used"]:
        split_of_file.setdefault(u["patient"], set()).add(u["split"])
    assert all(len(s) == 1 for s in split_of_file.values()), "a patient appears in both splits"
    assert a.train.num_patients + a.val.num_patients == 30 and a.val.num_patients > 0
    assert {u["patient"]: u["split"] for u in b.report["used"]} == split_a
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.patients, b.train.patients)
    # patient indices are 0..P-1 within each split
    assert sorted(a.train.patients.unique().tolist()) == list(range(a.train.num_patients))
    # growing the export never moves an existing patient to the other split
    more = write_site(tmp_path / "more", patients=40, images_per_patient=1)
    for r in more[30:]:
        shutil.copytree(tmp_path / "more" / Path(r["file"]).parent, tmp_path / "dicom" / Path(r["file"]).parent,
                        dirs_exist_ok=True)
    grown = build_site_dataset(cfg_for(tmp_path, tmp_path / "dicom", write_labels(tmp_path / "l2.csv", recs + more[30:])))
    grown_split = {u["patient"]: u["split"] for u in grown.report["used"]}
    assert all(grown_split[p] == s for p, s in split_a.items())
    # a different seed gives a different (still patient-level) split
    other = split_patients(split_a, 0.2, seed=1)
    assert other != split_patients(split_a, 0.2, seed=0)


def test_small_sites_get_both_splits_when_possible() -> None:
    assert sorted(split_patients(["a", "b"], 0.2, 0).values()) == ["train", "val"]
    assert list(split_patients(["a"], 0.2, 0).values()) == ["train"]
    assert set(split_patients([f"p{i}" for i in range(20)], 0.0, 0).values()) == {"train"}


def test_cache_hit_on_second_pass_and_invalidated_by_image_size_or_file_change(tmp_path: Path) -> None:
    recs = write_site(tmp_path / "dicom", patients=4, images_per_patient=2)
    cfg = cfg_for(tmp_path, tmp_path / "dicom")
    first = build_site_dataset(cfg)
    assert first.report["cache"] == {"hits": 0, "misses": 8}
    second = build_site_dataset(cfg)
    assert second.report["cache"] == {"hits": 8, "misses": 0}
    assert torch.equal(first.train.images, second.train.images)
    bigger = build_site_dataset(cfg_for(tmp_path, tmp_path / "dicom", image_size=32))
    assert bigger.report["cache"] == {"hits": 0, "misses": 8} and bigger.train.images.shape[-1] == 32
    assert build_site_dataset(cfg).report["cache"]["hits"] == 8  # the 28-pixel cache is still there
    # re-exported file (new content, new mtime) is decoded again; the others are not
    target = tmp_path / "dicom" / recs[0]["file"]
    write_dicom(target, patient_id=recs[0]["patient_id"], sop_uid=recs[0]["sop"], seed=99)
    os.utime(target, ns=(1, 1))
    after = build_site_dataset(cfg)
    assert after.report["cache"] == {"hits": 7, "misses": 1}


def test_quarantine_reason_per_file(tmp_path: Path) -> None:
    data = tmp_path / "dicom"
    recs = write_site(data, patients=6, images_per_patient=2)
    write_dicom(data / "x/burned.dcm", patient_id="PB", burned_in="YES", seed=1)
    write_dicom(data / "x/burned_no.dcm", patient_id="PB", burned_in="NO", seed=2)
    write_dicom(data / "x/ct.dcm", patient_id="PC", modality="CT", seed=3)
    write_dicom(data / "x/nopid.dcm", patient_id="", seed=4)
    write_dicom(data / "x/ybr420.dcm", patient_id="PD", photometric="YBR_PARTIAL_420", seed=5)
    write_dicom(data / "x/zero_rows.dcm", patient_id="PE", seed=6, extra={"Columns": 0},
                pixels=np.zeros((28, 28), np.uint16))
    write_dicom(data / "x/j2k.dcm", patient_id="PF", seed=7, rows=64, columns=64, transfer_syntax=JPEG2000Lossless)
    shutil.copy(data / recs[0]["file"], data / "x/zz_duplicate.dcm")
    (data / "x/notes.txt").write_text("exported by PACS\n")
    (data / "x/empty.dcm").write_bytes(b"")
    for name, cut in (("cut_in_pixels", -300), ("cut_in_header", 400)):  # own UIDs, else they are DUPLICATEs
        good = write_dicom(tmp_path / f"{name}.dcm", patient_id="PG", sop_uid=uid(name)).read_bytes()
        (data / f"x/{name}.dcm").write_bytes(good[:cut])
    labels = write_labels(tmp_path / "labels.csv", recs[:-2] + [{"sop": "1.2.3.4.5.6.unmatched", "label": 0},
                                                            {"sop": uid("sop-PB-2"), "label": 1},
                                                            {"sop": uid("sop-PF-7"), "label": 1},
                                                            {"sop": uid("cut_in_pixels"), "label": 1}])
    ds = build_site_dataset(cfg_for(tmp_path, data, labels))
    r = reasons(ds)
    assert r["x/burned.dcm"] == Reason.BURNED_IN_ANNOTATION
    assert "x/burned_no.dcm" in used_files(ds)
    assert r["x/ct.dcm"] == Reason.MODALITY_NOT_ALLOWED
    assert r["x/nopid.dcm"] == Reason.MISSING_PATIENT_ID
    assert r["x/ybr420.dcm"] == Reason.UNSUPPORTED_PHOTOMETRIC
    assert r["x/zero_rows.dcm"] == Reason.BAD_GEOMETRY
    assert "x/j2k.dcm" in used_files(ds)  # compressed via the openjpeg plugin
    assert r["x/zz_duplicate.dcm"] == Reason.DUPLICATE
    assert r["x/notes.txt"] == Reason.NOT_DICOM and r["x/empty.dcm"] == Reason.NOT_DICOM
    assert r["x/cut_in_pixels.dcm"] == Reason.TRUNCATED and r["x/cut_in_header.dcm"] == Reason.TRUNCATED
    assert r[recs[-1]["file"]] == Reason.NO_LABEL and r[recs[-2]["file"]] == Reason.NO_LABEL
    assert ds.card["labels"]["unmatched"] == "<5" and len(ds.report["unmatched_labels"]) == 1
    # every file is accounted for exactly once
    all_files = {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()}
    assert used_files(ds) | set(r) == all_files and not used_files(ds) & set(r)


def test_label_keys_by_study_and_accession_and_named_classes(tmp_path: Path) -> None:
    recs = write_site(tmp_path / "dicom", patients=6, images_per_patient=2)
    (tmp_path / "acc.csv").write_text(
        "AccessionNumber;finding\n" + "".join(f"{r['accession']};{'pneumonia' if r['label'] else 'normal'}\n"
                                             for r in recs[::2]), encoding="utf-8")
    cfg = cfg_for(tmp_path, tmp_path / "dicom", tmp_path / "acc.csv", label_key="AccessionNumber",
                  label_column="finding", classes=("normal", "pneumonia"))
    ds = build_site_dataset(cfg)
    assert len(ds.train) + len(ds.val) == 12 and ds.card["by_class"] == {"normal": 6, "pneumonia": 6}
    study = write_labels(tmp_path / "study.csv", recs, key="study", header_key="StudyInstanceUID")
    ds = build_site_dataset(cfg_for(tmp_path, tmp_path / "dicom", study, label_key="StudyInstanceUID"))
    assert len(ds.train) + len(ds.val) == 12
    # names without [data].classes are refused per image (BAD_LABEL), not guessed
    ds_bad = cfg_for(tmp_path, tmp_path / "dicom", tmp_path / "acc.csv", label_key="AccessionNumber",
                     label_column="finding")
    with pytest.raises(NoUsableImagesError) as e:
        build_site_dataset(ds_bad)
    assert set(reasons(e.value.dataset).values()) == {Reason.BAD_LABEL}


def test_labels_csv_missing_column_is_a_config_error(tmp_path: Path) -> None:
    from client.site_config import ConfigError

    write_site(tmp_path / "dicom", patients=1, images_per_patient=1)
    (tmp_path / "l.csv").write_text("uid,diagnosis\n1.2,0\n")
    with pytest.raises(ConfigError, match="column 'SOPInstanceUID'.*columns are: uid, diagnosis"):
        build_site_dataset(cfg_for(tmp_path, tmp_path / "dicom", tmp_path / "l.csv"))


def test_no_usable_image_raises_with_counts_only(tmp_path: Path) -> None:
    data = tmp_path / "dicom"
    write_dicom(data / "a.dcm", patient_id="SECRETPID", modality="CT")
    (data / "b.txt").write_text("hello")
    with pytest.raises(NoUsableImagesError) as e:
        build_site_dataset(cfg_for(tmp_path, data))
    msg = str(e.value)
    assert "MODALITY_NOT_ALLOWED: 1" in msg and "NOT_DICOM: 1" in msg
    assert "SECRETPID" not in msg and "a.dcm" not in msg and str(data) not in msg
    assert len(e.value.dataset.train) == 0 and e.value.dataset.card["images_used"] == 0


# ---- pixel path -------------------------------------------------------------------------------------------------
def _one(tmp_path: Path, name: str, **kw: Any) -> torch.Tensor:
    data = tmp_path / name
    write_dicom(data / "img.dcm", patient_id="P1", **kw)
    ds = build_site_dataset(cfg_for(tmp_path / f"st-{name}", data, modalities=("*",)))
    return torch.cat([ds.train.images, ds.val.images])[0, 0]


def _ramp(h: int = 28, w: int = 28) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 1000 + 100).astype(np.uint16)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    m2 = _one(tmp_path, "m2", pixels=_ramp())
    m1 = _one(tmp_path, "m1", pixels=_ramp(), photometric="MONOCHROME1")
    assert torch.allclose(m1, 1.0 - m2, atol=1e-5)


def test_window_clips_and_rescale_is_applied(tmp_path: Path) -> None:
    plain = _one(tmp_path, "plain", pixels=_ramp())
    windowed = _one(tmp_path, "win", pixels=_ramp(), window=(600.0, 200.0))
    raw = torch.as_tensor(_ramp().astype(np.float32))
    # DICOM linear window (c=600, w=200): x <= 500 -> darkest, x >= 699 -> brightest (PS3.3 C.11.2.1.2)
    assert bool(((raw <= 500) == (windowed == 0)).all())
    assert bool(((raw >= 699) == (windowed == 1)).all())
    assert not torch.allclose(plain, windowed)
    # rescale slope/intercept with a window in rescaled units: intercept -1000 shifts the window accordingly
    shifted = _one(tmp_path, "res", pixels=_ramp(), rescale=(1.0, -1000.0), window=(-400.0, 200.0))
    assert torch.allclose(shifted, windowed, atol=1e-5)


def test_multiframe_uses_the_middle_frame(tmp_path: Path) -> None:
    frames = np.stack([_ramp() * 0 + 7, _ramp(), (_ramp()[::-1]).copy(), _ramp() * 0 + 9])  # middle = index 2
    multi = _one(tmp_path, "mf", pixels=frames, frames=4, transfer_syntax=RLELossless)
    single = _one(tmp_path, "sf", pixels=_ramp()[::-1].copy())
    assert torch.allclose(multi, single, atol=1e-6)


def test_rgb_becomes_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((28, 28, 3), np.uint8)
    rgb[..., 0] = np.arange(28)[None, :] * 9
    rgb[..., 1] = np.arange(28)[:, None] * 9
    rgb[..., 2] = 40
    colour = _one(tmp_path, "rgb", pixels=rgb, photometric="RGB", bits=8, modality="US")
    y = torch.as_tensor(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    y = (y - y.min()) / (y.max() - y.min())
    assert torch.allclose(colour.double(), y, atol=1e-5)


def test_non_square_keeps_aspect_ratio_and_pads(tmp_path: Path) -> None:
    img = _one(tmp_path, "wide", pixels=(np.ones((20, 80)) * np.arange(80)[None, :] + 10).astype(np.uint16),
               rows=20, columns=80)
    assert img.shape == (28, 28)
    assert float(img[:10].abs().sum()) == 0.0 and float(img[-10:].abs().sum()) == 0.0  # zero padding top/bottom
    assert float(img[12:16].max()) > 0.9  # content kept, centred


def test_bit_flipped_and_damaged_copies_never_raise(tmp_path: Path) -> None:
    data = tmp_path / "dicom"
    recs = write_site(data, patients=3, images_per_patient=2, rle_every=2)
    rng = np.random.default_rng(0)
    for i, r in enumerate(recs):
        raw = bytearray((data / r["file"]).read_bytes())
        for _ in range(3):
            for pos in rng.integers(128, len(raw), 8):
                raw[pos] ^= 1 << int(rng.integers(0, 8))
            (data / f"flip_{i}_{_}.dcm").write_bytes(bytes(raw))
        (data / f"head_{i}.dcm").write_bytes(bytes(raw[: int(rng.integers(1, len(raw)))]))
    try:
        ds = build_site_dataset(cfg_for(tmp_path, data))
        report = ds.report
    except NoUsableImagesError as e:
        report = e.dataset.report
    files = {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()}
    accounted = [u["file"] for u in report["used"]] + [q["file"] for q in report["quarantined"]]
    assert sorted(accounted) == sorted(files)
    assert all(q["reason"] in Reason.__members__ for q in report["quarantined"])


def test_cache_and_labels_inside_the_data_folder_are_not_ingested_and_corrupt_cache_is_rebuilt(
        tmp_path: Path) -> None:
    data = tmp_path / "export"
    recs = write_site(data, patients=3, images_per_patient=2)
    labels = write_labels(data / "labels.csv", recs)
    cfg = cfg_for(tmp_path, data, labels, cache_dir=data / ".atoll-cache")
    first = build_site_dataset(cfg)
    assert first.report["quarantined"] == [] and len(first.report["used"]) == 6
    caches = list((data / ".atoll-cache").glob("tensors-*.pt"))
    assert len(caches) == 1
    caches[0].write_bytes(b"not a torch file")
    again = build_site_dataset(cfg)
    assert again.report["quarantined"] == [] and again.report["cache"] == {"hits": 0, "misses": 6}
    assert torch.equal(torch.cat([first.train.images, first.val.images]),
                       torch.cat([again.train.images, again.val.images]))
