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

from server.update_pass import Inspection, RoundPlan, WeightedSum, inspect_update

__all__ = ["UpdateChecks", "Validator", "make_validator", "update_norm", "validate_update"]

Validator = Callable[[ArrayRecord, ArrayRecord], "str | None"]


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
    return inspect_update(update, RoundPlan(global_), max_norm=max_norm).problem


class UpdateChecks:
    """The round book's per-update path: `validate_update`'s checks, the digest the site signed and (for
    FedAvg/FedProx) the weighted sum, in one pass per update (:mod:`server.update_pass`).

    Callable as the plain `Validator` too. The global weights' layout is built once per round (the first
    update of a round with new global weights builds it), and so is the running sum.
    """

    def __init__(self, max_norm: float | None, *, accumulate: bool = False) -> None:
        _check_bound(max_norm)
        self.max_norm = max_norm
        self.accumulate = accumulate
        self._plan: RoundPlan | None = None
        self.total: WeightedSum | None = None

    def plan(self, global_: ArrayRecord) -> RoundPlan:
        if self._plan is None or self._plan.arrays is not global_:
            self._plan = RoundPlan(global_)
            self.total = WeightedSum(self._plan) if self.accumulate else None
        return self._plan

    def inspect(self, update: ArrayRecord, global_: ArrayRecord, *, scheme: str | None = None,
                weight: float | None = None) -> Inspection:
        """One pass over `update`; adds ``weight * update`` to the round's sum when summing and weight is given."""
        plan = self.plan(global_)
        total = self.total if weight is not None else None
        return inspect_update(update, plan, max_norm=self.max_norm, scheme=scheme, total=total,
                              weight=weight or 0.0)

    def __call__(self, update: ArrayRecord, global_: ArrayRecord) -> str | None:
        return inspect_update(update, self.plan(global_), max_norm=self.max_norm).problem


def make_validator(max_norm: float | None, *, accumulate: bool = False) -> UpdateChecks:
    """The update checks with a fixed bound: what `RoundBook(validator=...)` expects. ``accumulate``: also keep
    the round's FedAvg weighted sum of the accepted updates (`RoundBook.aggregate`)."""
    return UpdateChecks(max_norm, accumulate=accumulate)
