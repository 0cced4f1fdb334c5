"""The site's budget guard: checks a round against the hospital's policy and lifetime budget, write-ahead.

Order of a round at a site (DESIGN.md): :meth:`BudgetGuard.reserve` runs *before any data is touched*. Under an
exclusive lock on the site ledger it brings the verified running state of the ledger up to date
(:mod:`privacy.ledger_state`: the merged lifetime history, open reservations and answered rounds, folded forward
from the records appended since; recomputed from every record when it is missing or does not bind to the ledger,
and periodically), checks the request against the policy, computes epsilon of (history + this round) with the policy's accountant over the whole lifetime, and
either appends a ``refusal`` record and raises :class:`BudgetRefused`, or appends a ``reservation`` record
(fsynced) that charges the round. Training happens only after that. :meth:`BudgetGuard.complete` then appends
the signed ``round`` record that goes to the server.

Rules that keep epsilon from ever being under-counted:

* The charge is made at reservation time. A reservation without completion (crash during training) stays
  charged; a new guard on the same files sees it.
* Replay: ``reserve`` for a ``(run_id, server_round)`` that already has an *uncompleted* reservation with the
  same mechanism parameters and the same incoming weights returns that reservation and adds nothing (the
  crashed attempt released nothing: a ``round`` record is written before any update leaves the site). Policy and
  budget are re-checked against the current policy. If the earlier reservation was *completed*, its update may
  already have left the site: the round is not charged again only if the caller can send **the very same
  bytes** again (``resend``: the site's cache of released updates, keyed by the update's SHA-256 in the signed
  ``round`` record) — re-sending a released output is post-processing and costs no privacy. Without that exact
  update (cache pruned, or different parameters or incoming weights), the request is charged as a new round:
  fresh noise on the same data would be a second release.
* ``complete`` twice for one reservation returns the existing record when the update hash is the same (the same
  bytes released again cost nothing) and raises :class:`~privacy.ledger.LedgerError` otherwise (a second,
  different update under one charge would be an uncharged release).
* Non-DP rounds (``dp=False``, only if the policy says ``allow_non_dp = true``) are charged as a mechanism with
  noise multiplier 0: epsilon of any history containing one is ``inf``, so :meth:`BudgetGuard.spent` reports
  ``inf`` from then on and every later DP round is refused as over budget. They are never treated as free.

Record bodies (envelope fields are documented in :mod:`privacy.ledger`):

``reservation``: run_id, server_round, dp, noise_multiplier, clip_norm, sample_rate, steps, (adaptive clipping
    only: adaptive_clip, target_unclipped_quantile, clip_lr, count_noise, gradient_noise_multiplier),
    charge ``[sigma or 0, q, steps]``, accountant, delta, history (canonical lifetime history including this
    charge), epsilon_before, epsilon_after, max_epsilon, weights_in_sha256, policy_sha256, and the basis of delta:
    patients (training patients), policy_delta (the policy's declared delta, 0 = auto), allow_large_delta.
``round``: the same mechanism fields plus reservation_seq, reservation_sha256, update_sha256,
    released_metrics, patients, policy_delta, allow_large_delta, and (when the caller gives them) num_examples
    (what the update is weighted by) and server_prev_digest (the consortium's previous round digest, countersigned),
    update_hash (the digest construction of update_sha256, ``models.HASH_SCHEMES``; absent = "sha256");
    history/epsilon_after are recomputed at completion over every charge in the ledger.
``refusal``: run_id, server_round, code, message, the requested parameters, accountant, delta, history,
    epsilon_spent, epsilon_requested (``null`` when the budget was not the reason), max_epsilon, policy_sha256.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from contract.mechanism import ADAPTIVE_KEYS, GRADIENT_NOISE_KEY, RECORD_KEYS, Mechanism
from privacy.accounting import canonical_history, compute_epsilon
from privacy.ledger import LedgerError, LedgerTransaction, SiteLedger, epsilon_json, record_hash
from privacy.ledger_state import FULL_CHECK_EVERY, RunningState, StateFile
from privacy.policy import (ACCOUNTANT_OUT_OF_POLICY, BUDGET_EXCEEDED, CLIP_OUT_OF_POLICY, NOISE_OUT_OF_POLICY,
                            NON_DP_NOT_ALLOWED, SAMPLE_RATE_OUT_OF_POLICY, STEPS_OUT_OF_POLICY, SitePolicy,
                            mechanism_problem)

log = logging.getLogger("atoll.privacy")

BAD_REQUEST = "BAD_REQUEST"
REFUSAL_CODES: tuple[str, ...] = (BUDGET_EXCEEDED, NOISE_OUT_OF_POLICY, CLIP_OUT_OF_POLICY, STEPS_OUT_OF_POLICY,
                                  SAMPLE_RATE_OUT_OF_POLICY, NON_DP_NOT_ALLOWED, ACCOUNTANT_OUT_OF_POLICY,
                                  BAD_REQUEST)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MECHANISM = RECORD_KEYS
ADAPTIVE_RECORD_KEYS = (*ADAPTIVE_KEYS, GRADIENT_NOISE_KEY)


class BudgetRefused(Exception):
    """The site refuses a round. ``message`` is safe to send to the server (no identifiers, no paths)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks of the site for one round (from the round's config record): which round, and the
    one :class:`~contract.mechanism.Mechanism` it would charge."""

    run_id: str
    server_round: int
    mechanism: Mechanism


@dataclass(frozen=True)
class Reservation:
    """A charged, not yet completed round: proof that the write-ahead record is on disk."""

    run_id: str
    server_round: int
    seq: int
    record_sha256: str
    epsilon_before: float
    epsilon_after: float
    delta: float
    replayed: bool = False
    record: dict = field(default_factory=dict, compare=False, repr=False)
    #: for a replay of a *completed* round: its signed ``round`` record and what ``resend`` returned for it
    completed: dict | None = field(default=None, compare=False, repr=False)
    resent: Any = field(default=None, compare=False, repr=False)


def charges(records: Iterable[dict]) -> list[tuple[float, float, int]]:
    """The accountant history of a ledger: one ``charge`` per reservation record, in ledger order."""
    out = []
    for r in records:
        if r.get("type") == "reservation":
            s, q, n = r["charge"]
            out.append((float(s), float(q), int(n)))
    return out


def history_json(hist: Iterable[tuple[float, float, int]]) -> list[list]:
    return [[float(s), float(q), int(n)] for s, q, n in canonical_history(hist)]


def _fmt(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:.2f}"


class BudgetGuard:
    """Checks rounds against a :class:`SitePolicy` and the lifetime budget persisted in a :class:`SiteLedger`.

    Parameters
    ----------
    ledger: the site's ledger (the only persistent state; a new guard on the same file sees everything).
    policy: the hospital's privacy policy.
    num_patients: patients in the training split; fixes delta when the policy says auto (``1/(10 P)``).
    dataset_fingerprint: keyed hash of the dataset trained on, recorded in every record (empty = none).
    full_check_every: records between the first full recomputations of the running state from the ledger (later
        ones come when the ledger has doubled since the last, see :meth:`_full_check_due`).

    Raises :class:`~privacy.policy.PolicyError` when the policy's explicit delta is too large for this dataset.
    """

    def __init__(self, ledger: SiteLedger, policy: SitePolicy, num_patients: int,
                 dataset_fingerprint: str = "", *, full_check_every: int = FULL_CHECK_EVERY) -> None:
        self.ledger = ledger
        self.policy = policy
        self.num_patients = int(num_patients)
        # keyed hash of what the site trains on (client.pacs.fingerprint): lets the auditor see a dataset change
        # between runs without learning anything about it; "" where the caller has none
        self.dataset_fingerprint = str(dataset_fingerprint)
        self.delta = policy.effective_delta(self.num_patients)
        self.policy_sha256 = policy.sha256()
        self.full_check_every = max(1, int(full_check_every))
        self._state: RunningState | None = None
        self._state_file = StateFile(ledger)

    # ----------------------------------------------------------------- running state

    @contextlib.contextmanager
    def _synced(self, write: bool) -> Iterator[tuple[LedgerTransaction, RunningState]]:
        """The ledger under its lock (exclusive when ``write``) and its running state folded up to the end.

        The state is this guard's own from the last call, else the state file's; it is used only if its checkpoint
        binds to the ledger, else (and periodically, see :meth:`_full_check_due`) it is recomputed from every record.
        Records appended inside the block are folded in and the state file rewritten after them.
        """
        if self._state is not None:
            cand, why = self._state, ""
        else:
            cand, why = self._state_file.load()
        opener = self.ledger.transaction if write else self.ledger.view
        with opener(cand.checkpoint if cand is not None else None) as txn:
            changed = False
            if cand is not None and txn.bound:
                st = cand
            else:
                st = RunningState.from_records(self.ledger.site, txn.all(), txn.checkpoint())
                changed = True
                if cand is not None:
                    behind = " (the ledger has fewer records than the state summarised: restored from an older " \
                             "copy?)" if cand.count > st.count else ""
                    log.warning("ledger %s: its running state does not match the ledger any more%s; recomputed from "
                                "all %d records", self.ledger.path, behind, st.count)
                elif why and why not in ("no state file", "unsigned ledger (a state file cannot be authenticated)"):
                    log.warning("ledger %s: %s; running state recomputed from all %d records",
                                self.ledger.path, why, st.count)
            tail = txn.since(st.count)
            if tail:
                st.fold(tail, txn.checkpoint())
                changed = True
            if self._full_check_due(st):
                st = self._full_check(txn, st)
                changed = True
            self._state = st
            before = txn.count
            yield txn, st
            if txn.count != before:
                st.fold(txn.since(st.count), txn.checkpoint())
                changed = True
            if changed and txn.count:  # a read of an empty ledger writes nothing
                self._state_file.save(st)

    def _full_check_due(self, st: RunningState) -> bool:
        """Every ``full_check_every`` records at first, then whenever the ledger doubled since the last full
        recomputation: a lifetime's recomputations read at most about twice its records (O(1) per round amortised),
        while early damage is found early. The count of the last one is in the state file, so the schedule holds
        across processes (a deployment starts one per message)."""
        return st.count - st.checked_at >= max(self.full_check_every, st.checked_at)

    def _full_check(self, txn: LedgerTransaction, st: RunningState) -> RunningState:
        """Recompute the state from every (re-verified) record; the recomputation wins over a mismatch."""
        full = RunningState.from_records(self.ledger.site, txn.all(), txn.checkpoint())
        if not full.same_summary(st):
            log.error("ledger %s: the running state differed from a full recomputation at record %d; using the "
                      "recomputation", self.ledger.path, full.count)
        return full

    def _eps(self, st: RunningState, history: Iterable[tuple[float, float, int]]) -> float:
        return st.epsilon(list(canonical_history(history)), self.policy.accountant, self.delta, self.epsilon_of)

    # ----------------------------------------------------------------- queries

    def epsilon_of(self, history: Iterable[tuple[float, float, int]]) -> float:
        return compute_epsilon(list(history), self.delta, self.policy.accountant)

    def history(self) -> list[tuple[float, float, int]]:
        """The persisted lifetime accountant history (one entry per reservation)."""
        return charges(self.ledger.records())

    def spent(self) -> float:
        """Epsilon over the whole persisted history (``inf`` once a non-DP round was run)."""
        with self._synced(write=False) as (_txn, st):
            return self._eps(st, st.history())

    def answered(self, run_id: str, server_round: int) -> bool:
        """Whether this site already released an update for ``(run_id, server_round)`` (a ``round`` record exists)."""
        if isinstance(server_round, bool) or not isinstance(server_round, int):
            return False
        with self._synced(write=False) as (_txn, st):
            return st.is_answered(run_id, server_round)

    def remaining(self) -> float:
        return max(0.0, self.policy.max_epsilon - self.spent())

    # ----------------------------------------------------------------- reserve

    def reserve(self, req: RoundRequest, *, weights_in_sha256: str,
                resend: Callable[[str], Any] | None = None) -> Reservation:
        """Check ``req`` and charge it write-ahead; raise :class:`BudgetRefused` (recorded) if not acceptable.

        ``resend(update_sha256)`` returns the released update with that hash (anything not ``None``) or
        ``None``; with it, a replay of a completed round returns a :class:`Reservation` whose ``completed`` and
        ``resent`` are set and charges nothing — the caller must send exactly ``resent`` and ``completed``.
        """
        _check_hash("weights_in_sha256", weights_in_sha256)
        refusal: BudgetRefused | None = None
        with self._synced(write=True) as (txn, st):
            hist = st.history()  # the merged lifetime history: the accountant sees few entries
            spent = self._eps(st, hist)
            problem = self._policy_problem(req)
            replay = self._find_replay(st.open.values(), req, weights_in_sha256) if problem is None else None
            # only a run's answered round can have a completed record to resend: read the records just then
            done = (self._find_completed(txn.all(), req, weights_in_sha256)
                    if problem is None and replay is None and resend is not None
                    and st.is_answered(req.run_id, req.server_round) else None)
            payload = resend(done["update_sha256"]) if done is not None else None
            if payload is not None:
                log.info("run %s round %s: replay of a completed round (record seq %d); the same released update "
                         "is sent again, not charged", req.run_id, req.server_round, done["seq"])
                rsv = txn.all()[done["reservation_seq"]]
                return dataclasses.replace(self._reservation(rsv, replayed=True), completed=done, resent=payload)
            if problem is not None:
                refusal = BudgetRefused(*problem)
                self._append_refusal(txn, req, refusal, hist, spent, None, weights_in_sha256)
            elif replay is not None:
                if req.mechanism.dp and spent > self.policy.max_epsilon:
                    refusal = BudgetRefused(BUDGET_EXCEEDED, f"site budget exhausted: spent ε={_fmt(spent)} of "
                                            f"{self.policy.max_epsilon:.2f}")
                    self._append_refusal(txn, req, refusal, hist, spent, spent, weights_in_sha256)
                else:
                    log.info("run %s round %s: replay of reservation seq %d, not charged again",
                             req.run_id, req.server_round, replay["seq"])
                    return self._reservation(replay, replayed=True)
            else:
                charge = req.mechanism.charge()
                after_hist = hist + [charge]
                after = self._eps(st, after_hist)
                if req.mechanism.dp and after > self.policy.max_epsilon:
                    refusal = BudgetRefused(BUDGET_EXCEEDED, self._budget_message(spent, after, req))
                    self._append_refusal(txn, req, refusal, hist, spent, after, weights_in_sha256)
                else:
                    if not req.mechanism.dp:
                        log.warning("run %s round %s: NON-DP round allowed by policy; this dataset's epsilon is now "
                                    "infinite and every later DP round will be refused", req.run_id, req.server_round)
                    rec = txn.append({
                        "type": "reservation", **self._mechanism(req), "charge": list(charge),
                        "accountant": self.policy.accountant, "delta": self.delta,
                        "history": history_json(after_hist),
                        "epsilon_before": epsilon_json(spent), "epsilon_after": epsilon_json(after),
                        "max_epsilon": self.policy.max_epsilon, "weights_in_sha256": weights_in_sha256,
                        "policy_sha256": self.policy_sha256, **self._delta_basis(),
                    })
                    return self._reservation(rec, replayed=False)
        assert refusal is not None
        raise refusal

    def _budget_message(self, spent: float, after: float, req: RoundRequest) -> str:
        m = req.mechanism
        mech = f"σ={m.noise_multiplier:g}, q={m.sample_rate:.3g}, {m.steps} steps"
        if math.isinf(spent):
            return (f"site budget exhausted: a non-DP round was run on this dataset, so its epsilon is ∞ "
                    f"(budget {self.policy.max_epsilon:.2f}); no further DP round is possible ({mech})")
        return (f"site budget exhausted: spent ε={_fmt(spent)} of {self.policy.max_epsilon:.2f}; "
                f"this round would reach ε={_fmt(after)} ({mech})")

    def _policy_problem(self, req: RoundRequest) -> tuple[str, str] | None:
        p, m = self.policy, req.mechanism
        if not isinstance(req.run_id, str) or not req.run_id or len(req.run_id) > 200:
            return BAD_REQUEST, "the round request has no valid run id"
        if isinstance(req.server_round, bool) or not isinstance(req.server_round, int) or req.server_round < 0:
            return BAD_REQUEST, f"the round request's server round {req.server_round!r} is not a non-negative integer"
        if not isinstance(m, Mechanism):
            return BAD_REQUEST, "the round request carries no DP mechanism"
        if not isinstance(m.dp, bool):
            return BAD_REQUEST, "the round request's dp flag is not a boolean"
        for name in ("noise_multiplier", "clip_norm", "sample_rate"):
            v = getattr(m, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return BAD_REQUEST, f"the round request's {name.replace('_', ' ')} {v!r} is not a finite number"
        if isinstance(m.steps, bool) or not isinstance(m.steps, int):
            return BAD_REQUEST, f"the round request's local steps {m.steps!r} is not an integer"
        if m.adaptive_clip and m.problems():  # an impossible noise split (contract.mechanism) is never charged
            key, what = m.problems()[0]
            return BAD_REQUEST, f"the round request's '{key}' {what}"
        # the policy's rules live in privacy.policy, shared with `atoll site check` and `atoll site approve`
        return mechanism_problem(p, m)

    @staticmethod
    def _mechanism(req: RoundRequest) -> dict[str, Any]:
        return {"run_id": req.run_id, "server_round": int(req.server_round), **req.mechanism.to_record()}

    def _find_replay(self, open_reservations: Iterable[dict], req: RoundRequest, weights_in: str) -> dict | None:
        """The newest uncompleted reservation of this exact request (same mechanism, same incoming weights)."""
        want = self._mechanism(req)
        for r in sorted(open_reservations, key=lambda r: r["seq"], reverse=True):
            if (r.get("type") == "reservation" and all(r.get(k) == v for k, v in want.items())
                    and req.mechanism.matches_record(r) and r.get("weights_in_sha256") == weights_in):
                return r
        return None

    def _find_completed(self, records: list[dict], req: RoundRequest, weights_in: str) -> dict | None:
        """The newest ``round`` record of this exact request (same mechanism, same incoming weights)."""
        want = self._mechanism(req)
        for r in reversed(records):
            if (r.get("type") == "round" and all(r.get(k) == v for k, v in want.items())
                    and req.mechanism.matches_record(r) and r.get("weights_in_sha256") == weights_in):
                return r
        return None

    def _append_refusal(self, txn, req: RoundRequest, refusal: BudgetRefused, hist, spent: float,
                        requested: float | None, weights_in: str) -> None:
        body = {"type": "refusal", "code": refusal.code, "message": refusal.message,
                "accountant": self.policy.accountant, "delta": self.delta, "history": history_json(hist),
                "epsilon_spent": epsilon_json(spent),
                "epsilon_requested": None if requested is None else epsilon_json(requested),
                "max_epsilon": self.policy.max_epsilon, "policy_sha256": self.policy_sha256,
                "weights_in_sha256": weights_in}
        try:
            body.update(self._mechanism(req))
        except (TypeError, ValueError):  # malformed request: record what can be recorded
            body.update(run_id=str(req.run_id)[:200], server_round=-1,
                        dp=bool(getattr(req.mechanism, "dp", True)))
        txn.append(body)
        log.warning("refused run %s round %s [%s]: %s", req.run_id, req.server_round, refusal.code, refusal.message)

    def _reservation(self, rec: dict, *, replayed: bool) -> Reservation:
        from privacy.ledger import epsilon_value

        return Reservation(run_id=rec["run_id"], server_round=rec["server_round"], seq=rec["seq"],
                           record_sha256=record_hash(rec), epsilon_before=epsilon_value(rec["epsilon_before"]),
                           epsilon_after=epsilon_value(rec["epsilon_after"]), delta=float(rec["delta"]),
                           replayed=replayed, record=rec)

    # ----------------------------------------------------------------- complete

    def _delta_basis(self) -> dict[str, Any]:
        """What the auditor needs to check ``delta`` without the policy file: the patient count it was derived
        from, the policy's declared delta (0 = auto, ``1/(10 x patients)``) and whether a larger one is allowed."""
        basis = {"patients": self.num_patients, "policy_delta": float(self.policy.delta),
                 "allow_large_delta": bool(self.policy.allow_large_delta)}
        if self.dataset_fingerprint:
            basis["dataset_fingerprint"] = self.dataset_fingerprint
        return basis

    def complete(self, res: Reservation, *, update_sha256: str, num_examples: int | None = None,
                 server_prev_digest: str | None = None, update_hash: str = "sha256") -> dict:
        """Append the signed ``round`` record for a reserved round and return it (the dict sent to the server).

        ``num_examples``: the training examples the update is weighted by (signed, so the server can bound it by
        the site's dataset card). ``server_prev_digest``: the consortium's signed digest of the previous round,
        as the round config sent it; signing it countersigns the server's history up to there. ``update_hash``: the
        digest construction ``update_sha256`` was computed with (``models.HASH_SCHEMES``); recorded as the
        record's ``update_hash`` field unless it is "sha256", the construction of records without the field.
        """
        _check_hash("update_sha256", update_sha256)
        if update_hash != "sha256":
            from models.serialization import HASH_SCHEMES

            if update_hash not in HASH_SCHEMES:
                raise ValueError(f"update_hash must be one of {', '.join(HASH_SCHEMES)}, got {update_hash!r}")
        if server_prev_digest is not None and server_prev_digest != "":
            _check_hash("server_prev_digest", server_prev_digest)
        if num_examples is not None and (isinstance(num_examples, bool) or not isinstance(num_examples, int)
                                         or num_examples < 0):
            raise ValueError(f"num_examples must be a non-negative integer, got {num_examples!r}")
        with self._synced(write=True) as (txn, st):
            rsv = st.open.get(res.seq)  # an open reservation has no round record yet: nothing to look up
            if rsv is None or record_hash(rsv) != res.record_sha256:
                records = txn.all()  # not open (completed already, or not this ledger's): check every record
                if not (0 <= res.seq < len(records)) or record_hash(records[res.seq]) != res.record_sha256:
                    raise LedgerError(f"reservation seq {res.seq} (run {res.run_id!r} round {res.server_round}) is "
                                      f"not in the ledger {self.ledger.path}; cannot complete it")
                rsv = records[res.seq]
                for r in records:
                    if r.get("type") == "round" and r.get("reservation_seq") == res.seq:
                        if r.get("update_sha256") == update_sha256:
                            return r
                        raise LedgerError(
                            f"reservation seq {res.seq} (run {res.run_id!r} round {res.server_round}) was already "
                            "completed with a different update; releasing a second update would not be charged")
            hist = st.history()
            before_hist = st.history_without(_charge(rsv))
            after = self._eps(st, hist)
            before = self._eps(st, before_hist)
            body = {"type": "round", **{k: rsv[k] for k in ("run_id", "server_round", *_MECHANISM)},
                    **{k: rsv[k] for k in ADAPTIVE_RECORD_KEYS if k in rsv},  # adaptive clipping: as reserved
                    "charge": rsv["charge"], "accountant": self.policy.accountant, "delta": self.delta,
                    "history": history_json(hist), "epsilon_before": epsilon_json(before),
                    "epsilon_after": epsilon_json(after), "max_epsilon": self.policy.max_epsilon,
                    "weights_in_sha256": rsv["weights_in_sha256"], "update_sha256": update_sha256,
                    "reservation_seq": rsv["seq"], "reservation_sha256": res.record_sha256,
                    "released_metrics": list(self.policy.released_metrics), "policy_sha256": self.policy_sha256,
                    **self._delta_basis()}
            if update_hash != "sha256":
                body["update_hash"] = update_hash
            if num_examples is not None:
                body["num_examples"] = int(num_examples)
            if server_prev_digest:
                body["server_prev_digest"] = server_prev_digest
            return txn.append(body)


def _charge(rec: dict) -> tuple[float, float, int]:
    s, q, n = rec["charge"]
    return (float(s), float(q), int(n))


def _check_hash(name: str, value: Any) -> None:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ValueError(f"{name} must be a lowercase hex SHA-256 digest, got {value!r}")
