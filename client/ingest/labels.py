"""Labels CSV: one row per key (a DICOM UID or accession number) with a class label.

Class indices must mean the same thing at every site, so labels are either non-negative integers, or names mapped
through ``[data].classes`` (position = index). Mapping names by sorted order per site would silently disagree
between a site that has both classes and one that has only one.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from client.site_config import ConfigError


@dataclass
class Labels:
    """Parsed labels: ``key -> class index``, plus keys whose rows are unusable (``key -> detail``)."""

    by_key: dict[str, int] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)  # key -> first CSV row number (1 = header)
    empty_rows: int = 0

    def keys(self) -> set[str]:
        return set(self.by_key) | set(self.bad)


def load_labels(path: Path, key_column: str, label_column: str, classes: tuple[str, ...] | None) -> Labels:
    """Read the labels CSV (UTF-8, optional BOM; comma, semicolon or tab separated).

    Raises
    ------
    ConfigError: unreadable file or a missing column (naming the file, the column and the columns found).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read labels CSV ({e.__class__.__name__}); save it as UTF-8 text") from None
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(text[:8192], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(text.splitlines(), dialect=dialect)
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    for col, setting in ((key_column, "[data].label_key"), (label_column, "[data].label_column")):
        if col not in header:
            raise ConfigError(
                f"{path}: column {col!r} (from {setting}) not found; columns are: {', '.join(header) or '(none)'}"
            )
    index = {name: i for i, name in enumerate(classes)} if classes else None
    out = Labels()
    for rownum, row in enumerate(reader, start=2):
        key = (row.get(key_column) or "").strip()
        value = (row.get(label_column) or "").strip()
        if not key:
            out.empty_rows += 1
            continue
        out.rows.setdefault(key, rownum)
        parsed, problem = _parse(value, index)
        if problem:
            out.bad[key] = f"row {rownum}: {problem}"
            out.by_key.pop(key, None)
            continue
        if key in out.bad:
            continue
        if key in out.by_key and out.by_key[key] != parsed:
            out.bad[key] = f"row {rownum}: conflicting labels for the same key"
            del out.by_key[key]
            continue
        assert parsed is not None
        out.by_key[key] = parsed
    return out


def _parse(value: str, index: dict[str, int] | None) -> tuple[int | None, str | None]:
    if not value:
        return None, "empty label"
    if index is not None:
        if value in index:
            return index[value], None
        return None, f"label {value!r} is not one of [data].classes"
    try:
        n = int(value)
    except ValueError:
        return None, f"label {value!r} is not an integer; set [data].classes to map class names to indices"
    if n < 0:
        return None, f"label {n} is negative"
    return n, None
