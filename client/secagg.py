"""SecAgg+ at a site: Atoll's round, unchanged, inside Flower's SecAgg+ client protocol.

When the lead runs with `secagg = true`, the fit of a round is Flower's SecAgg+ protocol (legacy
API, Flower 1.41): four "train" messages per round, one per stage (setup, share_keys,
collect_masked_vectors, unmask), each carrying a "secaggplus_configs" record. A ClientApp has one
handler per message type, so Atoll's `train` handler hands these messages to `handle` here. It
runs them through a legacy `ClientApp(client_fn=..., mods=[csprng_secaggplus_mod])`: the mod does
the protocol (keys, shares, masks from ChaCha20 rather than Flower's 32-bit-seeded generator) and,
in the collect_masked_vectors stage, calls `fit` of `_AtollSite`, which calls Atoll's own train
handler on a plain Atoll round message. So approval check, write-ahead budget reservation,
patient-level DP-SGD, the signed ledger record and the egress guard all run exactly as in a plain
round; the mod then masks the update and only the masked vector leaves the site.

What the masked reply carries besides the masked vector: the number of examples (the SecAgg+
weight) and, as FitRes metrics, the policy-released metrics, the signed ledger record (canonical
JSON text under `wire.LEDGER`) and the site's name (`wire.SITE`). `check_protocol_reply` is the
egress guard for SecAgg+ replies: every stage's reply must hold exactly the protocol's fields and,
in the masked stage, exactly the metrics the Atoll egress guard already passed and no array.

A refusal from Atoll's handler (budget, approval, policy) goes back as Atoll's usual refusal reply,
and the site leaves that round's protocol (the server removes the masks it shared). Any other
failure propagates to the caller (`site_errors_stay_local` turns it into a sanitised refusal).
"""

from __future__ import annotations

import contextvars
import copy
import json
import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

from contract import wire
from client.egress import EgressBlocked
from privacy.secagg_prg import csprng_secaggplus_mod

__all__ = ["SECAGG_OUT_OF_RANGE", "check_protocol_reply", "handle", "is_secaggplus"]

log = logging.getLogger("atoll.site")

#: Refusal code: the update or its weight does not fit SecAgg+'s fixed-point range (it would be clipped).
SECAGG_OUT_OF_RANGE = "SECAGG_OUT_OF_RANGE"

Handler = Callable[[Message, Context], Message]

#: What each protocol stage's reply may hold in "secaggplus_configs".
_STAGE_KEYS = {
    Stage.SETUP: {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS},
    Stage.UNMASK: {Key.NODE_ID_LIST, Key.SHARE_LIST},
}
_FITRES = ("fitres.parameters", "fitres.metrics", "fitres.num_examples", "fitres.status")


# Set only while this module runs Atoll's train handler inside the SecAgg+ masked-vector stage. A
# context variable, not a message field: nothing the server sends can claim that a round is masked.
_MASKING: contextvars.ContextVar[bool] = contextvars.ContextVar("atoll_secagg_masking", default=False)


def masking() -> bool:
    """True inside the SecAgg+ masked-vector stage: the update being computed will leave masked."""
    return _MASKING.get()


def is_secaggplus(msg: Message) -> bool:
    """True for a message of the SecAgg+ protocol (the fit of a round under `secagg = true`)."""
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


class _Refused(Exception):
    """Atoll's handler refused the round: its reply goes back as is; the site leaves the protocol."""

    def __init__(self, content: RecordDict) -> None:
        super().__init__("round refused")
        self.content = content


def handle(msg: Message, context: Context, train: Handler) -> Message:
    """Answer one SecAgg+ message; `train` is Atoll's train handler (client.app.train).

    Returns the protocol reply (egress-checked), or Atoll's refusal reply when the site does not
    take part in this round. Other exceptions propagate.
    """
    stage = str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))
    site = _AtollSite(msg, context, train)

    def client_fn(ctx: Context):
        return site.to_client()

    legacy = ClientApp(client_fn=client_fn, mods=[csprng_secaggplus_mod])
    try:
        reply = legacy(msg, context)
    except _Refused as refused:
        return Message(refused.content, reply_to=msg)
    if reply.has_error():
        return reply
    check_protocol_reply(stage, reply.content, site.released)
    return reply


class _AtollSite(NumPyClient):
    """The legacy client the SecAgg+ mod calls in the masked-vector stage: one Atoll round."""

    def __init__(self, msg: Message, context: Context, train: Handler) -> None:
        self._msg, self._context, self._train = msg, context, train
        self.released: dict | None = None  # the FitRes metrics handed to the mod

    def fit(self, parameters, config):
        names = json.loads(str(config.get(wire.ARRAYS, "null")))
        if not isinstance(names, list) or len(names) != len(parameters) or not all(isinstance(n, str) for n in names):
            raise ValueError("SecAgg+ round config does not name the model's tensors")
        round_config = ConfigRecord({k: v for k, v in config.items() if k != wire.ARRAYS})
        arrays = ArrayRecord({n: Array(np.asarray(p)) for n, p in zip(names, parameters)})
        inner = Message(RecordDict({wire.CONFIG: round_config, wire.ARRAYS: arrays}),
                        metadata=copy.copy(self._msg.metadata))
        token = _MASKING.set(True)
        try:
            content = self._train(inner, self._context).content
        finally:
            _MASKING.reset(token)
        if wire.REFUSAL in content.config_records or wire.ARRAYS not in content.array_records:
            raise _Refused(content)
        update = content[wire.ARRAYS]
        if sorted(update.keys()) != sorted(names):  # the egress guard already pinned the tensor set
            raise ValueError("the round's update does not hold the model's tensors")
        values = [update[n].numpy() for n in names]
        metrics = {k: float(v) for k, v in content[wire.METRICS].items()}
        num_examples = int(metrics.pop(wire.NUM_EXAMPLES))
        site = str(content[wire.SITE]["name"])
        self._check_range(values, num_examples, site)
        self.released = {**metrics, wire.LEDGER: str(content[wire.LEDGER]["record"]), wire.SITE: site}
        return values, num_examples, dict(self.released)

    def _check_range(self, values: list[np.ndarray], num_examples: int, site: str) -> None:
        """Refuse rather than let SecAgg+ clip: it quantises weight/max_weight * update on [-c, c]."""
        state = SecAggPlusState(**self._context.state.config_records[RECORD_KEY_STATE])
        ratio = num_examples / float(state.max_weight)
        peak = max((float(np.abs(v).max()) for v in values if v.size), default=0.0)
        problem = ""
        if ratio > 1:
            problem = (f"the site's {num_examples} training examples exceed the run's secagg-max-weight "
                       f"({state.max_weight:g}); the lead must raise secagg-max-weight")
        elif peak * ratio > state.clipping_range:
            problem = (f"an update coordinate of magnitude {peak:.3g} exceeds SecAgg+'s clipping range "
                       f"({state.clipping_range:g} at weight {ratio:.3g}); the aggregate would be wrong")
        if problem:
            log.warning("refused to mask the round's update: %s", problem)
            content = RecordDict({wire.REFUSAL: wire.refusal_record(SECAGG_OUT_OF_RANGE, problem),
                                  wire.SITE: wire.site_record(site)})
            raise _Refused(content)


def check_protocol_reply(stage: str, content: RecordDict, released: dict | None) -> None:
    """Egress guard for a SecAgg+ reply: only protocol material and the already-checked metrics.

    Raises EgressBlocked (generic message; the detail goes to the site log) when a reply holds any
    other record or key, an array (the update in the clear), or metrics other than `released`.
    """
    try:
        if stage not in _STAGE_KEYS:
            raise EgressBlocked(f"unknown SecAgg+ stage {stage!r}")
        allowed = {RECORD_KEY_CONFIGS} | (set(_FITRES) if stage == Stage.COLLECT_MASKED_VECTORS else set())
        extra = set(content.keys()) - allowed
        if extra or RECORD_KEY_CONFIGS not in content.config_records:
            raise EgressBlocked(f"SecAgg+ {stage} reply carries records {sorted(content.keys())}")
        keys = set(content.config_records[RECORD_KEY_CONFIGS].keys())
        if keys != _STAGE_KEYS[stage]:
            raise EgressBlocked(f"SecAgg+ {stage} reply carries keys {sorted(keys)}")
        if stage == Stage.COLLECT_MASKED_VECTORS:
            _check_masked_reply(content, released)
    except EgressBlocked as blocked:
        log.error("egress guard blocked a SecAgg+ reply (incident %s): %s", blocked.incident, blocked.detail)
        raise


def _check_masked_reply(content: RecordDict, released: dict | None) -> None:
    if released is None:
        raise EgressBlocked("masked reply without a round the site trained")
    if set(content.keys()) != {RECORD_KEY_CONFIGS, *_FITRES}:
        raise EgressBlocked(f"masked reply carries records {sorted(content.keys())}")
    if any(len(rec) for rec in content.array_records.values()):
        raise EgressBlocked("masked reply carries an array in the clear")
    if dict(content.config_records["fitres.metrics"]) != released:
        raise EgressBlocked("masked reply carries metrics other than those the egress guard passed")
    if set(content.metric_records["fitres.num_examples"].keys()) != {"num_examples"}:
        raise EgressBlocked("masked reply carries extra metric values")
    if set(content.config_records["fitres.status"].keys()) != {"code", "message"}:
        raise EgressBlocked("masked reply carries an unexpected status")
    masked = content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    if not isinstance(masked, list) or not all(isinstance(b, bytes) for b in masked):
        raise EgressBlocked("masked parameters are not a list of arrays")

