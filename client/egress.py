"""The site's egress guard: the last check on everything a reply carries out of the hospital.

DESIGN.md: what leaves a site is either covered by DP (the update) or listed in the site policy as
released in the clear. The ClientApp builds replies that way, but a bug, a modified app or a
careless mod could still attach a tensor, a metric or a free-text record. The guard checks a
reply's RecordDict against what was declared and approved:

* ArrayRecord "arrays" only: exactly the declared tensors (names, shapes, dtypes), all finite;
* MetricRecord "metrics" only: scalar finite numbers under allowed metric names;
* ConfigRecords only "ledger", "site", "refusal", "attestation", each with its own keys and short string values
  (no bytes, no lists: nothing that could smuggle an array);
* ConfigRecord "missing" (why a released metric has no value): keys are metric names the policy releases,
  values one of the fixed codes of `wire.MISSING_REASONS` (no free text).

A metric without a finite value (a one-class validation split has no AUC; a round whose Poisson
batches were all empty has no loss) must not block the whole reply: `release_metrics` keeps the
defined ones and names the others in "missing" with a code.

Anything else raises `EgressBlocked`, whose message is generic (it may cross the wire); the
specifics go to the site's own log under an incident id.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from contract import wire

__all__ = [
    "DEFAULT_CONFIG_RECORDS",
    "EgressBlocked",
    "EgressPolicy",
    "TensorSpec",
    "check_reply",
    "egress_guard_mod",
    "release_metrics",
]

log = logging.getLogger("atoll.site.egress")

#: Config records a reply may carry, with the keys each may hold and the longest value allowed.
DEFAULT_CONFIG_RECORDS: Mapping[str, Mapping[str, int]] = {
    wire.LEDGER: {"record": 65536},
    wire.SITE: {"name": 128},
    wire.REFUSAL: {"code": 64, "message": 1000},
    wire.ATTESTATION: {"record": 2048},  # the site's signature over an evaluation reply: hashes and names only
}


class EgressBlocked(Exception):
    """A reply carried something not declared. `str()` is generic; `detail` stays on the site."""

    def __init__(self, detail: str, incident: str | None = None) -> None:
        self.incident = incident or secrets.token_hex(4)
        self.detail = detail
        super().__init__(f"the reply was blocked by the site's egress guard (incident {self.incident}; "
                         "see the site log)")


@dataclass(frozen=True)
class TensorSpec:
    """One declared output tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_dict(cls, d: Mapping) -> "TensorSpec":
        return cls(str(d["name"]), tuple(int(x) for x in d["shape"]), str(d["dtype"]))


@dataclass(frozen=True)
class EgressPolicy:
    """What a reply may carry: the declared tensors, the allowed metric names, the config records."""

    tensors: tuple[TensorSpec, ...]
    metrics: frozenset[str]
    config_records: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: dict(DEFAULT_CONFIG_RECORDS))

    @classmethod
    def for_model(cls, arrays: ArrayRecord, metrics: Iterable[str]) -> "EgressPolicy":
        """Declared tensors = those of `arrays` (the global model the site was sent this round)."""
        specs = tuple(TensorSpec(k, tuple(int(x) for x in a.shape), str(a.dtype)) for k, a in arrays.items())
        return cls(specs, frozenset(metrics) | {wire.NUM_EXAMPLES})

    @classmethod
    def from_declared(cls, outputs: Mapping) -> "EgressPolicy":
        """From declared outputs as JSON: {"tensors" (or "outputs"): [{name, shape, dtype}], "metrics": [...]}.

        A run manifest's `to_dict()` has this shape (`client.approval.RunManifest`).
        """
        tensors = outputs.get("tensors", outputs.get("outputs", []))
        specs = tuple(TensorSpec.from_dict(t) for t in tensors)
        return cls(specs, frozenset(str(m) for m in outputs.get("metrics", [])) | {wire.NUM_EXAMPLES})

    @classmethod
    def from_manifest(cls, manifest) -> "EgressPolicy":
        """From an approved `client.approval.RunManifest` (its `outputs` and `metrics`)."""
        specs = tuple(TensorSpec(str(t.name), tuple(int(x) for x in t.shape), str(t.dtype)) for t in manifest.outputs)
        return cls(specs, frozenset(str(m) for m in manifest.metrics) | {wire.NUM_EXAMPLES})


def _check_arrays(name: str, record: ArrayRecord, policy: EgressPolicy) -> None:
    if name != wire.ARRAYS:
        raise EgressBlocked(f"undeclared array record {name!r}")
    declared = {t.name: t for t in policy.tensors}
    got = list(record.keys())
    extra = [k for k in got if k not in declared]
    missing = [k for k in declared if k not in record]
    if extra or missing:
        raise EgressBlocked(f"tensors differ from the declared outputs (extra: {extra[:5]}, missing: {missing[:5]})")
    for key in got:
        spec, arr = declared[key], record[key]
        if str(arr.dtype) != spec.dtype or tuple(arr.shape) != spec.shape:
            raise EgressBlocked(f"tensor {key!r} is {arr.dtype}{tuple(arr.shape)}, declared {spec.dtype}{spec.shape}")
        try:
            values = arr.numpy()
        except Exception:  # noqa: BLE001 - undecodable bytes are not the declared tensor
            raise EgressBlocked(f"tensor {key!r} does not decode as an array") from None
        if values.dtype != np.dtype(spec.dtype) or values.shape != spec.shape:
            raise EgressBlocked(f"tensor {key!r} decodes to {values.dtype}{values.shape}, not what it declares")
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            raise EgressBlocked(f"tensor {key!r} has non-finite values")
        if values.dtype.kind not in "fciub":
            raise EgressBlocked(f"tensor {key!r} has non-numeric dtype {values.dtype}")
        # `Array.numpy()` ignores bytes after the .npy payload (and odd header padding), yet Flower
        # ships `Array.data` whole: only the canonical serialisation of the values may leave.
        if Array(values).data != arr.data:
            raise EgressBlocked(f"tensor {key!r} carries {len(arr.data)} bytes, not the canonical "
                                f"serialisation of its values")


def _check_metrics(name: str, record: MetricRecord, policy: EgressPolicy) -> None:
    if name != wire.METRICS:
        raise EgressBlocked(f"undeclared metric record {name!r}")
    for key, value in record.items():
        if key not in policy.metrics:
            raise EgressBlocked(f"metric {key!r} is not released by the site policy")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EgressBlocked(f"metric {key!r} is not a finite scalar ({type(value).__name__})")


def release_metrics(metrics: Mapping[str, float], allowed: Iterable[str],
                    reasons: Mapping[str, str] | None = None) -> tuple[MetricRecord, ConfigRecord | None]:
    """The metrics a reply may carry: allowed ones with a finite value, and why the other allowed ones have none.

    Parameters
    ----------
    metrics: what the site computed (NaN or inf where a value is not defined).
    allowed: names the site's policy releases; anything else is dropped here (and blocked by the guard).
    reasons: a code from `wire.MISSING_REASONS` per metric whose missing value has a known cause;
        otherwise "NOT_FINITE".

    Returns
    -------
    (MetricRecord of finite values, ConfigRecord "missing" or None when nothing is missing).
    """
    allowed = set(allowed)
    reasons = reasons or {}
    values: dict[str, float] = {}
    missing: dict[str, str] = {}
    for key, value in metrics.items():
        if key not in allowed:
            continue
        v = float(value)
        if math.isfinite(v):
            values[key] = v
        else:
            code = reasons.get(key, "NOT_FINITE")
            missing[key] = code if code in wire.MISSING_REASONS else "NOT_FINITE"
    return MetricRecord(values), (wire.missing_record(missing) if missing else None)


def _check_missing(record: ConfigRecord, policy: EgressPolicy) -> None:
    for key, value in record.items():
        if key not in policy.metrics:
            raise EgressBlocked(f"missing-metric record names {key!r}, which the site policy does not release")
        if not isinstance(value, str) or value not in wire.MISSING_REASONS:
            raise EgressBlocked(f"missing-metric record holds a reason for {key!r} that is not one of "
                                f"{', '.join(wire.MISSING_REASONS)}")


def _check_config(name: str, record: ConfigRecord, policy: EgressPolicy) -> None:
    if name == wire.MISSING:
        _check_missing(record, policy)
        return
    if name not in policy.config_records:
        raise EgressBlocked(f"undeclared config record {name!r}")
    limits = policy.config_records[name]
    for key, value in record.items():
        if key not in limits:
            raise EgressBlocked(f"config record {name!r} carries undeclared key {key!r}")
        if not isinstance(value, str):
            raise EgressBlocked(f"config record {name!r} key {key!r} holds {type(value).__name__}, not text")
        if len(value) > limits[key]:
            raise EgressBlocked(f"config record {name!r} key {key!r} is {len(value)} characters "
                                f"(limit {limits[key]})")


def check_reply(content: RecordDict, policy: EgressPolicy) -> None:
    """Raise EgressBlocked (and log the reason locally) unless `content` carries only what `policy` allows."""
    try:
        for name, record in content.items():
            if isinstance(record, ArrayRecord):
                _check_arrays(name, record, policy)
            elif isinstance(record, MetricRecord):
                _check_metrics(name, record, policy)
            elif isinstance(record, ConfigRecord):
                _check_config(name, record, policy)
            else:
                raise EgressBlocked(f"record {name!r} of unknown type {type(record).__name__}")
    except EgressBlocked as blocked:
        log.error("egress guard blocked a reply (incident %s): %s", blocked.incident, blocked.detail)
        raise


def egress_guard_mod(allowed_metrics: Callable[[Context], Iterable[str]]):
    """A Flower client mod that checks every reply of a train/evaluate handler.

    The declared tensors are those of the incoming message's "arrays" (the global model): a site
    returns weights of exactly that model or nothing. `allowed_metrics(context)` gives the metric
    names the site's policy releases. A blocked reply is replaced by a refusal with code
    EGRESS_BLOCKED and the generic message.

    Usage: ``@app.train(mods=[egress_guard_mod(lambda ctx: released_metrics_of(ctx))])``.
    """

    def mod(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        incoming = msg.content.array_records.get(wire.ARRAYS) if msg.has_content() else None
        declared = incoming if incoming is not None else ArrayRecord()
        policy = EgressPolicy.for_model(declared, allowed_metrics(context))
        try:
            check_reply(reply.content, policy)
        except EgressBlocked as blocked:
            return Message(RecordDict({wire.REFUSAL: wire.refusal_record("EGRESS_BLOCKED", str(blocked))}),
                           reply_to=msg)
        return reply

    return mod
