"""Per-round bookkeeping of what each site answered: update, refusal, error, metrics, epsilon.

Every reply is classified before aggregation. Only replies from the node bound to a site
(:class:`SiteTrust`) that carry an update, whose signed ledger record verifies against the site's
enrolled key and whose update passes validation are handed to Flower's strategy, stripped to the
update and its weight (the signed, card-bounded example count) so that sites releasing different
metric sets cannot break aggregation. A reply from a node bound to no site goes into that node's own
``node-<id>`` entry: it never changes an enrolled site's history or the averaged metrics.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from contract import threshold, wire
from models import HASH_SCHEMES, state_dict_digest, state_dict_sha256

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
    verified: bool = True             # the reply came from the node bound to this site (or the unverified demo)
    claimed: str = ""                 # the site name a not-bound (or mismatching) node claimed

    def as_dict(self) -> dict:
        d = {"status": self.status, "train": self.train, "val": self.val}
        if self.missing:
            d["missing"] = dict(self.missing)
        if self.code:
            d.update(code=self.code, message=self.message)
        if self.claimed:
            d["claimed_site"] = self.claimed
        if not self.verified:
            d["verified"] = False  # not from the site's enrolled node: shown, never averaged
        if self.epsilon is not None:
            d.update(epsilon=self.epsilon, delta=self.delta)
        return d


class SiteTrust:
    """Which Flower node speaks for which site, for a whole run (DESIGN.md "Trust and transport").

    A reply may change a site's history entry, its metrics or the model only if it comes from the node bound to
    that site. Bindings come from the consortium registry (:mod:`privacy.registry`: node id -> site name, set
    by the lead at registration) or, for a site registered without a node id (a local simulation), from the
    first node whose update carried a record signed by that site's enrolled ledger key; either way one node
    speaks for one site, and one site from one node, for the rest of the run. Without enrolled keys
    (``verified=False``, the unverified local demo only) names are taken as claimed.
    """

    def __init__(self, registry=None, *, verified: bool = True) -> None:
        self.registry = registry
        self.verified = verified
        self._bound: dict[int, str] = {}
        self.claims: dict[int, str] = {}  # the site name each unbound node first claimed (to file its errors)
        if registry is not None:
            for e in registry.entries.values():
                if e.node_id is not None:
                    self._bound[e.node_id] = e.name

    def site_of(self, node: int) -> str | None:
        """The site ``node`` is bound to, or None."""
        return self._bound.get(node)

    def may_bind(self, node: int, site: str) -> str | None:
        """Why ``node`` may not be bound to ``site`` (None if it may)."""
        other = next((n for n, s in self._bound.items() if s == site and n != node), None)
        if other is not None:
            return f"site {site!r} already speaks from another node in this run; node {node} cannot speak for it"
        if self.registry is not None:
            entry = self.registry.get(site)
            if entry is None:
                return f"site {site!r} is not in the consortium registry"
            if entry.node_id is not None and entry.node_id != node:
                return f"node {node} is not the node registered for site {site!r}"
        return None

    def bind(self, node: int, site: str) -> None:
        self._bound[node] = site

    def entry(self, site: str):
        return self.registry.get(site) if self.registry is not None else None


class RoundBook:
    """What happened at each site in one round, keyed by the site's name (``node-<id>`` if not bound to one)."""

    def __init__(self, server_round: int, ledger=None, validator=None, *, bind_updates: bool = True,
                 trust: SiteTrust | None = None) -> None:
        """``bind_updates``: an update must be the one its signed record names (``update_sha256``), trained
        on the weights this round sent (``weights_in_sha256``). Off only under SecAgg+, where the server
        never holds a single update to hash. ``trust``: the run's node/site bindings (one per run; a fresh
        unverified one when omitted, for unit tests of the bookkeeping alone)."""
        self.server_round = server_round
        self.sites: dict[str, SiteRound] = {}
        self.node_names: dict[int, str] = {}
        self.accepted_records: list[dict] = []
        self._entry_node: dict[str, int] = {}  # which node each entry's replies came from
        self._ledger = ledger
        self._validator = validator
        self._bind = bind_updates
        self.trust = trust if trust is not None else SiteTrust(verified=getattr(ledger, "keys_dir", None) is not None)
        self._global_sha: tuple[ArrayRecord, str] | None = None  # the round's global weights and their hash

    def _entry(self, name: str, node: int, *, verified: bool) -> SiteRound:
        site = self.sites.setdefault(name, SiteRound())
        site.verified = verified
        self._entry_node.setdefault(name, node)
        return site

    def _site(self, msg: Message) -> tuple[str, SiteRound]:
        """The history entry this reply may change.

        A node bound to a site changes that site's entry. A node bound to none (not registered, or a site whose
        node is bound by its first signed update and has not sent one yet) gets an *unverified* entry: under the
        name it claims while that name is bound to no node and no other node answered under it this round, else
        under ``node-<id>``. Unverified entries never count in the averaged metrics, and when a node proves it is
        the site (a record signed by the site's key), another node's unverified entry under that name moves to
        that node's ``node-<id>``: a rogue node's refusal never merges into an honest site's entry.
        """
        node = msg.metadata.src_node_id
        claimed = None if msg.has_error() else wire.site_name_of(msg.content)
        bound = self.trust.site_of(node)
        if bound is not None:
            name, verified = bound, True
        elif not self.trust.verified:  # the unverified local demo: names as claimed
            name, verified = claimed or self.node_names.get(node) or f"node-{node}", True
        else:
            verified = False
            if claimed is None:
                claimed = self.trust.claims.get(node)
            free = (claimed is not None and self.trust.may_bind(node, claimed) is None
                    and self._entry_node.get(claimed, node) == node)
            name = claimed if free else f"node-{node}"
            if claimed is not None:
                self.trust.claims.setdefault(node, claimed)
        self.node_names.setdefault(node, name)
        site = self._entry(name, node, verified=verified)
        if claimed and (not verified or claimed != name):
            site.claimed = claimed
        return name, site

    def _bind_node(self, node: int, name: str, speaker: str) -> tuple[str, SiteRound]:
        """``node`` proved it is ``speaker``: bind them and make its entry the site's (verified) entry."""
        self.trust.bind(node, speaker)
        site = self.sites.pop(name)
        self._entry_node.pop(name, None)
        other = self.sites.pop(speaker, None)
        if other is not None:  # another node's unverified entry under this name: back to that node's own
            other_node = self._entry_node.pop(speaker)
            self.sites[f"node-{other_node}"] = other
            self._entry_node[f"node-{other_node}"] = other_node
            self.node_names[other_node] = f"node-{other_node}"
        site.verified, site.claimed = True, ""
        self.sites[speaker] = site
        self._entry_node[speaker] = node
        self.node_names[node] = speaker
        return speaker, site

    def admit_train_reply(self, msg: Message, global_arrays: ArrayRecord) -> bool:
        name, site = self._site(msg)
        node = msg.metadata.src_node_id
        if msg.has_error():
            site.status, site.code, site.message = "error", "NODE_ERROR", str(msg.error.reason)[:300]
            log.warning("round %d: %s failed: %s", self.server_round, name, site.message)
            return False
        content = msg.content
        if site.claimed and site.verified:  # a bound node naming another site
            return self._reject(name, site, "NODE_NOT_SITE", f"node {node} is bound to site {name!r} but its reply "
                                f"names site {site.claimed!r}")
        refusal = wire.refusal_of(content)
        if refusal:
            site.status, (site.code, site.message) = "refused", refusal
            log.warning("round %d: %s refused [%s]: %s", self.server_round, name, *refusal)
            return False
        if wire.ARRAYS not in content.array_records or wire.METRICS not in content.metric_records:
            return self._reject(name, site, "MALFORMED_REPLY", "reply carries no update or no metrics")
        record = wire.parse_ledger_record(content)
        if self._ledger is not None and self.trust.verified:
            if record is None:
                return self._reject(name, site, "NO_LEDGER_RECORD", "update arrived without its signed ledger record")
            speaker = name if site.verified else (site.claimed or "")
            if not site.verified:
                problem = (self.trust.may_bind(node, speaker) if speaker else
                           f"node {node} is not enrolled for any site and its reply names none")
                if problem:
                    return self._reject(name, site, "NODE_NOT_ENROLLED", problem)
            try:
                self._ledger.accept(record, site=speaker)
            except Exception as exc:  # LedgerError: signature, chain or key mismatch
                return self._reject(name, site, "LEDGER_REJECTED", str(exc))
            if not site.verified:  # the record verified against the site's enrolled key: bind node and site
                name, site = self._bind_node(node, name, speaker)
            self.accepted_records.append(record)
        elif self._ledger is not None and record is not None:
            try:
                self._ledger.accept(record, site=name)
            except Exception as exc:  # noqa: BLE001
                return self._reject(name, site, "LEDGER_REJECTED", str(exc))
            self.accepted_records.append(record)
        if record is not None:
            site.epsilon = _float_or_none(record.get("epsilon_after"))
            site.delta = _float_or_none(record.get("delta"))
        metrics = content[wire.METRICS]
        weight, weight_problem = self._weight(name, record, metrics)
        if hasattr(self._validator, "inspect"):  # the one-pass path (server.update_pass)
            problem = self._one_pass(content[wire.ARRAYS], global_arrays, record, weight, weight_problem)
            if problem:
                return self._reject(name, site, *problem)
        else:
            if self._validator is not None:
                problem = self._validator(content[wire.ARRAYS], global_arrays)
                if problem:
                    return self._reject(name, site, "UPDATE_REJECTED", problem)
            if self._bind and record is not None:
                problem = self._binding_problem(record, content[wire.ARRAYS], global_arrays)
                if problem:
                    return self._reject(name, site, "UPDATE_NOT_AS_SIGNED", problem)
            if weight_problem:
                return self._reject(name, site, "NUM_EXAMPLES_REJECTED", weight_problem)
        site.train = {k: float(v) for k, v in metrics.items()}
        site.missing.update(wire.missing_of(content))
        site.status = "contributed"
        msg.content = RecordDict({
            wire.ARRAYS: content[wire.ARRAYS],
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: weight}),
        })
        return True

    def _one_pass(self, update: ArrayRecord, global_arrays: ArrayRecord, record: dict | None, weight: float,
                  weight_problem: str | None) -> tuple[str, str] | None:
        """Checks, digest and (FedAvg) weighted sum of the update in one pass; (code, reason) if rejected.

        Reasons and their order are those of the separate steps: UPDATE_REJECTED (validation), then
        UPDATE_NOT_AS_SIGNED (digest, weights in), then NUM_EXAMPLES_REJECTED. The update is added to the
        round's sum as it is read; a rejection takes it out again (``WeightedSum.discard``).
        """
        checks = self._validator
        scheme = None
        if self._bind and record is not None:
            scheme = record.get("update_hash", "sha256")  # records older than the field were all SHA-256
            if scheme not in HASH_SCHEMES:
                return "UPDATE_NOT_AS_SIGNED", (f"the signed record names update_hash {str(scheme)[:40]!r}, a digest "
                                                f"this server does not know ({', '.join(HASH_SCHEMES)})")
        res = checks.inspect(update, global_arrays, scheme=scheme, weight=None if weight_problem else weight)
        total = checks.total
        problem: tuple[str, str] | None = None
        if res.problem:
            problem = "UPDATE_REJECTED", res.problem
        elif scheme is not None:
            if record.get("update_sha256") != res.digest:
                problem = "UPDATE_NOT_AS_SIGNED", (
                    f"the update's {scheme} digest {str(res.digest)[:12]}… is not the update_sha256 "
                    f"{str(record.get('update_sha256'))[:12]}… in the site's signed ledger record")
            elif record.get("weights_in_sha256") != checks.plan(global_arrays).global_digest("sha256"):
                problem = "UPDATE_NOT_AS_SIGNED", ("the site's signed record says it trained on other weights than "
                                                   "this round sent (weights_in_sha256 differs): a stale or replayed "
                                                   "update")
        if problem is None and weight_problem:
            problem = "NUM_EXAMPLES_REJECTED", weight_problem
        if total is not None:
            if problem is None and not weight_problem:
                total.commit(res.views or [], weight)
            else:
                total.discard()
        return problem

    def aggregate(self) -> ArrayRecord | None:
        """FedAvg of the accepted updates, summed as they were admitted (``make_validator(accumulate=True)``);
        None when nothing with a positive weight was accepted or the checks do not sum."""
        total = getattr(self._validator, "total", None)
        return total.result() if total is not None else None

    def _weight(self, name: str, record: dict | None, metrics: MetricRecord) -> tuple[float, str | None]:
        """FedAvg weight of a site's update, and why the reply is rejected (None if it is not).

        An unsigned, unbounded example count would let one site take nearly all the weight (a claim of 1e6).
        So with enrolled keys the count must be the ``num_examples`` signed in the record, equal to the released
        ``num-examples`` metric, and at most the training examples of the site's dataset card in the registry;
        only then is the update weighted by it. Without a card count to bound it, every site weighs 1.
        """
        claimed = metrics.get(wire.NUM_EXAMPLES)
        if not (self._ledger is not None and self.trust.verified):
            return float(claimed if claimed is not None else 1.0), None  # unverified demo
        signed = record.get("num_examples") if record is not None else None
        if isinstance(signed, bool) or not isinstance(signed, int) or signed < 0:
            return 0.0, "the signed ledger record carries no num_examples (a site Atoll older than this server?)"
        if claimed is not None and float(claimed) != float(signed):
            return 0.0, (f"num-examples {float(claimed):g} in the reply is not the num_examples {signed} in the "
                         "site's signed ledger record")
        entry = self.trust.entry(name)
        card = entry.train_examples if entry is not None else None
        if card is None:
            log.info("round %d: %s has no training-example count in the consortium registry: weight 1",
                     self.server_round, name)
            return 1.0, None
        if signed > card:
            return 0.0, (f"num_examples {signed} is more than the {card} training examples the site's dataset card "
                         "declared in the consortium registry")
        return float(signed), None

    def _binding_problem(self, record: dict, update: ArrayRecord, global_arrays: ArrayRecord) -> str | None:
        """Why the update is not the one the site's signed record vouches for (None if it is).

        Without this, a signed record proves only that *some* update was trained with that privacy
        spend, not that it is the one being aggregated; the auditor could not tie the model to it.
        """
        scheme = record.get("update_hash", "sha256")  # records older than the field were all SHA-256
        if scheme not in HASH_SCHEMES:
            return (f"the signed record names update_hash {str(scheme)[:40]!r}, a digest this server does not know "
                    f"({', '.join(HASH_SCHEMES)})")
        try:
            got = state_dict_digest(update.to_torch_state_dict(), scheme)
        except Exception as exc:  # noqa: BLE001 - unreadable arrays: reject, never crash the round
            return f"the update's tensors cannot be read ({type(exc).__name__})"
        if record.get("update_sha256") != got:
            return (f"the update's {scheme} digest {got[:12]}… is not the update_sha256 "
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
        """Evaluation metrics count only from the node bound to a site (by the registry or by its signed update
        this run); anything else is noted in the node's own entry and never averaged."""
        name, site = self._site(msg)
        refusal = None if msg.has_error() else wire.refusal_of(msg.content)
        if refusal:
            site.missing["val"] = refusal[0]  # history says why there is no validation entry
        if msg.has_error() or refusal or wire.METRICS not in msg.content.metric_records:
            return
        if not site.verified or (site.claimed and site.claimed != name):
            if site.status == "pending":
                site.status, site.code = "ignored", "NODE_NOT_ENROLLED"
                site.message = (f"evaluation metrics from node {msg.metadata.src_node_id}, not the enrolled node of "
                                f"site {site.claimed!r}" if site.claimed else "evaluation metrics from a node that is "
                                "not enrolled for any site")
            log.warning("round %d: ignored evaluation metrics from %s (%s)", self.server_round, name,
                        f"claims {site.claimed!r}" if site.claimed else "no site")
            return
        site.val = {k: float(v) for k, v in msg.content[wire.METRICS].items()}
        site.missing.update(wire.missing_of(msg.content))

    def aggregated_val(self) -> dict[str, float]:
        """Example-weighted mean of each validation metric over the (verified) sites that released it."""
        out: dict[str, float] = {}
        trusted = [s for s in self.sites.values() if s.verified]
        keys = {k for s in trusted for k in s.val if k != wire.NUM_EXAMPLES
                and not k.startswith(threshold.METRIC)}  # counts are pooled (decision_threshold), not averaged
        for k in sorted(keys):
            pairs = [(s.val[k], s.val.get(wire.NUM_EXAMPLES, 1.0)) for s in trusted
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

    def decision_threshold(self) -> dict | None:
        """The threshold with the best balanced accuracy on the pooled released ``val_threshold_counts`` of the
        verified sites (contract.threshold), with the sites it came from; None when no site released them."""
        keys = threshold.metric_keys()
        released = {n: s.val for n, s in self.sites.items() if s.verified and all(k in s.val for k in keys)}
        chosen = threshold.choose(threshold.pool(released.values()))
        if chosen is None:
            return None
        return {"threshold": chosen[0], "val_balanced_accuracy": chosen[1], "sites": sorted(released),
                "rule": "max balanced accuracy on pooled val_threshold_counts (released in the clear, not DP)"}

    def as_dict(self) -> dict:
        out = {"round": self.server_round, "sites": {n: s.as_dict() for n, s in sorted(self.sites.items())},
               "aggregated": self.aggregated_val()}
        if (chosen := self.decision_threshold()) is not None:
            out["decision_threshold"] = chosen
        return out


def _float_or_none(v) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None
