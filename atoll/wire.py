"""The wire format both sides agree on: what a round asks of a site and what a site may answer.

Defined once here (DESIGN.md: "whatever both sides must agree on is defined once") so the
ServerApp and the ClientApp cannot drift apart. Only plain scalars travel in the round config; the
site's reply carries the update, the released metrics, its signed ledger record, or a refusal.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from flwr.app import ConfigRecord, RecordDict

# Record keys inside a reply's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
LEDGER = "ledger"
REFUSAL = "refusal"
SITE = "site"
NUM_EXAMPLES = "num-examples"

# Refusal codes that are not the privacy guard's (its codes come from privacy.guard).
SITE_ERROR = "SITE_ERROR"
NO_SITE_CONFIG = "NO_SITE_CONFIG"
NO_USABLE_DATA = "NO_USABLE_DATA"
RUN_NOT_APPROVED = "RUN_NOT_APPROVED"
EGRESS_BLOCKED = "EGRESS_BLOCKED"
ROUND_ALREADY_ANSWERED = "ROUND_ALREADY_ANSWERED"
SECAGG_MISMATCH = "SECAGG_MISMATCH"

# Every metric Atoll's ClientApp can release; a site sends the subset its policy lists.
APP_METRICS = ("num-examples", "train_loss", "train_seconds", "val_loss", "val_accuracy", "val_auc")


@dataclass(frozen=True)
class RoundConfig:
    """What the lead asks of every site in one round (sent as the ConfigRecord "config")."""

    run_id: str
    server_round: int
    num_rounds: int = 1
    model: str = "atollnet"
    image_size: int = 28
    local_steps: int = 100        # defaults equal server.settings.RunSettings' (tests/test_wire_and_settings.py)
    lr: float = 0.05
    batch_size: int = 64          # non-DP minibatch size
    sample_rate: float = 0.1      # DP: probability that a patient is in a step (same for every site)
    dp: bool = True
    noise_multiplier: float = 2.0
    clip_norm: float = 4.0
    seed: int = 0
    secagg: bool = False          # the update leaves masked under SecAgg+ (part of what a site approves)
    prev_digest: str = ""         # hash of the consortium's signed digest of the previous round (privacy.anchor);
                                  # the site signs it into its round record (countersignature). "" = none sent

    def to_record(self) -> ConfigRecord:
        rec = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
        return ConfigRecord(rec)

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> "RoundConfig":
        """Parse a round config; a missing or mistyped field is a ValueError naming the field."""
        kwargs = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in rec:
                if f.name in ("run_id", "server_round"):
                    raise ValueError(f"round config lacks required field '{key}'")
                continue
            value = rec[key]
            kind = {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"round config field '{key}' must be {kind.__name__}, got {value!r}")
            kwargs[f.name] = value
        return cls(**kwargs)

    def as_dict(self) -> dict:
        return asdict(self)


def refusal_record(code: str, message: str) -> ConfigRecord:
    """A refusal the lead will see. `message` must already be free of identifiers and paths."""
    return ConfigRecord({"code": code, "message": message})


def site_record(name: str) -> ConfigRecord:
    return ConfigRecord({"name": name})


def ledger_record(record: dict) -> ConfigRecord:
    return ConfigRecord({"record": json.dumps(record, sort_keys=True, separators=(",", ":"))})


def parse_ledger_record(content: RecordDict) -> dict | None:
    if LEDGER not in content.config_records:
        return None
    return json.loads(str(content.config_records[LEDGER]["record"]))


def refusal_of(content: RecordDict) -> tuple[str, str] | None:
    if REFUSAL not in content.config_records:
        return None
    rec = content.config_records[REFUSAL]
    return str(rec["code"]), str(rec["message"])


def site_name_of(content: RecordDict) -> str | None:
    if SITE not in content.config_records:
        return None
    return str(content.config_records[SITE]["name"])
