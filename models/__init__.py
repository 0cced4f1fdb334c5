"""Atoll networks: MONAI models by name, made DP-compatible (Opacus), weight hashing and export."""

from .compat import make_dp_compatible
from .factory import DEFAULT_MODEL, MODEL_NAMES, build_model
from .serialization import export_model, load_exported, state_dict_sha256

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_NAMES",
    "build_model",
    "export_model",
    "load_exported",
    "make_dp_compatible",
    "state_dict_sha256",
]
