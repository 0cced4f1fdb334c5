"""The site ledger's verified running state: what the budget guard needs, without re-reading the lifetime history.

Why: the guard's check of a round used to re-read, re-verify and re-scan every record of the dataset's lifetime
(and in deployment every message starts a fresh ClientApp process that did all of it again), so its cost grew with
the ledger. :class:`RunningState` is an exact summary of the first ``count`` records, folded forward record by
record, and :class:`StateFile` keeps it next to the ledger (``ledger.jsonl`` -> ``ledger.state.json``).

What it holds (exact sufficient statistics; nothing is approximated):

* ``charges``: the merged charges ``{(sigma, q): steps}`` of every ``reservation`` record, i.e. the canonical
  lifetime history (:func:`privacy.accounting.canonical_history`). This is what both accountants consume:
  - RDP: equivalent to the accumulated per-order RDP values (``sum steps * curve(sigma, q)``), but keeping the steps
    per mechanism gives epsilon bit-identical to a full recomputation (the same float sum in the same order); a
    running per-order vector would round differently and could land an ulp *below* it.
  - PRV: exactly what ``PRVAccountant`` composes. PRV itself cannot be made incremental: its epsilon comes from
    an FFT convolution over a grid sized by the *total* number of steps, so a PRV site still pays one PRV
    evaluation per new charge (bounded by ``privacy.accounting.PRV_MAX_POINTS``, RDP above it), only not the
    re-scan of the records.
* ``open``: the reservations not completed by a ``round`` record (full records; a crash leaves one behind): the
  only candidates of a replay.
* ``answered``: per run, the server rounds that have a ``round`` record, as inclusive ranges (a run's rounds are
  consecutive, so this stays a few numbers per run).
* the binding :class:`~privacy.ledger.Checkpoint` (count, byte offsets and hash of the last record summarised),
  ``checked_at`` (count at the last full recomputation) and a cache of the epsilon of the current history.

Trust: the state is never trusted blindly. The file carries an HMAC-SHA256 under a key derived from the site's
signing key (``hmac``/``hashlib`` from the standard library: a symmetric tag is enough, only the site itself
checks it); an unsigned ledger has no key, so its state file is never read back (a full recomputation instead).
On load the checkpoint must bind to the ledger (record ``count - 1`` still on disk with that hash and signature);
the records after it are verified and folded in. A missing, altered, foreign, outdated or unbound state file,
and periodically (first every ``FULL_CHECK_EVERY`` records, then each time the ledger has doubled), means a full
recomputation from the verified records; a mismatch there is
logged and the recomputation wins. The auditor never uses the state: it recomputes everything from the records.
Write order: the ledger record is appended and fsynced first, the state file after it (atomic rename, no fsync:
it is a cache; a lost or torn one is recomputed). A crash between the two leaves a state one record behind,
which the next load folds forward.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.accounting import HistoryEntry, canonical_history
from privacy.ledger import GENESIS, Checkpoint, SiteLedger, canonical_json

log = logging.getLogger("atoll.ledger")

STATE_VERSION = 1
#: records before the first full recomputation of the running state from the verified ledger; later ones come when
#: the ledger has doubled since the last (privacy.guard.BudgetGuard._full_check_due); the count of the last one is
#: kept in the state file, so the schedule holds across processes
FULL_CHECK_EVERY = 1000
_MAC_CONTEXT = b"atoll ledger running state v1\x00"


def _opacus_version() -> str:
    import opacus

    return str(getattr(opacus, "__version__", "?"))


@dataclass
class RunningState:
    """Exact summary of a site ledger's first ``count`` records (see the module doc)."""

    site: str
    checkpoint: Checkpoint = field(default_factory=lambda: Checkpoint(0, 0, 0, GENESIS))
    charges: dict[tuple[float, float], int] = field(default_factory=dict)
    open: dict[int, dict] = field(default_factory=dict)
    answered: dict[str, list[list[int]]] = field(default_factory=dict)
    checked_at: int = 0
    #: ``(accountant, delta, opacus version, history) -> epsilon`` of recent histories (the current one persisted)
    eps_cache: dict[tuple, float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def count(self) -> int:
        return self.checkpoint.count

    # ------------------------------------------------------------------ building

    @classmethod
    def from_records(cls, site: str, records: Iterable[dict], checkpoint: Checkpoint) -> "RunningState":
        """A full recomputation: fold every record from the first (``checkpoint``: where they end)."""
        st = cls(site)
        for rec in records:
            st._fold_one(rec)
        st.checkpoint = checkpoint
        st.checked_at = checkpoint.count
        return st

    def fold(self, records: list[dict], checkpoint: Checkpoint) -> None:
        """Fold the records that follow the summary (``seq`` from ``count`` on), ending at ``checkpoint``."""
        for i, rec in enumerate(records):
            if rec.get("seq") != self.count + i:
                raise ValueError(f"record seq {rec.get('seq')!r} does not follow the running state "
                                 f"({self.count + i} expected)")
            self._fold_one(rec)
        if records or checkpoint.count == self.count:
            self.checkpoint = checkpoint

    def _fold_one(self, rec: dict) -> None:
        kind = rec.get("type")
        if kind == "reservation":
            s, q, n = rec["charge"]
            key = (float(s), float(q))
            self.charges[key] = self.charges.get(key, 0) + int(n)
            self.open[int(rec["seq"])] = rec
        elif kind == "round":
            self.open.pop(rec.get("reservation_seq"), None)
            rnd = rec.get("server_round")
            if isinstance(rnd, int) and not isinstance(rnd, bool):
                _add_to_ranges(self.answered.setdefault(str(rec.get("run_id")), []), rnd)

    # ------------------------------------------------------------------ queries

    def history(self) -> list[HistoryEntry]:
        """The canonical lifetime history (merged, sorted: what ``canonical_history(charges(records))`` gives)."""
        return list(canonical_history((s, q, n) for (s, q), n in self.charges.items()))

    def history_without(self, charge: tuple[float, float, int]) -> list[HistoryEntry]:
        """The canonical history with one charge taken out (the history before a reservation)."""
        s, q, n = float(charge[0]), float(charge[1]), int(charge[2])
        return list(canonical_history((cs, cq, cn - n if (cs, cq) == (s, q) else cn)
                                      for (cs, cq), cn in self.charges.items()))

    def is_answered(self, run_id: str, server_round: int) -> bool:
        """Whether a ``round`` record of ``(run_id, server_round)`` exists."""
        return any(lo <= server_round <= hi for lo, hi in self.answered.get(str(run_id), ()))

    def same_summary(self, other: "RunningState") -> bool:
        """Whether two states summarise the same records identically (the epsilon cache aside)."""
        return (self.checkpoint == other.checkpoint and self.charges == other.charges
                and self.open == other.open and self.answered == other.answered)

    # ------------------------------------------------------------------ epsilon cache

    def epsilon(self, history: list[HistoryEntry], accountant: str, delta: float, compute) -> float:
        """``compute(history)`` memoised by the exact history, accountant, delta and Opacus version."""
        key = (accountant, float(delta), _opacus_version(), tuple(history))
        if key not in self.eps_cache:
            if len(self.eps_cache) >= 8:
                self.eps_cache.pop(next(iter(self.eps_cache)))
            self.eps_cache[key] = float(compute(history))
        return self.eps_cache[key]

    # ------------------------------------------------------------------ (de)serialisation

    def to_json(self) -> dict[str, Any]:
        cp = self.checkpoint
        current = tuple(self.history())
        spent = [{"accountant": a, "delta": d, "opacus": v, "epsilon": "inf" if e == float("inf") else e}
                 for (a, d, v, h), e in self.eps_cache.items() if h == current]
        return {"v": STATE_VERSION, "site": self.site,
                "checkpoint": {"count": cp.count, "offset": cp.offset, "last_start": cp.last_start,
                               "last_hash": cp.last_hash},
                "charges": [[s, q, n] for (s, q), n in sorted(self.charges.items())],
                "open": [self.open[k] for k in sorted(self.open)],
                "answered": {k: v for k, v in sorted(self.answered.items())},
                "checked_at": self.checked_at, "spent": spent}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "RunningState":
        cp = obj["checkpoint"]
        st = cls(str(obj["site"]), Checkpoint(int(cp["count"]), int(cp["offset"]), int(cp["last_start"]),
                                              str(cp["last_hash"])))
        for s, q, n in obj["charges"]:
            st.charges[(float(s), float(q))] = int(n)
        st.open = {int(r["seq"]): r for r in obj["open"]}
        st.answered = {str(k): [[int(lo), int(hi)] for lo, hi in v] for k, v in obj["answered"].items()}
        st.checked_at = int(obj["checked_at"])
        current = tuple(st.history())
        for e in obj.get("spent", []):
            eps = float("inf") if e["epsilon"] == "inf" else float(e["epsilon"])
            st.eps_cache[(str(e["accountant"]), float(e["delta"]), str(e["opacus"]), current)] = eps
        return st


def _add_to_ranges(ranges: list[list[int]], x: int) -> None:
    """Insert ``x`` into sorted, disjoint, non-adjacent inclusive ranges (merging neighbours)."""
    if ranges and ranges[-1][1] + 1 == x:  # the usual case: the next round of a run
        ranges[-1][1] = x
        return
    for r in ranges:
        if r[0] <= x <= r[1]:
            return
    ranges.append([x, x])
    ranges.sort()
    merged: list[list[int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    ranges[:] = merged


class StateFile:
    """``<ledger>.state.json`` next to a site ledger: the :class:`RunningState`, tagged with an HMAC under a key
    derived from the ledger's signing key. An unsigned ledger's state is written for inspection but never read
    back as trusted (no key to check it with)."""

    def __init__(self, ledger: SiteLedger) -> None:
        self.path = ledger.path.with_name(ledger.path.stem + ".state.json")
        self.site = ledger.site
        key: Ed25519PrivateKey | None = ledger._key
        self._mac_key = None if key is None else hashlib.sha256(_MAC_CONTEXT + key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())).digest()

    def _tag(self, body: bytes) -> str:
        assert self._mac_key is not None
        return hmac.new(self._mac_key, body, hashlib.sha256).hexdigest()

    def load(self) -> tuple[RunningState | None, str]:
        """The stored state if it is present and authentic, else ``None``; the second value says why not."""
        if self._mac_key is None:
            return None, "unsigned ledger (a state file cannot be authenticated)"
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None, "no state file"
        except OSError as exc:
            return None, f"state file unreadable ({type(exc).__name__})"
        try:
            obj = json.loads(raw)
            body = canonical_json(obj["state"])
            if not hmac.compare_digest(str(obj["mac"]), self._tag(body)):
                return None, "state file altered (its tag does not verify)"
            state = obj["state"]
            if state.get("v") != STATE_VERSION:
                return None, f"state file version {state.get('v')!r}"
            if state.get("site") != self.site:
                return None, "state file of another site"
            return RunningState.from_json(state), ""
        except (ValueError, KeyError, TypeError, AttributeError):
            return None, "state file malformed"

    def save(self, state: RunningState) -> None:
        """Write atomically (temporary file + rename, no fsync: a cache, recomputed whenever it is lost)."""
        body = state.to_json()
        data = {"state": body, "mac": self._tag(canonical_json(body)) if self._mac_key is not None else None}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            tmp.write_bytes(canonical_json(data))
            os.replace(tmp, self.path)
        except OSError as exc:  # the ledger is the truth; a state that cannot be written only costs time
            log.warning("ledger running state %s not written (%s); the next load recomputes it", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
