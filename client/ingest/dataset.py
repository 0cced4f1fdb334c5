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
import shlex
import stat
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from client.ingest.cache import IndexCache, TensorCache, file_key
from client.ingest.card import DEFAULT_THRESHOLD, REPORT_SCHEMA, make_card
from client.ingest.index import HeaderFacts, attach_pixel_data, header_reason, iter_files, read_header
from client.ingest.labels import Labels, load_labels
from client.ingest.pseudonyms import Pseudonymizer
from client.ingest.quarantine import (Quarantined, Reason, describe, has_bad_name, printable_name,
                                      reason_for_decode_error)
from client.ingest.split import TRAIN, VAL, split_patients
from client.ingest.transforms import build_preprocess, plain_tensors, preprocess, preprocess_key
from client.site_config import SiteConfig, setting_name

if TYPE_CHECKING:  # pragma: no cover - typing only; rich is imported where a bar is shown
    from rich.progress import Progress

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


def build_site_dataset(cfg: SiteConfig, *, threshold: int = DEFAULT_THRESHOLD,
                       progress: "Progress | None" = None) -> SiteDataset:
    """Index, quarantine, preprocess (with the on-disk cache) and split the site's data.

    Parameters
    ----------
    cfg: validated site configuration.
    threshold: small-cell suppression threshold of the dataset card.
    progress: a ``rich`` progress display to advance per file (see :func:`client.ingest.progress.ingest_progress`);
        ``None`` shows nothing. Its text holds counts only.

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
        labels = load_labels(cfg.labels_csv, cfg.label_key, cfg.label_column, cfg.classes,
                             setting=lambda k: setting_name(cfg, k))
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

    walk_errors: list[tuple[str, OSError]] = []
    files = list(iter_files(cfg.dicom_dir, exclude, walk_errors))  # listed first: the progress bar needs a total
    task = progress.add_task("Indexing and caching DICOM", total=len(files)) if progress is not None else None
    modalities_setting = setting_name(cfg, "modalities")
    with _quiet_pydicom():
        for rel, path in files:
            if task is not None:
                progress.advance(task)
            if has_bad_name(rel):  # cannot be keyed, cached or reported as UTF-8: one file out, not the site
                quarantined.append(Quarantined(printable_name(rel), Reason.BAD_FILE_NAME,
                                               "the file or folder name is not valid UTF-8; rename it"))
                continue
            try:
                st = path.stat()
            except OSError as e:
                quarantined.append(Quarantined(rel, Reason.UNREADABLE, describe(e)))
                continue
            if not stat.S_ISREG(st.st_mode):  # reading a named pipe or a device would block or never end
                quarantined.append(Quarantined(rel, Reason.UNREADABLE,
                                               "not a regular file (named pipe, socket or device)"))
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

            problem, label = _usable(facts, cfg, labels, label_keys, kept_sops, modalities_setting)
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

    for rel, e in walk_errors:
        quarantined.append(Quarantined(printable_name(rel), Reason.UNREADABLE, f"folder cannot be listed: {describe(e)}"))
    if task is not None:
        progress.update(task, description="Writing the ingest cache")
    try:
        icache.save(seen_keys)
        tcache.save(seen_keys)
    except OSError as e:
        log.warning("could not write the ingest cache (%s); the next pass will decode again", type(e).__name__)
    if task is not None:
        progress.update(task, description="Indexed and cached DICOM")

    assignment = split_patients((u["patient"] for u in used), cfg.val_fraction, cfg.seed)
    for u in used:
        u["split"] = assignment[u["patient"]]
    train = _split_tensors([i for i, u in enumerate(used) if u["split"] == TRAIN], used, tensors, cfg.image_size)
    val = _split_tensors([i for i, u in enumerate(used) if u["split"] == VAL], used, tensors, cfg.image_size)

    unmatched = sorted(label_keys - matched_label_keys) if labels is not None else []
    card = make_card(site=cfg.name, task=cfg.task, image_size=cfg.image_size, used=used,
                     quarantined=[q.reason.value for q in quarantined], labels_unmatched=len(unmatched),
                     labelled=labels is not None, class_names=cfg.classes, threshold=threshold)
    hints = _label_hints(cfg, labels)
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
        "hints": [local for _, local in hints],
        "card": card,
    }
    dataset = SiteDataset(train=train, val=val, card=card, report=report, sop_uids=tuple(sorted(kept_sops)))
    counts = Counter(q.reason.value for q in quarantined)
    patients = (f"{train.num_patients + val.num_patients} patients"
                + (f" ({train.num_patients} train / {val.num_patients} validation)" if cfg.val_fraction > 0 else ""))
    log.info("site %s: %d images used, %s; cache %d hit / %d miss; %.1fs", cfg.name, len(used), patients,
             tcache.hits, tcache.misses, time.perf_counter() - t0)
    if quarantined:  # counts and reason codes only: file names stay in the on-site report
        log.warning("site %s: %s quarantined (%s); `atoll site check --report FILE` lists the reason for each file",
                    cfg.name, _plural(len(quarantined), "file"), quarantine_summary(counts))
    if not used:
        summary = quarantine_summary(counts, sep=": ") or "the data folder holds no files"
        fix = "".join(f"; {public}" for public, _ in hints)
        raise NoUsableImagesError(f"no usable image at site {cfg.name} ({summary}){fix}; "
                                  "run `atoll site check` with --report on the site for details", dataset)
    return dataset


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def quarantine_summary(counts: Mapping[str, int], sep: str = " ") -> str:
    """``"CORRUPT_HEADER 2, NOT_DICOM 1"``: reason codes by count, most frequent first (no file names)."""
    return ", ".join(f"{r}{sep}{n}" for r, n in sorted(counts.items(), key=lambda rn: (-rn[1], rn[0])))


def _label_hints(cfg: SiteConfig, labels: Labels | None) -> list[tuple[str, str]]:
    """How to fix labels that are class names while no classes are set: ``(public, local)`` pairs.

    The public form (it may cross the wire inside :class:`NoUsableImagesError`) names the settings only; the
    local form (on-site report and terminal) quotes the class names found, as a command to copy.
    """
    if labels is None or cfg.classes or not labels.text_values:
        return []
    public = ("the labels are class names but no classes are set: set [data].classes in the site TOML "
              "(--classes with `atoll site check --data`)")
    names = sorted(labels.text_values)
    if len(names) > 10:
        return [(public, f"{len(names)} different text labels in {cfg.label_column!r} (e.g. "
                         f"{', '.join(map(repr, names[:3]))}): is {setting_name(cfg, 'label_column')} the label column?")]
    toml = ", ".join(f'"{n}"' for n in names)
    shell = " ".join(shlex.quote(n) for n in names)
    fix = (f"add --classes {shell} (in a site TOML: classes = [{toml}] under [data], i.e. [data].classes)"
           if cfg.path is None else f"add classes = [{toml}] under [data] in {cfg.path} ([data].classes)")
    return [(public, f"the labels are class names ({', '.join(names)}) but no classes are set: {fix}; the order "
                     "fixes each class's index, so use the same order at every site")]


def _usable(facts: HeaderFacts, cfg: SiteConfig, labels: Labels | None, label_keys: set[str],
            kept_sops: dict[str, str], modalities_setting: str) -> tuple[tuple[Reason, str] | None, int | None]:
    """Decision before pixels: ``(problem, None)`` or ``(None, label)``; header -> duplicate -> label, in order."""
    problem = header_reason(facts, cfg.allows_modality, modalities_setting)
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
