"""The DP-SGD mechanism of one round at one site: σ, C, q, steps and the accountant, as one type.

It is the only place these fields are spelled out. The lead's run settings hold one, the round config carries it to
the sites (as flat config keys, :meth:`Mechanism.to_config`), the site's budget guard charges it, the trainer runs
it, the run manifest pins it, the ledger records it (:meth:`Mechanism.to_record`) and the auditor reads it back
(:meth:`Mechanism.from_record`). A change of one field therefore changes every place at once, and a test that only
pins copies equal has nothing left to pin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from contract._fields import KINDS, coerce

#: accountants the sites' budget guard and the auditor implement (privacy.accounting)
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")

# config key (run config and round config) of each field; `steps` keeps its historical run-config name
_CONFIG_KEYS: dict[str, str] = {"dp": "dp", "noise_multiplier": "noise-multiplier", "clip_norm": "clip-norm",
                                "sample_rate": "sample-rate", "steps": "local-steps", "accountant": "accountant"}
#: ledger-record keys of the mechanism (the accountant a site records is the one it charged with: its policy's)
RECORD_KEYS: tuple[str, ...] = ("dp", "noise_multiplier", "clip_norm", "sample_rate", "steps")


class MechanismError(ValueError):
    """A mechanism field is missing, mistyped or out of range; the message names the key."""


@dataclass(frozen=True)
class Mechanism:
    """Patient-level DP-SGD for one round at one site.

    dp: False only for a non-DP round (a site's policy must allow it; its epsilon is then infinite).
    noise_multiplier: σ, Gaussian noise std relative to the clip norm.
    clip_norm: C, L2 bound on one patient's contribution to a step.
    sample_rate: q, probability that a patient is in a step's Poisson batch (the same at every site).
    steps: DP-SGD steps per round (each one sampled batch; the accountant charges exactly these).
    accountant: ``""`` lets each site charge with its policy's accountant (it records which); otherwise the
        accountant the lead asks for, which a site whose policy uses another one refuses.
    """

    dp: bool = True
    noise_multiplier: float = 2.0
    clip_norm: float = 4.0
    sample_rate: float = 0.1
    steps: int = 100
    accountant: str = ""

    # ------------------------------------------------------------------ checks
    def problems(self) -> list[tuple[str, str]]:
        """``(config key, what is wrong)`` for each out-of-range field; empty when the mechanism is well formed."""
        out: list[tuple[str, str]] = []
        if not isinstance(self.dp, bool):
            out.append(("dp", "must be true or false"))
        for name in ("noise_multiplier", "clip_norm", "sample_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                out.append((_CONFIG_KEYS[name], f"must be a finite number, got {v!r}"))
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            out.append(("local-steps", f"must be an integer >= 1, got {self.steps!r}"))
        if out:
            return out
        if self.dp and self.noise_multiplier <= 0:
            out.append(("noise-multiplier", "must be > 0 when dp = true"))
        if self.noise_multiplier < 0:
            out.append(("noise-multiplier", "must be >= 0"))
        if self.dp and self.clip_norm <= 0:
            out.append(("clip-norm", "must be > 0 when dp = true"))
        if not 0 < self.sample_rate <= 1:
            out.append(("sample-rate", "must be in (0, 1]"))
        if self.accountant not in ("", *ACCOUNTANTS):
            out.append(("accountant", f"must be empty (each site's policy) or one of {', '.join(ACCOUNTANTS)}"))
        return out

    def check(self, where: str = "mechanism") -> "Mechanism":
        """Return self, or raise :class:`MechanismError` naming the first bad key."""
        bad = self.problems()
        if bad:
            key, what = bad[0]
            raise MechanismError(f"{where} '{key}' {what}")
        return self

    # ------------------------------------------------------------------ accounting view
    def charge(self) -> tuple[float, float, int]:
        """What the accountant composes: ``(σ, q, steps)``; a non-DP round is σ = 0 (infinite epsilon)."""
        return (float(self.noise_multiplier) if self.dp else 0.0, float(self.sample_rate), int(self.steps))

    def describe(self) -> str:
        if not self.dp:
            return f"no DP, {self.steps} steps"
        return f"σ={self.noise_multiplier:g}, C={self.clip_norm:g}, q={self.sample_rate:.3g}, {self.steps} steps"

    # ------------------------------------------------------------------ serialisations
    def to_config(self) -> dict[str, Any]:
        """Flat config keys, as the run config and each round's ConfigRecord carry them."""
        return {_CONFIG_KEYS[f.name]: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "round config",
                    base: "Mechanism | None" = None) -> "Mechanism":
        """Parse the mechanism's keys out of a flat config; absent keys keep ``base``'s (default: the recipe's)."""
        base = base or cls()
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = _CONFIG_KEYS[f.name]
            kwargs[f.name] = (coerce(config[key], KINDS[str(f.type)], key, where, MechanismError) if key in config
                              else getattr(base, f.name))
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:  # pragma: no cover - dataclass construction does not validate
            raise MechanismError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """As the run manifest pins it (field names; floats normalised so 1 and 1.0 hash the same)."""
        d = asdict(self)
        for name in ("noise_multiplier", "clip_norm", "sample_rate"):
            d[name] = float(d[name])
        if not self.dp:
            d["noise_multiplier"] = 0.0
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "mechanism") -> "Mechanism":
        names = {f.name for f in fields(cls)}
        if not isinstance(data, Mapping):
            raise MechanismError(f"{where}: expected an object with {', '.join(sorted(names))}")
        unknown, missing = set(data) - names, names - set(data) - {"accountant"}
        if unknown or missing:
            raise MechanismError(f"{where}: unknown field(s) {sorted(unknown)} / missing field(s) {sorted(missing)}")
        kwargs = {}
        for f in fields(cls):
            if f.name in data:
                kwargs[f.name] = coerce(data[f.name], KINDS[str(f.type)], f.name, where, MechanismError)
        return cls(**kwargs).check(where)

    def to_record(self) -> dict[str, Any]:
        """The mechanism's fields of a ledger record (reservation, round, refusal)."""
        return {"dp": bool(self.dp), "noise_multiplier": float(self.noise_multiplier),
                "clip_norm": float(self.clip_norm), "sample_rate": float(self.sample_rate), "steps": int(self.steps)}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Mechanism":
        """The mechanism a ledger record charged (``accountant`` is the one the site recorded)."""
        return cls(dp=bool(rec["dp"]), noise_multiplier=float(rec["noise_multiplier"]),
                   clip_norm=float(rec["clip_norm"]), sample_rate=float(rec["sample_rate"]),
                   steps=int(rec["steps"]), accountant=str(rec.get("accountant", "")))

    def same_charge(self, other: "Mechanism") -> bool:
        """Whether two mechanisms charge the same (the accountant aside)."""
        return self.to_record() == other.to_record()
