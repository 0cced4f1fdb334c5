"""Signed, hash-chained privacy ledger: the site's own copy (:class:`SiteLedger`) and the server's (:class:`ConsortiumLedger`).

Record format (schema v1), one JSON object per line (JSON Lines), written in canonical form
---------------------------------------------------------------------------------------------
Every record carries these envelope fields (the body fields depend on ``type``; see :mod:`privacy.guard`):

``v``        schema version (1)
``type``     ``"reservation"`` | ``"round"`` | ``"refusal"``
``site``     the site's name (as enrolled with the consortium)
``seq``      0-based position of the record in the site's ledger (line number - 1)
``prev``     SHA-256 (hex) of the previous record's canonical bytes, ``"0" * 64`` for the first record
``time``     UTC time of writing, ISO 8601 (``2026-01-31T12:00:00Z``)
``key_id``   id of the signing key (:func:`privacy.keys.key_id`), or ``null`` for an unsigned ledger
``sig``      base64 Ed25519 signature over the canonical bytes of the record *without* ``sig``;
             absent in unsigned mode

Canonical serialisation (:func:`canonical_json`): ``json.dumps(sort_keys=True, separators=(",", ":"),
ensure_ascii=False, allow_nan=False)`` encoded as UTF-8. Floats are written as Python's shortest round-trip
``repr``, so a record that has gone through ``json.loads`` serialises back to the very same bytes and its hash and
signature can be recomputed by anyone. Infinity is not JSON: an infinite epsilon is the string ``"inf"``.

Hash chain: ``record_hash(r) = sha256(canonical_json(r))`` over the *whole* record including ``sig``; record
``n`` stores ``record_hash(record n-1)`` in ``prev``. The server only receives a site's ``round`` records, so its
copy has gaps in ``seq`` (reservations and refusals stay on site); it checks signature, strictly increasing
``seq`` and, where ``seq`` is consecutive, the ``prev`` link. ``atoll audit verify`` checks the server copy
against the site's full ledger, where every link is checked.

Durability: appends are single ``write`` calls of a whole line followed by ``fdatasync`` (``fsync`` where the
platform has no ``fdatasync``): it flushes the data and the file size, which is all a later read needs, and
skips the timestamps; the record is durable when ``append`` returns. The directory is fsynced when the ledger
file is created; every read-modify-append runs under ``fcntl.flock`` on the ledger file, so two processes at one
site serialise.

Resuming from a checkpoint: a reader that already holds a verified summary of the first ``n`` records (the budget
guard's running state, :mod:`privacy.ledger_state`) passes its :class:`Checkpoint` to
:meth:`SiteLedger.transaction` / :meth:`SiteLedger.view`. The ledger then checks only that record ``n - 1`` is still
on disk at the recorded offset with the recorded hash and a valid signature (``bound``) and parses the records after
it; if that record is not there, it falls back to reading and checking the whole file.

Torn last line (no trailing newline): a crash in the middle of a write leaves one, but so does a truncation that
cut acknowledged records (a careless restore, ``truncate``, a full disk). The file alone cannot tell the two apart,
and cutting the line silently would lower the spent budget in the second case. So a torn tail is never cut: every
read stops with :class:`LedgerTornError` naming the line, and ``atoll site repair-ledger`` (:mod:`privacy.repair`)
keeps it as charged — it moves the torn bytes aside and appends a signed reservation charging what the torn line
charged (or the policy's worst case when that is not readable). The repair can only raise epsilon.

An unreadable line in an earlier run's consortium copy stops the next run the same way: it may hold a site's
newest record, and without it a site whose ledger was rolled back to before it would be accepted again.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.keys import fsync_dir, write_all

log = logging.getLogger("atoll.ledger")

SCHEMA_VERSION = 1
GENESIS = "0" * 64
RECORD_TYPES: tuple[str, ...] = ("reservation", "round", "refusal")
ENVELOPE_FIELDS: tuple[str, ...] = ("v", "type", "site", "seq", "prev", "time", "key_id")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class LedgerError(ValueError):
    """A ledger record or file failed a check; the message says which record, which field and why."""


REPAIR_COMMAND = "atoll site repair-ledger --config SITE.toml"


class LedgerTornError(LedgerError):
    """The site ledger ends in a torn line; it is kept (never cut) until the documented repair runs."""

    def __init__(self, path: Path, line_no: int, torn: bytes) -> None:
        self.path, self.line_no, self.torn = path, line_no, torn
        super().__init__(
            f"{path} line {line_no}: torn last line ({len(torn)} bytes, no newline): a crash mid-write or a "
            "truncation that may have cut acknowledged records. Atoll stops rather than lower the spent budget. "
            f"Restore the ledger from backup, or run `{REPAIR_COMMAND}`: it keeps the torn line as charged "
            "(it can only raise epsilon) and moves its bytes aside")


# ------------------------------------------------------------------------------------------------ primitives


def canonical_json(obj: Any) -> bytes:
    """Canonical UTF-8 JSON: sorted keys, no whitespace, floats as Python ``repr``, no NaN/Infinity.

    RFC 8785-like (not byte-identical to JCS for floats: ``1e+16`` vs ``1e16``); reproducible because a record
    that went through ``json.loads`` serialises back to the very same bytes.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """Hash that the next record's ``prev`` must carry: SHA-256 of the canonical bytes of the whole record."""
    return sha256_hex(canonical_json(dict(record)))


def signing_bytes(record: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the canonical record without its ``sig`` field."""
    return canonical_json({k: v for k, v in record.items() if k != "sig"})


def sign_record(record: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return a copy of ``record`` with ``key_id`` set and ``sig`` added."""
    from privacy.keys import key_id

    out = {k: v for k, v in record.items() if k != "sig"}
    out["key_id"] = key_id(key)
    out["sig"] = base64.b64encode(key.sign(signing_bytes(out))).decode("ascii")
    return out


def verify_record(record: Mapping[str, Any], public_key: Ed25519PublicKey) -> None:
    """Check ``record``'s signature (and key id) against ``public_key``; raise :class:`LedgerError` if not valid."""
    from privacy.keys import key_id

    sig = record.get("sig")
    if not isinstance(sig, str) or not sig:
        raise LedgerError("record is unsigned (no 'sig' field)")
    expected = key_id(public_key)
    if record.get("key_id") != expected:
        raise LedgerError(f"field 'key_id': record names key {record.get('key_id')!r}, the enrolled key is {expected!r}")
    try:
        raw = base64.b64decode(sig, validate=True)
        public_key.verify(raw, signing_bytes(record))
    except (InvalidSignature, ValueError):
        raise LedgerError("field 'sig': signature does not verify against the enrolled key "
                          "(the record was altered or signed by another key)") from None


def envelope_problems(record: Any) -> list[str]:
    """Structural problems of a record's envelope (empty list = well formed)."""
    if not isinstance(record, dict):
        return [f"record is a {type(record).__name__}, expected a JSON object"]
    out = []
    for f in ENVELOPE_FIELDS:
        if f not in record:
            out.append(f"field {f!r} is missing")
    if out:
        return out
    if record["v"] != SCHEMA_VERSION:
        out.append(f"field 'v': unsupported schema version {record['v']!r} (expected {SCHEMA_VERSION})")
    if record["type"] not in RECORD_TYPES:
        out.append(f"field 'type': {record['type']!r} is not one of {', '.join(RECORD_TYPES)}")
    if not isinstance(record["site"], str) or not _SITE_NAME.match(record["site"]):
        out.append(f"field 'site': {record['site']!r} is not a site name")
    if isinstance(record["seq"], bool) or not isinstance(record["seq"], int) or record["seq"] < 0:
        out.append(f"field 'seq': {record['seq']!r} is not a non-negative integer")
    if not isinstance(record["prev"], str) or not _HEX64.match(record["prev"]):
        out.append(f"field 'prev': {record['prev']!r} is not a SHA-256 hex digest")
    if record["key_id"] is not None and not isinstance(record["key_id"], str):
        out.append(f"field 'key_id': {record['key_id']!r} is not a key id")
    if "sig" in record and not isinstance(record["sig"], str):
        out.append("field 'sig': not a base64 string")
    return out


def epsilon_value(v: Any) -> float:
    """Parse a recorded epsilon: a JSON number, or the string ``"inf"`` (non-DP history)."""
    if isinstance(v, bool):
        raise LedgerError(f"epsilon {v!r} is not a number")
    if isinstance(v, (int, float)):
        return float(v)
    if v == "inf":
        return float("inf")
    raise LedgerError(f"epsilon {v!r} is neither a number nor \"inf\"")


def epsilon_json(eps: float) -> float | str:
    """The JSON form of an epsilon (``"inf"`` for infinity; JSON has no Infinity)."""
    return "inf" if eps == float("inf") else float(eps)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def durable_sync(fd: int) -> None:
    """Make appended bytes durable: ``fdatasync`` (data + the size needed to read them back), else ``fsync``."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


@dataclass(frozen=True)
class Checkpoint:
    """Where a verified summary of a site ledger ends: its first ``count`` records, the last of them stored at
    bytes ``[last_start, offset)`` with hash ``last_hash`` (``GENESIS`` and zeros for an empty prefix)."""

    count: int
    offset: int
    last_start: int
    last_hash: str


def read_jsonl(path: str | Path) -> list[tuple[int, dict | None, str]]:
    """Read a JSON Lines file as ``(line_number, record_or_None, raw_line)``; ``None`` marks an unparsable line.

    A last line without a newline (torn write) is reported like any other line; callers decide.
    """
    out = []
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, start=1):
            text = raw.decode("utf-8", errors="replace").rstrip("\n")
            if not text.strip():
                out.append((i, None, text))
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError:
                rec = None
            out.append((i, rec if isinstance(rec, dict) else None, text))
    return out


# ------------------------------------------------------------------------------------------------ site ledger


class SiteLedger:
    """A site's lifetime ledger for one dataset: append-only, fsynced, hash-chained, signed when a key is given.

    Parameters
    ----------
    path: the JSON Lines file (created, with its folder, on first append).
    site: the site's name; every record carries it and an existing file must belong to it.
    signing_key: Ed25519 private key; ``None`` = unsigned mode (records have ``key_id: null`` and no ``sig``;
        a consortium that enrolls keys rejects them).
    """

    def __init__(self, path: str | Path, *, site: str, signing_key: Ed25519PrivateKey | None = None) -> None:
        if not isinstance(site, str) or not _SITE_NAME.match(site):
            raise LedgerError(f"site name {site!r} is not valid (letters, digits, . _ -; at most 64 characters)")
        self.path = Path(path)
        self.site = site
        self._key = signing_key
        if signing_key is not None:
            from privacy.keys import key_id

            self.key_id: str | None = key_id(signing_key)
        else:
            self.key_id = None
        self._records: list[dict] = []
        self._base = 0            # seq of _records[0]: > 0 after resuming from a checkpoint (prefix not loaded)
        self._offset = 0          # bytes of the file already parsed into _records
        self._last_start = 0      # byte offset where the newest parsed record starts
        self._ino: int | None = None
        self._last_hash = GENESIS
        self._base_hash = GENESIS  # hash of record _base - 1 (the checkpoint resumed from)

    @property
    def signed(self) -> bool:
        return self._key is not None

    # ------------------------------------------------------------------ reading

    def records(self) -> list[dict]:
        """All records, oldest first, re-read from disk under a shared lock (chain structure checked)."""
        if not self.path.exists():
            return []
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._load(fd, None)
            return list(self._records)
        finally:
            os.close(fd)  # closing releases the lock

    def __len__(self) -> int:
        return len(self.records())

    @property
    def count(self) -> int:
        """Records parsed so far (the next record's ``seq``)."""
        return self._base + len(self._records)

    def checkpoint(self) -> Checkpoint:
        """Where the records parsed so far end (what a summary of them binds to)."""
        return Checkpoint(self.count, self._offset, self._last_start, self._last_hash)

    @contextlib.contextmanager
    def transaction(self, resume: Checkpoint | None = None) -> Iterator["LedgerTransaction"]:
        """Exclusive lock on the ledger for a read-check-append sequence (e.g. the guard's reserve).

        ``resume``: a verified checkpoint; the records before it are then not re-read when record
        ``resume.count - 1`` is still there (``txn.bound``; see the module doc). Without it every record is loaded.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if created:
                fsync_dir(self.path.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
            bound = self._load(fd, resume)
            yield LedgerTransaction(self, fd, bound)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def view(self, resume: Checkpoint | None = None) -> Iterator["LedgerTransaction"]:
        """Shared lock on the ledger for a consistent read (same ``resume`` rule as :meth:`transaction`); the
        handle's ``append`` is not allowed. A missing file reads as an empty ledger."""
        if not self.path.exists():
            self._reset()
            yield LedgerTransaction(self, None, resume is None or resume.count == 0, writable=False)
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            bound = self._load(fd, resume)
            yield LedgerTransaction(self, fd, bound, writable=False)
        finally:
            os.close(fd)

    def _load(self, fd: int, resume: Checkpoint | None) -> bool:
        """Bring the parsed records up to the file's end; return whether ``resume`` binds (see the module doc).

        Without ``resume`` the whole file is parsed (a prefix skipped earlier is loaded now)."""
        if resume is None:
            if self._base:
                self._reset()
            self._refresh(fd, writable=True)
            return True
        st = os.fstat(fd)
        if self._ino != st.st_ino or self.count < resume.count or st.st_size < self._offset:
            if not self._adopt(fd, resume):
                self._reset()
        self._refresh(fd, writable=True)
        if self._bound_in_memory(resume):
            return True
        if self._base:  # the checkpoint's record is in the prefix we skipped: read everything and look again
            self._reset()
            self._refresh(fd, writable=True)
            return self._bound_in_memory(resume)
        return False

    def _reset(self) -> None:
        self._records, self._base, self._offset, self._last_start = [], 0, 0, 0
        self._last_hash, self._base_hash, self._ino = GENESIS, GENESIS, None

    def _bound_in_memory(self, cp: Checkpoint) -> bool:
        if cp.count == 0:
            return cp.last_hash == GENESIS
        i = cp.count - 1 - self._base
        if i == -1:
            return self._base_hash == cp.last_hash
        return 0 <= i < len(self._records) and record_hash(self._records[i]) == cp.last_hash

    def _adopt(self, fd: int, cp: Checkpoint) -> bool:
        """Skip the first ``cp.count`` records if record ``cp.count - 1`` is on disk at ``[last_start, offset)`` with
        hash ``last_hash`` (and, in a signed ledger, our own valid signature); False leaves everything unchanged."""
        if cp.count <= 0 or not 0 <= cp.last_start < cp.offset or not _HEX64.match(cp.last_hash):
            return False
        st = os.fstat(fd)
        if st.st_size < cp.offset:
            return False
        raw = os.pread(fd, cp.offset - cp.last_start + 1, cp.last_start - 1) if cp.last_start else \
            b"\n" + os.pread(fd, cp.offset, 0)
        if len(raw) != cp.offset - cp.last_start + 1 or raw[:1] != b"\n" or raw[-1:] != b"\n" or \
                b"\n" in raw[1:-1]:
            return False
        try:
            rec = json.loads(raw[1:-1])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        if (envelope_problems(rec) or rec["site"] != self.site or rec["seq"] != cp.count - 1
                or record_hash(rec) != cp.last_hash):
            return False
        if self._key is not None:
            try:
                verify_record(rec, self._key.public_key())
            except LedgerError:
                return False
        self._records, self._base, self._offset, self._last_start = [], cp.count, cp.offset, cp.last_start
        self._last_hash, self._base_hash, self._ino = cp.last_hash, cp.last_hash, st.st_ino
        return True

    def append(self, body: Mapping[str, Any]) -> dict:
        """Append one record (envelope filled in, signed, fsynced) and return it."""
        with self.transaction() as txn:
            return txn.append(body)

    def _refresh(self, fd: int, *, writable: bool) -> None:
        st = os.fstat(fd)
        if self._ino != st.st_ino or st.st_size < self._offset:
            self._reset()
            self._ino = st.st_ino
        if st.st_size == self._offset:
            return
        data = os.pread(fd, st.st_size - self._offset, self._offset)
        end = data.rfind(b"\n") + 1
        torn = data[end:]
        data = data[:end]
        line_no = self.count
        pos = self._offset
        for raw in data.splitlines(keepends=True):
            line_no += 1
            start, pos = pos, pos + len(raw)
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                raise LedgerError(f"{self.path} line {line_no}: not valid JSON; the ledger is damaged "
                                  "(restore it from backup; do not delete it, the budget would restart at zero)") from None
            problems = envelope_problems(rec)
            if problems:
                raise LedgerError(f"{self.path} line {line_no}: {problems[0]}")
            if rec["site"] != self.site:
                raise LedgerError(f"{self.path} line {line_no}: record belongs to site {rec['site']!r}, "
                                  f"this ledger is opened for site {self.site!r}")
            if rec["seq"] != line_no - 1:
                raise LedgerError(f"{self.path} line {line_no}: field 'seq' is {rec['seq']}, expected {line_no - 1} "
                                  "(a record was dropped, inserted or reordered)")
            if rec["prev"] != self._last_hash:
                raise LedgerError(f"{self.path} line {line_no}: field 'prev' does not match the hash of line "
                                  f"{line_no - 1} (the ledger was edited)")
            if self._key is not None:
                self._check_own_signature(rec, line_no)
            self._last_hash = record_hash(rec)
            self._last_start = start
            self._records.append(rec)
        self._offset += end
        if torn:
            raise LedgerTornError(self.path, self.count + 1, torn)

    def _check_own_signature(self, rec: dict, line_no: int) -> None:
        """A signed ledger accepts only records its own key signed.

        The hash chain alone cannot protect the *last* record (nothing links to it yet): without this
        check, editing the newest reservation's charge would silently lower :meth:`BudgetGuard.spent`.
        An unsigned record in a signed ledger is refused for the same reason (stripping the signature
        would otherwise be the way around it).
        """
        assert self._key is not None
        try:
            verify_record(rec, self._key.public_key())
        except LedgerError as exc:
            raise LedgerError(f"{self.path} line {line_no}: {exc}; the ledger was altered or written with another "
                              "key — restore it from backup (do not delete it: the budget would restart at zero)"
                              ) from None


class LedgerTransaction:
    """Handle given out by :meth:`SiteLedger.transaction` (and :meth:`SiteLedger.view`, read only): the records,
    whether the checkpoint it was opened with binds (``bound``), and an ``append``."""

    def __init__(self, ledger: SiteLedger, fd: int | None, bound: bool = True, *, writable: bool = True) -> None:
        self._ledger = ledger
        self._fd = fd
        self._writable = writable
        self.bound = bound

    @property
    def records(self) -> list[dict]:
        """Every record (the whole ledger is loaded first if it was opened from a checkpoint)."""
        return self.all()

    @property
    def count(self) -> int:
        return self._ledger.count

    def all(self) -> list[dict]:
        """Every record, oldest first; loads (and checks) the prefix a checkpoint skipped."""
        led = self._ledger
        if led._base:
            led._reset()
            if self._fd is not None:
                led._refresh(self._fd, writable=False)
        return led._records

    def since(self, count: int) -> list[dict]:
        """The records with ``seq >= count`` (``count`` not before the loaded part: else every record is loaded)."""
        led = self._ledger
        if count < led._base:
            self.all()
        return led._records[count - led._base:]

    def checkpoint(self) -> Checkpoint:
        return self._ledger.checkpoint()

    def append(self, body: Mapping[str, Any]) -> dict:
        led = self._ledger
        if self._fd is None or not self._writable:
            raise LedgerError("a read-only view of the ledger cannot append")
        clash = set(body) & (set(ENVELOPE_FIELDS) - {"type"} | {"sig"})
        if clash:
            raise LedgerError(f"record body may not set envelope field(s) {sorted(clash)}")
        if body.get("type") not in RECORD_TYPES:
            raise LedgerError(f"record type {body.get('type')!r} is not one of {', '.join(RECORD_TYPES)}")
        rec: dict[str, Any] = {k: v for k, v in body.items() if k != "type"}
        rec.update(v=SCHEMA_VERSION, type=body["type"], site=led.site, seq=led.count,
                   prev=led._last_hash, time=utc_now(), key_id=led.key_id)
        if led._key is not None:
            rec = sign_record(rec, led._key)
        line = canonical_json(rec) + b"\n"
        write_all(self._fd, line)
        durable_sync(self._fd)  # the record is on disk before the caller acts on it (write-ahead)
        led._records.append(rec)
        led._last_start = led._offset
        led._offset += len(line)
        led._last_hash = record_hash(rec)
        return rec


# ------------------------------------------------------------------------------------------------ consortium ledger


def _reported_epsilon(record: Mapping[str, Any]) -> float:
    """The epsilon a stored record reported (0 if unreadable: a damaged old record must not block a site)."""
    try:
        return epsilon_value(record.get("epsilon_after"))
    except LedgerError:
        return 0.0


def _newest_records_of_earlier_runs(ledgers: Iterable[Path]) -> dict[str, tuple[str, dict]]:
    """Per site, the highest-seq record it sent in the given ledgers of earlier runs (named by their folder).

    A site's ledger only grows, so a later run that receives a lower ``seq`` (or a lower epsilon) has
    met a site whose ledger was deleted or rolled back — the one way a site could make its lifetime
    budget restart. An unreadable line is never skipped: it may be the newest record of a site, and a site
    rolled back to before it would then be accepted again, so it raises :class:`LedgerError` naming the line.
    """
    out: dict[str, tuple[str, dict]] = {}
    for other in ledgers:
        if not Path(other).is_file():
            continue
        for line, rec, _raw in read_jsonl(other):
            if (not isinstance(rec, dict) or envelope_problems(rec) or not isinstance(rec.get("seq"), int)
                    or isinstance(rec.get("seq"), bool)):
                raise LedgerError(
                    f"{other} line {line}: not a JSON record (a torn write or an edit) in an earlier run's consortium "
                    "ledger. It may hold a site's newest record, and a site whose ledger was rolled back to before it "
                    "would be accepted again (a rollback of its spent budget), so no new run starts. Restore that "
                    "file from backup, or replace the line with the record from the site's own ledger (same site and "
                    "seq; `atoll audit verify` on that run with --site-ledger shows which)")
            site = str(rec.get("site", ""))
            if site not in out or rec["seq"] > out[site][1]["seq"]:
                out[site] = (Path(other).parent.name, rec)
    return out


class ConsortiumLedger:
    """The server's copy of the sites' ``round`` records for one run: ``run_root/ledger.jsonl``.

    ``earlier_runs``: ledger files of the consortium's earlier runs. A site's ledger only grows, so a record
    whose ``seq`` or epsilon is below what the site reported there means its ledger was deleted or rolled
    back (the one way a site could restart its lifetime budget): rejected.

    ``group_commit``: one ``fdatasync`` per :meth:`sync` instead of one per accepted record (see :meth:`accept`).

    With ``keys_dir`` (enrolled ``<site>.pub`` files) every record must be signed by its site's enrolled key;
    without it records are stored unverified (a warning says so). Accepted records are appended verbatim
    (canonical bytes, fsynced) so the auditor can re-check every signature.
    """

    FILENAME = "ledger.jsonl"

    def __init__(self, run_root: str | Path, keys_dir: str | Path | None = None, *,
                 earlier_runs: Iterable[str | Path] = (), group_commit: bool = False) -> None:
        self.root = Path(run_root)
        self.path = self.root / self.FILENAME
        self.keys_dir = Path(keys_dir) if keys_dir else None
        if self.keys_dir is not None and not self.keys_dir.is_dir():
            raise LedgerError(f"keys_dir {self.keys_dir} does not exist; enroll site public keys there as <site>.pub")
        if self.keys_dir is None:
            log.warning("consortium ledger %s: no enrolled site keys (keys_dir unset); ledger records are "
                        "stored UNVERIFIED", self.path)
        self._keys: dict[str, Ed25519PublicKey] = {}
        self.group_commit = bool(group_commit)
        self._unsynced = 0  # records accepted under group commit since the last sync()
        self._records: list[dict] = []
        # Per site, the newest record seen: from an earlier run first (named in _last_run), then this run's.
        self._last: dict[str, dict] = {}
        self._last_run: dict[str, str] = {}
        earlier = _newest_records_of_earlier_runs(
            Path(p) for p in earlier_runs if Path(p).resolve() != self.path.resolve())
        for site, (run, rec) in earlier.items():
            self._last[site], self._last_run[site] = rec, run
        if self.path.exists():
            for line, rec, _raw in read_jsonl(self.path):
                if rec is None:
                    raise LedgerError(f"{self.path} line {line}: not a JSON record; the run's ledger is damaged")
                self._records.append(rec)
                self._remember(rec)

    def _public_key(self, site: str) -> Ed25519PublicKey:
        from privacy.keys import KeyFileError, load_public_key

        if site not in self._keys:
            assert self.keys_dir is not None
            path = self.keys_dir / f"{site}.pub"
            if not path.exists():
                raise LedgerError(f"site {site!r} is not enrolled: no public key {path}")
            try:
                self._keys[site] = load_public_key(path)
            except KeyFileError as exc:
                raise LedgerError(f"site {site!r}: enrolled key unusable: {exc}") from None
        return self._keys[site]

    def check(self, record: Any, *, site: str) -> None:
        """All checks :meth:`accept` makes, without storing; raises :class:`LedgerError`."""
        problems = envelope_problems(record)
        if problems:
            raise LedgerError(f"malformed ledger record from {site!r}: {problems[0]}")
        if record["site"] != site:
            raise LedgerError(f"record names site {record['site']!r} but came from site {site!r}")
        if record["type"] != "round":
            raise LedgerError(f"site {site!r} sent a {record['type']!r} record; only 'round' records are accepted")
        for f in ("run_id", "server_round", "epsilon_after", "delta", "history"):
            if f not in record:
                raise LedgerError(f"round record from {site!r} (seq {record['seq']}) lacks field {f!r}")
        try:
            eps = epsilon_value(record["epsilon_after"])
        except LedgerError as exc:
            raise LedgerError(f"round record from {site!r} (seq {record['seq']}): field 'epsilon_after': {exc}") from None
        if self.keys_dir is not None:
            pub = self._public_key(site)
            try:
                verify_record(record, pub)
            except LedgerError as exc:
                raise LedgerError(f"site {site!r} record seq {record['seq']} (run {record.get('run_id')!r} round "
                                  f"{record.get('server_round')!r}): {exc}") from None
        last = self._last.get(site)
        if last is not None:
            run = self._last_run.get(site)  # set while the newest record known is an earlier run's
            if record["seq"] <= last["seq"] and run is not None:
                raise LedgerError(
                    f"site {site!r} record seq {record['seq']}: its ledger is behind what it reported in run {run!r} "
                    f"(seq {last['seq']}, ε={last.get('epsilon_after')}): the site's ledger was reset or restored "
                    "from an older copy, which would under-report its spent budget. The site must restore its newest "
                    "ledger; a genuinely new dataset must be enrolled under a new site name")
            if record["seq"] <= last["seq"]:
                raise LedgerError(f"site {site!r}: field 'seq' {record['seq']} does not follow the last accepted "
                                  f"record's seq {last['seq']} (replayed or reordered record)")
            if record["seq"] == last["seq"] + 1 and record["prev"] != record_hash(last):
                raise LedgerError(f"site {site!r} record seq {record['seq']}: field 'prev' is not the hash of the "
                                  f"previous accepted record (seq {last['seq']}): chain broken")
            last_eps = _reported_epsilon(last)
            if eps < last_eps:
                where = f" in run {run!r}" if run is not None else ""
                raise LedgerError(f"site {site!r} record seq {record['seq']}: field 'epsilon_after' {eps:.4g} is "
                                  f"below the previously reported {last_eps:.4g}{where} (spent privacy cannot decrease)")

    def _remember(self, rec: dict) -> None:
        site = str(rec.get("site", ""))
        self._last[site] = rec
        self._last_run.pop(site, None)

    def accept(self, record: Any, *, site: str) -> dict:
        """Verify a site's round record (see :meth:`check`) and append it verbatim; raises :class:`LedgerError`.

        With ``group_commit`` the record is written but made durable only by the next :meth:`sync`: one
        ``fdatasync`` for a whole round's records. The server calls :meth:`sync` before it signs the round's digest
        (``server.outputs.RunOutputs.digest``), so no digest names a record that a crash could lose; a record lost
        before that belongs to a round that is redone on resume, and the site's own ledger keeps it anyway. (The
        site's ledger is never grouped: its reservation must be durable before training starts.)"""
        self.check(record, site=site)
        self.root.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        line = canonical_json(record) + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if created:
                fsync_dir(self.root)
            fcntl.flock(fd, fcntl.LOCK_EX)
            write_all(fd, line)
            if not self.group_commit:
                durable_sync(fd)
            else:
                self._unsynced += 1
        finally:
            os.close(fd)
        rec = json.loads(line)
        self._records.append(rec)
        self._remember(rec)
        return rec

    def sync(self) -> None:
        """Make every record accepted since the last call durable (one ``fdatasync`` for the group)."""
        if not self._unsynced:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            durable_sync(fd)  # flushes the file, whichever descriptor wrote it
        finally:
            os.close(fd)
        self._unsynced = 0

    def records(self, site: str | None = None) -> list[dict]:
        return [r for r in self._records if site is None or r.get("site") == site]

    def sites(self) -> list[str]:
        return sorted({str(r.get("site")) for r in self._records})

    def epsilon_series(self, site: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """Per site, in arrival order: ``{"run_id", "server_round", "seq", "epsilon", "delta"}`` (epsilon may be inf)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self._records:
            s = str(r.get("site"))
            if site is not None and s != site:
                continue
            try:
                eps = epsilon_value(r.get("epsilon_after"))
            except LedgerError:
                eps = float("nan")
            out.setdefault(s, []).append({"run_id": r.get("run_id"), "server_round": r.get("server_round"),
                                          "seq": r.get("seq"), "epsilon": eps, "delta": r.get("delta")})
        return out
