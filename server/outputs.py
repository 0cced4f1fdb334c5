"""A run's folder: settings, global weights per round, per-round history, status.

Layout of RUN_DIR/<run-name>/:
  settings.json        the lead's run settings as used
  weights/round-NNN.pt global weights after round NNN (000 = initial), torch state dict
  history.json         per round: each site's status, released train/val metrics, epsilon; aggregates
  checkpoint.json      last completed round and its weights file (written atomically)
  ledger.jsonl         the consortium's copy of the sites' signed ledger records (privacy.ledger)
  digests.jsonl        the consortium's signed, chained round digests (privacy.anchor): what each round accepted,
                       the settings hash, the saved weights' hash; the next round's config carries the last one
  status.json          completed | stopped (+ reason)

The digest-signing key is ``consortium_ed25519.pem`` in the keys folder (or in RUN_DIR when the demo runs
without one); the auditor pins its ``consortium_ed25519.pub`` (sites countersign digest hashes, they do not verify them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclasses.dataclass
class RunOutputs:
    root: Path
    name: str
    history: list[dict] = dataclasses.field(default_factory=list)
    ledger: Any = None
    status: str = "running"
    reason: str = ""
    settings_sha256: str = ""
    digests: Any = None

    @classmethod
    def create(cls, run_dir: Path, name: str, settings: Any) -> "RunOutputs":
        from privacy.anchor import RunDigests, load_or_create_consortium_key

        root = run_dir / name
        (root / "weights").mkdir(parents=True, exist_ok=True)
        text = json.dumps(dataclasses.asdict(settings), indent=2)
        _atomic_write(root / "settings.json", text)
        out = cls(root, name, settings_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())
        out.ledger = _consortium_ledger(root, settings)
        key_folder = Path(settings.keys_dir) if getattr(settings, "keys_dir", "") else run_dir
        out.digests = RunDigests(root, load_or_create_consortium_key(key_folder), name)
        return out

    def digest(self, server_round: int, arrays: ArrayRecord | None, accepted: list[dict]) -> str:
        """Sign and append this round's digest (before its weights are saved); return its hash."""
        from models import state_dict_sha256
        from privacy.anchor import accepted_entry

        weights = state_dict_sha256(arrays.to_torch_state_dict()) if arrays is not None else None
        return self.digests.append(server_round, settings_sha256=self.settings_sha256, weights_sha256=weights,
                                   accepted=[accepted_entry(r) for r in accepted])

    def weights_path(self, server_round: int) -> Path:
        return self.root / "weights" / f"round-{server_round:03d}.pt"

    def save_weights(self, server_round: int, arrays: ArrayRecord) -> None:
        path = self.weights_path(server_round)
        tmp = path.with_suffix(".tmp")
        torch.save(arrays.to_torch_state_dict(), tmp)
        os.replace(tmp, path)
        _atomic_write(self.root / "checkpoint.json",
                      json.dumps({"round": server_round, "weights": path.name, "time": time.time()}))

    def record_round(self, book, train_wall_seconds: float) -> None:
        entry = book.as_dict()
        entry["train_wall_seconds"] = train_wall_seconds
        self.history.append(entry)
        _atomic_write(self.root / "history.json", json.dumps(self.history, indent=2))

    def finish(self, status: str, reason: str = "") -> None:
        self.status, self.reason = status, reason
        _atomic_write(self.root / "status.json", json.dumps({"status": status, "reason": reason,
                                                              "rounds": len(self.history)}))


def _consortium_ledger(root: Path, settings: Any):
    """The run's consortium ledger; verifies site signatures when the lead gives enrolled keys."""
    from privacy.ledger import ConsortiumLedger

    keys = Path(settings.keys_dir) if getattr(settings, "keys_dir", "") else None
    # every earlier run in this runs folder: a site whose ledger went backwards since then is rejected
    earlier = [p for p in sorted(root.parent.glob(f"*/{ConsortiumLedger.FILENAME}"))
               if p.parent != root and (p.parent / "settings.json").is_file()]
    return ConsortiumLedger(root, keys_dir=keys, earlier_runs=earlier)
