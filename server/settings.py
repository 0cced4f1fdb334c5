"""The lead's run settings, read from Flower's run config and checked before any round starts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract import Mechanism, MechanismError, TaskError, TaskSpec
from contract._fields import KINDS, coerce, key_of
from contract.server_options import ServerOptions
from contract.recipe import MAX_AUGMENT_MULTIPLICITY

if TYPE_CHECKING:  # imported where used: `atoll run --help` and a settings check must not wait for Flower/NumPy
    from contract.wire import RoundConfig


class SettingsError(ValueError):
    """A run-config value is missing, mistyped or out of range; the message names the key."""


@dataclass(frozen=True)
class RunSettings:
    """Run-config keys are the field names with '-' for '_' (e.g. `num-server-rounds`); the task's and the
    mechanism's keys are theirs (:meth:`TaskSpec.to_config`, :meth:`Mechanism.to_config`), flat beside them.

    The training defaults are Atoll's DP recipe (README "Benchmarks", bench/utility.py): per round and site
    100 local steps of DP-SGD with SGD momentum 0.9 (privacy.dpsgd's default optimizer) at lr 0.05, patients
    Poisson-sampled at q = 0.1, per-patient clip norm C = 4 and noise multiplier sigma = 2 (:class:`Mechanism`'s
    defaults). Three rounds spend epsilon ~ 4 at delta = 1/(10 x patients) on the demo hospitals.
    ``pyproject.toml [tool.flwr.app.config]`` repeats these values (tests/test_wire_and_settings.py checks it)
    and ``atoll demo`` uses them.
    """

    num_server_rounds: int = 3
    run_name: str = ""
    run_dir: str = ""
    keys_dir: str = ""
    allow_unverified_demo: bool = False  # only the local demo may run without enrolled site keys (loud warning)
    model: str = "atollnet"
    lr: float = 0.05
    batch_size: int = 64
    strategy: str = "fedavg"
    proximal_mu: float = 0.0      # fedprox: weight of the proximal term (mu/2)||w - w_global||^2 at the sites
    # Site-side recipe options (privacy.dpsgd; both keep the mechanism and its charge, README "Run config"):
    augment_multiplicity: int = 1  # K random views of each sampled image, gradients averaged before clipping
    ema_decay: float = 0.0        # sites release the EMA (decay d) of their DP iterates within a round; 0 = off
    num_malicious: int = 0        # krum | multikrum | bulyan: how many sites the rule must tolerate (f >= 1)
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
    # `atoll run resume`: go on from the run folder's checkpoint (server.resume) instead of starting the run. How
    # the run was launched, not what it does: left out of settings.json, the manifest and the round config.
    resume: bool = False
    task: TaskSpec = field(default_factory=TaskSpec)
    mechanism: Mechanism = field(default_factory=Mechanism)
    # server momentum / FedAdam / server EMA / decision threshold: post-processing of what the sites released
    server_options: ServerOptions = field(default_factory=ServerOptions)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "RunSettings":
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = key_of(f.name)
            if f.name in _NESTED or key not in run_config:
                continue  # Flower already rejects keys absent from pyproject; others belong to other apps
            try:
                kwargs[f.name] = coerce(run_config[key], KINDS[str(f.type)], key, "run config")
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
        try:
            kwargs["task"] = TaskSpec.from_config(run_config, where="run config")
            kwargs["mechanism"] = Mechanism.from_config(run_config, where="run config")
            kwargs["server_options"] = ServerOptions.from_config(run_config, where="run config")
        except (TaskError, MechanismError, ValueError) as exc:
            raise SettingsError(str(exc)) from None
        s = cls(**kwargs)
        s.check()
        return s

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "settings.json") -> "RunSettings":
        """The settings a run folder's settings.json holds (``dataclasses.asdict`` of them), checked."""
        if not isinstance(data, dict) or not isinstance(data.get("task"), dict) \
                or not isinstance(data.get("mechanism"), dict):
            raise SettingsError(f"{where}: not the settings of an Atoll run (no task / mechanism object)")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise SettingsError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (written by another Atoll "
                                "version?)")
        try:
            task_fields = {f.name for f in fields(TaskSpec)}
            task = TaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["task"].items()
                               if k in task_fields}).check(where)
            mechanism = Mechanism.from_dict(data["mechanism"], where=f"{where} mechanism")
            server_options = ServerOptions(**data.get("server_options", {}))  # absent: a run before the options
            kwargs: dict[str, Any] = {}
            for f in fields(cls):
                if f.name in _NESTED or f.name not in data:
                    continue
                kwargs[f.name] = coerce(data[f.name], KINDS[str(f.type)], f.name, where)
        except (TaskError, MechanismError, TypeError, ValueError) as exc:
            raise SettingsError(str(exc)) from None
        s = cls(**kwargs, task=task, mechanism=mechanism, server_options=server_options)
        s.check()
        return s

    def check(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise SettingsError(f"run config '{key}' {what}")
        need(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.batch_size >= 1, "batch-size", "must be >= 1")
        self._check_recipe(need)
        for key, what in (*self.mechanism.problems(), *self.task.problems()):
            need(False, key, what)
        need(self.task.spatial_dims == 3 or min(self.task.size) >= 8, "image-size", "must be >= 8")
        need(self.min_sites >= 1, "min-sites", "must be >= 1")
        need(self.max_update_norm >= 0, "max-update-norm", "must be >= 0 (0 = no bound)")
        self._check_strategy(need)
        for key, what in self.server_options.problems(self.strategy):
            need(False, key, what)
        need(self.server_options.decision_threshold == "argmax"
             or (self.task.is_classification and len(self.task.classes) == 2), "decision-threshold",
             "\"validation\" needs a binary classification task (a threshold on the positive class's probability)")
        need(self.round_timeout > 0, "round-timeout", "must be > 0")
        need(bool(self.run_dir) and Path(self.run_dir).is_absolute(), "run-dir",
             "must be an absolute path (relative paths resolve against the SuperLink's working directory)")
        if self.secagg:
            self._check_secagg(need)

    def _check_recipe(self, need) -> None:
        """The site-side training options: the same bounds train_local enforces, named by run-config key."""
        need(1 <= self.augment_multiplicity <= MAX_AUGMENT_MULTIPLICITY, "augment-multiplicity",
             f"must be a whole number in [1, {MAX_AUGMENT_MULTIPLICITY}] (1 = no augmentation), "
             f"got {self.augment_multiplicity}")
        need(self.augment_multiplicity == 1 or self.task.kind == "classification", "augment-multiplicity",
             f"must be 1 for task {self.task.kind!r}: augmented views apply to classification only")
        need(0 <= self.ema_decay < 1, "ema-decay", f"must be in [0, 1) (0 = off), got {self.ema_decay}")

    def _check_strategy(self, need) -> None:
        """Every strategy setting must act: no fedprox without a proximal term, no Krum tolerating nobody."""
        strategy = self.strategy.strip().lower().replace("-", "").replace("_", "")
        need(self.proximal_mu >= 0, "proximal-mu", "must be >= 0")
        need(strategy != "fedprox" or self.proximal_mu > 0, "proximal-mu",
             "must be > 0 when strategy = \"fedprox\" (with mu = 0 FedProx trains exactly like FedAvg)")
        need(strategy == "fedprox" or self.proximal_mu == 0, "proximal-mu",
             f"applies to strategy \"fedprox\" only, but strategy is {self.strategy!r}")
        robust = strategy in ("krum", "multikrum", "bulyan")
        need(self.num_malicious >= 0, "num-malicious", "must be >= 0")
        need(not robust or self.num_malicious >= 1, "num-malicious",
             f"must be >= 1 for strategy {self.strategy!r}: the number of malicious sites the rule tolerates "
             "(with 0 its robustness guarantee never applies)")
        need(robust or self.num_malicious == 0, "num-malicious",
             f"applies to krum, multikrum and bulyan only, but strategy is {self.strategy!r}")

    def _check_secagg(self, need) -> None:
        """SecAgg+ hides single updates from the server, so nothing may need a single update."""
        strategy = self.strategy.strip().lower().replace("-", "").replace("_", "")
        need(strategy in ("fedavg", "fedavgm", "fedadam"), "strategy",
             f"is {self.strategy!r} but must be \"fedavg\" (or \"fedavgm\" / \"fedadam\", which only "
             "post-process the sum) when secagg = true: under SecAgg+ the server only "
             "sees the sum of the sites' masked updates, so a robust rule (median, trimmed mean, Krum, Bulyan) "
             "has no single update to act on, and FedProx is not available on the legacy SecAgg+ path")
        need(self.max_update_norm == 0, "max-update-norm",
             f"is {self.max_update_norm} but must be 0 when secagg = true: under SecAgg+ the server never holds "
             "one site's update, so it cannot bound its norm (the sites' DP-SGD clipping still bounds it)")
        need(self.min_sites >= 2, "min-sites", "must be >= 2 when secagg = true (a sum over one site is its update)")
        need(self.secagg_max_weight >= 1, "secagg-max-weight", "must be >= 1 (the largest num-examples of a site)")
        from privacy.secagg_prg import check_num_shares

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
        out = {key_of(f.name): getattr(self, f.name) for f in fields(self) if f.name not in _NESTED}
        return {**out, **self.task.to_config(), **self.mechanism.to_config(), **self.server_options.to_config()}

    def name_for(self, flower_run_id: int) -> str:
        return self.run_name or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{flower_run_id % 100000:05d}"

    def round_config(self, run_name: str, server_round: int) -> RoundConfig:
        from contract.wire import RoundConfig

        return RoundConfig(run_id=run_name, server_round=server_round, num_rounds=self.num_server_rounds,
                           model=self.model, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                           secagg=self.secagg, strategy=self.strategy, proximal_mu=self.proximal_mu,
                           augment_multiplicity=self.augment_multiplicity, ema_decay=self.ema_decay,
                           num_malicious=self.num_malicious, task=self.task, mechanism=self.mechanism,
                           server_options=self.server_options)


_NESTED = ("task", "mechanism", "server_options")
