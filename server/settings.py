"""The lead's run settings, read from Flower's run config and checked before any round starts."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from atoll.wire import RoundConfig
from privacy.secagg_prg import check_num_shares


class SettingsError(ValueError):
    """A run-config value is missing, mistyped or out of range; the message names the key."""


@dataclass(frozen=True)
class RunSettings:
    """Run-config keys are the field names with '-' for '_' (e.g. `num-server-rounds`).

    The training defaults are Atoll's DP recipe (README "Benchmarks", bench/utility.py): per round and site
    100 local steps of DP-SGD with SGD momentum 0.9 (privacy.dpsgd's default optimizer) at lr 0.05, patients
    Poisson-sampled at q = 0.1, per-patient clip norm C = 4 and noise multiplier sigma = 2. Three rounds spend
    epsilon ~ 4 at delta = 1/(10 x patients) on the demo hospitals. ``pyproject.toml [tool.flwr.app.config]``
    repeats these values and ``atoll demo`` uses them (tests/test_dp_utility.py keeps them equal).
    """

    num_server_rounds: int = 3
    run_name: str = ""
    run_dir: str = ""
    keys_dir: str = ""
    allow_unverified_demo: bool = False  # only the local demo may run without enrolled site keys (loud warning)
    model: str = "atollnet"
    image_size: int = 28
    local_steps: int = 100
    lr: float = 0.05
    batch_size: int = 64
    sample_rate: float = 0.1
    dp: bool = True
    noise_multiplier: float = 2.0
    clip_norm: float = 4.0
    strategy: str = "fedavg"
    max_update_norm: float = 0.0  # reject updates with ||update - global|| above this; 0 = no bound
    min_sites: int = 2
    num_sites: int = 0            # 0 = every connected site; otherwise wait for this many
    round_timeout: float = 3600.0
    seed: int = 0
    # SecAgg+ (Flower's protocol, ChaCha20 masks): the server sees only the sum of the updates.
    secagg: bool = False
    secagg_num_shares: float = 1.0                # shares per site: odd count >= 3, or fraction of sites (<= 1)
    secagg_reconstruction_threshold: float = 0.6  # shares that rebuild a secret: count >= 2, or fraction (<= 1)
    secagg_max_weight: float = 10000.0            # largest num-examples a site may weight its update by

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "RunSettings":
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in known:
                continue  # Flower already rejects keys absent from pyproject; others belong to other apps
            f = known[key]
            kind = {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise SettingsError(f"run config '{key}' must be {kind.__name__}, got {value!r}")
            kwargs[f.name] = value
        s = cls(**kwargs)
        s.check()
        return s

    def check(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise SettingsError(f"run config '{key}' {what}")
        need(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
        need(self.local_steps >= 1, "local-steps", "must be >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.batch_size >= 1, "batch-size", "must be >= 1")
        need(0 < self.sample_rate <= 1, "sample-rate", "must be in (0, 1]")
        need(self.image_size >= 8, "image-size", "must be >= 8")
        need(self.min_sites >= 1, "min-sites", "must be >= 1")
        need(not self.dp or self.noise_multiplier > 0, "noise-multiplier", "must be > 0 when dp = true")
        need(not self.dp or self.clip_norm > 0, "clip-norm", "must be > 0 when dp = true")
        need(self.max_update_norm >= 0, "max-update-norm", "must be >= 0 (0 = no bound)")
        need(self.round_timeout > 0, "round-timeout", "must be > 0")
        need(bool(self.run_dir) and Path(self.run_dir).is_absolute(), "run-dir",
             "must be an absolute path (relative paths resolve against the SuperLink's working directory)")
        if self.secagg:
            self._check_secagg(need)

    def _check_secagg(self, need) -> None:
        """SecAgg+ hides single updates from the server, so nothing may need a single update."""
        strategy = self.strategy.strip().lower().replace("-", "").replace("_", "")
        need(strategy == "fedavg", "strategy",
             f"is {self.strategy!r} but must be \"fedavg\" when secagg = true: under SecAgg+ the server only "
             "sees the sum of the sites' masked updates, so a robust rule (median, trimmed mean, Krum, Bulyan) "
             "has no single update to act on, and FedProx is not available on the legacy SecAgg+ path")
        need(self.max_update_norm == 0, "max-update-norm",
             f"is {self.max_update_norm} but must be 0 when secagg = true: under SecAgg+ the server never holds "
             "one site's update, so it cannot bound its norm (the sites' DP-SGD clipping still bounds it)")
        need(self.min_sites >= 2, "min-sites", "must be >= 2 when secagg = true (a sum over one site is its update)")
        need(self.secagg_max_weight >= 1, "secagg-max-weight", "must be >= 1 (the largest num-examples of a site)")
        num_shares, threshold = self.secagg_parameters()
        try:
            check_num_shares(num_shares, threshold)
        except ValueError as exc:
            raise SettingsError(f"run config 'secagg-num-shares'/'secagg-reconstruction-threshold': {exc}") from None
        for key, value in (("secagg-num-shares", num_shares), ("secagg-reconstruction-threshold", threshold)):
            need(not (self.num_sites and isinstance(value, int) and value > self.num_sites), key,
                 f"is {value} shares but num-sites is {self.num_sites}")

    def secagg_parameters(self) -> tuple[int | float, int | float]:
        """(num_shares, reconstruction_threshold) as Flower's SecAggPlusWorkflow takes them.

        A run-config value of 1 means all (Flower's 1.0); a value in (0, 1) a fraction; a whole number
        >= 2 a count. Anything else is a SettingsError naming the key.
        """
        out: list[int | float] = []
        for key, value in (("secagg-num-shares", self.secagg_num_shares),
                           ("secagg-reconstruction-threshold", self.secagg_reconstruction_threshold)):
            if value <= 0 or (value > 1 and not float(value).is_integer()):
                raise SettingsError(f"run config '{key}' must be a fraction in (0, 1] or a whole number of "
                                    f"shares, got {value!r}")
            out.append(float(value) if value <= 1 else int(value))
        return out[0], out[1]

    def to_run_config(self) -> dict[str, Any]:
        """As Flower's `--run-config` keys (the inverse of from_run_config)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def name_for(self, flower_run_id: int) -> str:
        return self.run_name or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{flower_run_id % 100000:05d}"

    def round_config(self, run_name: str, server_round: int) -> RoundConfig:
        return RoundConfig(run_id=run_name, server_round=server_round, num_rounds=self.num_server_rounds,
                           model=self.model,
                           image_size=self.image_size, local_steps=self.local_steps, lr=self.lr,
                           batch_size=self.batch_size, sample_rate=self.sample_rate, dp=self.dp, noise_multiplier=self.noise_multiplier,
                           clip_norm=self.clip_norm, seed=self.seed, secagg=self.secagg)
