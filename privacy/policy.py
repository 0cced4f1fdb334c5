"""Site privacy policy: the hospital's own limits, parsed from the ``[privacy]`` table of its site TOML.

The policy belongs to the hospital, not to the consortium lead: the site refuses any round whose parameters fall
outside it (see :mod:`privacy.guard`). Parsing is strict (unknown key, wrong type, empty range are errors) because
a typo in a privacy limit must never silently fall back to a default.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from privacy.ledger import canonical_json, sha256_hex

if TYPE_CHECKING:  # pragma: no cover - typing only
    from contract.mechanism import Mechanism

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
# "num-examples" is the wire name (contract.wire.NUM_EXAMPLES); FedAvg needs it, so the ClientApp always releases it.
DEFAULT_RELEASED_METRICS: tuple[str, ...] = ("num-examples", "train_loss", "val_loss", "val_accuracy", "val_auc")
_METRIC_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


# Refusal codes of the policy's rules: the guard answers a round with them, `atoll site check` and `atoll site
# approve` report them before any round (see :func:`check_policy`).
POLICY_INVALID = "POLICY_INVALID"
DELTA_TOO_LARGE = "DELTA_TOO_LARGE"
BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
NOISE_OUT_OF_POLICY = "NOISE_OUT_OF_POLICY"
CLIP_OUT_OF_POLICY = "CLIP_OUT_OF_POLICY"
STEPS_OUT_OF_POLICY = "STEPS_OUT_OF_POLICY"
SAMPLE_RATE_OUT_OF_POLICY = "SAMPLE_RATE_OUT_OF_POLICY"
NON_DP_NOT_ALLOWED = "NON_DP_NOT_ALLOWED"
ACCOUNTANT_OUT_OF_POLICY = "ACCOUNTANT_OUT_OF_POLICY"


class PolicyError(ValueError):
    """Invalid site privacy policy; the message names ``<where>.<key>``, the problem and what to do.

    ``code`` is the refusal code a round answers when it fails on this (``POLICY_INVALID``, ``DELTA_TOO_LARGE``).
    """

    def __init__(self, message: str, code: str = POLICY_INVALID) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SitePolicy:
    """Hospital-owned privacy limits for one dataset (lifetime budget, allowed DP-SGD parameters, releases).

    ``delta == 0`` means *auto*: ``1 / (10 * patients)`` (see :meth:`effective_delta`).
    Ranges are inclusive ``(lo, hi)`` tuples.
    """

    max_epsilon: float = 8.0
    delta: float = 0.0
    accountant: str = "rdp"
    noise_multiplier: tuple[float, float] = (0.5, 10.0)
    clip_norm: tuple[float, float] = (0.1, 10.0)
    local_steps: tuple[int, int] = (1, 1000)
    max_sample_rate: float = 1.0
    allow_non_dp: bool = False
    allow_large_delta: bool = False
    released_metrics: tuple[str, ...] = field(default=DEFAULT_RELEASED_METRICS)

    @classmethod
    def from_table(cls, table: Mapping[str, Any] | None, where: str = "[privacy]") -> "SitePolicy":
        """Parse and validate a ``[privacy]`` TOML table; absent keys take the documented defaults.

        Parameters
        ----------
        table: the parsed ``[privacy]`` table (``None`` or ``{}`` = all defaults).
        where: prefix for error messages, e.g. ``"/etc/atoll/site.toml [privacy]"``.

        Raises
        ------
        PolicyError: naming ``<where>.<key>`` and what to do.
        """
        if table is None:
            table = {}
        if not isinstance(table, Mapping):
            raise PolicyError(f"{where}: expected a table of keys, got {type(table).__name__}; write it as [privacy]")
        unknown = sorted(set(table) - set(_FIELDS))
        if unknown:
            raise PolicyError(
                f"{where}.{unknown[0]}: unknown key; allowed keys are {', '.join(_FIELDS)} "
                "(check the spelling or remove it)"
            )
        values: dict[str, Any] = {}
        for key, parse in _FIELDS.items():
            if key in table:
                values[key] = parse(table[key], f"{where}.{key}")
        return cls(**values)

    def effective_delta(self, num_patients: int) -> float:
        """Delta used for accounting on a dataset of ``num_patients`` patients.

        Auto (``delta == 0``) is ``1 / (10 * num_patients)``. An explicit delta larger than that is refused
        unless ``allow_large_delta`` is set, because delta >= 1/patients allows leaking a whole patient.
        """
        problem = delta_problem(self, num_patients)
        if problem is not None:
            raise PolicyError(problem[1], code=problem[0])
        return 1.0 / (10.0 * num_patients) if self.delta == 0 else float(self.delta)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (tuples become lists) — what :meth:`sha256` hashes."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def sha256(self) -> str:
        """Hex SHA-256 of the canonical JSON of :meth:`to_dict`; recorded in every ledger record."""
        return sha256_hex(canonical_json(self.to_dict()))

    def noise_in_range(self, sigma: float) -> bool:
        return self.noise_multiplier[0] <= sigma <= self.noise_multiplier[1]


# ---------------------------------------------------------------- the policy's rules, shared by every check
#
# One place for each rule: the budget guard applies them to a round (privacy.guard), `atoll site check` to the
# site's data and ledger, `atoll site approve` to a run manifest (both through check_policy), so a run can never
# pass a check and then be refused for a rule the check did not know.


def delta_problem(policy: SitePolicy, num_patients: int) -> tuple[str, str] | None:
    """``(code, message)`` when the policy's delta cannot be used on ``num_patients`` patients, else None.

    An explicit delta larger than ``1/(10 x patients)`` is refused unless ``allow_large_delta`` is set, because
    delta >= 1/patients allows leaking a whole patient.
    """
    if isinstance(num_patients, bool) or not isinstance(num_patients, int) or num_patients < 1:
        return POLICY_INVALID, f"effective_delta: num_patients must be a positive integer, got {num_patients!r}"
    auto = 1.0 / (10.0 * num_patients)
    if policy.delta > auto and not policy.allow_large_delta:
        return DELTA_TOO_LARGE, (f"[privacy].delta: {policy.delta!r} is larger than 1/(10 x {num_patients} patients) "
                                 f"= {auto:.3g}; set delta = 0 (auto), a smaller value, or allow_large_delta = true")
    return None


def mechanism_problem(policy: SitePolicy, mechanism: "Mechanism") -> tuple[str, str] | None:
    """``(code, message)`` when one round's DP-SGD mechanism is outside the policy, else None.

    The message is safe to send to the server (numbers and ranges only).
    """
    p, m = policy, mechanism
    dp, noise_multiplier, clip_norm, sample_rate, steps = m.dp, m.noise_multiplier, m.clip_norm, m.sample_rate, m.steps
    if m.accountant and m.accountant != p.accountant:
        return ACCOUNTANT_OUT_OF_POLICY, (f"the run asks for the {m.accountant!r} accountant; this site charges its "
                                          f"lifetime budget with {p.accountant!r}")
    if not dp and not p.allow_non_dp:
        return NON_DP_NOT_ALLOWED, "this site's policy does not allow training without differential privacy"
    lo, hi = p.local_steps
    if not lo <= steps <= hi:
        return STEPS_OUT_OF_POLICY, f"local steps {steps} outside this site's allowed range [{lo}, {hi}]"
    if not 0 < sample_rate <= p.max_sample_rate:
        return SAMPLE_RATE_OUT_OF_POLICY, (f"sampling rate q={sample_rate:.4g} outside this site's allowed "
                                           f"range (0, {p.max_sample_rate:g}]")
    if dp:
        lo, hi = p.noise_multiplier
        if not lo <= noise_multiplier <= hi:
            return NOISE_OUT_OF_POLICY, (f"noise multiplier σ={noise_multiplier:g} outside this site's "
                                         f"allowed range [{lo:g}, {hi:g}]")
        lo, hi = p.clip_norm
        if not lo <= clip_norm <= hi:
            return CLIP_OUT_OF_POLICY, f"clip norm C={clip_norm:g} outside this site's allowed range [{lo:g}, {hi:g}]"
    return None


@dataclass(frozen=True)
class PolicyFinding:
    """One result of :func:`check_policy`: a rule that refuses (``blocking``) or a warning, with its code."""

    code: str
    message: str
    blocking: bool = True

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


def check_policy(policy: SitePolicy, *, num_patients: int | None = None,
                 history: Sequence[tuple[float, float, int]] | None = None,
                 run: "Mechanism | None" = None, rounds: int = 1) -> list[PolicyFinding]:
    """Apply every rule of the budget guard that can be judged before a round.

    Parameters
    ----------
    num_patients: training patients of the site's data (the delta rule); ``None`` skips it.
    history: the site's lifetime accountant history from its ledger (``[(sigma, q, steps)]``); ``None`` skips the
        budget. An empty list is a fresh dataset.
    run: a run's per-round :class:`~contract.mechanism.Mechanism` (``rounds`` of it); ``None`` checks the site
        alone (policy, data and budget spent so far).

    Returns
    -------
    Findings, blocking first: a blocking one means the guard would refuse (every) round; a non-blocking one is a
    warning (e.g. only some of the run's rounds fit in the budget, where the guard will stop the site).
    """
    out: list[PolicyFinding] = []
    delta = None
    if num_patients is not None:
        problem = delta_problem(policy, num_patients)
        if problem is not None:
            out.append(PolicyFinding(*problem))
        else:
            delta = policy.effective_delta(num_patients)
    if run is not None:
        problem = mechanism_problem(policy, run)
        if problem is not None:
            out.append(PolicyFinding(*problem))
    if history is not None and delta is not None and not out:
        out.extend(_budget(policy, delta, list(history), run, rounds))
    return out


def _budget(policy: SitePolicy, delta: float, history: list[tuple[float, float, int]],
            run: "Mechanism | None", rounds: int) -> list[PolicyFinding]:
    """The guard's budget rule (epsilon after a DP round <= max_epsilon) over the run's rounds, in order."""
    from privacy.accounting import compute_epsilon  # Opacus: loaded only when a budget is checked

    budget = policy.max_epsilon
    spent = compute_epsilon(history, delta, policy.accountant) if history else 0.0
    if run is None or not run.dp:
        if run is not None:  # allowed by the policy (else mechanism_problem said so), never free
            return [PolicyFinding(BUDGET_EXCEEDED, "a non-DP run makes this dataset's epsilon infinite; every later "
                                  "DP round will be refused", blocking=False)]
        if spent >= budget:
            return [PolicyFinding(BUDGET_EXCEEDED, f"the lifetime budget is spent (ε={spent:.2f} of {budget:g}): "
                                  "every DP round will be refused")]
        return []
    charge = run.charge()
    fit = 0
    after = spent
    while fit < rounds:
        after = compute_epsilon(history + [charge] * (fit + 1), delta, policy.accountant)
        if after > budget:
            break
        fit += 1
    if fit == 0:
        return [PolicyFinding(BUDGET_EXCEEDED, f"the first round would reach ε={after:.2f}, over this site's budget "
                              f"of {budget:g} (spent so far ε={spent:.2f}): every round will be refused")]
    if fit < rounds:
        return [PolicyFinding(BUDGET_EXCEEDED, f"only {fit} of {rounds} rounds fit in this site's budget of {budget:g} "
                              f"(spent so far ε={spent:.2f}); the site will refuse the rest", blocking=False)]
    return []


# ---------------------------------------------------------------- field parsers (registry: key -> parser)


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PolicyError(f"{where}: expected a number, got {type(v).__name__} {v!r}; write e.g. {where.rsplit('.', 1)[-1]} = 1.0")
    x = float(v)
    if not math.isfinite(x):
        raise PolicyError(f"{where}: must be a finite number, got {v!r}")
    return x


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise PolicyError(f"{where}: expected true or false, got {type(v).__name__} {v!r}")
    return v


def _max_epsilon(v: Any, where: str) -> float:
    x = _number(v, where)
    if x <= 0:
        raise PolicyError(f"{where}: must be > 0 (the lifetime epsilon budget of this dataset), got {v!r}")
    return x


def _delta(v: Any, where: str) -> float:
    x = _number(v, where)
    if not 0 <= x < 1:
        raise PolicyError(f"{where}: must be 0 (auto = 1/(10 x patients)) or in (0, 1), got {v!r}")
    return x


def _accountant(v: Any, where: str) -> str:
    if not isinstance(v, str) or v.lower() not in ACCOUNTANTS:
        raise PolicyError(f"{where}: expected one of {', '.join(repr(a) for a in ACCOUNTANTS)}, got {v!r}")
    return v.lower()


def _range(kind: str, integer: bool, positive_lo: bool) -> Callable[[Any, str], tuple]:
    def parse(v: Any, where: str) -> tuple:
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise PolicyError(f"{where}: expected [min, max] ({kind}), got {v!r}; write e.g. [1, 10]")
        out = []
        for i, x in enumerate(v):
            w = f"{where}[{i}]"
            if integer:
                if isinstance(x, bool) or not isinstance(x, int):
                    raise PolicyError(f"{w}: expected an integer, got {type(x).__name__} {x!r}")
                out.append(int(x))
            else:
                out.append(_number(x, w))
        lo, hi = out
        if positive_lo and lo <= 0 or (integer and lo < 1):
            raise PolicyError(f"{where}: min must be {'>= 1' if integer else '> 0'}, got {lo!r}")
        if lo > hi:
            raise PolicyError(f"{where}: min {lo!r} is greater than max {hi!r}; write [min, max] with min <= max")
        return (lo, hi)

    return parse


def _sample_rate(v: Any, where: str) -> float:
    x = _number(v, where)
    if not 0 < x <= 1:
        raise PolicyError(f"{where}: must be in (0, 1] (fraction of patients sampled per step), got {v!r}")
    return x


def _metrics(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)):
        raise PolicyError(f"{where}: expected a list of metric names, got {type(v).__name__} {v!r}")
    seen: list[str] = []
    for i, m in enumerate(v):
        if not isinstance(m, str) or not _METRIC_NAME.match(m):
            raise PolicyError(
                f"{where}[{i}]: {m!r} is not a metric name (letters, digits, _ . -; starting with a letter)"
            )
        if m.startswith("val_threshold_count") and m != "val_threshold_counts":  # contract.threshold.METRIC
            raise PolicyError(f"{where}[{i}]: {m!r} is not a metric a site releases; list \"val_threshold_counts\" "
                              "to release the whole set of decision-threshold counts (or nothing of it)")
        if m in seen:
            raise PolicyError(f"{where}[{i}]: {m!r} is listed twice; remove the duplicate")
        seen.append(m)
    return tuple(seen)


_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "max_epsilon": _max_epsilon,
    "delta": _delta,
    "accountant": _accountant,
    "noise_multiplier": _range("noise multiplier sigma", integer=False, positive_lo=True),
    "clip_norm": _range("clip norm C", integer=False, positive_lo=True),
    "local_steps": _range("local DP-SGD steps per round", integer=True, positive_lo=True),
    "max_sample_rate": _sample_rate,
    "allow_non_dp": _bool,
    "allow_large_delta": _bool,
    "released_metrics": _metrics,
}
