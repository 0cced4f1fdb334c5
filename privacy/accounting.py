"""Lifetime epsilon of a dataset from its whole DP-SGD history, through Opacus' accountants.

A history entry is ``(noise_multiplier, sample_rate, steps)`` — exactly the tuples Opacus accountants keep in
``accountant.history``. Epsilon is always computed over the WHOLE lifetime history at once (never summed per
round), so two runs of k rounds give the same epsilon as one accountant over all steps.

Choices that keep the number an upper bound (never an under-count):

* Entries with the same ``(sigma, q)`` are merged (steps added). Composition is commutative and both accountants
  are linear in steps for a fixed mechanism, so this is exact; it keeps the PRV convolution and the RDP sum short.
* ``rdp``: :class:`opacus.accountants.RDPAccountant` semantics. The per-step RDP curve of each ``(sigma, q)`` is
  cached (Opacus computes ``compute_rdp(...)= steps * curve``); the result is bit-identical to
  ``RDPAccountant.get_epsilon`` (tested), but a 1000-round ledger costs one curve per distinct mechanism.
* ``prv``: :class:`opacus.accountants.PRVAccountant` with ``eps_error=0.01`` and its *upper* bound. PRV is known to
  fail on some inputs (``RuntimeError: Discrete mean differs ...``, opacus#601), to return ``inf`` or negative values
  for very large epsilons (opacus#585), and its grid grows like ``L * sqrt(steps)/eps_error`` (a 5000-step,
  epsilon~2000 history needs ~10^8 points and gets the process OOM-killed). Before calling it we predict the grid
  size with Opacus' own ``compute_safe_domain_size``; above :data:`PRV_MAX_POINTS`, or on any exception,
  non-finite or negative result, we fall back to RDP, which is a valid (looser) upper bound. The accountant that
  produced the number is reported in :class:`EpsilonResult.accountant_used` and recorded in the ledger.
* A history entry with ``sigma == 0`` is non-DP training: epsilon is ``inf``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as _rdp_analysis
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
PRV_EPS_ERROR = 0.01
PRV_MAX_POINTS = 4_000_000  # ~32 MB per float64 array; the PRV convolution keeps a handful of them

HistoryEntry = tuple[float, float, int]


class AccountingError(ValueError):
    """Malformed history or delta (the message says which entry and why)."""


@dataclass(frozen=True)
class EpsilonResult:
    epsilon: float
    accountant_used: str  # "rdp", "prv", or "none" (empty history)
    note: str = ""  # why a PRV request fell back to RDP, if it did


def normalize_history(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """Validate and merge history entries: same ``(sigma, q)`` -> steps added; zero-step entries dropped.

    Returns entries sorted by ``(sigma, q)`` (a canonical form; order does not change epsilon).
    """
    merged: dict[tuple[float, float], int] = {}
    for i, entry in enumerate(history):
        try:
            sigma, q, steps = entry
        except (TypeError, ValueError):
            raise AccountingError(f"history[{i}]: expected (noise_multiplier, sample_rate, steps), got {entry!r}") from None
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise AccountingError(f"history[{i}]: steps must be a non-negative integer, got {steps!r}")
        for name, v in (("noise multiplier", sigma), ("sample rate", q)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
                raise AccountingError(f"history[{i}]: {name} must be a finite number, got {v!r}")
        sigma, q = float(sigma), float(q)
        if sigma < 0:
            raise AccountingError(f"history[{i}]: noise multiplier must be >= 0 (0 = non-DP), got {sigma!r}")
        if not 0 < q <= 1:
            raise AccountingError(f"history[{i}]: sample rate must be in (0, 1], got {q!r}")
        if steps == 0:
            continue
        merged[(sigma, q)] = merged.get((sigma, q), 0) + int(steps)
    return [(s, q, n) for (s, q), n in sorted(merged.items())]


def canonical_history(history: Iterable[Sequence[float]]) -> tuple[HistoryEntry, ...]:
    """Hashable canonical form of a history (merged, sorted tuple) — what ledger records store as ``history``."""
    return tuple(normalize_history(history))


def add_to_history(history: Iterable[Sequence[float]], entry: Sequence[float]) -> list[HistoryEntry]:
    """History with one more charge, in canonical (merged, sorted) form."""
    return normalize_history([*history, entry])


def compute_epsilon(history: Sequence[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by the whole ``history`` at ``delta`` (an upper bound; see module docstring)."""
    return compute_epsilon_detail(history, delta, accountant).epsilon


def compute_epsilon_detail(history: Sequence[Sequence[float]], delta: float, accountant: str = "rdp") -> EpsilonResult:
    """Like :func:`compute_epsilon`, also saying which accountant produced the number and why."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise AccountingError(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise AccountingError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    hist = normalize_history(history)
    if not hist:
        return EpsilonResult(0.0, "none")
    if any(sigma == 0 for sigma, _, _ in hist):
        return EpsilonResult(math.inf, accountant, "non-DP training (noise_multiplier 0) in history")
    if accountant == "rdp":
        return EpsilonResult(_rdp_epsilon(hist, float(delta)), "rdp")
    return _prv_or_rdp(hist, float(delta))


# ------------------------------------------------------------------------------------------------- RDP


@functools.lru_cache(maxsize=1024)
def _rdp_curve(sigma: float, q: float) -> np.ndarray:
    """Per-step RDP of the Poisson-subsampled Gaussian at Opacus' default orders (read-only array)."""
    curve = np.asarray(
        _rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS),
        dtype=float,
    )
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(hist: list[HistoryEntry], delta: float) -> float:
    # Same arithmetic as RDPAccountant.get_privacy_spent: sum([compute_rdp(q, sigma, steps, orders) ...]).
    rdp = sum([_rdp_curve(sigma, q) * steps for sigma, q, steps in hist])
    eps, _ = _rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    eps = float(eps)
    return eps if eps >= 0 else 0.0 if not math.isnan(eps) else math.inf


def opacus_rdp_epsilon(history: Sequence[Sequence[float]], delta: float) -> float:
    """Plain ``RDPAccountant`` (no cache, no merging) — the reference the cached path is tested against."""
    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta)) if acc.history else 0.0


# ------------------------------------------------------------------------------------------------- PRV


def prv_grid_points(hist: list[HistoryEntry], delta: float, eps_error: float = PRV_EPS_ERROR) -> float:
    """Number of grid points PRVAccountant would allocate (its own domain rule: 2L / mesh)."""
    delta_error = delta / 1000
    total = sum(n for _, _, n in hist)
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in hist]
    L = compute_safe_domain_size(prvs=prvs, max_self_compositions=[n for *_, n in hist],
                                 eps_error=eps_error, delta_error=delta_error)
    mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
    return float(2 * L / mesh)


def _prv_or_rdp(hist: list[HistoryEntry], delta: float) -> EpsilonResult:
    def fallback(why: str) -> EpsilonResult:
        return EpsilonResult(_rdp_epsilon(hist, delta), "rdp", f"PRV fell back to RDP: {why}")

    try:
        points = prv_grid_points(hist, delta)
    except Exception as e:  # noqa: BLE001 - any failure of the estimate means: do not trust PRV here
        return fallback(f"domain estimate failed ({type(e).__name__})")
    if not math.isfinite(points) or points > PRV_MAX_POINTS:
        return fallback(f"PRV grid would need {points:.3g} points (> {PRV_MAX_POINTS:.0e})")
    acc = PRVAccountant()
    acc.history = list(hist)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            eps = float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
    except Exception as e:  # noqa: BLE001 - known numerical failures (opacus#601); RDP is a valid bound
        return fallback(f"{type(e).__name__}: {str(e)[:80]}")
    if not math.isfinite(eps) or eps < 0:
        return fallback(f"PRV returned {eps!r}")
    return EpsilonResult(eps, "prv")
