"""What the server does with the round's aggregate before it is the next global model, as one type.

Server momentum (Flower's FedAvgM), FedAdam, an exponential moving average of the global model and the way the
final decision threshold is chosen are all post-processing of what the sites released (the aggregate of their DP
updates, and the validation metrics their policies list): they cost no privacy, but they change the model a site
helps to build, so the run config sets them, the round config carries them and the run manifest pins them (a
site approves them). Defined once here, flattened into config keys like :class:`~contract.Mechanism`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from contract._fields import KINDS, coerce, key_of

#: how the decision threshold of a binary classifier is chosen: "argmax" (0.5), or "validation" (the threshold
#: that maximises balanced accuracy, equivalently Youden's J, on the pooled released `val_threshold_counts`)
THRESHOLD_RULES: tuple[str, ...] = ("argmax", "validation")


@dataclass(frozen=True)
class ServerOptions:
    """server_lr, server_momentum: FedAvgM's server learning rate and momentum (strategy "fedavgm" only).
    fedadam_eta, fedadam_beta1, fedadam_beta2, fedadam_tau: FedAdam's (strategy "fedadam" only; Flower's defaults).
    server_ema: decay d of the server's EMA of the global model (0 = off); ema_t = d ema_{t-1} + (1 - d) w_t.
    decision_threshold: one of :data:`THRESHOLD_RULES`.
    """

    server_lr: float = 1.0
    server_momentum: float = 0.0
    fedadam_eta: float = 0.1
    fedadam_beta1: float = 0.9
    fedadam_beta2: float = 0.99
    fedadam_tau: float = 1e-3
    server_ema: float = 0.0
    decision_threshold: str = "argmax"

    def problems(self, strategy: str) -> list[tuple[str, str]]:
        """``(config key, what is wrong)``; a setting that would do nothing with ``strategy`` is a problem too."""
        name = strategy.strip().lower().replace("-", "").replace("_", "")
        out: list[tuple[str, str]] = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "float" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                out.append((key_of(f.name), f"must be a finite number, got {v!r}"))
        if out:
            return out
        if self.server_lr <= 0:
            out.append(("server-lr", "must be > 0"))
        for key, v in (("server-momentum", self.server_momentum), ("fedadam-beta1", self.fedadam_beta1),
                       ("fedadam-beta2", self.fedadam_beta2), ("server-ema", self.server_ema)):
            if not 0 <= v < 1:
                out.append((key, f"must be in [0, 1), got {v!r}"))
        for key, v in (("fedadam-eta", self.fedadam_eta), ("fedadam-tau", self.fedadam_tau)):
            if v <= 0:
                out.append((key, f"must be > 0, got {v!r}"))
        if self.decision_threshold not in THRESHOLD_RULES:
            out.append(("decision-threshold", f"must be one of {', '.join(THRESHOLD_RULES)}, "
                                              f"got {self.decision_threshold!r}"))
        default = ServerOptions()
        if name == "fedavgm" and self.server_lr == 1.0 and self.server_momentum == 0.0:
            out.append(("server-momentum", "must be > 0 (or server-lr != 1) when strategy = \"fedavgm\": with "
                                           "lr 1 and no momentum FedAvgM is exactly FedAvg"))
        if name != "fedavgm":
            for key in ("server_lr", "server_momentum"):
                if getattr(self, key) != getattr(default, key):
                    out.append((key_of(key), f"applies to strategy \"fedavgm\" only, but strategy is {strategy!r}"))
        if name != "fedadam":
            for key in ("fedadam_eta", "fedadam_beta1", "fedadam_beta2", "fedadam_tau"):
                if getattr(self, key) != getattr(default, key):
                    out.append((key_of(key), f"applies to strategy \"fedadam\" only, but strategy is {strategy!r}"))
        return out

    def to_config(self) -> dict[str, Any]:
        """Flat config keys (``server-lr`` ...), as the run config and each round's ConfigRecord carry them."""
        return {key_of(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "round config") -> "ServerOptions":
        """Parse the options' keys out of a flat config; absent keys keep their defaults."""
        kwargs = {f.name: coerce(config[key_of(f.name)], KINDS[str(f.type)], key_of(f.name), where)
                  for f in fields(cls) if key_of(f.name) in config}
        return cls(**kwargs)

    def non_default(self) -> dict[str, Any]:
        """The options that differ from the defaults, by config key (what a manifest pins; floats as floats)."""
        default = ServerOptions()
        return {key_of(f.name): (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                for f in fields(self) if (v := getattr(self, f.name)) != getattr(default, f.name)}

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.non_default().items()) or "none"
