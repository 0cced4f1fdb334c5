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
                                "sample_rate": "sample-rate", "steps": "local-steps", "accountant": "accountant",
                                "adaptive_clip": "adaptive-clip",
                                "target_unclipped_quantile": "target-unclipped-quantile", "clip_lr": "clip-lr",
                                "count_noise": "count-noise"}
#: ledger-record keys of the mechanism (the accountant a site records is the one it charged with: its policy's)
RECORD_KEYS: tuple[str, ...] = ("dp", "noise_multiplier", "clip_norm", "sample_rate", "steps")
#: the adaptive-clipping fields (Andrew et al. 2021). A record, manifest or settings dict carries them only when
#: ``adaptive_clip`` is true, so every fixed-clip record reads (and hashes) exactly as before they existed; an
#: adaptive record also carries ``gradient_noise_multiplier`` (σ_z, derived: :meth:`Mechanism.gradient_noise`).
ADAPTIVE_KEYS: tuple[str, ...] = ("adaptive_clip", "target_unclipped_quantile", "clip_lr", "count_noise")
GRADIENT_NOISE_KEY = "gradient_noise_multiplier"
#: the released count of unclipped patients is the CENTRED sum of one indicator per sampled patient,
#: sum_i (b_i - 1/2): adding or removing one patient moves it by exactly 1/2 (privacy.adaptive_clip)
COUNT_SENSITIVITY = 0.5


def gradient_noise_multiplier(sigma: float, count_noise: float) -> float:
    """σ_z of the clipped-gradient sum such that (gradient sum, centred count) together are ONE Gaussian
    mechanism of noise multiplier σ (Andrew et al. 2021, Thm 1; the same formula as Opacus'
    ``AdaClipDPOptimizer.add_noise``): 1/σ² = 1/σ_z² + (Δ_b/σ_b)² with the count's sensitivity Δ_b = 1/2, so
    σ_z = (σ⁻² − (2σ_b)⁻²)^(-1/2). Needs σ < 2σ_b (``inf`` otherwise: no gradient noise could make up for it)."""
    rest = sigma ** -2 - (count_noise / COUNT_SENSITIVITY) ** -2
    return rest ** -0.5 if rest > 0 else math.inf


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
    adaptive_clip: adaptive clipping (Andrew et al., NeurIPS 2021, "Differentially private learning with adaptive
        clipping"): ``clip_norm`` is only the STARTING C; after each step C follows the noised fraction of
        sampled patients whose gradient was not clipped towards ``target_unclipped_quantile``, geometrically:
        C <- C * exp(-clip_lr * (fraction - target)). The count is one more output of every step, so the noise is
        split: σ is still what the accountant charges (:meth:`charge`), the count gets N(0, σ_b²) with
        σ_b = ``count_noise`` and the gradient sum gets σ_z*C with σ_z = :meth:`gradient_noise` >= σ.
    target_unclipped_quantile: γ in [0, 1], the fraction of sampled patients C should leave unclipped.
    clip_lr: η > 0, the geometric step of C (at most a factor exp(η) per step).
    count_noise: σ_b, the count's noise std (its sensitivity is 1/2); must be > σ/2. The larger, the less extra
        gradient noise (σ_b = 5σ costs 0.5 %) but the noisier the count (its std over the expected batch q*P).
    """

    dp: bool = True
    noise_multiplier: float = 2.0
    clip_norm: float = 4.0
    sample_rate: float = 0.1
    steps: int = 100
    accountant: str = ""
    adaptive_clip: bool = False
    target_unclipped_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float = 0.0

    # ------------------------------------------------------------------ checks
    def problems(self) -> list[tuple[str, str]]:
        """``(config key, what is wrong)`` for each out-of-range field; empty when the mechanism is well formed."""
        out: list[tuple[str, str]] = []
        if not isinstance(self.dp, bool):
            out.append(("dp", "must be true or false"))
        if not isinstance(self.adaptive_clip, bool):
            out.append(("adaptive-clip", "must be true or false"))
        for name in ("noise_multiplier", "clip_norm", "sample_rate", "target_unclipped_quantile", "clip_lr",
                     "count_noise"):
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
        if self.adaptive_clip:
            out.extend(self._adaptive_problems())
        return out

    def _adaptive_problems(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if not self.dp:
            out.append(("adaptive-clip", "needs dp = true (it adapts the DP clip norm)"))
            return out
        if not 0 <= self.target_unclipped_quantile <= 1:
            out.append(("target-unclipped-quantile", f"must be in [0, 1], got {self.target_unclipped_quantile!r}"))
        if self.clip_lr <= 0:
            out.append(("clip-lr", f"must be > 0 (the geometric step of C), got {self.clip_lr!r}"))
        if not self.count_noise > self.noise_multiplier / 2:
            out.append(("count-noise", f"must be > noise-multiplier / 2 = {self.noise_multiplier / 2:g} when "
                                       f"adaptive-clip = true (got {self.count_noise!r}): the count of unclipped "
                                       "patients is released with the update, and the split of σ between the "
                                       "two (Andrew et al. Thm 1) needs σ < 2σ_b; e.g. count-noise = "
                                       f"{2 * self.noise_multiplier:g} adds 3 % gradient noise"))
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

    def gradient_noise(self) -> float:
        """σ_z, the noise multiplier of the clipped-gradient sum: σ itself under fixed clipping; under adaptive
        clipping the share of σ left once the count took its own (:func:`gradient_noise_multiplier`)."""
        if not self.adaptive_clip:
            return float(self.noise_multiplier)
        return gradient_noise_multiplier(float(self.noise_multiplier), float(self.count_noise))

    def describe(self) -> str:
        if not self.dp:
            return f"no DP, {self.steps} steps"
        clip = (f"adaptive C from {self.clip_norm:g} (γ={self.target_unclipped_quantile:g}, η={self.clip_lr:g}, "
                f"σ_b={self.count_noise:g}, σ_z={self.gradient_noise():.4g})" if self.adaptive_clip
                else f"C={self.clip_norm:g}")
        return f"σ={self.noise_multiplier:g}, {clip}, q={self.sample_rate:.3g}, {self.steps} steps"

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
        for name in ("noise_multiplier", "clip_norm", "sample_rate", "target_unclipped_quantile", "clip_lr",
                     "count_noise"):
            d[name] = float(d[name])
        if not self.dp:
            d["noise_multiplier"] = 0.0
        if not self.adaptive_clip:  # a fixed-clip manifest pins (and hashes) exactly what it did before
            for k in ADAPTIVE_KEYS:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "mechanism") -> "Mechanism":
        names = {f.name for f in fields(cls)}
        if not isinstance(data, Mapping):
            raise MechanismError(f"{where}: expected an object with {', '.join(sorted(names))}")
        unknown, missing = set(data) - names, names - set(data) - {"accountant", *ADAPTIVE_KEYS}
        if unknown or missing:
            raise MechanismError(f"{where}: unknown field(s) {sorted(unknown)} / missing field(s) {sorted(missing)}")
        kwargs = {}
        for f in fields(cls):
            if f.name in data:
                kwargs[f.name] = coerce(data[f.name], KINDS[str(f.type)], f.name, where, MechanismError)
        return cls(**kwargs).check(where)

    def to_record(self) -> dict[str, Any]:
        """The mechanism's fields of a ledger record (reservation, round, refusal)."""
        out: dict[str, Any] = {"dp": bool(self.dp), "noise_multiplier": float(self.noise_multiplier),
                               "clip_norm": float(self.clip_norm), "sample_rate": float(self.sample_rate),
                               "steps": int(self.steps)}
        if self.adaptive_clip:
            out.update({"adaptive_clip": True, "target_unclipped_quantile": float(self.target_unclipped_quantile),
                        "clip_lr": float(self.clip_lr), "count_noise": float(self.count_noise),
                        # null for an impossible split (a refusal record): JSON has no infinity
                        GRADIENT_NOISE_KEY: self.gradient_noise() if math.isfinite(self.gradient_noise()) else None})
        return out

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Mechanism":
        """The mechanism a ledger record charged (``accountant`` is the one the site recorded). A record without
        the adaptive fields (every record before they existed) is fixed clipping."""
        adaptive = rec.get("adaptive_clip", False) is True
        extra = ({"adaptive_clip": True, "target_unclipped_quantile": float(rec["target_unclipped_quantile"]),
                  "clip_lr": float(rec["clip_lr"]), "count_noise": float(rec["count_noise"])} if adaptive else {})
        return cls(dp=bool(rec["dp"]), noise_multiplier=float(rec["noise_multiplier"]),
                   clip_norm=float(rec["clip_norm"]), sample_rate=float(rec["sample_rate"]),
                   steps=int(rec["steps"]), accountant=str(rec.get("accountant", "")), **extra)

    def matches_record(self, rec: Mapping[str, Any]) -> bool:
        """Whether ledger record ``rec`` describes exactly this mechanism (adaptive fields included)."""
        try:
            return Mechanism.from_record(rec).to_record() == self.to_record()
        except (KeyError, TypeError, ValueError):
            return False

    def same_charge(self, other: "Mechanism") -> bool:
        """Whether two mechanisms charge the same (the accountant aside)."""
        return self.to_record() == other.to_record()
