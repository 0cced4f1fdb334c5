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

import torch
from torch import nn


def state_dict_sha256(sd: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over (name, dtype, shape, raw bytes) of every tensor, names sorted."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        header = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode()
        h.update(len(header).to_bytes(8, "big"))
        h.update(header)
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


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
