"""The ``[data.source]`` table: which PACS a site pulls from, how it authenticates, and what it asks for.

Parsed by :func:`parse_source`, which :mod:`client.site_config` registers as the parser of ``[data].source`` (a
TOML sub-table). Validation follows the rest of the site config: an unknown key, a wrong type, a missing file or a
secret other users can read is a :class:`~client.site_config.ConfigError` naming the file, ``[data.source].key``
and what to do. Nothing here opens a connection.

Two kinds::

    [data.source]                       [data.source]
    kind = "dicomweb"                   kind = "dimse"
    url = "https://pacs/dicom-web"      host = "pacs.hospital.local"
    username = "atoll"                  port = 104
    password_file = "pacs.password"     called_ae = "PACS"
    modality = ["CR", "DX"]             calling_ae = "ATOLL"
    study_date = "20190101-20231231"    retrieve = "move"          # or "get"
                                        move_port = 11113          # Atoll's own storage SCP (C-MOVE)

The query (``modality``, ``study_date``, ``study_description``, ``series_description``) is sent to the PACS and
evaluated there (QIDO-RS / C-FIND), so the site only pulls what it means to use.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import urlsplit

from client.site_config import (ANY_MODALITY, ConfigError, _choice, _Ctx, _fail, _int, _modalities, _path, _str,
                                _type_name)

KINDS: tuple[str, ...] = ("dicomweb", "dimse")
RETRIEVE: tuple[str, ...] = ("move", "get")
DEFAULT_TIMEOUT_S = 30
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash, at most 16 characters
_DATE = re.compile(r"^(\d{8})?-?(\d{8})?$")
_PATTERN = re.compile(r"^[^\\\x00-\x1f]{1,64}$")


@dataclass(frozen=True)
class SourceQuery:
    """What the site shares, as the PACS evaluates it. ``modalities`` empty means any modality."""

    modalities: tuple[str, ...] | None = None  # None: take [data].modalities (filled in by the site config)
    study_date: str | None = None  # DICOM range: "YYYYMMDD-YYYYMMDD", "YYYYMMDD-", "-YYYYMMDD" or "YYYYMMDD"
    study_description: str | None = None  # DICOM wildcard pattern (* and ?)
    series_description: str | None = None


@dataclass(frozen=True)
class DicomWebSource:
    """A DICOMweb server (QIDO-RS to list, WADO-RS to retrieve)."""

    url: str
    query: SourceQuery
    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    timeout: int = DEFAULT_TIMEOUT_S
    kind: Literal["dicomweb"] = "dicomweb"

    def describe(self) -> str:
        """How messages name this source (on-site only: never sent to the consortium)."""
        return f"dicomweb source {self.url}"


@dataclass(frozen=True)
class DimseSource:
    """A DIMSE peer (C-FIND to list; C-MOVE to Atoll's own storage SCP, or C-GET on the same association)."""

    host: str
    port: int
    called_ae: str
    calling_ae: str
    query: SourceQuery
    retrieve: Literal["move", "get"] = "move"
    move_ae: str | None = None  # the AE title the PACS sends to (default: calling_ae)
    move_port: int | None = None  # where Atoll's storage SCP listens during a pull
    timeout: int = DEFAULT_TIMEOUT_S
    kind: Literal["dimse"] = "dimse"

    def describe(self) -> str:
        return f"dimse source {self.called_ae}@{self.host}:{self.port}"


PacsSource = Union[DicomWebSource, DimseSource]


# --------------------------------------------------------------------------------------------------------------
# Key parsers (same style as client.site_config)
# --------------------------------------------------------------------------------------------------------------
def _url(v: Any, where: str, ctx: _Ctx) -> str:
    s = _str(v, where, ctx).rstrip("/")
    parts = urlsplit(s)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail(ctx, where, f"expected the DICOMweb root as an http(s) URL, e.g. "
                                f"\"https://pacs.hospital.local/dicom-web\", got {s!r}")
    if parts.username or parts.password:
        raise _fail(ctx, where, "the URL must not hold credentials; put the user in `username` and the password "
                                "in a file named by `password_file` (mode 600)")
    if parts.query or parts.fragment:
        raise _fail(ctx, where, "the URL must be the DICOMweb root, without ?query or #fragment")
    return s


def _ae(v: Any, where: str, ctx: _Ctx) -> str:
    s = _str(v, where, ctx)
    if not _AE.match(s):
        raise _fail(ctx, where, f"an AE title is 1 to 16 printable ASCII characters without backslash, got {s!r}")
    return s


def _host(v: Any, where: str, ctx: _Ctx) -> str:
    s = _str(v, where, ctx)
    if any(c.isspace() for c in s) or "/" in s:
        raise _fail(ctx, where, f"expected a host name or IP address, got {s!r}")
    return s


def _secret_file(v: Any, where: str, ctx: _Ctx) -> Path:
    """A credential file: must exist, be a regular non-empty file and be readable by the site's user alone."""
    p = _path(must_exist=True, kind="file")(v, where, ctx)
    st = p.stat()
    if os.name == "posix" and st.st_mode & 0o077:
        raise _fail(ctx, where, f"{p} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                                f"run: chmod 600 {p}")
    if st.st_size == 0:
        raise _fail(ctx, where, f"{p} is empty; write the credential into it (one line)")
    return p


def _study_date(v: Any, where: str, ctx: _Ctx) -> str:
    s = _str(v, where, ctx).replace(" ", "")
    m = _DATE.match(s)
    if not m or not (m.group(1) or m.group(2)) or (m.group(1) and m.group(2) and "-" not in s):
        raise _fail(ctx, where, f'expected a DICOM date range such as "20190101-20231231", "20190101-" or '
                                f'"-20231231", got {s!r}')
    for d in (m.group(1), m.group(2)):
        if d:
            try:
                dt.datetime.strptime(d, "%Y%m%d")
            except ValueError:
                raise _fail(ctx, where, f"{d} is not a calendar date (YYYYMMDD)") from None
    if m.group(1) and m.group(2) and m.group(1) > m.group(2):
        raise _fail(ctx, where, f"the range starts after it ends ({s})")
    return s


def _pattern(v: Any, where: str, ctx: _Ctx) -> str:
    s = _str(v, where, ctx)
    if not _PATTERN.match(s):
        raise _fail(ctx, where, f"expected a description pattern of at most 64 characters (wildcards * and ?, "
                                f"no backslash), got {s!r}")
    return s


def _modality_list(v: Any, where: str, ctx: _Ctx) -> tuple[str, ...]:
    return _modalities([v] if isinstance(v, str) else v, where, ctx)


_QUERY_KEYS = {
    "modality": _modality_list,
    "study_date": _study_date,
    "study_description": _pattern,
    "series_description": _pattern,
}
_COMMON_KEYS = {"kind": _choice(KINDS), "timeout": _int(1, 3600), **_QUERY_KEYS}
KEYS: dict[str, dict[str, Any]] = {
    "dicomweb": {**_COMMON_KEYS, "url": _url, "username": _str, "password_file": _secret_file,
                 "token_file": _secret_file, "ca_file": _path(must_exist=True, kind="file")},
    "dimse": {**_COMMON_KEYS, "host": _host, "port": _int(1, 65535), "called_ae": _ae, "calling_ae": _ae,
              "retrieve": _choice(RETRIEVE), "move_ae": _ae, "move_port": _int(1, 65535)},
}
REQUIRED: dict[str, tuple[str, ...]] = {"dicomweb": ("url",), "dimse": ("host", "port", "called_ae", "calling_ae")}


def parse_source(v: Any, where: str, ctx: _Ctx) -> PacsSource:
    """Parse the ``[data.source]`` table (registered in ``client.site_config.SECTIONS["data"]["source"]``)."""
    where = "[data.source]" if where == "[data].source" else where
    if not isinstance(v, dict):
        raise _fail(ctx, where, f"expected a table, got {_type_name(v)}; write it as [data.source]")
    if "kind" not in v:
        raise _fail(ctx, f"{where}.kind", f"missing required key; add `kind = \"dicomweb\"` or `kind = \"dimse\"`")
    kind = _choice(KINDS)(v["kind"], f"{where}.kind", ctx)
    keys = KEYS[kind]
    for key in v:
        if key not in keys:
            other = next((k for k in KINDS if k != kind and key in KEYS[k]), None)
            hint = f" (it belongs to kind = \"{other}\")" if other else ""
            raise _fail(ctx, f"{where}.{key}", f"unknown key for kind = \"{kind}\"{hint}; allowed keys are "
                                               f"{', '.join(keys)}")
    for key in REQUIRED[kind]:
        if key not in v:
            raise _fail(ctx, f"{where}.{key}", f"missing required key for kind = \"{kind}\"; add `{key} = ...`")
    val = {k: keys[k](x, f"{where}.{k}", ctx) for k, x in v.items() if k != "kind"}
    query = SourceQuery(modalities=val.pop("modality", None), study_date=val.pop("study_date", None),
                        study_description=val.pop("study_description", None),
                        series_description=val.pop("series_description", None))
    timeout = val.pop("timeout", DEFAULT_TIMEOUT_S)
    if kind == "dicomweb":
        return _dicomweb(val, query, timeout, where, ctx)
    return _dimse(val, query, timeout, where, ctx)


def _dicomweb(val: dict[str, Any], query: SourceQuery, timeout: int, where: str, ctx: _Ctx) -> DicomWebSource:
    if "token_file" in val and ("username" in val or "password_file" in val):
        raise _fail(ctx, f"{where}.token_file", "use either a bearer token (token_file) or basic auth "
                                                "(username + password_file), not both")
    if ("username" in val) != ("password_file" in val):
        missing = "password_file" if "username" in val else "username"
        raise _fail(ctx, f"{where}.{missing}", "basic auth needs both `username` and `password_file`; add the "
                                               "missing one")
    if "ca_file" in val and not val["url"].startswith("https://"):
        raise _fail(ctx, f"{where}.ca_file", "a CA file only applies to an https:// url")
    return DicomWebSource(query=query, timeout=timeout, **val)


def _dimse(val: dict[str, Any], query: SourceQuery, timeout: int, where: str, ctx: _Ctx) -> DimseSource:
    retrieve = val.setdefault("retrieve", "move")
    if retrieve == "move" and "move_port" not in val:
        raise _fail(ctx, f"{where}.move_port", "C-MOVE needs the port of Atoll's own storage SCP (the PACS must "
                                               "know move_ae at this host and port); add `move_port = ...`, or "
                                               "use `retrieve = \"get\"`")
    if retrieve == "get":
        for key in ("move_ae", "move_port"):
            if key in val:
                raise _fail(ctx, f"{where}.{key}", "only applies with retrieve = \"move\"; remove it for C-GET")
    return DimseSource(query=query, timeout=timeout, **val)


def with_default_modalities(source: PacsSource, modalities: tuple[str, ...]) -> PacsSource:
    """Fill an absent ``modality`` query from ``[data].modalities`` ("*" queries any modality)."""
    if source.query.modalities is not None:
        mods = source.query.modalities
    else:
        mods = modalities
    mods = () if ANY_MODALITY in mods else mods
    return replace(source, query=replace(source.query, modalities=mods))


def read_credential(path: Path, *, what: str) -> str:
    """The first line of a credential file (checked again: its mode may have changed since the config loaded)."""
    st = path.stat()
    if os.name == "posix" and st.st_mode & 0o077:
        raise ConfigError(f"{what} {path} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                          f"run: chmod 600 {path}")
    text = path.read_text(encoding="utf-8").strip().splitlines()
    if not text or not text[0].strip():
        raise ConfigError(f"{what} {path} is empty; write the credential into it (one line)")
    return text[0].strip()
