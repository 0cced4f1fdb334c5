"""Flower's aggregation strategies by name, with their parameters checked before a run starts.

The lead picks `strategy = "fedmedian"` (etc.) in the run config; a typo or an impossible setting
(Krum asked to tolerate more malicious sites than it can) must fail at `atoll run start`, not as a
silent fallback or a warning in round 7. Aggregation itself stays Flower's
(`flwr.serverapp.strategy`); this module only chooses and checks.

Robustness guarantees hold only with enough sites: Krum/Multi-Krum need n >= 2f + 3, Bulyan
n >= 4f + 3 (f = `num_malicious_nodes`, n = `min_train_nodes`). Under SecAgg+ the server sees only
the sum, so per-update robust rules have nothing to act on (see docs/security.md).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum, Strategy

from server.server_opt import ServerFedAdam, ServerFedAvgM

__all__ = ["STRATEGIES", "StrategyError", "build_strategy", "sums_in_one_pass", "strategy_parameters"]

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": ServerFedAvgM,   # Flower's FedAvgM, stepping on the released aggregate only (server.server_opt)
    "fedadam": ServerFedAdam,   # Flower's FedAdam, likewise
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
}


# Strategies whose server-side aggregation is exactly the example-weighted mean (FedProx's proximal term acts at
# the sites): the round book sums their updates in the same pass that checks them (server.update_pass). FedAvgM
# and FedAdam then post-process that mean (server.server_opt): they never see a single update.
_WEIGHTED_MEAN = ("fedavg", "fedprox", "fedavgm", "fedadam")


def sums_in_one_pass(name: str) -> bool:
    """Whether strategy ``name`` aggregates by the weighted mean that ``RoundBook.aggregate`` computes."""
    return next(k for k, v in STRATEGIES.items() if v is _lookup(name)) in _WEIGHTED_MEAN


class StrategyError(ValueError):
    """Unknown strategy name or a bad parameter; the message names it and what is allowed."""


def strategy_parameters(name: str) -> tuple[str, ...]:
    """The keyword parameters Flower's strategy `name` accepts."""
    cls = _lookup(name)
    return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")


def _lookup(name: str) -> type[Strategy]:
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[key]


def _number(kind: str, lo: float | None, hi: float | None, lo_open: bool = False,
            hi_open: bool = False) -> Callable[[str, str, Any], Any]:
    def check(strategy: str, param: str, value: Any) -> Any:
        ok_type = (isinstance(value, int) if kind == "int" else isinstance(value, (int, float)))
        if isinstance(value, bool) or not ok_type or (kind == "float" and not math.isfinite(value)):
            raise StrategyError(f"{strategy}: {param} must be {'an integer' if kind == 'int' else 'a number'}, "
                                f"got {value!r}")
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
            raise StrategyError(f"{strategy}: {param} must be in {span}, got {value!r}")
        return float(value) if kind == "float" else value
    return check


def _text(strategy: str, param: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise StrategyError(f"{strategy}: {param} must be a non-empty string, got {value!r}")
    return value


def _callable(strategy: str, param: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise StrategyError(f"{strategy}: {param} must be callable or None, got {type(value).__name__}")
    return value


_CHECKS: dict[str, Callable[[str, str, Any], Any]] = {
    "fraction_train": _number("float", 0.0, 1.0, lo_open=True),
    "fraction_evaluate": _number("float", 0.0, 1.0),
    "min_train_nodes": _number("int", 1, None),
    "min_evaluate_nodes": _number("int", 0, None),
    "min_available_nodes": _number("int", 1, None),
    "proximal_mu": _number("float", 0.0, None),
    "server_learning_rate": _number("float", 0.0, None, lo_open=True),
    "server_momentum": _number("float", 0.0, 1.0, hi_open=True),
    "eta": _number("float", 0.0, None, lo_open=True),
    "eta_l": _number("float", 0.0, None, lo_open=True),
    "beta_1": _number("float", 0.0, 1.0, hi_open=True),
    "beta_2": _number("float", 0.0, 1.0, hi_open=True),
    "tau": _number("float", 0.0, None, lo_open=True),
    "beta": _number("float", 0.0, 0.5, hi_open=True),
    "num_malicious_nodes": _number("int", 0, None),
    "num_nodes_to_select": _number("int", 1, None),
    "weighted_by_key": _text,
    "arrayrecord_key": _text,
    "configrecord_key": _text,
    "train_metrics_aggr_fn": _callable,
    "evaluate_metrics_aggr_fn": _callable,
    "selection_rule": _callable,
}


def build_strategy(name: str, **kwargs: Any) -> Strategy:
    """Flower's strategy `name` (fedavg | fedprox | fedavgm | fedadam | fedmedian | fedtrimmedavg | krum |
    multikrum | bulyan) built with `kwargs`, each checked first.

    `min_available_nodes` defaults to `min_train_nodes` (Flower would otherwise wait for 2 sites
    and then try to sample more than are connected).

    Raises
    ------
    StrategyError
        Unknown name, a parameter the strategy does not take, a value of the wrong type or out of
        range, or a robustness setting the number of sites cannot support.
    """
    cls = _lookup(name)
    label = next(k for k, v in STRATEGIES.items() if v is cls)
    accepted = strategy_parameters(label)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise StrategyError(f"{label}: unknown parameter(s) {', '.join(unknown)}; "
                            f"{label} takes {', '.join(accepted)}")
    params = {k: _CHECKS[k](label, k, v) if k in _CHECKS else v for k, v in kwargs.items()}
    defaults = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
                if p.default is not inspect.Parameter.empty}
    n = params.get("min_train_nodes", defaults.get("min_train_nodes", 2))
    params.setdefault("min_available_nodes", max(n, defaults.get("min_available_nodes", 2)))
    if params["min_available_nodes"] < n:
        raise StrategyError(f"{label}: min_available_nodes ({params['min_available_nodes']}) must be at least "
                            f"min_train_nodes ({n})")
    f = params.get("num_malicious_nodes", 0)
    if label in ("krum", "multikrum") and n < 2 * f + 3:
        raise StrategyError(f"{label}: tolerating num_malicious_nodes={f} needs min_train_nodes >= {2 * f + 3} "
                            f"(n >= 2f + 3), got {n}; add sites or lower num_malicious_nodes")
    if label == "bulyan" and n < 4 * f + 3:
        raise StrategyError(f"bulyan: tolerating num_malicious_nodes={f} needs min_train_nodes >= {4 * f + 3} "
                            f"(n >= 4f + 3), got {n}; add sites or lower num_malicious_nodes")
    if label == "multikrum" and params.get("num_nodes_to_select", 1) > n - f:
        raise StrategyError(f"multikrum: num_nodes_to_select ({params['num_nodes_to_select']}) must be at most "
                            f"min_train_nodes - num_malicious_nodes ({n - f})")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:  # Flower's own checks (e.g. FedTrimmedAvg's beta)
        raise StrategyError(f"{label}: {exc}") from None
