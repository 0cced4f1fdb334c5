"""Build a volume site's data: index headers -> group by series -> assemble by geometry -> masks -> MONAI -> split.

One example is one DICOM series (a 3D volume) with its label map. Every file ends in exactly one place: part of a
used series, part of a quarantined series (series-level reason, :mod:`client.volumes.reasons`), a used mask, or a
quarantined file (file-level reason of the 2D path: NOT_DICOM, CORRUPT_HEADER, MODALITY_NOT_ALLOWED ...).

Caching as in the 2D path (``client.ingest.cache``): header facts per file key in a JSON index, and the
preprocessed ``(image, label map)`` per series in one consolidated tensor file per preprocessing key, keyed by the
file keys of the series' files and of its mask — so round 2 parses no pixel data and runs no transform.

Without a task (``atoll site check --volumes``) every series is decoded and its mask checked on the native grid,
nothing is resampled or cached, and the returned splits are empty (the card and report are what a check shows).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch

from client.ingest.cache import _atomic_write, file_key
from client.ingest.dataset import NoUsableImagesError, SiteDataset, SplitTensors, _quiet_pydicom
from client.ingest.index import attach_pixel_data, header_reason, iter_files, read_header
from client.ingest.pseudonyms import Pseudonymizer
from client.ingest.quarantine import Reason, describe
from client.ingest.split import TRAIN, VAL, split_patients
from client.site_config import ConfigError, SiteConfig
from client.volumes.card import make_volume_card
from client.volumes.masks import MaskError, align_to_image, read_nifti, read_seg, seg_reference
from client.volumes.reasons import VolumeReason
from client.volumes.series import Assembled, SeriesFacts, SliceGeometry, assemble, frame_geometries, lps_to_ras
from client.volumes.transforms import build_volume_transform, modality_lut, preprocess_volume, volume_preprocess_key
from contract.task import TaskSpec

log = logging.getLogger("atoll.ingest")
INDEX_VERSION = 1


def load_mask_table(cfg: SiteConfig) -> dict[str, Path]:
    """``SeriesInstanceUID -> NIfTI path`` from the labels CSV (paths relative to the CSV's folder)."""
    if cfg.labels_csv is None:
        return {}
    if cfg.label_key != "SeriesInstanceUID":
        raise ConfigError(f"{cfg.path}: [data].label_key: a volume site names its NIfTI masks by SeriesInstanceUID; "
                          f"set label_key = \"SeriesInstanceUID\"")
    try:
        with open(cfg.labels_csv, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{cfg.labels_csv}: cannot read labels CSV ({type(e).__name__})") from None
    cols = set(rows[0]) if rows else set()
    for col in (cfg.label_key, cfg.label_column):
        if rows and col not in cols:
            raise ConfigError(f"{cfg.labels_csv}: no column {col!r} (columns: {', '.join(sorted(cols))}); set "
                              f"[data].label_key / label_column")
    base = cfg.labels_csv.parent
    return {r[cfg.label_key].strip(): (base / r[cfg.label_column].strip()).resolve() for r in rows
            if r.get(cfg.label_key) and r.get(cfg.label_column)}


class _Index:
    """Header facts per file key (JSON, site-only: it holds UIDs and pseudonyms)."""

    def __init__(self, cache_dir: Path | None, fingerprint: str) -> None:
        self.path = cache_dir / f"volume-index-v{INDEX_VERSION}-{fingerprint}.json" if cache_dir else None
        self.entries: dict[str, dict[str, Any]] = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))
            except Exception:  # noqa: BLE001 - a corrupt cache is rebuilt
                self.entries = {}

    def save(self, keep: set[str]) -> None:
        if self.path is None or (not self.dirty and set(self.entries) <= keep):
            return
        data = json.dumps({k: v for k, v in self.entries.items() if k in keep}).encode()
        _atomic_write(self.path, lambda f: f.write(data))


class _Tensors:
    """Preprocessed ``(image, label)`` per series key, one file per preprocessing key."""

    def __init__(self, cache_dir: Path | None, key: str | None) -> None:
        self.path = cache_dir / f"volumes-{key[:24]}.pt" if cache_dir and key else None
        self.key = key
        self.items: dict[str, Any] = {}
        self.hits = self.misses = 0
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                blob = torch.load(self.path, map_location="cpu", weights_only=True)
                if blob.get("key") == key:
                    self.items = blob["items"]
            except Exception:  # noqa: BLE001
                self.items = {}

    def get(self, k: str) -> Any:
        hit = self.items.get(k)
        self.hits += hit is not None
        self.misses += hit is None
        return hit

    def put(self, k: str, v: Any) -> None:
        self.items[k] = v
        self.dirty = True

    def save(self, keep: set[str]) -> None:
        if self.path is None or (not self.dirty and set(self.items) <= keep):
            return
        blob = {"key": self.key, "items": {k: v for k, v in self.items.items() if k in keep}}
        _atomic_write(self.path, lambda f: torch.save(blob, f))


def _header_entry(rel: str, path: Path, pseudonyms: Pseudonymizer, allows: Any) -> dict[str, Any]:
    """What the index keeps of one file: a file-level problem, a SEG's reference, or the slice facts."""
    facts, ds, _ = read_header(rel, path, pseudonyms, "classification")
    if facts.error is None and facts.modality == "SEG" and ds is not None:
        return {"seg": seg_reference(ds), "patient": facts.patient}
    problem = header_reason(facts, allows)
    if problem is not None:
        return {"problem": [problem[0].value, problem[1]]}
    assert ds is not None
    geoms = frame_geometries(ds, rel)
    entry = {"series": facts.series, "study": facts.study, "patient": facts.patient, "modality": facts.modality,
             "multiframe": (facts.num_frames or 1) > 1, "pixel_offset": facts.pixel_offset}
    if isinstance(geoms, str):
        entry["geometry_problem"] = geoms
    else:
        entry["slices"] = [asdict(g) for g in geoms]
    return entry


def build_volume_dataset(cfg: SiteConfig, task: TaskSpec | None = None, *, threshold: int = 5) -> SiteDataset:
    """Index, assemble, check masks, preprocess (cached) and split a volume site's series.

    Parameters
    ----------
    cfg: site configuration with ``kind = "volumes"``.
    task: the run's task (its size, spacing and orientation drive preprocessing); None = check only.
    threshold: small-count suppression threshold of the dataset card.

    Raises
    ------
    ConfigError: unreadable labels CSV, missing columns, bad secret.
    NoUsableImagesError: no series can be used (message with counts only).
    """
    t0 = time.perf_counter()
    pseudonyms = Pseudonymizer.from_file(cfg.secret_file)
    masks_csv = load_mask_table(cfg)
    labelled = cfg.labels_csv is not None
    cache_dir = cfg.cache_dir if task is not None else None
    index = _Index(cfg.cache_dir, pseudonyms.fingerprint())
    pkey = volume_preprocess_key(task) if task is not None else None
    tensors = _Tensors(cache_dir, pkey)
    transform = build_volume_transform(task) if task is not None else None
    n_labels = len(cfg.labels) if cfg.labels else None
    mask_paths = {p for p in masks_csv.values()}
    exclude = tuple(p for p in (cfg.cache_dir, cfg.state_dir, cfg.labels_csv) if p is not None)

    file_q: list[dict[str, str]] = []
    series: dict[str, SeriesFacts] = {}
    kinds: dict[str, set[bool]] = {}
    segs: dict[str, list[str]] = {}
    fkeys: dict[str, str] = {}
    offsets: dict[str, int] = {}
    with _quiet_pydicom():
        for rel, path in iter_files(cfg.dicom_dir, exclude):
            if path.resolve() in mask_paths:
                continue
            try:
                fk = file_key(rel, path.stat())
            except OSError as e:
                file_q.append({"file": rel, "reason": Reason.UNREADABLE.value, "detail": describe(e)})
                continue
            fkeys[rel] = fk
            entry = index.entries.get(fk)
            if entry is None:
                entry = _header_entry(rel, path, pseudonyms, cfg.allows_modality)
                index.entries[fk] = entry
                index.dirty = True
            if "problem" in entry:
                file_q.append({"file": rel, "reason": entry["problem"][0], "detail": entry["problem"][1]})
                continue
            if "seg" in entry:
                labelled = True
                if entry["seg"]:
                    segs.setdefault(entry["seg"], []).append(rel)
                else:
                    file_q.append({"file": rel, "reason": VolumeReason.BAD_MASK.value,
                                   "detail": "DICOM SEG references no source series"})
                continue
            uid = entry["series"] or f"(no SeriesInstanceUID) {rel}"
            s = series.setdefault(uid, SeriesFacts(series=uid, study=entry["study"], patient=entry["patient"],
                                                   modality=entry["modality"]))
            s.files.append(rel)
            offsets[rel] = entry.get("pixel_offset") or 0
            kinds.setdefault(uid, set()).add(bool(entry["multiframe"]))
            if s.problem is None:
                if (entry["study"], entry["patient"], entry["modality"]) != (s.study, s.patient, s.modality):
                    s.problem = (VolumeReason.MIXED_SERIES, f"{rel} belongs to another patient, study or modality "
                                                            "than the rest of its series")
                elif "geometry_problem" in entry:
                    s.problem = (VolumeReason.BAD_GEOMETRY, f"{rel}: {entry['geometry_problem']}")
                else:
                    s.slices.extend(SliceGeometry(**{**g, "position": tuple(g["position"]),
                                                     "orientation": tuple(g["orientation"]),
                                                     "pixel_spacing": tuple(g["pixel_spacing"])})
                                    for g in entry["slices"])
        for uid, s in series.items():
            if s.problem is None and (len(kinds[uid]) > 1 or (True in kinds[uid] and len(s.files) > 1)):
                s.problem = (VolumeReason.MIXED_SERIES, "the series mixes multi-frame and single-frame files, or "
                                                        "spreads over several multi-frame files")
            if s.problem is None and not s.patient:
                s.problem = (VolumeReason.MISSING_PATIENT_ID, "empty PatientID: the series cannot be attributed")

        for ref, rels in sorted(segs.items()):  # every SEG file ends somewhere too
            for n, rel in enumerate(sorted(rels)):
                if ref not in series:
                    file_q.append({"file": rel, "reason": VolumeReason.BAD_MASK.value,
                                   "detail": "DICOM SEG references a series that is not in the data folder"})
                elif n > 0:
                    file_q.append({"file": rel, "reason": Reason.DUPLICATE.value,
                                   "detail": f"a second DICOM SEG for the series of {sorted(rels)[0]}; that one is used"})
            segs[ref] = sorted(rels)

        used: list[dict[str, Any]] = []
        series_q: list[dict[str, Any]] = []
        volumes: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        keep: set[str] = set()
        for uid in sorted(series, key=lambda u: sorted(series[u].files)[0]):
            s = series[uid]
            files = sorted(s.files)
            geo = assemble(s)
            if not isinstance(geo, Assembled):
                series_q.append({"files": files, "reason": geo[0].value, "detail": geo[1]})
                continue
            mask_src: tuple[str, Path] | None = None
            if uid in masks_csv:
                mask_src = ("nifti", masks_csv[uid])
            elif uid in segs:
                mask_src = ("seg", cfg.dicom_dir / segs[uid][0])
            if labelled and mask_src is None:
                series_q.append({"files": files, "reason": VolumeReason.NO_MASK.value,
                                 "detail": "no labels CSV row and no DICOM SEG references this series"})
                continue
            mkey = ""
            if mask_src is not None:
                try:
                    mkey = file_key(str(mask_src[1]), mask_src[1].stat())
                except OSError as e:
                    series_q.append({"files": files, "reason": VolumeReason.BAD_MASK.value,
                                     "detail": f"mask not readable: {describe(e)}"})
                    continue
            skey = hashlib.sha256("|".join([*(fkeys[f] for f in files), mkey]).encode()).hexdigest()[:32]
            result = tensors.get(skey) if task is not None else None
            if result is None:
                result = _decode(cfg, geo, mask_src, n_labels, transform, offsets)
                if task is not None:
                    tensors.put(skey, result)
            keep.add(skey)
            if isinstance(result, dict) and "reason" in result:
                series_q.append({"files": files, **result})
                continue
            image, label, present = result["image"], result["label"], result["present"]
            volumes.append((image, label))
            used.append({"files": files, "patient": s.patient, "study": s.study, "series": uid,
                         "modality": s.modality, "native_shape": list(geo.shape),
                         "native_spacing_mm": [round(float(v), 4) for v in geo.spacing],
                         "mask": None if mask_src is None else mask_src[0], "labels_present": present})

    try:
        index.save(set(fkeys.values()))
        tensors.save(keep)
    except OSError as e:
        log.warning("could not write the volume cache (%s); the next pass will decode again", type(e).__name__)

    assignment = split_patients((u["patient"] for u in used), cfg.val_fraction, cfg.seed)
    for u in used:
        u["split"] = assignment[u["patient"]]
    size = task.size if task is not None else None
    train = _split([i for i, u in enumerate(used) if u["split"] == TRAIN], used, volumes, size)
    val = _split([i for i, u in enumerate(used) if u["split"] == VAL], used, volumes, size)
    quarantined = file_q + series_q
    card = make_volume_card(site=cfg.name, used=used, quarantined=[q["reason"] for q in quarantined],
                            labelled=labelled, label_names=cfg.labels, threshold=threshold,
                            size=list(task.size) if task is not None else None)
    report = {
        "schema": "atoll.ingest-report/1", "kind": "volumes", "data_dir": str(cfg.dicom_dir),
        "labels_csv": str(cfg.labels_csv) if cfg.labels_csv else None, "preprocess_key": pkey,
        "used": [{"files": u["files"], "patient": u["patient"], "split": u["split"], "modality": u["modality"],
                  "native_shape": u["native_shape"], "native_spacing_mm": u["native_spacing_mm"],
                  "mask": u["mask"], "labels_present": u["labels_present"]} for u in used],
        "quarantined": quarantined,
        "cache": {"hits": tensors.hits, "misses": tensors.misses},
        "card": card,
    }
    # the dataset fingerprint of a volume site is keyed over the SeriesInstanceUIDs it trains on (one per volume)
    dataset = SiteDataset(train=train, val=val, card=card, report=report,
                          sop_uids=tuple(sorted(str(u["series"]) for u in used)))
    counts = Counter(q["reason"] for q in quarantined)
    log.info("site %s: %d series used (%d train / %d val patients), %d quarantined %s, cache %d hit / %d miss, %.1fs",
             cfg.name, len(used), train.num_patients, val.num_patients, len(quarantined), dict(sorted(counts.items())),
             tensors.hits, tensors.misses, time.perf_counter() - t0)
    if not used:
        summary = ", ".join(f"{r}: {n}" for r, n in sorted(counts.items())) or "the data folder holds no files"
        raise NoUsableImagesError(f"no usable series at site {cfg.name} ({summary}); "
                                  "run `atoll site check --volumes` with --report on the site for details", dataset)
    return dataset


def _read_volume(cfg: SiteConfig, geo: Assembled, offsets: dict[str, int]) -> np.ndarray:
    """Pixels of the assembled series, in geometric order, after the modality LUT: float32 [slices, rows, cols]."""
    planes: list[np.ndarray] = []
    cache: dict[str, np.ndarray] = {}
    for s in geo.order:
        if s.file not in cache:
            ds = pydicom.dcmread(cfg.dicom_dir / s.file)
            px = ds.pixel_array
            cache[s.file] = modality_lut(ds, px if px.ndim == 3 and int(ds.get("NumberOfFrames", 1) or 1) > 1
                                         else px[None])
        planes.append(cache[s.file][s.frame])
    return np.stack(planes).astype(np.float32)


def _decode(cfg: SiteConfig, geo: Assembled, mask_src: tuple[str, Path] | None, n_labels: int | None,
            transform: Any, offsets: dict[str, int]) -> dict[str, Any]:
    """Decode one series and its mask; ``{"image", "label", "present"}`` or ``{"reason", "detail"}``. Never raises."""
    try:
        volume = _read_volume(cfg, geo, offsets)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - one broken series must never stop the site
        return {"reason": VolumeReason.DECODE_ERROR.value, "detail": describe(e)}
    affine = lps_to_ras(geo.affine_lps)
    labels = None
    if mask_src is not None:
        try:
            mask = read_nifti(mask_src[1]) if mask_src[0] == "nifti" else read_seg(mask_src[1], cfg.labels)
            labels = align_to_image(mask, affine, geo.shape, n_labels, subgrid=mask_src[0] == "seg")
        except MaskError as e:
            return {"reason": e.reason.value, "detail": e.detail}
    present = sorted(int(v) for v in np.unique(labels) if v > 0) if labels is not None else []
    if transform is None:
        return {"image": None, "label": None, "present": present}
    try:
        image, label = preprocess_volume(volume, affine, labels, transform)
    except Exception as e:  # noqa: BLE001
        return {"reason": VolumeReason.DECODE_ERROR.value, "detail": describe(e)}
    return {"image": image, "label": label, "present": present}


def _split(idx: list[int], used: list[dict[str, Any]], volumes: list[Any], size: tuple[int, ...] | None
           ) -> SplitTensors:
    """Stack one split ordered by (patient, first file); labels [N, D, H, W] (-1 everywhere when unlabelled)."""
    idx = sorted(idx, key=lambda i: (used[i]["patient"], used[i]["files"][0]))
    pindex = {p: n for n, p in enumerate(sorted({used[i]["patient"] for i in idx}))}
    patients = torch.tensor([pindex[used[i]["patient"]] for i in idx], dtype=torch.int64)
    if size is None:  # check only: nothing preprocessed
        return SplitTensors(images=torch.zeros((len(idx), 1, 1, 1, 1)), labels=torch.full((len(idx), 1, 1, 1), -1),
                            patients=patients)
    images = torch.stack([volumes[i][0] for i in idx]) if idx else torch.zeros((0, 1, *size))
    labels = torch.stack([volumes[i][1] if volumes[i][1] is not None else torch.full(size, -1, dtype=torch.int64)
                          for i in idx]) if idx else torch.zeros((0, *size), dtype=torch.int64)
    return SplitTensors(images=images, labels=labels, patients=patients)
