"""The wire format both sides agree on: what a round asks of a site and what a site may answer.

Defined once here (DESIGN.md: "whatever both sides must agree on is defined once") so the
ServerApp and the ClientApp cannot drift apart. Only plain scalars travel in the round config; the
site's reply carries the update, the released metrics, its signed ledger record, or a refusal.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from flwr.app import ConfigRecord, RecordDict

from contract._fields import KINDS, coerce, key_of
from contract.mechanism import Mechanism
from contract.server_options import ServerOptions
from contract.task import TaskSpec

# Record keys inside a reply's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
LEDGER = "ledger"
REFUSAL = "refusal"
SITE = "site"
NUM_EXAMPLES = "num-examples"
ATTESTATION = "attestation"  # ConfigRecord: the site's signature over an evaluation reply (evaluation_statement)
MISSING = "missing"  # ConfigRecord: released metric name -> why it has no value this round (MISSING_REASONS)

# Why a metric the site releases has no value in a reply: a fixed vocabulary, so the record can carry no free text.
# EMPTY_BATCHES: every DP step of the round drew an empty Poisson batch (a valid, noise-only release; no loss).
MISSING_REASONS = ("NOT_FINITE", "SINGLE_CLASS", "NO_DATA", "EMPTY_BATCHES")

# Refusal codes that are not the privacy guard's (its codes come from privacy.guard).
SITE_ERROR = "SITE_ERROR"
NO_SITE_CONFIG = "NO_SITE_CONFIG"
NO_USABLE_DATA = "NO_USABLE_DATA"
RUN_NOT_APPROVED = "RUN_NOT_APPROVED"
EGRESS_BLOCKED = "EGRESS_BLOCKED"
ROUND_ALREADY_ANSWERED = "ROUND_ALREADY_ANSWERED"
SECAGG_MISMATCH = "SECAGG_MISMATCH"
TASK_MISMATCH = "TASK_MISMATCH"
NO_COMPLETE_MIRROR = "NO_COMPLETE_MIRROR"  # a PACS site whose first pull has not succeeded (client.pacs)

#: Metrics of the default (binary X-ray) task, kept for callers that predate TaskSpec.metric_names().
APP_METRICS = TaskSpec().metric_names()


@dataclass(frozen=True)
class RoundConfig:
    """What the lead asks of every site in one round (sent as the ConfigRecord "config").

    The task and the DP mechanism are one type each (:class:`TaskSpec`, :class:`Mechanism`), flattened into the
    record with the same keys the run config uses, so the run config, the round config and the manifest cannot
    disagree on a field's name or default.
    """

    run_id: str
    server_round: int
    num_rounds: int = 1
    model: str = "atollnet"
    lr: float = 0.05
    batch_size: int = 64          # non-DP minibatch size
    seed: int = 0
    secagg: bool = False          # the update leaves masked under SecAgg+ (part of what a site approves)
    strategy: str = "fedavg"      # how the server combines the updates (sites approve it)
    proximal_mu: float = 0.0      # fedprox: the site adds the proximal term (mu/2)||w - w_global||^2
    augment_multiplicity: int = 1  # K augmented views per sampled image, averaged before clipping (1 = off)
    ema_decay: float = 0.0        # the site releases the EMA of its DP iterates within the round (0 = off)
    num_malicious: int = 0        # krum | multikrum | bulyan: sites the rule tolerates
    prev_digest: str = ""         # hash of the consortium's signed digest of the previous round (privacy.anchor);
                                  # the site signs it into its round record (countersignature). "" = none sent
    task: TaskSpec = field(default_factory=TaskSpec)
    mechanism: Mechanism = field(default_factory=Mechanism)
    server_options: ServerOptions = field(default_factory=ServerOptions)  # server-side post-processing (approved)

    def to_record(self) -> ConfigRecord:
        rec = {key_of(f.name): getattr(self, f.name) for f in fields(self) if f.name not in _NESTED}
        rec.update(self.task.to_config())
        rec.update(self.mechanism.to_config())
        rec.update(self.server_options.to_config())
        return ConfigRecord(rec)

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> "RoundConfig":
        """Parse a round config; a missing or mistyped field is a ValueError naming the field."""
        kwargs: dict = {}
        for f in fields(cls):
            if f.name in _NESTED:
                continue
            key = key_of(f.name)
            if key not in rec:
                if f.name in ("run_id", "server_round"):
                    raise ValueError(f"round config lacks required field '{key}'")
                continue
            kwargs[f.name] = coerce(rec[key], KINDS[str(f.type)], key, "round config field")
        as_dict = dict(rec)
        return cls(**kwargs, task=TaskSpec.from_config(as_dict), mechanism=Mechanism.from_config(as_dict),
                   server_options=ServerOptions.from_config(as_dict))

    def as_dict(self) -> dict:
        return asdict(self)


_NESTED = ("task", "mechanism", "server_options")


def refusal_record(code: str, message: str) -> ConfigRecord:
    """A refusal the lead will see. `message` must already be free of identifiers and paths."""
    return ConfigRecord({"code": code, "message": message})


def missing_record(reasons: dict[str, str]) -> ConfigRecord:
    """``{metric name: reason code}`` for released metrics without a value (codes from MISSING_REASONS)."""
    return ConfigRecord(dict(reasons))


def missing_of(content: RecordDict) -> dict[str, str]:
    if MISSING not in content.config_records:
        return {}
    return {str(k): str(v) for k, v in content.config_records[MISSING].items()}


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


EVALUATION_STATEMENT = "atoll.evaluation/1"


def released_sha256(content: RecordDict) -> str:
    """Hash of the metrics (and missing-metric codes) an evaluation reply releases, as both sides compute it."""
    metrics = {str(k): float(v) for k, v in content.metric_records[METRICS].items()} \
        if METRICS in content.metric_records else {}
    body = {"metrics": metrics, "missing": missing_of(content)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def evaluation_statement(site: str, run_id: str, server_round: int, weights_sha256: str, released: str) -> dict:
    """What a site signs when it answers an evaluation: this site scored *these* weights and released *these*
    metrics. Hashes and names only: it carries nothing the reply does not already carry in the clear."""
    return {"kind": EVALUATION_STATEMENT, "site": site, "run_id": run_id, "server_round": int(server_round),
            "weights_sha256": weights_sha256, "released_sha256": released}


def attestation_record(statement: dict) -> ConfigRecord:
    return ConfigRecord({"record": json.dumps(statement, sort_keys=True, separators=(",", ":"))})


def attestation_of(content: RecordDict) -> dict | None:
    if ATTESTATION not in content.config_records:
        return None
    try:
        out = json.loads(str(content.config_records[ATTESTATION]["record"]))
    except (KeyError, ValueError):
        return None
    return out if isinstance(out, dict) else None
