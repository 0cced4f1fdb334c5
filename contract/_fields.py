"""Typed scalar fields shared by the contract types: one parser for run config, round config and manifests.

A Flower run config and a ConfigRecord both carry plain scalars; an int where a float is expected is accepted
(TOML writes ``lr = 1``), a bool is never a number, and anything else is an error that names the key.
"""

from __future__ import annotations

from typing import Any

KINDS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


def coerce(value: Any, kind: type, key: str, where: str, error: type[ValueError] = ValueError) -> Any:
    """``value`` as ``kind``, or ``error`` (a ValueError) naming ``where`` and ``key``."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise error(f"{where} '{key}' must be {kind.__name__}, got {value!r}")
    return value


def key_of(field_name: str) -> str:
    """Config keys are field names with '-' for '_' (Flower's convention: ``num-server-rounds``)."""
    return field_name.replace("_", "-")
