"""The consortium's site registry: one site name bound to its Flower node, its ledger key and its dataset card.

Why one file: three facts decide whether a reply may change a run, and each alone can be spoofed. The Flower
node id (``msg.metadata.src_node_id``, from the node key registered with the SuperLink) says *which machine*
answered; the site's Ed25519 ledger key (``<site>.pub``) says *which hospital* signed the privacy record; the
dataset card (``atoll site check --card``) says how many training examples and patients that hospital declared
when the run was approved. A rogue node holding only ``ca.crt`` can register a node key with the open-source
Control API, so the server admits a reply only when all three name the same site here.

Layout: ``<keys_dir>/registry.json`` next to the enrolled ``<site>.pub`` files::

    {"v": 1, "sites": {"hospital-a": {"node_id": 1234, "ledger_key_id": "0123456789abcdef",
                                      "train_examples": 812, "train_patients": 400}}}

``node_id`` may be ``null`` where the node id is not known in advance (a local simulation); the server then
binds the node that first sends a record signed by the site's key, for the rest of the run. ``train_examples`` /
``train_patients`` are ``null`` where the card suppressed them (small counts): the server then weights the site's
update equally instead of by its claimed example count, and the audit cannot pin ``patients``.

This module is stdlib + :mod:`privacy.keys` only, so the ServerApp, the CLI and the auditor share it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

REGISTRY_FILE = "registry.json"
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


class RegistryError(ValueError):
    """The registry file is malformed or contradicts itself; the message names the file, site and field."""


@dataclass(frozen=True)
class SiteEntry:
    name: str
    node_id: int | None = None
    ledger_key_id: str | None = None
    train_examples: int | None = None
    train_patients: int | None = None


def card_counts(card: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """``(train_examples, train_patients)`` of a dataset card (``None`` where the card suppressed a count)."""
    try:
        train = card["split"]["train"]
    except (KeyError, TypeError):
        raise RegistryError("dataset card has no split.train section (write it with `atoll site check --card`)") from None

    def count(v: Any) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None

    return count(train.get("images")), count(train.get("patients"))


class SiteRegistry:
    """Read/write ``<keys_dir>/registry.json``; look sites up by name or by Flower node id."""

    def __init__(self, path: str | Path, entries: Mapping[str, SiteEntry] | None = None) -> None:
        self.path = Path(path)
        self.entries: dict[str, SiteEntry] = dict(entries or {})
        self._check_unique_nodes()

    @classmethod
    def load(cls, keys_dir: str | Path) -> "SiteRegistry | None":
        """The registry in ``keys_dir``, or ``None`` if there is none; raises :class:`RegistryError` if malformed."""
        path = Path(keys_dir) / REGISTRY_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path}: not readable JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("v") != 1 or not isinstance(data.get("sites"), dict):
            raise RegistryError(f"{path}: expected {{\"v\": 1, \"sites\": {{...}}}}")
        entries = {}
        for name, raw in data["sites"].items():
            entries[name] = _entry(path, name, raw)
        return cls(path, entries)

    def _check_unique_nodes(self) -> None:
        seen: dict[int, str] = {}
        for e in self.entries.values():
            if e.node_id is not None:
                if e.node_id in seen:
                    raise RegistryError(f"{self.path}: node id {e.node_id} is registered for both {seen[e.node_id]!r} "
                                        f"and {e.name!r}; one node can speak for one site only")
                seen[e.node_id] = e.name

    def site_of_node(self, node_id: int) -> str | None:
        return next((e.name for e in self.entries.values() if e.node_id == node_id), None)

    def get(self, name: str) -> SiteEntry | None:
        return self.entries.get(name)

    def bind(self, entry: SiteEntry) -> None:
        """Add or replace one site's entry (checked: name, key id form, unique node id) and save atomically."""
        _entry(self.path, entry.name, {k: v for k, v in asdict(entry).items() if k != "name"})
        old = self.entries.get(entry.name)
        self.entries[entry.name] = entry
        try:
            self._check_unique_nodes()
        except RegistryError:
            if old is None:
                del self.entries[entry.name]
            else:
                self.entries[entry.name] = old
            raise
        self.save()

    def save(self) -> None:
        data = {"v": 1, "sites": {n: {k: v for k, v in asdict(e).items() if k != "name"}
                                  for n, e in sorted(self.entries.items())}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


def _entry(path: Path, name: Any, raw: Any) -> SiteEntry:
    if not isinstance(name, str) or not _SITE_NAME.match(name):
        raise RegistryError(f"{path}: {name!r} is not a site name")
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: site {name!r}: expected an object")
    out: dict[str, Any] = {}
    for key in ("node_id", "train_examples", "train_patients"):
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise RegistryError(f"{path}: site {name!r} field {key!r}: {v!r} is not a non-negative integer or null")
        out[key] = v
    kid = raw.get("ledger_key_id")
    if kid is not None and (not isinstance(kid, str) or not _KEY_ID.match(kid)):
        raise RegistryError(f"{path}: site {name!r} field 'ledger_key_id': {kid!r} is not a 16-hex-digit key id")
    unknown = set(raw) - {"node_id", "train_examples", "train_patients", "ledger_key_id"}
    if unknown:
        raise RegistryError(f"{path}: site {name!r}: unknown field(s) {sorted(unknown)}")
    return SiteEntry(name, ledger_key_id=kid, **out)
