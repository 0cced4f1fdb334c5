"""A run's folder: settings, global weights per round, per-round history, status.

Layout of RUN_DIR/<run-name>/:
  settings.json        the lead's run settings as used
  weights/round-NNN.pt global weights after round NNN (000 = initial), torch state dict
  history.json         per round: each site's status, released train/val metrics, epsilon; aggregates
  checkpoint.json      last completed round and its weights file (written atomically)
  ledger.jsonl         the consortium's copy of the sites' signed ledger records (privacy.ledger)
  digests.jsonl        the consortium's signed, chained round digests (privacy.anchor): what each round accepted,
                       the settings hash, the saved weights' hash; the next round's config carries the last one
  tensorboard/         the same per-round metrics as TensorBoard event files (server.tensorboard_events)
  status.json          completed | stopped (+ reason; a stop the lead asked for says so and at which round)
  server.json          the ServerApp's pid, host and Flower run id: `atoll run status` tells a killed run
  stop-request.json    written by `atoll run stop`: the ServerApp stops cleanly before the next round

torch and Flower are imported where weights are written, so that the lead's CLI reads a run folder without them.
The digest-signing key is ``consortium_ed25519.pem`` in the keys folder (or in RUN_DIR when the demo runs
without one); the auditor pins its ``consortium_ed25519.pub`` (sites countersign digest hashes, they do not verify them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

SERVER_FILE = "server.json"
STOP_FILE = "stop-request.json"
STOPPED_BY_LEAD = "stopped by the lead"


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
    def create(cls, run_dir: Path, name: str, settings: Any, flower_run_id: int | None = None) -> "RunOutputs":
        from privacy.anchor import RunDigests, load_or_create_consortium_key

        root = run_dir / name
        (root / "weights").mkdir(parents=True, exist_ok=True)
        # a reused run name never inherits an old stop request (removed before settings.json marks the folder a
        # run, so that a stop written as soon as the folder is a run is never lost)
        (root / STOP_FILE).unlink(missing_ok=True)
        text = json.dumps(dataclasses.asdict(settings), indent=2)
        _atomic_write(root / "settings.json", text)
        # who writes this folder: a run without status.json whose process is gone was killed, not running
        _atomic_write(root / SERVER_FILE, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                      "flower_run_id": flower_run_id, "started": time.time()}))
        out = cls(root, name, settings_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())
        out.ledger = _consortium_ledger(root, settings)
        key_folder = Path(settings.keys_dir) if getattr(settings, "keys_dir", "") else run_dir
        out.digests = RunDigests(root, load_or_create_consortium_key(key_folder), name)
        return out

    def digest(self, server_round: int, arrays: ArrayRecord | None, accepted: list[dict]) -> str:
        """Sign and append this round's digest (before its weights are saved); return its hash."""
        from server.update_pass import weights_sha256  # = models.state_dict_sha256, zero-copy and cached
        from privacy.anchor import accepted_entry

        weights = weights_sha256(arrays) if arrays is not None else None
        if self.ledger is not None:
            self.ledger.sync()  # the round's records (group commit) are durable before a digest names them
        return self.digests.append(server_round, settings_sha256=self.settings_sha256, weights_sha256=weights,
                                   accepted=[accepted_entry(r) for r in accepted])

    def weights_path(self, server_round: int) -> Path:
        return self.root / "weights" / f"round-{server_round:03d}.pt"

    def save_weights(self, server_round: int, arrays: ArrayRecord) -> None:
        import torch

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
        from server.tensorboard_events import write_round  # TensorBoard view of the same entry (never fails a run)

        write_round(self.root, entry)

    def finish(self, status: str, reason: str = "", **extra: Any) -> None:
        self.status, self.reason = status, reason
        _atomic_write(self.root / "status.json", json.dumps({"status": status, "reason": reason,
                                                              "rounds": len(self.history), **extra}))

    @property
    def stopped_by_lead(self) -> bool:
        return self.status == "stopped" and self.reason.startswith(STOPPED_BY_LEAD)

    def stop_requested(self) -> dict | None:
        """The lead's stop request (`atoll run stop`) once it is due, checked by the ServerApp before each round.

        A request may name the round after which to stop (``after_round``); until that round is recorded it waits.
        """
        request = read_stop_request(self.root)
        if request is None:
            return None
        after = request.get("after_round")
        return request if not isinstance(after, int) or len(self.history) >= after else None

    def finish_stopped_by_lead(self, request: dict, num_rounds: int) -> None:
        """A clean stop between rounds: every round a site was asked to train is complete and recorded."""
        done = len(self.history)
        why = request.get("reason") or ""
        rounds = "round 1" if done == 1 else f"rounds 1-{done}"
        reason = (f"{STOPPED_BY_LEAD} at round {done} of {num_rounds} ({rounds} complete and recorded; "
                  f"round {done + 1} was never sent)" if done else f"{STOPPED_BY_LEAD} before round 1")
        self.finish("stopped", reason + (f": {why}" if why else ""), stopped_by="lead", stopped_at_round=done,
                    requested_at=request.get("requested_at"))


def write_stop_request(root: Path, reason: str = "", after_round: int | None = None) -> Path:
    path = Path(root) / STOP_FILE
    _atomic_write(path, json.dumps({"requested_at": time.time(), "reason": reason, "after_round": after_round}))
    return path


def read_stop_request(root: Path) -> dict | None:
    try:
        data = json.loads((Path(root) / STOP_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"reason": ""}  # a torn request is still the lead's request to stop
    return data if isinstance(data, dict) else {"reason": ""}


def _consortium_ledger(root: Path, settings: Any):
    """The run's consortium ledger; verifies site signatures when the lead gives enrolled keys."""
    from privacy.ledger import ConsortiumLedger

    keys = Path(settings.keys_dir) if getattr(settings, "keys_dir", "") else None
    # every earlier run in this runs folder: a site whose ledger went backwards since then is rejected
    earlier = [p for p in sorted(root.parent.glob(f"*/{ConsortiumLedger.FILENAME}"))
               if p.parent != root and (p.parent / "settings.json").is_file()]
    # group commit: the round's records are fsynced together, before the round's digest (RunOutputs.digest)
    return ConsortiumLedger(root, keys_dir=keys, earlier_runs=earlier, group_commit=True)
