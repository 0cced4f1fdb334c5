"""Labels CSV: one row per key (a DICOM UID or accession number) with a class label.

Class indices must mean the same thing at every site, so labels are either non-negative integers, or names mapped
through ``[data].classes`` (position = index). Mapping names by sorted order per site would silently disagree
between a site that has both classes and one that has only one.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from client.site_config import ConfigError

#: Largest class index a labels CSV may hold without ``classes`` (a model with more outputs is a typo, not a task).
MAX_CLASS_INDEX = 999
#: Longest CSV field accepted (the csv module's own default); a longer one is not a labels file.
MAX_FIELD_CHARS = 131072
#: Longest label value quoted back in a message (messages must stay one readable line).
_QUOTE = 40
_DIGITS = re.compile(r"^[0-9]+$")

#: ``setting(key)`` names a setting in messages: ``[data].label_key`` (site TOML) or ``--label-key`` (first look).
Setting = Callable[[str], str]


def _toml_setting(key: str) -> str:
    return f"[data].{key}"


@dataclass
class Labels:
    """Parsed labels: ``key -> class index``, plus keys whose rows are unusable (``key -> detail``)."""

    by_key: dict[str, int] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)  # key -> first CSV row number (1 = header)
    empty_rows: int = 0
    #: label values that are text while no classes are configured (stays on site: shown as a fix, never sent)
    text_values: Counter = field(default_factory=Counter)

    def keys(self) -> set[str]:
        return set(self.by_key) | set(self.bad)


def _quote(value: str) -> str:
    return repr(value if len(value) <= _QUOTE else value[:_QUOTE] + "...")


def load_labels(path: Path, key_column: str, label_column: str, classes: tuple[str, ...] | None,
                setting: Setting = _toml_setting) -> Labels:
    """Read the labels CSV (UTF-8, optional BOM; comma, semicolon or tab separated), streaming.

    Each message names the file, and the row when one is at fault; ``setting`` names the settings involved.

    Raises
    ------
    ConfigError: unreadable or non-UTF-8 file, a row the csv module cannot parse (NUL byte, a field longer than
        :data:`MAX_FIELD_CHARS`), an empty file, a missing or repeated column.
    """
    try:
        f = path.open(encoding="utf-8-sig", newline="")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read labels CSV ({e.strerror or e.__class__.__name__})") from None
    reader = None
    with f:
        try:
            sample = f.read(8192)
            f.seek(0)
            try:
                dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
            except csv.Error:
                dialect = csv.excel
            reader = csv.reader(f, dialect)
            return _read(path, reader, key_column, label_column, classes, setting)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start} of a chunk cannot be decoded); "
                              "save it as UTF-8 (CSV UTF-8 in a spreadsheet program)") from None
        except csv.Error as e:
            row = reader.line_num if reader is not None else 1
            what = str(e)
            if "field larger than field limit" in what:
                what = f"a field is longer than {MAX_FIELD_CHARS} characters"
            raise ConfigError(f"{path}: row {row}: {what}; is this the labels CSV?") from None


def _read(path: Path, reader, key_column: str, label_column: str, classes: tuple[str, ...] | None,
          setting: Setting) -> Labels:
    limit = csv.field_size_limit()
    csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        return _rows(path, reader, key_column, label_column, classes, setting)
    finally:
        csv.field_size_limit(limit)


def _rows(path: Path, reader, key_column: str, label_column: str, classes: tuple[str, ...] | None,
          setting: Setting) -> Labels:
    header_row = next(reader, None)
    if header_row is None:
        raise ConfigError(f"{path}: the labels CSV is empty; its first row must name the columns "
                          f"({key_column}, {label_column})")
    header = [h.strip() for h in header_row]
    for col, key in ((key_column, "label_key"), (label_column, "label_column")):
        if col not in header:
            raise ConfigError(f"{path}: column {col!r} (from {setting(key)}) not found; columns are: "
                              f"{', '.join(_quote(h)[1:-1] for h in header[:20]) or '(none)'}")
        if header.count(col) > 1:
            raise ConfigError(f"{path}: column {col!r} appears {header.count(col)} times in the header row; "
                              "rename or remove the extra column")
    ki, li = header.index(key_column), header.index(label_column)
    index = {name: i for i, name in enumerate(classes)} if classes else None
    out = Labels()
    name = path.name
    for row in reader:
        rownum = reader.line_num
        if any("\x00" in cell for cell in row):  # Python >= 3.11's csv accepts NUL; text files have none
            raise ConfigError(f"{path}: row {rownum}: holds a NUL byte; is this a CSV text file (not .xlsx)?")
        key = row[ki].strip() if ki < len(row) else ""
        value = row[li].strip() if li < len(row) else ""
        if not key:
            out.empty_rows += 1
            continue
        out.rows.setdefault(key, rownum)
        parsed, problem = _parse(value, index, setting)
        if problem:
            if index is None and value and not _DIGITS.match(value):
                out.text_values[value[:_QUOTE]] += 1
            out.bad[key] = f"{name} row {rownum}: {problem}"
            out.by_key.pop(key, None)
            continue
        if key in out.bad:
            continue
        if key in out.by_key and out.by_key[key] != parsed:
            out.bad[key] = f"{name} row {rownum}: conflicting labels for the same key"
            del out.by_key[key]
            continue
        assert parsed is not None
        out.by_key[key] = parsed
    return out


def _parse(value: str, index: dict[str, int] | None, setting: Setting) -> tuple[int | None, str | None]:
    if not value:
        return None, "empty label"
    if index is not None:
        if value in index:
            return index[value], None
        return None, f"label {_quote(value)} is not one of {setting('classes')}"
    if not _DIGITS.match(value):  # int() would also take "+1", "1_0", " 1", non-ASCII digits and 4300-digit text
        return None, f"label {_quote(value)} is not an integer; set {setting('classes')} to map class names to indices"
    if len(value) > 6 or int(value) > MAX_CLASS_INDEX:
        return None, f"label {_quote(value)} is not a class index (0..{MAX_CLASS_INDEX})"
    return int(value), None
