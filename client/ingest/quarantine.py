"""Quarantine reason codes: why a file found in the data folder is not used for training.

Every file under the data folder ends either *used* or *quarantined* with exactly one :class:`Reason`; nothing is
dropped silently and nothing crashes the site. The codes (not the details) are what the dataset card counts; the
details (which may name files) stay in the on-site report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum


class Reason(str, Enum):
    """Why a file is not used. Values are stable strings (they appear in reports and cards)."""

    UNREADABLE = "UNREADABLE"  # the OS refused to read it (permissions, I/O error)
    NOT_DICOM = "NOT_DICOM"  # no DICOM Part 10 preamble/File Meta (text, image, zip, zero-length ...)
    CORRUPT_HEADER = "CORRUPT_HEADER"  # starts as DICOM but the header cannot be parsed
    TRUNCATED = "TRUNCATED"  # file ends before its pixel data does
    NO_PIXEL_DATA = "NO_PIXEL_DATA"  # a non-image object (SR, RT plan, DICOMDIR, ECG ...)
    MISSING_UID = "MISSING_UID"  # no SOPInstanceUID: cannot be deduplicated or labelled
    MISSING_PATIENT_ID = "MISSING_PATIENT_ID"  # no PatientID: patient-level privacy cannot be guaranteed
    UNSUPPORTED_TRANSFER_SYNTAX = "UNSUPPORTED_TRANSFER_SYNTAX"  # no installed pixel-data plugin decodes it
    BURNED_IN_ANNOTATION = "BURNED_IN_ANNOTATION"  # BurnedInAnnotation = YES (text such as names in the pixels)
    MODALITY_NOT_ALLOWED = "MODALITY_NOT_ALLOWED"  # modality not in [data].modalities
    UNSUPPORTED_PHOTOMETRIC = "UNSUPPORTED_PHOTOMETRIC"  # photometric interpretation we do not convert
    BAD_GEOMETRY = "BAD_GEOMETRY"  # rows/columns/frames/samples missing, zero, inconsistent or absurd
    DUPLICATE = "DUPLICATE"  # same SOPInstanceUID as a file that is kept
    NO_LABEL = "NO_LABEL"  # labels given, but none matches this image
    BAD_LABEL = "BAD_LABEL"  # a label matches but its value is not a known class, or keys disagree
    DECODE_ERROR = "DECODE_ERROR"  # a plugin exists but decoding or preprocessing failed
    BAD_FILE_NAME = "BAD_FILE_NAME"  # the file's name (or a folder's) is not valid UTF-8: it cannot be keyed


def printable_name(rel: str) -> str:
    """A file name as the on-site report can hold it: undecodable bytes shown as ``\\xff`` escapes.

    ``os.walk`` hands back undecodable bytes as lone surrogates, which no UTF-8 writer (JSON report, cache key,
    log handler) accepts; the escaped form lets the admin find the file.
    """
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def has_bad_name(rel: str) -> bool:
    """Whether ``rel`` holds bytes that are not UTF-8 (surrogate escapes from the file system)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@dataclass(frozen=True)
class Quarantined:
    """One quarantined file: path relative to the data folder, reason code, human detail (on-site only)."""

    file: str
    reason: Reason
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason.value, "detail": self.detail}


_TRUNCATION_HINTS = ("less than expected", "end of file", "truncat", "too short", "unexpected eof", "insufficient")


def root_cause(exc: BaseException) -> BaseException:
    """Innermost cause (MONAI's ``Compose`` re-raises a transform's error as ``RuntimeError`` from it)."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def reason_for_decode_error(exc: BaseException) -> Reason:
    """Map an exception raised while decoding/preprocessing pixels to a reason code."""
    exc = root_cause(exc)
    msg = str(exc).lower()
    if isinstance(exc, NotImplementedError):
        return Reason.UNSUPPORTED_TRANSFER_SYNTAX
    if isinstance(exc, EOFError) or any(h in msg for h in _TRUNCATION_HINTS):
        return Reason.TRUNCATED
    if "no 'pixel data'" in msg or "no pixel data" in msg:
        return Reason.NO_PIXEL_DATA
    if isinstance(exc, MemoryError):
        return Reason.BAD_GEOMETRY
    return Reason.DECODE_ERROR


def describe(exc: BaseException, limit: int = 300) -> str:
    """Short one-line description of an exception for the on-site report (never used in logs or cards)."""
    exc = root_cause(exc)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}"
