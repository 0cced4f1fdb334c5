"""Arms of bench/utility: a named set of run-config overrides on top of the lead's default recipe.

An option of the training recipe lands as a run-config key (``server.settings.RunSettings`` and the task's and
mechanism's keys beside them), so an arm is nothing but ``NAME:key=value,key=value`` — any option that becomes a
run-config key can be measured without a change to the bench. Values are TOML scalars, as in Flower's own
``--run-config`` (``lr=0.1``, ``secagg=true``, ``strategy="fedadam"``; a bare word is taken as a string), and go
through ``RunSettings.from_run_config``, so a mistyped or out-of-range value is the same SettingsError a real run
would give, naming the key.

The bench sets some keys itself and an arm may not: where runs live (``run-dir``, ``keys-dir``, ``run-name``), how
many sites take part (``num-sites``), the seed of each run, DP on/off and the noise multiplier (calibrated per
target epsilon), and ``resume`` / ``allow-unverified-demo``.
"""

from __future__ import annotations

import math
import statistics
import tomllib
from dataclasses import dataclass, field
from typing import Any

#: keys the bench sets for every run; an arm that sets one is rejected (say why in the message)
BENCH_KEYS: dict[str, str] = {
    "run-dir": "each run gets its own folder", "keys-dir": "the demo consortium's enrolled keys",
    "run-name": "set per run", "num-sites": "the three demo hospitals", "seed": "use --seeds",
    "dp": "the DP arms are the --eps list; pooled and fedavg are the non-DP references",
    "noise-multiplier": "calibrated per target epsilon (--eps)", "resume": "every run starts fresh",
    "allow-unverified-demo": "the bench runs with enrolled site keys",
}


class ArmError(ValueError):
    """A ``--arm`` that cannot be run; the message names the arm, the key and what to do."""


@dataclass(frozen=True)
class Arm:
    """One recipe: ``name`` and its run-config overrides (``{}`` = the default recipe)."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        return self.name if not self.overrides else \
            f"{self.name} ({', '.join(f'{k}={v}' for k, v in self.overrides.items())})"


def _value(text: str) -> Any:
    """A TOML scalar (``0.9``, ``3``, ``true``, ``"x"``); anything TOML does not read is the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_arm(spec: str, allowed: set[str] | frozenset[str]) -> Arm:
    """``NAME:key=value,key=value`` -> :class:`Arm`; ``allowed`` = the run-config keys of this Atoll.

    Raises ArmError for a missing name, a pair without '=', a key the run config does not have (listing the
    closest ones) or one the bench sets itself.
    """
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not sep or not name:
        raise ArmError(f"--arm {spec!r}: expected NAME:key=value[,key=value...], e.g. "
                       "momentum:strategy=fedavgm,server-momentum=0.9")
    if name in ("default", "pooled", "fedavg"):
        raise ArmError(f"--arm {spec!r}: the name {name!r} is taken by a reference arm; choose another")
    overrides: dict[str, Any] = {}
    for pair in (p.strip() for p in rest.split(",")):
        if not pair:
            continue
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ArmError(f"--arm {name}: {pair!r} is not key=value")
        if key in BENCH_KEYS:
            raise ArmError(f"--arm {name}: '{key}' is set by the bench ({BENCH_KEYS[key]}); leave it out")
        if key not in allowed:
            import difflib

            near = difflib.get_close_matches(key, sorted(allowed), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ArmError(f"--arm {name}: unknown run-config key '{key}'{hint}; the keys are those of "
                           "pyproject.toml [tool.flwr.app.config]")
        overrides[key] = _value(value.strip())
    if not overrides:
        raise ArmError(f"--arm {name}: no overrides given (the default recipe is always measured as 'default')")
    return Arm(name, overrides)


def run_config_keys() -> frozenset[str]:
    """Every run-config key of the lead's settings (RunSettings fields, task and mechanism keys)."""
    from server.settings import RunSettings

    return frozenset(RunSettings(run_dir="/").to_run_config())


def arm_settings(arm: Arm, base: Any, **fixed: Any) -> Any:
    """``base`` (a RunSettings) with the arm's overrides and then the bench's ``fixed`` run-config keys, checked
    as a run would be (SettingsError naming the key, prefixed with the arm's name)."""
    from server.settings import RunSettings, SettingsError

    config = {**base.to_run_config(), **arm.overrides, **fixed}
    try:
        return RunSettings.from_run_config(config)
    except SettingsError as exc:
        raise ArmError(f"--arm {arm.name}: {exc}") from None


def spread(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation, max - min and every value (None/NaN values are left out of the stats)."""
    ok = [float(v) for v in values if v is not None and not math.isnan(v)]
    return {"mean": statistics.fmean(ok) if ok else None,
            "std": statistics.stdev(ok) if len(ok) > 1 else (0.0 if ok else None),
            "spread": (max(ok) - min(ok)) if ok else None, "runs": list(values)}
