"""Server-side checks on one site's update before any strategy aggregates it.

A site's update is trusted with nothing: a wrong tensor set, a changed dtype or shape, a NaN or
an infinity, or a step far larger than any honest DP-SGD round could produce would poison (or
crash) aggregation for every hospital. `validate_update` returns a short reason instead of raising,
so `server.sitebook.RoundBook(validator=...)` can log it and leave the site out of the round.

Reasons name tensors by their model parameter names only (e.g. "conv1.weight"); they never carry
values from the update.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord

__all__ = ["Validator", "make_validator", "update_norm", "validate_update"]

Validator = Callable[[ArrayRecord, ArrayRecord], "str | None"]
_MAX_LISTED = 3


def _names(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _check_bound(max_norm: float | None) -> None:
    if max_norm is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float))
                                 or not math.isfinite(max_norm) or max_norm <= 0):
        raise ValueError(f"max_norm must be a positive finite number or None, got {max_norm!r}")


def update_norm(update: ArrayRecord, global_: ArrayRecord) -> float:
    """||update - global||_2 over the floating-point tensors, computed in float64.

    Integer tensors (e.g. BatchNorm's `num_batches_tracked` counters) are not model weights in the
    geometric sense and are left out of the norm; their dtype and shape are still checked.
    """
    total = 0.0
    for name, g in global_.items():
        a, b = update[name].numpy(), g.numpy()
        if np.issubdtype(b.dtype, np.floating) or np.issubdtype(b.dtype, np.complexfloating):
            d = a.astype(np.float64) - b.astype(np.float64)
            total += float(np.vdot(d, d).real)
    return math.sqrt(total)


def validate_update(update: ArrayRecord, global_: ArrayRecord, max_norm: float | None) -> str | None:
    """Why `update` must not be aggregated, or None if it may be.

    Parameters
    ----------
    update : ArrayRecord
        The site's returned weights (the full model, as Atoll's sites send it).
    global_ : ArrayRecord
        The global weights the site was sent this round.
    max_norm : float or None
        Bound on ||update - global||_2; None = no bound.

    Returns
    -------
    str or None
        A one-line reason (wrong tensor names, dtype, shape, non-finite values, norm over the
        bound, undecodable tensor), or None.
    """
    _check_bound(max_norm)
    if not isinstance(update, ArrayRecord):
        return f"update is a {type(update).__name__}, not an ArrayRecord"
    expected, got = list(global_.keys()), list(update.keys())
    missing = [n for n in expected if n not in update]
    extra = [n for n in got if n not in global_]
    if missing:
        return f"update lacks tensor(s) {_names(missing)}"
    if extra:
        return f"update has unexpected tensor(s) {_names(extra)}"
    for name in expected:
        want, have = global_[name], update[name]
        if have.dtype != want.dtype:
            return f"tensor {name!r} has dtype {have.dtype}, expected {want.dtype}"
        if tuple(have.shape) != tuple(want.shape):
            return f"tensor {name!r} has shape {tuple(have.shape)}, expected {tuple(want.shape)}"
        try:
            arr = have.numpy()
        except Exception:  # noqa: BLE001 - any decoding failure means the bytes are not a tensor
            return f"tensor {name!r} could not be decoded"
        if arr.dtype != np.dtype(want.dtype) or arr.shape != tuple(want.shape):
            return f"tensor {name!r} does not decode to its declared dtype/shape"
        if (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating)) \
                and not np.isfinite(arr).all():
            return f"tensor {name!r} has non-finite values (NaN or infinity)"
    if max_norm is not None:
        norm = update_norm(update, global_)
        if not math.isfinite(norm):
            return "update norm overflows"
        if norm > max_norm:
            return f"update norm ||update - global|| = {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


def make_validator(max_norm: float | None) -> Validator:
    """`validate_update` with a fixed bound: the callable `RoundBook(validator=...)` expects."""
    _check_bound(max_norm)

    def validator(update: ArrayRecord, global_: ArrayRecord) -> str | None:
        return validate_update(update, global_, max_norm)

    return validator
