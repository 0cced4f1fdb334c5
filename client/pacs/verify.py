"""Is a retrieved object the instance that was asked for, and does it decode as DICOM?

A PACS can hand back a corrupt attachment, a cut stream or another object than the one requested (a mixed-up
storage area, a proxy serving the wrong cache entry). Such an object is quarantined, never mirrored: the reasons
are those of the folder quarantine (:class:`client.ingest.quarantine.Reason`) plus :data:`WRONG_INSTANCE`.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_expected_length

from client.ingest.quarantine import Reason, describe

WRONG_INSTANCE = "WRONG_INSTANCE"  # decodes, but is not the instance that was asked for
RETRIEVE_FAILED = "RETRIEVE_FAILED"  # the PACS failed to serve this one instance (e.g. HTTP 500)
INVALID_UID = "INVALID_UID"  # the PACS listed a SOP Instance UID that is not a DICOM UID
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def valid_uid(uid: str) -> bool:
    """A DICOM UID (digits and dots, at most 64 characters): safe to use as a file name in the mirror."""
    return len(uid) <= 64 and bool(_UID.match(uid))


@dataclass(frozen=True)
class Checked:
    """Outcome for one object: ``sop`` it claims to be (if readable), ``problem`` = (reason, detail) or None."""

    sop: str | None
    problem: tuple[str, str] | None


def _cut_short(ds: pydicom.Dataset) -> str | None:
    """Why the pixel data is incomplete, or None. pydicom reads a cut stream without complaint (a short last value;
    for encapsulated data, only a warning that the delimiter is missing), so the length is checked here."""
    pixels = ds.get("PixelData")
    if pixels is None:
        return "image object without Pixel Data: the stream ends before its pixels" if "Rows" in ds else None
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and ts.is_encapsulated:
        return None  # fragments: completeness is the delimiter warning's business
    try:
        expected = get_expected_length(ds, unit="bytes")
    except Exception:  # noqa: BLE001 - geometry attributes missing or absurd: the ingest quarantines those
        return None
    if len(pixels) < expected:
        return f"Pixel Data holds {len(pixels)} of {expected} bytes: the stream was cut"
    return None


def check_instance(data: bytes, wanted: Mapping[str, tuple[str, str]], asked: str | None = None) -> Checked:
    """Parse ``data`` fully (header and every element, pixels undecoded) and check its UIDs.

    ``wanted``: SOP Instance UID -> (Study, Series Instance UID) as the PACS listed them. ``asked``: the UID this
    object was requested as (WADO-RS per instance); without it (C-MOVE/C-GET deliver a series' objects in any
    order) the object must be one of ``wanted``. An object filed under another study or series than the listing
    says is not what was asked for either.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:  # never shown: they can quote header values
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data))
            sop = str(ds.get("SOPInstanceUID", "") or "").strip()
            where = (str(ds.get("StudyInstanceUID", "") or "").strip(), str(ds.get("SeriesInstanceUID", "") or "").strip())
            cut = _cut_short(ds) or next((str(w.message)[:120] for w in caught if "End of file" in str(w.message)), None)
        if cut:
            return Checked(sop or None, (Reason.TRUNCATED.value, cut))
    except InvalidDicomError:
        return Checked(None, (Reason.NOT_DICOM.value, "no DICOM preamble/File Meta header"))
    except (EOFError, OSError) as e:
        return Checked(None, (Reason.TRUNCATED.value, describe(e)))
    except Exception as e:  # noqa: BLE001 - any parse failure of a damaged object
        return Checked(None, (Reason.CORRUPT_HEADER.value, describe(e)))
    if not sop:
        return Checked(None, (Reason.MISSING_UID.value, "no SOPInstanceUID"))
    if asked is not None and sop != asked:
        return Checked(sop, (WRONG_INSTANCE, "the PACS returned another instance than the one requested"))
    if sop not in wanted:
        return Checked(sop, (WRONG_INSTANCE, "the PACS sent an instance that was not requested"))
    if where != tuple(wanted[sop]):
        return Checked(sop, (WRONG_INSTANCE, "the object belongs to another study or series than the PACS listed"))
    return Checked(sop, None)
