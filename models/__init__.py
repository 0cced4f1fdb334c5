"""Atoll networks: MONAI models by name, made DP-compatible (Opacus), weight hashing and export."""

from .compat import make_dp_compatible
from .factory import DEFAULT_MODEL, MODEL_KINDS, MODEL_NAMES, build_model, build_task_model
from .losses import build_loss
from .serialization import (HASH_SCHEMES, UPDATE_HASH, FramedDigest, export_model, load_exported, state_dict_digest,
                            state_dict_sha256, tensor_frame)

__all__ = [
    "HASH_SCHEMES",
    "UPDATE_HASH",
    "FramedDigest",
    "DEFAULT_MODEL",
    "MODEL_KINDS",
    "MODEL_NAMES",
    "build_loss",
    "build_model",
    "build_task_model",
    "export_model",
    "load_exported",
    "make_dp_compatible",
    "state_dict_digest",
    "state_dict_sha256",
    "tensor_frame",
]
