"""Build a site's training data: index -> quarantine -> MONAI preprocess (cached) -> patient split.

One streaming pass over the data folder; each file is decided in a fixed order (header checks, duplicate, label,
decode) so the decision is the same whether or not it came from the cache:

1. header facts (index cache, else one ``stop_before_pixels`` parse) -> header reasons (see ``index.header_reason``)
2. DUPLICATE: the SOPInstanceUID of a file already used (earlier in sorted path order)
3. labels (when a labels CSV is configured): NO_LABEL / BAD_LABEL
4. pixels: tensor cache, else decode the pixel tail + MONAI pipeline -> tensor, or a decode reason

Nothing escapes per file: every exception becomes a quarantine entry. Logs at INFO and above carry counts only.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from client.ingest.cache import IndexCache, TensorCache, file_key
from client.ingest.card import DEFAULT_THRESHOLD, REPORT_SCHEMA, make_card
from client.ingest.index import HeaderFacts, attach_pixel_data, header_reason, iter_files, read_header
from client.ingest.labels import Labels, load_labels
from client.ingest.pseudonyms import Pseudonymizer
from client.ingest.quarantine import Quarantined, Reason, describe, reason_for_decode_error
from client.ingest.split import TRAIN, VAL, split_patients
from client.ingest.transforms import build_preprocess, plain_tensors, preprocess, preprocess_key
from client.site_config import SiteConfig

log = logging.getLogger("atoll.ingest")


@dataclass
class SplitTensors:
    """One split, fully preprocessed, on CPU. ``labels`` is -1 for every image when no labels CSV is configured."""

    images: torch.Tensor  # float32 [N, 1, H, W]
    labels: torch.Tensor  # int64 [N]
    patients: torch.Tensor  # int64 [N], patient index 0..P-1 within this split

    @property
    def num_patients(self) -> int:
        return int(self.patients.unique().numel())

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class SiteDataset:
    """Result of :func:`build_site_dataset`: the splits, the shareable card, the on-site report."""

    train: SplitTensors
    val: SplitTensors
    card: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    sop_uids: tuple[str, ...] = ()  # sorted SOP Instance UIDs of the used images (dataset fingerprint; on site)


class NoUsableImagesError(RuntimeError):
    """No image of the site can be used. The message holds counts only (safe to send); ``dataset`` has the rest."""

    def __init__(self, message: str, dataset: SiteDataset) -> None:
        super().__init__(message)
        self.dataset = dataset


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log lines while ingesting: they can quote header values (names, UIDs).

    Their content is not lost: each problem becomes a reason code (and a detail in the on-site report).
    """
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings(), plain_tensors():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _label_key(f: HeaderFacts, key: str) -> str | None:
    return {"SOPInstanceUID": f.sop, "SeriesInstanceUID": f.series, "StudyInstanceUID": f.study,
            "AccessionNumber": f.accession}[key]


def build_site_dataset(cfg: SiteConfig, *, threshold: int = DEFAULT_THRESHOLD) -> SiteDataset:
    """Index, quarantine, preprocess (with the on-disk cache) and split the site's data.

    Parameters
    ----------
    cfg: validated site configuration.
    threshold: small-cell suppression threshold of the dataset card.

    Raises
    ------
    ConfigError: missing/weak secret, unreadable labels CSV or missing label columns.
    NoUsableImagesError: not a single image is usable (message with counts per reason; no identifiers).
    """
    t0 = time.perf_counter()
    pseudonyms = Pseudonymizer.from_file(cfg.secret_file)
    labels: Labels | None = None
    label_keys: set[str] = set()
    if cfg.labels_csv is not None:
        labels = load_labels(cfg.labels_csv, cfg.label_key, cfg.label_column, cfg.classes)
        label_keys = labels.keys()
    key = preprocess_key(cfg.image_size, cfg.task)
    icache = IndexCache(cfg.cache_dir, pseudonyms.fingerprint(), cfg.task)
    tcache = TensorCache(cfg.cache_dir, key, cfg.image_size)
    pipeline = build_preprocess(cfg.image_size)

    exclude = tuple(p for p in (cfg.cache_dir, cfg.state_dir, cfg.labels_csv) if p is not None)
    quarantined: list[Quarantined] = []
    used: list[dict[str, Any]] = []
    tensors: list[torch.Tensor] = []
    seen_keys: set[str] = set()
    kept_sops: dict[str, str] = {}
    matched_label_keys: set[str] = set()

    with _quiet_pydicom():
        for rel, path in iter_files(cfg.dicom_dir, exclude):
            try:
                st = path.stat()
            except OSError as e:
                quarantined.append(Quarantined(rel, Reason.UNREADABLE, describe(e)))
                continue
            fk = file_key(rel, st)
            seen_keys.add(fk)
            facts = icache.get(fk)
            ds = data = None
            if facts is None:
                facts, ds, data = read_header(rel, path, pseudonyms, cfg.task)
                icache.put(fk, facts)
            if labels is not None and facts.error is None:
                lk = _label_key(facts, cfg.label_key)
                if lk is not None and lk in label_keys:
                    matched_label_keys.add(lk)

            problem, label = _usable(facts, cfg, labels, label_keys, kept_sops)
            if problem is not None:
                quarantined.append(Quarantined(rel, problem[0], problem[1]))
                continue
            assert facts.sop is not None and facts.patient is not None

            result = tcache.get(fk)
            if result is None:
                result = _decode(facts, ds, data, path, rel, pseudonyms, cfg, pipeline)
                tcache.put(fk, result)
            if not isinstance(result, torch.Tensor):
                quarantined.append(Quarantined(rel, Reason(result[0]), result[1]))
                continue
            kept_sops[facts.sop] = rel
            tensors.append(result)
            used.append({"file": rel, "patient": facts.patient, "study": facts.study or rel,
                         "series": facts.series or rel, "modality": facts.modality, "label": label})

    try:
        icache.save(seen_keys)
        tcache.save(seen_keys)
    except OSError as e:
        log.warning("could not write the ingest cache (%s); the next pass will decode again", type(e).__name__)

    assignment = split_patients((u["patient"] for u in used), cfg.val_fraction, cfg.seed)
    for u in used:
        u["split"] = assignment[u["patient"]]
    train = _split_tensors([i for i, u in enumerate(used) if u["split"] == TRAIN], used, tensors, cfg.image_size)
    val = _split_tensors([i for i, u in enumerate(used) if u["split"] == VAL], used, tensors, cfg.image_size)

    unmatched = sorted(label_keys - matched_label_keys) if labels is not None else []
    card = make_card(site=cfg.name, task=cfg.task, image_size=cfg.image_size, used=used,
                     quarantined=[q.reason.value for q in quarantined], labels_unmatched=len(unmatched),
                     labelled=labels is not None, class_names=cfg.classes, threshold=threshold)
    report = {
        "schema": REPORT_SCHEMA,
        "data_dir": str(cfg.dicom_dir),
        "labels_csv": str(cfg.labels_csv) if cfg.labels_csv else None,
        "preprocess_key": key,
        "used": [{"file": u["file"], "patient": u["patient"], "split": u["split"], "modality": u["modality"],
                  "label": u["label"]} for u in used],
        "quarantined": [q.to_json() for q in quarantined],
        "unmatched_labels": [{"key": k, "row": labels.rows.get(k)} for k in unmatched] if labels else [],
        "cache": {"hits": tcache.hits, "misses": tcache.misses},
        "card": card,
    }
    dataset = SiteDataset(train=train, val=val, card=card, report=report, sop_uids=tuple(sorted(kept_sops)))
    counts = Counter(q.reason.value for q in quarantined)
    log.info("site %s: %d images used (%d train / %d val patients), %d quarantined %s, cache %d hit / %d miss, %.1fs",
             cfg.name, len(used), train.num_patients, val.num_patients, len(quarantined), dict(sorted(counts.items())),
             tcache.hits, tcache.misses, time.perf_counter() - t0)
    if not used:
        summary = ", ".join(f"{r}: {n}" for r, n in sorted(counts.items())) or "the data folder holds no files"
        raise NoUsableImagesError(f"no usable image at site {cfg.name} ({summary}); "
                                  "run `atoll site check` with --report on the site for details", dataset)
    return dataset


def _usable(facts: HeaderFacts, cfg: SiteConfig, labels: Labels | None, label_keys: set[str],
            kept_sops: dict[str, str]) -> tuple[tuple[Reason, str] | None, int | None]:
    """Decision before pixels: ``(problem, None)`` or ``(None, label)``; header -> duplicate -> label, in order."""
    problem = header_reason(facts, cfg.allows_modality)
    if problem is None and facts.sop in kept_sops:
        problem = (Reason.DUPLICATE, f"same SOPInstanceUID as the used file {kept_sops[facts.sop]}")
    if problem is not None or labels is None:
        return problem, None
    lk = _label_key(facts, cfg.label_key)
    if lk is None or lk not in label_keys:
        return (Reason.NO_LABEL, f"no row in the labels CSV for this image's {cfg.label_key}"), None
    if lk in labels.bad:
        return (Reason.BAD_LABEL, labels.bad[lk]), None
    return None, labels.by_key[lk]


def _decode(facts: HeaderFacts, ds: Any, data: bytes | None, path: Path, rel: str, pseudonyms: Pseudonymizer,
            cfg: SiteConfig, pipeline: Any) -> torch.Tensor | tuple[str, str]:
    """Pixels -> tensor, or ``(reason, detail)``; never raises (except KeyboardInterrupt/SystemExit)."""
    try:
        if ds is None:  # header came from the index cache: read the file once more
            _, ds, data = read_header(rel, path, pseudonyms, cfg.task)
            if ds is None:
                return (Reason.UNREADABLE.value, "file changed or vanished while ingesting")
        full = attach_pixel_data(ds, data, path, facts.pixel_offset or 0)
        if not any(k in full for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            # The header parse stopped at a Pixel Data tag, but the element could not be read: cut short.
            return (Reason.TRUNCATED.value, "Pixel Data element starts but the file ends before it does")
        return preprocess(full, pipeline, cfg.image_size)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - a broken file must never stop the site; Rust decoder plugins
        # (pylibjpeg-rle via pyo3) raise PanicException, which derives from BaseException, on corrupt input.
        return (reason_for_decode_error(e).value, describe(e))


def _split_tensors(idx: list[int], used: list[dict[str, Any]], tensors: list[torch.Tensor], size: int) -> SplitTensors:
    """Stack one split, ordered by (patient pseudonym, file); patient indices 0..P-1 in that order."""
    idx = sorted(idx, key=lambda i: (used[i]["patient"], used[i]["file"]))
    patients = sorted({used[i]["patient"] for i in idx})
    pindex = {p: n for n, p in enumerate(patients)}
    images = torch.stack([tensors[i] for i in idx]) if idx else torch.zeros((0, 1, size, size), dtype=torch.float32)
    labels = torch.tensor([-1 if used[i]["label"] is None else used[i]["label"] for i in idx], dtype=torch.int64)
    pats = torch.tensor([pindex[used[i]["patient"]] for i in idx], dtype=torch.int64)
    return SplitTensors(images=images, labels=labels, patients=pats)
