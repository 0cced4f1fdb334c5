"""Reopen an interrupted run at its last committed round (`atoll run resume`, or `atoll demo` run again).

The run folder is checked against its checkpoint (:mod:`server.checkpoint`) before anything changes: the settings
must hash as when the run started (so the sites' approvals of its manifest still hold and every signed digest
names the same settings), the weights of the committed round must be those the checkpoint names, and the digest
chain and the ledger copy must start with exactly the bytes committed. Then whatever lies beyond the committed
positions — the signed digest, accepted site records, history entry and weights of a round the ServerApp did not
finish, a torn last line, the final status of a stopped run — is moved to ``resumed/N/`` and cut from the live
files, so the folder is again exactly as it was after the committed round, and the round is run again.

Cutting is safe for the privacy record: a site's round record is never lost, it is in the site's own ledger, and
the site answers the repeated round with the very record and update it released (client.release_cache, no new
charge), which the server accepts again. A cut digest was never sent to any site (round r + 1 carries digest r),
so no countersignature refers to it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from server import checkpoint as ck
from server.outputs import (STOP_FILE, RunFolderError, RunOutputs, _atomic_write, lock_run_folder,
                            settings_json)

log = logging.getLogger("atoll.server")

RESUMES_FILE = "resumes.jsonl"
RESUMED_DIR = "resumed"


class ResumeRefused(RunFolderError):
    """The run cannot be resumed as asked; the message says why and what to do."""


@dataclasses.dataclass
class Resumed:
    """A reopened run: its outputs (history up to the committed round), the checkpoint, and what was set aside."""

    outputs: RunOutputs
    checkpoint: ck.RunCheckpoint
    state: dict[str, Any]
    set_aside: dict[str, Any]


def resume_run(run_dir: Path, name: str, settings: Any, flower_run_id: int | None) -> Resumed:
    """Check the run folder against its checkpoint, set the unfinished round aside, and reopen it."""
    root = Path(run_dir) / name
    if not (root / "settings.json").is_file():
        raise ResumeRefused(f"there is no run {name!r} in {run_dir} to resume (no {root / 'settings.json'}); "
                            "start it with `atoll run start`")
    lock = lock_run_folder(root)
    try:
        point, state = _checked(root, name, settings)
        set_aside = _set_aside(root, point)
        history = json.loads((root / "history.json").read_text()) if (root / "history.json").exists() else []
        out = RunOutputs.attach(root, name, settings, flower_run_id, lock, history=history)
    except BaseException:
        os.close(lock)
        raise
    entry = {"time": ck.now(), "flower_run_id": flower_run_id, "from_round": point.round,
             "previous_flower_run_id": point.flower_run_id, "set_aside": set_aside}
    with open(root / RESUMES_FILE, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return Resumed(out, point, state, set_aside)


def _checked(root: Path, name: str, settings: Any) -> tuple[ck.RunCheckpoint, dict[str, Any]]:
    import hashlib

    import torch

    from models import state_dict_sha256

    status = _read_json(root / "status.json")
    if isinstance(status, dict) and status.get("status") == "completed":
        raise ResumeRefused(f"run {name!r} is completed ({root / 'status.json'}); there is nothing to resume")
    point = ck.read_checkpoint(root)
    if point is None:
        raise ResumeRefused(f"run {name!r} has no {ck.CHECKPOINT_FILE} (its ServerApp stopped before round 0 was "
                            "committed, or an Atoll older than resume wrote it); start a new run instead")
    stored = (root / "settings.json").read_text()
    want = settings_json(settings, name)
    if hashlib.sha256(stored.encode()).hexdigest() != point.settings_sha256:
        raise ResumeRefused(f"{root / 'settings.json'} is not the settings the checkpoint committed (changed after "
                            "the run started); the run cannot be resumed")
    if want != stored:
        changed = _changed_keys(json.loads(stored), json.loads(want))
        raise ResumeRefused(f"the resumed run's settings differ from the run's own ({', '.join(changed)}); a resume "
                            f"continues the same run, so it takes the settings of {root / 'settings.json'}")
    if point.run_name != name:
        raise ResumeRefused(f"{root / ck.CHECKPOINT_FILE} belongs to run {point.run_name!r}, not {name!r}")
    if point.run_shape_sha256 != ck.run_shape_sha256(settings, name):
        raise ResumeRefused("the round config this Atoll would send differs from the one the sites approved for "
                            f"run {name!r} (a different Atoll version?); resume it with the Atoll that started it")
    weights = root / "weights" / point.weights
    try:
        got = state_dict_sha256(torch.load(weights, map_location="cpu", weights_only=True))
    except FileNotFoundError:
        raise ResumeRefused(f"{weights} is missing: the checkpoint's global weights are gone") from None
    except Exception as exc:  # noqa: BLE001 - any damage: not resumable, say which file
        raise ResumeRefused(f"{weights} is unreadable ({type(exc).__name__}); the run cannot be resumed") from None
    if got != point.weights_sha256:
        raise ResumeRefused(f"{weights} is not the model the checkpoint committed (hash {got[:12]}…, committed "
                            f"{point.weights_sha256[:12]}…)")
    for label, path, pos in (("digest chain", root / "digests.jsonl", point.digests),
                             ("ledger copy", root / "ledger.jsonl", point.ledger)):
        if pos.bytes == 0:
            continue
        try:
            prefix = ck.file_prefix_sha256(path, pos.bytes)
        except FileNotFoundError:
            raise ResumeRefused(f"{path} is missing, but the checkpoint committed {pos.records} record(s) of it "
                                f"(the run's {label} was deleted)") from None
        except ck.CheckpointError as exc:
            raise ResumeRefused(str(exc)) from None
        if prefix != pos.sha256:
            raise ResumeRefused(f"{path}: the first {pos.records} record(s) are not those the checkpoint committed "
                                f"(the run's {label} was altered after round {point.round}); `atoll audit verify` "
                                "says how")
    try:
        state = ck.load_state(root / point.state, point.state_sha256)
    except ck.CheckpointError as exc:
        raise ResumeRefused(str(exc)) from None
    return point, state


def _changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _changed_keys(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out or ["formatting"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _set_aside(root: Path, point: ck.RunCheckpoint) -> dict[str, Any]:
    """Move everything past the committed round into resumed/N/; returns what was moved (for resumes.jsonl)."""
    n = 1 + sum(1 for _ in (root / RESUMED_DIR).glob("*")) if (root / RESUMED_DIR).is_dir() else 1
    aside = root / RESUMED_DIR / str(n)
    moved: dict[str, Any] = {}

    def folder() -> Path:
        aside.mkdir(parents=True, exist_ok=True)
        return aside

    for fname, pos in (("digests.jsonl", point.digests), ("ledger.jsonl", point.ledger)):
        path = root / fname
        if not path.exists() or path.stat().st_size <= pos.bytes:
            continue
        with open(path, "r+b") as fh:
            fh.seek(pos.bytes)
            tail = fh.read()
            (folder() / fname).write_bytes(tail)
            fh.truncate(pos.bytes)
            fh.flush()
            os.fsync(fh.fileno())
        moved[fname] = tail.count(b"\n") + (0 if tail.endswith(b"\n") else 1)
    history = _read_json(root / "history.json")
    if isinstance(history, list) and len(history) > point.history_rounds:
        (folder() / "history.json").write_text(json.dumps(history[point.history_rounds:], indent=2))
        _atomic_write(root / "history.json", json.dumps(history[:point.history_rounds], indent=2))
        moved["history.json"] = [e.get("round") for e in history[point.history_rounds:] if isinstance(e, dict)]
    for p in sorted((root / "weights").glob("round-*.pt")):
        try:
            rnd = int(p.stem.split("-", 1)[1])
        except ValueError:
            continue
        if rnd > point.round:
            (folder() / "weights").mkdir(exist_ok=True)
            shutil.move(str(p), aside / "weights" / p.name)
            moved.setdefault("weights", []).append(p.name)
    for fname in ("status.json", STOP_FILE):
        if (root / fname).exists():
            shutil.move(str(root / fname), folder() / fname)
            moved[fname] = True
    return moved


def interrupted_run(run_dir: Path, settings: Any) -> tuple[str, ck.RunCheckpoint] | None:
    """The newest run in ``run_dir`` with exactly these settings whose ServerApp was killed (a checkpoint, no final
    status, no process holding its folder), as (run name, checkpoint); None if there is none.

    What `atoll demo` run again with the same --out continues instead of starting over.
    """
    import fcntl

    found = []
    for root in Path(run_dir).glob("*/" + ck.CHECKPOINT_FILE):
        root = root.parent
        if (root / "status.json").exists() or not (root / "settings.json").is_file():
            continue
        try:
            point = ck.read_checkpoint(root)
            same = (root / "settings.json").read_text() == settings_json(settings, root.name)
        except (OSError, ck.CheckpointError):
            continue
        if point is None or not same or point.round >= settings.num_server_rounds:
            continue
        try:
            fd = os.open(root / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: no ServerApp writes it
        except BlockingIOError:
            continue
        finally:
            os.close(fd)
        found.append((point.time, root.name, point))
    if not found:
        return None
    _, name, point = max(found)
    return name, point
