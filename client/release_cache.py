"""The site's copy of the updates it has released, so that a replayed round costs no privacy.

When the server asks again for a round the site already answered (a lost reply, a restarted ServerApp
resuming from a checkpoint, Flower re-delivering a message), the site can either train again — fresh
noise on the same data, a second release that must be charged — or send exactly the bytes it already
released, which is post-processing and free. The budget guard (:meth:`privacy.guard.BudgetGuard.reserve`)
decides; this cache supplies the bytes. An entry is looked up by the SHA-256 in the signed ``round``
record and re-hashed on load, so a damaged or swapped file is never sent in place of the original.

Only the newest ``keep`` entries are kept: replays concern recent rounds, and a pruned entry only means
the replay is charged as a new round (safe). The folder lives in the site's state directory and holds
nothing that has not already left the site (noised updates and released metrics).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from models import UPDATE_HASH, state_dict_digest, state_dict_sha256

log = logging.getLogger("atoll.site")

DEFAULT_KEEP = 8


@dataclass(frozen=True)
class Released:
    """One released reply: the update's tensors and the metrics sent with it."""

    update: dict[str, torch.Tensor]
    metrics: dict[str, float]


class ReleaseCache:
    """``state_dir/released/<update_sha256>.pt``, newest ``keep`` kept."""

    def __init__(self, state_dir: str | Path, keep: int = DEFAULT_KEEP) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(state_dir) / "released"
        self.keep = keep

    def _path(self, update_sha256: str) -> Path:
        if len(update_sha256) != 64 or any(c not in "0123456789abcdef" for c in update_sha256):
            raise ValueError(f"not a 64-hex-digit update digest: {update_sha256!r}")
        return self.root / f"{update_sha256}.pt"

    def put(self, update: dict[str, torch.Tensor], metrics: dict[str, float]) -> str:
        """Store a reply before it is released; returns its digest (``models.UPDATE_HASH``, as the ledger will
        record it)."""
        sha = state_dict_digest(update, UPDATE_HASH)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save({"update": {k: v.detach().cpu() for k, v in update.items()},
                            "metrics": {k: float(v) for k, v in metrics.items()}}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path(sha))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._prune()
        return sha

    def get(self, update_sha256: str) -> Released | None:
        """The released reply with this hash, or ``None`` (absent, unreadable, or not matching its hash)."""
        path = self._path(update_sha256)
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            update, metrics = blob["update"], blob["metrics"]
        except Exception as exc:  # noqa: BLE001 - any damage means: not resendable
            log.warning("release cache entry %s unreadable (%s); a replay will be charged as a new round",
                        path.name, type(exc).__name__)
            return None
        # entries released before the update digest was BLAKE3 are named by their SHA-256
        if update_sha256 not in (state_dict_digest(update, UPDATE_HASH), state_dict_sha256(update)):
            log.warning("release cache entry %s does not match its hash; a replay will be charged as a new round",
                        path.name)
            return None
        return Released(update=update, metrics={k: float(v) for k, v in metrics.items()})

    def _prune(self) -> None:
        entries = sorted(self.root.glob("*.pt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in entries[self.keep:]:
            old.unlink(missing_ok=True)
