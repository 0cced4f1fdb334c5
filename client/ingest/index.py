"""Header-only indexing of a PACS export: what each file is, and whether it can be used.

Each file is parsed once with ``stop_before_pixels=True``. The parse stops *at* the Pixel Data element, so the
stream position tells whether pixel data exists (a non-image SR, RT plan or DICOMDIR is read to the end) and where
it starts; :func:`attach_pixel_data` later parses only that tail instead of re-parsing the whole header.

Only the facts needed downstream are kept (:class:`HeaderFacts`), JSON-serialisable for the on-site index cache.
The PatientID is turned into its HMAC pseudonym immediately and never stored.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from client.ingest.pseudonyms import Pseudonymizer
from client.ingest.quarantine import Reason, describe

#: Files up to this size are read into memory once (header parse + pixel tail from the same bytes).
IN_MEMORY_MAX_BYTES = 32 * 1024 * 1024
#: Refuse to decode a frame larger than this (a bit-flipped Rows/Columns must not exhaust memory).
MAX_FRAME_BYTES = 1 << 30
#: Bump when HeaderFacts or their extraction change (invalidates the index cache).
INDEX_VERSION = 2

GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
SUPPORTED_PHOTOMETRIC: tuple[str, ...] = GREY + COLOUR
DEFLATED = ("1.2.840.10008.1.2.1.99",)

#: Per task, header attributes that must be present (the 2D classification task needs only rows/columns).
TASK_REQUIRED_ATTRIBUTES: dict[str, tuple[str, ...]] = {"classification": ()}


@dataclass
class HeaderFacts:
    """What indexing learned about one file (no raw PatientID; UIDs stay on site in the index cache/report)."""

    file: str  # path relative to the data folder, POSIX separators
    error: tuple[str, str] | None = None  # (reason, detail) when the header itself could not be read
    sop: str | None = None
    series: str | None = None
    study: str | None = None
    accession: str | None = None
    patient: str | None = None  # HMAC pseudonym of PatientID
    modality: str | None = None
    photometric: str | None = None
    rows: int | None = None
    columns: int | None = None
    samples: int | None = None
    frames: Any = None  # int, or the raw (invalid) text
    bits_allocated: int | None = None
    transfer_syntax: str | None = None
    burned_in: str | None = None
    sop_class: str | None = None
    pixel_offset: int | None = None  # byte offset of the Pixel Data element, None if absent
    required_missing: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "HeaderFacts":
        d = dict(d)
        if d.get("error") is not None:
            d["error"] = tuple(d["error"])
        d["required_missing"] = tuple(d.get("required_missing") or ())
        return cls(**d)

    @property
    def num_frames(self) -> int:
        return self.frames if isinstance(self.frames, int) else 1


def _resolve(p: Path) -> Path | None:
    try:
        return p.resolve()
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
        return None


def iter_files(root: Path, exclude: tuple[Path, ...] = (),
               errors: list[tuple[str, OSError]] | None = None) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative POSIX path, absolute path)`` for every file under ``root``, sorted, skipping ``exclude``.

    ``exclude`` holds the cache/state folders and the labels file when they live inside the data folder.
    Folders that cannot be listed are appended to ``errors`` as ``(relative path, error)`` (nothing is skipped
    silently). Symbolic links to folders are not followed (a link loop cannot trap the walk).
    """
    excl = {r for r in map(_resolve, exclude) if r is not None}
    excl_names = {p.name for p in excl}

    def onerror(e: OSError) -> None:
        if errors is not None and e.filename is not None:
            rel = Path(e.filename).relative_to(root).as_posix() if Path(e.filename) != root else "."
            errors.append((rel + "/", e))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=onerror):
        d = Path(dirpath)
        prefix = d.relative_to(root).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        dirnames[:] = sorted(n for n in dirnames if n not in excl_names or _resolve(d / n) not in excl)
        for name in sorted(filenames):
            p = d / name
            if name in excl_names and _resolve(p) in excl:  # resolve (a syscall per level) only on a name match
                continue
            yield prefix + name, p


def _get(ds: Dataset, keyword: str) -> Any:
    """Read one attribute defensively: a corrupt value yields None rather than an exception."""
    try:
        v = ds.get(keyword)
    except Exception:
        return None
    if v is None or v == "":
        return None
    return v


def _text(ds: Dataset, keyword: str) -> str | None:
    v = _get(ds, keyword)
    if v is None:
        return None
    s = str(v).strip().strip("\x00").strip()
    return s or None


def _int(ds: Dataset, keyword: str) -> Any:
    try:
        v = ds.get(keyword)
        return None if v is None or v == "" else int(v)
    except Exception:
        try:
            raw = ds[keyword].value if keyword in ds else None
        except Exception:
            raw = None
        return "invalid" if raw is None else str(raw)[:32]


def read_header(rel: str, path: Path, pseudonyms: Pseudonymizer, task: str) -> tuple[HeaderFacts, Dataset | None, bytes | None]:
    """Parse one file's header (never raises).

    Returns
    -------
    (facts, header dataset or None, file bytes when read into memory else None); the dataset and bytes let the
    caller decode pixels without reading or parsing the file again.
    """
    try:
        size = path.stat().st_size
        if size == 0:
            return HeaderFacts(rel, error=(Reason.NOT_DICOM.value, "empty file (0 bytes)")), None, None
        if size <= IN_MEMORY_MAX_BYTES:
            data: bytes | None = path.read_bytes()
            fp: Any = io.BytesIO(data)
        else:
            data, fp = None, open(path, "rb")
    except OSError as e:
        return HeaderFacts(rel, error=(Reason.UNREADABLE.value, describe(e))), None, None
    try:
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            pos = fp.tell()
        except InvalidDicomError:
            return HeaderFacts(rel, error=(Reason.NOT_DICOM.value, "no DICOM preamble/File Meta header")), None, None
        except (EOFError, OSError) as e:
            return HeaderFacts(rel, error=(Reason.TRUNCATED.value, describe(e))), None, None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # any parse failure of a damaged header (incl. plugin panics)
            return HeaderFacts(rel, error=(Reason.CORRUPT_HEADER.value, describe(e))), None, None
    finally:
        if data is None:
            fp.close()
    try:
        facts = _facts(rel, ds, pos, size, pseudonyms, task)
    except Exception as e:  # attribute access on a damaged dataset
        return HeaderFacts(rel, error=(Reason.CORRUPT_HEADER.value, describe(e))), None, None
    return facts, ds, data


def _facts(rel: str, ds: Dataset, pos: int, size: int, pseudonyms: Pseudonymizer, task: str) -> HeaderFacts:
    meta = getattr(ds, "file_meta", None)
    ts = _text(meta, "TransferSyntaxUID") if meta is not None else None
    pid = _text(ds, "PatientID")
    # A header cut short can end before SOPClassUID; the File Meta copy still says what the object is.
    sop_class = _text(ds, "SOPClassUID") or (_text(meta, "MediaStorageSOPClassUID") if meta is not None else None)
    deflated = ts in DEFLATED
    return HeaderFacts(
        file=rel,
        sop=_text(ds, "SOPInstanceUID"),
        series=_text(ds, "SeriesInstanceUID"),
        study=_text(ds, "StudyInstanceUID"),
        accession=_text(ds, "AccessionNumber"),
        patient=pseudonyms.patient(pid) if pid else None,
        modality=(_text(ds, "Modality") or "").upper() or None,
        photometric=(_text(ds, "PhotometricInterpretation") or "").upper() or None,
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        samples=_int(ds, "SamplesPerPixel"),
        frames=_int(ds, "NumberOfFrames"),
        bits_allocated=_int(ds, "BitsAllocated"),
        transfer_syntax=ts,
        burned_in=(_text(ds, "BurnedInAnnotation") or "").upper() or None,
        sop_class=UID(sop_class).name if sop_class else None,
        # Deflated files are parsed from an inflated copy, so the position says nothing: assume pixels, let decode tell.
        pixel_offset=0 if deflated else (pos if pos < size else None),
        required_missing=tuple(k for k in TASK_REQUIRED_ATTRIBUTES.get(task, ()) if _get(ds, k) is None),
    )


def header_reason(f: HeaderFacts, allows_modality: Any,
                  modalities_setting: str = "[data].modalities") -> tuple[Reason, str] | None:
    """First reason (in a fixed order) why a file cannot be used, judged from its header alone; None if usable.

    ``modalities_setting`` names the setting in the detail (``--modalities`` in a first look).
    """
    if f.error is not None:
        return Reason(f.error[0]), f.error[1]
    if f.pixel_offset is None:
        image_like = f.rows is not None or f.columns is not None or "Image Storage" in (f.sop_class or "")
        if image_like:  # an image object without pixels: a copy cut short (or pixels stripped by a tool)
            return Reason.TRUNCATED, "image object without Pixel Data: the file ends before its pixels"
        return Reason.NO_PIXEL_DATA, f"no Pixel Data (object type: {f.sop_class or 'unknown'})"
    if not f.sop:
        return Reason.MISSING_UID, "no SOPInstanceUID"
    if not allows_modality(f.modality):
        return Reason.MODALITY_NOT_ALLOWED, f"modality {f.modality or '(missing)'} is not in {modalities_setting}"
    if f.burned_in == "YES":
        return Reason.BURNED_IN_ANNOTATION, "BurnedInAnnotation = YES"
    if not f.patient:
        return Reason.MISSING_PATIENT_ID, "empty PatientID: images cannot be attributed to a patient"
    if f.photometric not in SUPPORTED_PHOTOMETRIC:
        return Reason.UNSUPPORTED_PHOTOMETRIC, f"photometric interpretation {f.photometric or '(missing)'} is not supported"
    geometry = _geometry_problem(f)
    if geometry:
        return Reason.BAD_GEOMETRY, geometry
    ts_problem = transfer_syntax_problem(f.transfer_syntax)
    if ts_problem:
        return Reason.UNSUPPORTED_TRANSFER_SYNTAX, ts_problem
    return None


def _geometry_problem(f: HeaderFacts) -> str | None:
    for name, v in (("Rows", f.rows), ("Columns", f.columns)):
        if not isinstance(v, int) or v <= 0:
            return f"{name} is missing or not a positive integer ({v!r})"
    if f.frames is not None and (not isinstance(f.frames, int) or f.frames < 1):
        return f"NumberOfFrames is not a positive integer ({f.frames!r})"
    expected = 1 if f.photometric in GREY + ("PALETTE COLOR",) else 3
    if f.samples != expected:
        return f"SamplesPerPixel {f.samples!r} does not match {f.photometric} (expected {expected})"
    if f.bits_allocated not in (1, 8, 16, 32, 64):
        return f"BitsAllocated {f.bits_allocated!r} is not 1, 8, 16, 32 or 64"
    assert isinstance(f.rows, int) and isinstance(f.columns, int)
    if f.rows * f.columns * expected * max(f.bits_allocated // 8, 1) > MAX_FRAME_BYTES:
        return f"frame of {f.rows}x{f.columns} is implausibly large"
    if f.required_missing:
        return f"missing attributes required by the task: {', '.join(f.required_missing)}"
    return None


_TS_CACHE: dict[str | None, str | None] = {}


def transfer_syntax_problem(ts: str | None) -> str | None:
    """None when an installed pixel-data plugin can decode ``ts``; otherwise what is missing."""
    if ts not in _TS_CACHE:
        _TS_CACHE[ts] = _ts_problem(ts)
    return _TS_CACHE[ts]


def _ts_problem(ts: str | None) -> str | None:
    if not ts:
        return "File Meta has no Transfer Syntax UID"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return f"no pixel-data decoder exists for transfer syntax {UID(ts).name}"
    if not decoder.is_available:
        missing = "; ".join(getattr(decoder, "missing_dependencies", []) or [])
        return f"transfer syntax {UID(ts).name} needs a plugin that is not installed ({missing})"
    return None


def attach_pixel_data(ds: Dataset, data: bytes | None, path: Path, pixel_offset: int) -> Dataset:
    """Return a dataset with pixel data: parse only the tail after ``pixel_offset`` when possible.

    Falls back to a full ``dcmread`` for deflated files, files read from disk, or when the tail does not parse
    (the full read then reports the real problem to the decoder).
    """
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if data is not None and ts not in DEFLATED and pixel_offset > 0:
        try:
            implicit, little = ds.original_encoding
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tail = read_dataset(io.BytesIO(data[pixel_offset:]), implicit, little)
            if len(tail):
                ds.update(tail)
                return ds
        except Exception:
            pass
    src: Any = io.BytesIO(data) if data is not None else path
    return pydicom.dcmread(src)
