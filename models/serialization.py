"""Weight hashing and model export.

``state_dict_sha256`` is the identity of a set of weights in the ledger (weights in/out of a round), so it
must be canonical: independent of dict order and device, sensitive to names, dtypes, shapes and bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


# The digest constructions a ledger record may name in its ``update_hash`` field. Both hash the same framed
# byte stream (see :class:`FramedDigest`); only the hash function differs. "sha256" is the construction of
# every record written before ``update_hash`` existed (a record without the field means "sha256"); "blake3"
# (the BLAKE3 reference implementation's Python bindings) runs several times faster per core, which is what
# lets the server check every update at memory speed (bench/aggregate.py). Weights hashes other than the
# update's (weights in, the server's round digests, exports) stay SHA-256.
HASH_SCHEMES = ("sha256", "blake3")
UPDATE_HASH = "blake3"


def tensor_frame(name: str, dtype: str, shape: tuple[int, ...] | list[int], nbytes: int) -> bytes:
    """The bytes hashed before one tensor's raw data: length-prefixed JSON header, then the data's length."""
    header = json.dumps([name, dtype, list(shape)]).encode()
    return len(header).to_bytes(8, "big") + header + int(nbytes).to_bytes(8, "big")


class FramedDigest:
    """Incremental digest of a weights set: for every tensor, names sorted, ``tensor_frame`` then its raw
    C-order bytes (native little-endian). Feeding a tensor's bytes in several pieces gives the same digest,
    which lets the server hash an update block by block while it checks and sums it."""

    def __init__(self, scheme: str = "sha256", *, parallel: bool = False) -> None:
        if scheme == "sha256":
            self._h = hashlib.sha256()
        elif scheme == "blake3":
            from blake3 import blake3  # deferred: only the hashing sides need it

            # parallel: BLAKE3's tree hashing over all cores for large pieces (the same digest, only faster)
            self._h = blake3(max_threads=blake3.AUTO) if parallel else blake3()
        else:
            raise ValueError(f"unknown weights hash construction {scheme!r}; known: {', '.join(HASH_SCHEMES)}")
        self.scheme = scheme

    def update(self, data) -> None:
        """Feed bytes (bytes, memoryview, or a C-contiguous numpy array, read as its raw bytes without a copy)."""
        if isinstance(data, np.ndarray):
            data = data.reshape(-1).view(np.uint8)  # BLAKE3's binding takes byte buffers only
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def state_dict_digest(sd: Mapping[str, torch.Tensor], scheme: str = "sha256") -> str:
    """Hex digest over (name, dtype, shape, raw bytes) of every tensor, names sorted, under ``scheme``."""
    h = FramedDigest(scheme)
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        h.update(tensor_frame(name, str(t.dtype).removeprefix("torch."), list(t.shape), len(data)))
        if len(data):
            h.update(data)
    return h.hexdigest()


def state_dict_sha256(sd: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over (name, dtype, shape, raw bytes) of every tensor, names sorted."""
    return state_dict_digest(sd, "sha256")


EXPORT_FORMAT = "atoll-model/1"


def export_model(model: nn.Module, path: str | Path, *, name: str, metadata: Mapping[str, Any] | None = None) -> str:
    """Write the trained weights plus how to rebuild them (name, build kwargs, hash) atomically.

    ``metadata`` must hold the ``build_model`` keyword arguments used (``spatial_dims``, ``in_channels``,
    ``num_classes`` ...) and may hold anything JSON-serialisable. Returns the weights' sha256.
    """
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    digest = state_dict_sha256(sd)
    meta = dict(metadata or {})
    json.dumps(meta)  # fail early on non-JSON metadata
    payload = {"format": EXPORT_FORMAT, "name": name, "metadata": meta, "sha256": digest, "state_dict": sd}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def load_exported(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported model; verifies the format and the weights' hash. Returns (model, metadata)."""
    from .factory import build_model

    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: not a readable Atoll model export ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not an Atoll model export (expected format {EXPORT_FORMAT})")
    sd = payload["state_dict"]
    if state_dict_sha256(sd) != payload["sha256"]:
        raise ValueError(f"{path}: weights do not match the recorded sha256 (file corrupted or edited)")
    meta = dict(payload["metadata"])
    build_kw = {k: meta[k] for k in ("spatial_dims", "in_channels", "num_classes") if k in meta}
    model = build_model(payload["name"], **build_kw)
    model.load_state_dict(sd)
    return model, meta
