"""Run manifests as a person reads them: generic field rendering, the asks, and what changed.

Rendering is generic on purpose: a manifest is a JSON object, and whatever section the lead adds (a ``task``, a
``mechanism``) is shown as nested rows without a change here. Only :func:`mechanism_of` knows field names, and it
looks them up anywhere in the manifest, so a section that moves keeps working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

# Names a mechanism field may carry; the first one found (depth-first, in manifest order) is used.
_NOISE = ("noise_multiplier", "sigma")
_RATE = ("sample_rate", "sampling_rate", "q")
_STEPS = ("local_steps", "steps")
_ROUNDS = ("num_rounds", "rounds", "num_server_rounds")
_DP = ("dp",)


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


@dataclass(frozen=True)
class Mechanism:
    """What one run asks of the site's privacy budget (None where the manifest does not say)."""

    dp: bool
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    rounds: int | None
    clip_norm: float | None

    def missing(self) -> list[str]:
        need = ["rounds", "steps"] + (["noise_multiplier", "sample_rate"] if self.dp else [])
        return [n for n in need if getattr(self, n) is None]


def mechanism_of(manifest: Mapping[str, Any]) -> Mechanism:
    dp = _find(manifest, _DP)

    def num(names: tuple[str, ...]) -> float | None:
        v = _find(manifest, names)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    steps, rounds = num(_STEPS), num(_ROUNDS)
    return Mechanism(dp=dp is not False, noise_multiplier=num(_NOISE), sample_rate=num(_RATE),
                     steps=int(steps) if steps is not None else None,
                     rounds=int(rounds) if rounds is not None else None, clip_norm=num(("clip_norm",)))


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
