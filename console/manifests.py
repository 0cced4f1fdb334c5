"""Run manifests as a person reads them: generic field rendering, the asks, and what changed.

Rendering is generic on purpose: a manifest is a JSON object, and whatever section the lead adds is shown as nested
rows without a change here. What a run costs is read from the parsed manifest's one ``Mechanism`` (contract), never
from field names guessed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

@dataclass(frozen=True)
class Row:
    """One rendered field: ``path`` like ``training.noise_multiplier``, ``depth`` for indentation."""

    path: str
    label: str
    depth: int
    value: str | None       # None for a section heading
    table: list[dict[str, str]] | None = None  # a list of objects (e.g. outputs), rendered as a small table


def _scalar(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "∞" if math.isinf(v) else f"{v:g}"
    if isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v):
        return "[" + ", ".join(_scalar(x) for x in v) + "]" if v and all(isinstance(x, (int, float)) for x in v) \
            else ", ".join(_scalar(x) for x in v) or "(none)"
    return str(v)


def rows(obj: Mapping[str, Any], prefix: str = "", depth: int = 0) -> list[Row]:
    """Every field of a manifest, in its own order, sections first as headings then their fields."""
    out: list[Row] = []
    for key, value in obj.items():
        path = f"{prefix}{key}"
        label = str(key).replace("_", " ")
        if isinstance(value, Mapping):
            out.append(Row(path, label, depth, None))
            out += rows(value, f"{path}.", depth + 1)
        elif isinstance(value, list) and value and all(isinstance(x, Mapping) for x in value):
            cols: list[str] = []
            for x in value:
                cols += [str(k) for k in x if str(k) not in cols]
            table = [{c: _scalar(x.get(c)) for c in cols} for x in value]
            out.append(Row(path, label, depth, f"{len(value)} item(s)", table))
        else:
            out.append(Row(path, label, depth, _scalar(value)))
    return out


def _walk(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield str(k), v
            yield from _walk(v)


def _find(obj: Mapping[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        for k, v in _walk(obj):
            if k == name and not isinstance(v, (Mapping, list)):
                return v
    return None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(field, before, now)`` for every leaf that differs (added or removed fields included)."""
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, _ABSENT) != b.get(key, _ABSENT):
            out.append((key, "(absent)" if key not in a else _short(a[key]), "(absent)" if key not in b
                        else _short(b[key])))
    return out


_ABSENT = object()


def _short(v: Any) -> str:
    if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
        return f"{len(v)} item(s): " + "; ".join(", ".join(f"{k}={_scalar(x[k])}" for k in x) for x in v)[:300]
    return _scalar(v)[:300]
