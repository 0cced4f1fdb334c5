"""Per-round bookkeeping of what each site answered: update, refusal, error, metrics, epsilon.

Every reply is classified before aggregation. Only replies that carry an update, whose signed ledger
record verifies (when the consortium has enrolled site keys) and whose update passes validation are
handed to Flower's strategy, stripped to the update and its weight so that sites releasing different
metric sets cannot break aggregation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from contract import wire
from models import state_dict_sha256

log = logging.getLogger("atoll.server")


@dataclass
class SiteRound:
    status: str = "pending"           # contributed | refused | rejected | error
    code: str = ""
    message: str = ""
    train: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    epsilon: float | None = None
    delta: float | None = None
    missing: dict[str, str] = field(default_factory=dict)  # metric (or "val") -> why it has no value

    def as_dict(self) -> dict:
        d = {"status": self.status, "train": self.train, "val": self.val}
        if self.missing:
            d["missing"] = dict(self.missing)
        if self.code:
            d.update(code=self.code, message=self.message)
        if self.epsilon is not None:
            d.update(epsilon=self.epsilon, delta=self.delta)
        return d


class RoundBook:
    """What happened at each site in one round, keyed by the site's name (node id if unnamed)."""

    def __init__(self, server_round: int, ledger=None, validator=None, *, bind_updates: bool = True) -> None:
        """``bind_updates``: an update must be the one its signed record names (``update_sha256``), trained
        on the weights this round sent (``weights_in_sha256``). Off only under SecAgg+, where the server
        never holds a single update to hash."""
        self.server_round = server_round
        self.sites: dict[str, SiteRound] = {}
        self.node_names: dict[int, str] = {}
        self._ledger = ledger
        self._validator = validator
        self._bind = bind_updates
        self._global_sha: tuple[ArrayRecord, str] | None = None  # the round's global weights and their hash

    def _site(self, msg: Message) -> tuple[str, SiteRound]:
        node = msg.metadata.src_node_id
        name = None
        if not msg.has_error():
            name = wire.site_name_of(msg.content)
        name = name or self.node_names.get(node) or f"node-{node}"
        self.node_names[node] = name
        return name, self.sites.setdefault(name, SiteRound())

    def admit_train_reply(self, msg: Message, global_arrays: ArrayRecord) -> bool:
        name, site = self._site(msg)
        if msg.has_error():
            site.status, site.code, site.message = "error", "NODE_ERROR", str(msg.error.reason)[:300]
            log.warning("round %d: %s failed: %s", self.server_round, name, site.message)
            return False
        content = msg.content
        refusal = wire.refusal_of(content)
        if refusal:
            site.status, (site.code, site.message) = "refused", refusal
            log.warning("round %d: %s refused [%s]: %s", self.server_round, name, *refusal)
            return False
        if wire.ARRAYS not in content.array_records or wire.METRICS not in content.metric_records:
            return self._reject(name, site, "MALFORMED_REPLY", "reply carries no update or no metrics")
        record = wire.parse_ledger_record(content)
        if record is not None:
            site.epsilon = _float_or_none(record.get("epsilon_after"))
            site.delta = _float_or_none(record.get("delta"))
        if self._ledger is not None:
            if record is None:
                return self._reject(name, site, "NO_LEDGER_RECORD", "update arrived without its signed ledger record")
            try:
                self._ledger.accept(record, site=name)
            except Exception as exc:  # LedgerError: signature, chain or key mismatch
                return self._reject(name, site, "LEDGER_REJECTED", str(exc))
        if self._validator is not None:
            problem = self._validator(content[wire.ARRAYS], global_arrays)
            if problem:
                return self._reject(name, site, "UPDATE_REJECTED", problem)
        if self._bind and record is not None:
            problem = self._binding_problem(record, content[wire.ARRAYS], global_arrays)
            if problem:
                return self._reject(name, site, "UPDATE_NOT_AS_SIGNED", problem)
        metrics = content[wire.METRICS]
        site.train = {k: float(v) for k, v in metrics.items()}
        site.missing.update(wire.missing_of(content))
        site.status = "contributed"
        msg.content = RecordDict({
            wire.ARRAYS: content[wire.ARRAYS],
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: float(metrics.get(wire.NUM_EXAMPLES, 1.0))}),
        })
        return True

    def _binding_problem(self, record: dict, update: ArrayRecord, global_arrays: ArrayRecord) -> str | None:
        """Why the update is not the one the site's signed record vouches for (None if it is).

        Without this, a signed record proves only that *some* update was trained with that privacy
        spend, not that it is the one being aggregated; the auditor could not tie the model to it.
        """
        try:
            got = state_dict_sha256(update.to_torch_state_dict())
        except Exception as exc:  # noqa: BLE001 - unreadable arrays: reject, never crash the round
            return f"the update's tensors cannot be read ({type(exc).__name__})"
        if record.get("update_sha256") != got:
            return (f"the update's SHA-256 {got[:12]}… is not the update_sha256 "
                    f"{str(record.get('update_sha256'))[:12]}… in the site's signed ledger record")
        if self._global_sha is None or self._global_sha[0] is not global_arrays:  # hashed once per round
            self._global_sha = (global_arrays, state_dict_sha256(global_arrays.to_torch_state_dict()))
        if record.get("weights_in_sha256") != self._global_sha[1]:
            return ("the site's signed record says it trained on other weights than this round sent "
                    "(weights_in_sha256 differs): a stale or replayed update")
        return None

    def _reject(self, name: str, site: SiteRound, code: str, message: str) -> bool:
        site.status, site.code, site.message = "rejected", code, message
        log.warning("round %d: update from %s rejected [%s]: %s", self.server_round, name, code, message)
        return False

    def admit_evaluate_reply(self, msg: Message) -> None:
        name, site = self._site(msg)
        refusal = None if msg.has_error() else wire.refusal_of(msg.content)
        if refusal:
            site.missing["val"] = refusal[0]  # history says why there is no validation entry
        if msg.has_error() or refusal or wire.METRICS not in msg.content.metric_records:
            return
        site.val = {k: float(v) for k, v in msg.content[wire.METRICS].items()}
        site.missing.update(wire.missing_of(msg.content))

    def aggregated_val(self) -> dict[str, float]:
        """Example-weighted mean of each validation metric over the sites that released it."""
        out: dict[str, float] = {}
        keys = {k for s in self.sites.values() for k in s.val if k != wire.NUM_EXAMPLES}
        for k in sorted(keys):
            pairs = [(s.val[k], s.val.get(wire.NUM_EXAMPLES, 1.0)) for s in self.sites.values()
                     if k in s.val and not math.isnan(s.val[k])]
            total = sum(w for _, w in pairs)
            if total > 0:
                out[k] = sum(v * w for v, w in pairs) / total
        return out

    def contributors(self) -> list[str]:
        return [n for n, s in self.sites.items() if s.status == "contributed"]

    def refusal_summary(self) -> str:
        bad = [f"{n}: {s.code}" for n, s in self.sites.items() if s.status != "contributed"]
        return "; ".join(bad) or "no site answered"

    def one_line(self) -> str:
        agg = self.aggregated_val()
        parts = [f"{len(self.contributors())}/{len(self.sites)} sites contributed"]
        if "val_auc" in agg:
            parts.append(f"val AUC {agg['val_auc']:.3f}")
        if "val_accuracy" in agg:
            parts.append(f"val acc {agg['val_accuracy']:.3f}")
        eps = {n: s.epsilon for n, s in self.sites.items() if s.epsilon is not None}
        if eps:
            parts.append("epsilon " + ", ".join(f"{n} {e:.2f}" for n, e in sorted(eps.items())))
        others = [f"{n} {s.status} ({s.code})" for n, s in self.sites.items() if s.status != "contributed"]
        return "; ".join(parts + others)

    def as_dict(self) -> dict:
        return {"round": self.server_round, "sites": {n: s.as_dict() for n, s in sorted(self.sites.items())},
                "aggregated": self.aggregated_val()}


def _float_or_none(v) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None
