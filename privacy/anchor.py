"""The consortium's signed, chained round digests: ``RUN_DIR/<run>/digests.jsonl``.

Why: a site's ledger and the server's copy of it can both be cut at the same point (the site and the server
agree, or one admin holds both), and every remaining link still verifies. The digests tie the end of that
history to other parties and other traces:

* after each round the server appends one digest, signed with the consortium's Ed25519 key, naming every site
  record it accepted in that round (site, seq, record SHA-256), the hash of the run settings and the hash of the
  global weights it saved; digest ``r`` carries the hash of digest ``r - 1`` (``prev``), round 0 is the run's
  start (settings + initial weights);
* the server sends the hash of digest ``r - 1`` in round ``r``'s config (``prev-digest``) and each site signs it
  into its round record (``server_prev_digest``): a site countersigns what the server says happened before;
* ``atoll audit verify`` checks the digests against the server copy, the site ledgers, history.json, the saved
  weights of every round and status.json. Dropping a round now means rewriting the consortium's signed chain,
  every other site's countersignature of it, history.json and the weights files together.

What collusion can still hide is listed in docs/security.md ("Anchored ledgers").

Record (canonical JSON, :func:`privacy.ledger.canonical_json`)::

    {"v": 1, "type": "digest", "run_id", "server_round", "prev", "time", "settings_sha256",
     "weights_sha256" (null when the round was not aggregated), "accepted": [{"site", "seq", "record_sha256"}],
     "key_id", "sig"}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.keys import fsync_dir, write_all
from privacy.ledger import GENESIS, LedgerError, canonical_json, record_hash, sign_record, utc_now

DIGESTS_FILE = "digests.jsonl"
CONSORTIUM_KEY_FILE = "consortium_ed25519.pem"
CONSORTIUM_PUB_FILE = "consortium_ed25519.pub"
DIGEST_FIELDS = ("v", "type", "run_id", "server_round", "prev", "time", "settings_sha256", "weights_sha256",
                 "accepted", "key_id", "sig")


def load_or_create_consortium_key(folder: str | Path) -> Ed25519PrivateKey:
    """The consortium's digest-signing key ``folder/consortium_ed25519.pem`` (created 0600 with its .pub if absent).

    The public half (``consortium_ed25519.pub``) is what sites and auditors pin.
    """
    from privacy.keys import ensure_site_key, load_private_key

    path = Path(folder) / CONSORTIUM_KEY_FILE
    ensure_site_key(path)
    return load_private_key(path)


class RunDigests:
    """Append-only writer of one run's digest chain (resumes an existing file)."""

    def __init__(self, run_root: str | Path, key: Ed25519PrivateKey, run_id: str) -> None:
        self.path = Path(run_root) / DIGESTS_FILE
        self.key = key
        self.run_id = run_id
        self.records: list[dict] = []
        if self.path.exists():
            for i, raw in enumerate(self.path.read_bytes().splitlines(), start=1):
                try:
                    self.records.append(json.loads(raw))
                except json.JSONDecodeError:
                    raise LedgerError(f"{self.path} line {i}: not a JSON record; the run's digest chain is damaged "
                                      "(restore it from backup)") from None

    @property
    def last_hash(self) -> str:
        return record_hash(self.records[-1]) if self.records else GENESIS

    def append(self, server_round: int, *, settings_sha256: str, weights_sha256: str | None,
               accepted: Iterable[Mapping[str, Any]]) -> str:
        """Sign and append the digest of ``server_round``; return its hash (what round + 1 sends as prev-digest)."""
        rows = sorted(({"site": str(a["site"]), "seq": int(a["seq"]), "record_sha256": str(a["record_sha256"])}
                       for a in accepted), key=lambda a: (a["site"], a["seq"]))
        rec = sign_record({"v": 1, "type": "digest", "run_id": self.run_id, "server_round": int(server_round),
                           "prev": self.last_hash, "time": utc_now(), "settings_sha256": settings_sha256,
                           "weights_sha256": weights_sha256, "accepted": rows}, self.key)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if created:
                fsync_dir(self.path.parent)
            write_all(fd, canonical_json(rec) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records.append(rec)
        return record_hash(rec)


def accepted_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    """How a digest names one accepted site record."""
    return {"site": record["site"], "seq": record["seq"], "record_sha256": record_hash(record)}
