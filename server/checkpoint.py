"""The run's resume point: what the ServerApp commits after each completed round, and reads back to go on.

Why one commit record: after a round the run folder changes in several files (the weights of the round, the
signed digest, the consortium's copy of the sites' records, history.json). A kill can land between any two of
those writes. ``checkpoint.json`` is written last, atomically (temp file, fsync, rename, fsync of the folder), and
names the position every other file had at that moment: the number of digests and the hash of the last one, the
length and SHA-256 of the ledger copy, the number of history entries, the weights file and its hash, and a state
file with what lives only in memory (the strategy's server-side optimiser state, the RNG states). Whatever lies
beyond those positions belongs to a round that never completed; :mod:`server.resume` sets it aside and the round
is run again (the sites answer it from their release cache at no charge, DESIGN.md "Privacy rules").

Flower itself leaves checkpointing to user code (flwr 1.41 has no strategy ``state_dict``), so the strategy state
is read from the attributes its strategies keep between rounds (:data:`STRATEGY_STATE_ATTRIBUTES`); a strategy of
our own can instead offer ``state_dict()`` / ``load_state_dict()``, which is used first.

torch is imported where the state file is read or written, so that the lead's CLI reads checkpoint.json without it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

CHECKPOINT_FILE = "checkpoint.json"
STATE_DIR = "state"
CHECKPOINT_VERSION = 1

#: attributes Flower 1.41's strategies (flwr.serverapp.strategy) change from round to round: FedAvgM's momentum
#: and the FedOpt family's moments (FedAdam, FedYogi, FedAdagrad) and their copy of the global arrays.
STRATEGY_STATE_ATTRIBUTES = ("current_arrays", "momentum_vector", "m_t", "v_t")


class CheckpointError(RuntimeError):
    """The checkpoint is missing, unreadable or does not match the run folder; the message says which file."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that it is either the old or the new content after a crash (fsync file and folder)."""
    from privacy.keys import fsync_dir

    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def file_prefix_sha256(path: Path, length: int) -> str:
    """SHA-256 of the first ``length`` bytes of ``path`` (an append-only file at a committed position)."""
    h = hashlib.sha256()
    remaining = length
    with open(path, "rb") as fh:
        while remaining > 0:
            chunk = fh.read(min(remaining, 1 << 20))
            if not chunk:
                raise CheckpointError(f"{path} is shorter ({length - remaining} bytes) than the {length} bytes the "
                                      "checkpoint committed: it was truncated after the round")
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class FilePosition:
    """How far an append-only file had grown at the commit: bytes, records and the SHA-256 of that prefix."""

    bytes: int = 0
    records: int = 0
    sha256: str = hashlib.sha256(b"").hexdigest()

    @classmethod
    def of(cls, path: Path) -> "FilePosition":
        if not path.exists():
            return cls()
        size = path.stat().st_size
        lines = path.read_bytes().count(b"\n")
        return cls(bytes=size, records=lines, sha256=file_prefix_sha256(path, size))


@dataclasses.dataclass(frozen=True)
class RunCheckpoint:
    """Everything needed to go on after ``round`` (0 = the run's start: initial weights, digest 0)."""

    round: int              # the last completed round (console.lead_view reads "round" and "weights" too)
    run_name: str
    settings_sha256: str
    run_shape_sha256: str   # the round config the sites approved (model, task, mechanism, rounds), round-independent
    weights: str            # round-NNN.pt in weights/
    weights_sha256: str     # models.state_dict_sha256 of those weights (what the next round sends)
    state: str              # state/round-NNN.pt: strategy state + RNG states
    state_sha256: str       # SHA-256 of that file's bytes
    digests: FilePosition   # digests.jsonl; digests.records == round + 1
    last_digest: str        # hash of the last digest (the next round's prev-digest)
    ledger: FilePosition    # ledger.jsonl (the sites' signed round records the server accepted)
    history_rounds: int     # entries of history.json
    flower_run_id: int | None = None
    time: float = 0.0
    version: int = CHECKPOINT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = CHECKPOINT_FILE) -> "RunCheckpoint":
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"version {data.get('version')!r}, this Atoll reads version {CHECKPOINT_VERSION} "
                                 "(a run from an older Atoll cannot be resumed)")
            data["digests"] = FilePosition(**data["digests"])
            data["ledger"] = FilePosition(**data["ledger"])
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: not a checkpoint of this Atoll ({exc})") from None


def read_checkpoint(root: Path) -> RunCheckpoint | None:
    """The run's committed checkpoint, or None if it has none; raises CheckpointError if it is unreadable."""
    path = Path(root) / CHECKPOINT_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return RunCheckpoint.from_json(text, str(path))


def run_shape_sha256(settings: Any, run_name: str) -> str:
    """Hash of the round config every round sends, less the round number and the digest chain: what the sites'
    manifest is built from (client.manifest), so a resume that would change it is refused before any round."""
    record = dict(settings.round_config(run_name, 0).to_record())
    for volatile in ("server-round", "prev-digest"):
        record.pop(volatile, None)
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ in-memory state


def capture_rng() -> dict[str, Any]:
    """Python's, NumPy's and torch's global RNG states (Flower samples nodes with ``random``)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def _to_saveable(value: Any) -> Any:
    """ArrayRecord / NumPy containers -> tagged torch tensors (so the state file loads with weights_only=True)."""
    import numpy as np
    import torch
    from flwr.app import ArrayRecord

    if isinstance(value, ArrayRecord):
        return {"__kind__": "ArrayRecord", "tensors": value.to_torch_state_dict()}
    if isinstance(value, np.ndarray):
        return {"__kind__": "ndarray", "tensor": torch.from_numpy(np.ascontiguousarray(value).copy())}
    if isinstance(value, dict):
        return {"__kind__": "dict", "items": {str(k): _to_saveable(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"__kind__": "list", "items": [_to_saveable(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"strategy state of type {type(value).__name__} cannot be checkpointed")


def _from_saveable(value: Any) -> Any:
    from flwr.app import ArrayRecord

    if not isinstance(value, dict) or "__kind__" not in value:
        return value
    kind = value["__kind__"]
    if kind == "ArrayRecord":
        return ArrayRecord(value["tensors"])
    if kind == "ndarray":
        return value["tensor"].numpy()
    if kind == "dict":
        return {k: _from_saveable(v) for k, v in value["items"].items()}
    return [_from_saveable(v) for v in value["items"]]


def strategy_state(strategy: Any) -> dict[str, Any]:
    """What the strategy carries from one round to the next (empty for FedAvg and the robust rules)."""
    if callable(getattr(strategy, "state_dict", None)):
        return {"state_dict": _to_saveable(strategy.state_dict())}
    return {name: _to_saveable(getattr(strategy, name)) for name in STRATEGY_STATE_ATTRIBUTES
            if hasattr(strategy, name)}


def load_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    if "state_dict" in state:
        strategy.load_state_dict(_from_saveable(state["state_dict"]))
        return
    for name, value in state.items():
        if name not in STRATEGY_STATE_ATTRIBUTES or not hasattr(strategy, name):
            raise CheckpointError(f"the checkpoint holds strategy state {name!r}, which strategy "
                                  f"{type(strategy).__name__} does not have (was the run's strategy changed?)")
        setattr(strategy, name, _from_saveable(value))


def save_state(path: Path, strategy: Any) -> str:
    """Write the strategy and RNG state atomically; returns the file's SHA-256."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"strategy": strategy_state(strategy), "rng": capture_rng()}, buf)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_state(path: Path, sha256: str) -> dict[str, Any]:
    import io

    import torch

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (the checkpoint names it)") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{path} does not match the SHA-256 its checkpoint committed (altered or damaged)")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def now() -> float:
    return time.time()
