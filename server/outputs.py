"""A run's folder: settings, global weights per round, per-round history, status.

Layout of RUN_DIR/<run-name>/:
  settings.json        the lead's run settings as used
  weights/round-NNN.pt global weights after round NNN (000 = initial), torch state dict
  history.json         per round: each site's status, released train/val metrics, epsilon; aggregates
  checkpoint.json      the resume point (server.checkpoint): last completed round, its weights file and hash, the
                       position of digests.jsonl / ledger.jsonl / history.json at that commit; written last, atomically
  state/round-NNN.pt   what only the ServerApp's memory held after round NNN: strategy state, RNG states
  resumes.jsonl        one line per `atoll run resume`: when, from which round, what an unfinished round left behind
  resumed/N/           what resume N set aside: the tail of an unfinished round (digests, ledger records, history,
                       weights, the old status.json), kept for the record, never read again
  run.lock             held (flock) by the one ServerApp writing this folder
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


LOCK_FILE = "run.lock"
RUN_EXISTS_HINT = "`atoll run resume {root}` continues it; a new run needs a new --run-name"


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (it exists already, or another ServerApp writes it)."""


def _atomic_write(path: Path, text: str) -> None:
    from server.checkpoint import atomic_write_text

    atomic_write_text(path, text)


def settings_json(settings: Any, name: str) -> str:
    """settings.json as written (its hash is in every signed digest): the run's name filled in (a run started
    without one got a generated name, and a resume names it); ``resume`` is how the run was launched this time,
    not a setting of the run, so it is left out and a resumed run keeps the hash it started with."""
    data = dataclasses.asdict(settings)
    data["run_name"] = name
    data.pop("resume", None)
    return json.dumps(data, indent=2)


def lock_run_folder(root: Path) -> int:
    """Hold ``run.lock`` for this process's lifetime (released by the kernel when it dies, also on SIGKILL)."""
    import fcntl

    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderError(f"another ServerApp is writing {root} right now (it holds {root / LOCK_FILE}); "
                             f"`atoll run status {root}` shows it") from None
    return fd


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
    flower_run_id: int | None = None
    lock_fd: int | None = None

    @classmethod
    def create(cls, run_dir: Path, name: str, settings: Any, flower_run_id: int | None = None) -> "RunOutputs":
        """A new run folder; refuses a folder that already holds a run (its history is never overwritten)."""
        root = run_dir / name
        if (root / "settings.json").exists():
            raise RunFolderError(f"run {name!r} already exists in {run_dir} ({root / 'settings.json'}); "
                                 + RUN_EXISTS_HINT.format(root=root))
        (root / "weights").mkdir(parents=True, exist_ok=True)
        lock = lock_run_folder(root)
        if (root / "settings.json").exists():  # another ServerApp made it between the check and the lock
            os.close(lock)
            raise RunFolderError(f"run {name!r} already exists in {run_dir}; " + RUN_EXISTS_HINT.format(root=root))
        # a stop request left in a folder that was never a run does not stop this one (removed before
        # settings.json marks the folder a run, so that a stop written as soon as the folder is a run is never lost)
        (root / STOP_FILE).unlink(missing_ok=True)
        text = settings_json(settings, name)
        _atomic_write(root / "settings.json", text)
        return cls.attach(root, name, settings, flower_run_id, lock)

    @classmethod
    def attach(cls, root: Path, name: str, settings: Any, flower_run_id: int | None, lock_fd: int | None,
               history: list[dict] | None = None) -> "RunOutputs":
        """The outputs of the run in ``root`` (settings.json written), as this ServerApp process writes them."""
        from privacy.anchor import RunDigests, load_or_create_consortium_key

        text = (root / "settings.json").read_text()
        # who writes this folder: a run without status.json whose process is gone was killed, not running
        _atomic_write(root / SERVER_FILE, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                      "flower_run_id": flower_run_id, "started": time.time()}))
        out = cls(root, name, history=list(history or []),
                  settings_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), flower_run_id=flower_run_id,
                  lock_fd=lock_fd)
        out.ledger = _consortium_ledger(root, settings)
        key_folder = Path(settings.keys_dir) if getattr(settings, "keys_dir", "") else root.parent
        out.digests = RunDigests(root, load_or_create_consortium_key(key_folder), name)
        return out

    def close(self) -> None:
        """Release the run folder (the lock); the outputs stay readable."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

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

    def save_weights(self, server_round: int, arrays: ArrayRecord) -> str:
        """Write the global weights of ``server_round``; returns their models.state_dict_sha256."""
        import torch

        from server.update_pass import weights_sha256  # = models.state_dict_sha256, cached from the digest

        path = self.weights_path(server_round)
        tmp = path.with_suffix(".tmp")
        state = arrays.to_torch_state_dict()
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return weights_sha256(arrays)

    def commit(self, server_round: int, weights_sha256: str, strategy: Any, settings: Any) -> None:
        """Round ``server_round`` is complete: write the resume point (server.checkpoint), atomically, last."""
        from server import checkpoint as ck

        state = self.root / ck.STATE_DIR / f"round-{server_round:03d}.pt"
        state_sha = ck.save_state(state, strategy)
        point = ck.RunCheckpoint(
            round=server_round, run_name=self.name, settings_sha256=self.settings_sha256,
            run_shape_sha256=ck.run_shape_sha256(settings, self.name), weights=self.weights_path(server_round).name,
            weights_sha256=weights_sha256, state=f"{ck.STATE_DIR}/{state.name}", state_sha256=state_sha,
            digests=ck.FilePosition.of(self.digests.path), last_digest=self.digests.last_hash,
            ledger=ck.FilePosition.of(self.root / "ledger.jsonl"), history_rounds=len(self.history),
            flower_run_id=self.flower_run_id, time=ck.now())
        _atomic_write(self.root / ck.CHECKPOINT_FILE, point.to_json())
        for old in (self.root / ck.STATE_DIR).glob("round-*.pt"):  # only the newest state is ever read
            if old != state:
                old.unlink(missing_ok=True)

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
