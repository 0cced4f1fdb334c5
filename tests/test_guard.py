"""Budget guard: lifetime accounting across runs and restarts, write-ahead, replay, refusals, concurrency."""

from __future__ import annotations

import math
import multiprocessing
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from privacy.accounting import compute_epsilon
from contract import Mechanism
from privacy.guard import (
    BUDGET_EXCEEDED, CLIP_OUT_OF_POLICY, NOISE_OUT_OF_POLICY, NON_DP_NOT_ALLOWED, SAMPLE_RATE_OUT_OF_POLICY,
    STEPS_OUT_OF_POLICY, BudgetGuard, BudgetRefused, RoundRequest,
)
from privacy.keys import generate_private_key
from privacy.ledger import LedgerError, SiteLedger, verify_record
from privacy.policy import PolicyError, SitePolicy

W_IN, W_OUT, W_OTHER = "11" * 32, "22" * 32, "33" * 32
PATIENTS = 1000  # auto delta = 1e-4
SIGMA, Q, STEPS = 1.0, 0.05, 20


def _guard(path: Path, key=None, **policy) -> BudgetGuard:
    pol = SitePolicy.from_table({"max_epsilon": 50.0, **policy}, where="test [privacy]")
    return BudgetGuard(SiteLedger(path, site="hospital-a", signing_key=key), pol, num_patients=PATIENTS)


def _req(run: str, rnd: int, **kw) -> RoundRequest:
    """Round ``rnd`` of ``run`` with the test's mechanism; ``kw`` overrides Mechanism fields."""
    return RoundRequest(run, rnd, Mechanism(**{"noise_multiplier": SIGMA, "clip_norm": 1.0, "sample_rate": Q,
                                               "steps": STEPS, **kw}))


def _round(guard: BudgetGuard, run: str, rnd: int, **kw) -> dict:
    return guard.complete(guard.reserve(_req(run, rnd, **kw), weights_in_sha256=W_IN), update_sha256=W_OUT)


def _types(guard: BudgetGuard) -> list[str]:
    return [r["type"] for r in guard.ledger.records()]


def test_two_runs_equal_one_accountant_over_all_steps(tmp_path: Path) -> None:
    path, k = tmp_path / "ledger.jsonl", 3
    for run in ("run-1", "run-2"):  # a fresh guard per run, as after a restart
        guard = _guard(path)
        for rnd in range(1, k + 1):
            rec = _round(guard, run, rnd)
    acc = RDPAccountant()
    for _ in range(2 * k * STEPS):
        acc.step(noise_multiplier=SIGMA, sample_rate=Q)
    expected = acc.get_epsilon(1 / (10 * PATIENTS))
    assert rec["epsilon_after"] == pytest.approx(expected, rel=1e-12)
    assert _guard(path).spent() == pytest.approx(expected, rel=1e-12)
    assert rec["history"] == [[SIGMA, Q, 2 * k * STEPS]]
    assert rec["delta"] == pytest.approx(1e-4)


def test_round_record_fields_and_signature(tmp_path: Path) -> None:
    key = generate_private_key()
    guard = _guard(tmp_path / "l.jsonl", key)
    res = guard.reserve(_req("run-1", 1), weights_in_sha256=W_IN)
    rec = guard.complete(res, update_sha256=W_OUT)
    verify_record(rec, key.public_key())
    assert rec["type"] == "round" and rec["site"] == "hospital-a" and rec["seq"] == 1
    assert {k: rec[k] for k in ("run_id", "server_round", "steps", "sample_rate", "noise_multiplier", "clip_norm",
                                "accountant", "weights_in_sha256", "update_sha256", "reservation_seq")} == {
        "run_id": "run-1", "server_round": 1, "steps": STEPS, "sample_rate": Q, "noise_multiplier": SIGMA,
        "clip_norm": 1.0, "accountant": "rdp", "weights_in_sha256": W_IN, "update_sha256": W_OUT,
        "reservation_seq": 0}
    assert rec["epsilon_before"] == 0.0 and rec["epsilon_after"] == res.epsilon_after > 0
    assert rec["policy_sha256"] == guard.policy.sha256() and rec["max_epsilon"] == 50.0
    assert "num-examples" in rec["released_metrics"]


def test_reservation_without_completion_stays_charged(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    _guard(path).reserve(_req("run-1", 1), weights_in_sha256=W_IN)  # ... and the process dies while training
    fresh = _guard(path)
    one = compute_epsilon([(SIGMA, Q, STEPS)], 1e-4)
    assert fresh.spent() == pytest.approx(one)
    rec = _round(fresh, "run-1", 2)
    assert rec["epsilon_after"] == pytest.approx(compute_epsilon([(SIGMA, Q, 2 * STEPS)], 1e-4))


def test_replay_of_uncompleted_round_is_not_charged_twice(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    first = _guard(path).reserve(_req("run-1", 1), weights_in_sha256=W_IN)
    guard = _guard(path)  # restart, the server resends round 1
    again = guard.reserve(_req("run-1", 1), weights_in_sha256=W_IN)
    assert again.replayed and again.seq == first.seq
    assert _types(guard) == ["reservation"]
    rec = guard.complete(again, update_sha256=W_OUT)
    assert rec["epsilon_after"] == pytest.approx(compute_epsilon([(SIGMA, Q, STEPS)], 1e-4))
    # the same update again costs nothing; a different update under the same charge is refused
    assert guard.complete(again, update_sha256=W_OUT) == rec
    with pytest.raises(LedgerError, match="already completed with a different update"):
        guard.complete(again, update_sha256=W_OTHER)
    # once completed (the update may have left), a resent round is a new charge
    third = guard.reserve(_req("run-1", 1), weights_in_sha256=W_IN)
    assert not third.replayed
    assert guard.spent() == pytest.approx(compute_epsilon([(SIGMA, Q, 2 * STEPS)], 1e-4))


def test_replay_of_a_completed_round_resends_the_same_bytes_without_a_charge(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    rec = _round(_guard(path), "run-1", 1)
    asked: list[str] = []
    cache = {W_OUT: "the released update"}

    def resend(sha: str):
        asked.append(sha)
        return cache.get(sha)

    guard = _guard(path)  # restart; the server asks for round 1 again with the same weights
    again = guard.reserve(_req("run-1", 1), weights_in_sha256=W_IN, resend=resend)
    assert again.replayed and again.completed == rec and again.resent == "the released update"
    assert asked == [W_OUT], "the update to resend is the one the signed round record names"
    assert _types(guard) == ["reservation", "round"], "nothing charged, nothing written"
    assert guard.spent() == pytest.approx(compute_epsilon([(SIGMA, Q, STEPS)], 1e-4))
    # other incoming weights or parameters are a different round: charged, whatever the cache holds
    assert guard.reserve(_req("run-1", 1), weights_in_sha256=W_OTHER, resend=resend).completed is None
    assert guard.reserve(_req("run-1", 1, steps=STEPS + 1), weights_in_sha256=W_IN, resend=resend).completed is None
    assert len(guard.history()) == 3


def test_replay_of_a_completed_round_without_its_bytes_is_charged(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    _round(_guard(path), "run-1", 1)
    guard = _guard(path)
    again = guard.reserve(_req("run-1", 1), weights_in_sha256=W_IN, resend=lambda sha: None)  # cache pruned
    assert not again.replayed and again.completed is None
    assert guard.spent() == pytest.approx(compute_epsilon([(SIGMA, Q, 2 * STEPS)], 1e-4))


def test_a_resend_is_still_subject_to_the_current_policy(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    _round(_guard(path), "run-1", 1)
    stricter = _guard(path, local_steps=[1, STEPS - 1])
    with pytest.raises(BudgetRefused) as err:
        stricter.reserve(_req("run-1", 1), weights_in_sha256=W_IN, resend=lambda sha: "bytes")
    assert err.value.code == STEPS_OUT_OF_POLICY


def _rewrite_last(path: Path, change) -> None:
    import json

    lines = path.read_text().splitlines()
    rec = json.loads(lines[-1])
    change(rec)
    lines[-1] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("change", [
    pytest.param(lambda r: r.update(charge=[50.0, r["charge"][1], r["charge"][2]]), id="charge-lowered"),
    pytest.param(lambda r: (r.update(charge=[50.0, r["charge"][1], r["charge"][2]], key_id=None), r.pop("sig")),
                 id="charge-lowered-and-signature-stripped"),
])
def test_editing_the_newest_record_of_a_signed_ledger_cannot_lower_the_spent_budget(tmp_path: Path, change) -> None:
    """The hash chain cannot protect the last record (nothing links to it yet); its signature does."""
    key = generate_private_key()
    path = tmp_path / "l.jsonl"
    guard = _guard(path, key)
    _round(guard, "run-1", 1)
    guard.reserve(_req("run-1", 2), weights_in_sha256=W_IN)  # the newest record is a reservation
    honest = guard.spent()
    _rewrite_last(path, change)
    with pytest.raises(LedgerError, match=r"line 3: .*(signature|unsigned)"):
        _guard(path, key).spent()
    with pytest.raises(LedgerError):
        _guard(path, key).reserve(_req("run-1", 3), weights_in_sha256=W_IN)
    assert honest == pytest.approx(compute_epsilon([(SIGMA, Q, 2 * STEPS)], 1e-4))


def test_a_signed_ledger_refuses_records_of_another_key(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    _round(_guard(path, generate_private_key()), "run-1", 1)
    with pytest.raises(LedgerError, match="line 1: field 'key_id'"):
        _guard(path, generate_private_key()).spent()


def test_replay_with_different_parameters_is_charged(tmp_path: Path) -> None:
    guard = _guard(tmp_path / "l.jsonl")
    guard.reserve(_req("run-1", 1), weights_in_sha256=W_IN)
    other = guard.reserve(_req("run-1", 1, steps=STEPS + 1), weights_in_sha256=W_IN)
    assert not other.replayed
    assert guard.history() == [(SIGMA, Q, STEPS), (SIGMA, Q, STEPS + 1)]


def test_site_at_budget_refuses_and_records_it(tmp_path: Path) -> None:
    one = compute_epsilon([(SIGMA, Q, STEPS)], 1e-4)
    two = compute_epsilon([(SIGMA, Q, 2 * STEPS)], 1e-4)
    budget = (one + two) / 2  # room for exactly one round
    guard = _guard(tmp_path / "l.jsonl", max_epsilon=budget)
    _round(guard, "run-1", 1)
    with pytest.raises(BudgetRefused) as err:
        guard.reserve(_req("run-1", 2), weights_in_sha256=W_IN)
    assert err.value.code == BUDGET_EXCEEDED
    assert err.value.message == (f"site budget exhausted: spent ε={one:.2f} of {budget:.2f}; this round would "
                                 f"reach ε={two:.2f} (σ=1, q=0.05, {STEPS} steps)")
    assert str(tmp_path) not in err.value.message
    refusal = guard.ledger.records()[-1]
    assert refusal["type"] == "refusal" and refusal["code"] == BUDGET_EXCEEDED
    assert refusal["epsilon_requested"] == pytest.approx(two) and refusal["epsilon_spent"] == pytest.approx(one)
    assert guard.spent() == pytest.approx(one)  # a refusal charges nothing


@pytest.mark.parametrize(("change", "code"), [
    ({"noise_multiplier": 0.3}, NOISE_OUT_OF_POLICY),
    ({"noise_multiplier": 11.0}, NOISE_OUT_OF_POLICY),
    ({"clip_norm": 20.0}, CLIP_OUT_OF_POLICY),
    ({"steps": 2000}, STEPS_OUT_OF_POLICY),
    ({"sample_rate": 0.9}, SAMPLE_RATE_OUT_OF_POLICY),
    ({"dp": False}, NON_DP_NOT_ALLOWED),
])
def test_out_of_policy_is_refused_before_anything_is_charged(tmp_path: Path, change: dict, code: str) -> None:
    guard = _guard(tmp_path / "l.jsonl", max_sample_rate=0.5)
    with pytest.raises(BudgetRefused) as err:
        guard.reserve(_req("run-1", 1, **change), weights_in_sha256=W_IN)
    assert err.value.code == code
    assert _types(guard) == ["refusal"] and guard.spent() == 0.0


def test_non_dp_round_makes_epsilon_infinite_forever(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    guard = _guard(path, allow_non_dp=True)
    rec = _round(guard, "run-1", 1, dp=False)
    assert rec["epsilon_after"] == "inf" and float(rec["epsilon_after"]) == math.inf
    assert math.isinf(_guard(path, allow_non_dp=True).spent())
    with pytest.raises(BudgetRefused) as err:
        _guard(path, allow_non_dp=True).reserve(_req("run-2", 1), weights_in_sha256=W_IN)
    assert err.value.code == BUDGET_EXCEEDED and "non-DP" in err.value.message


def test_large_explicit_delta_is_refused_at_setup(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="allow_large_delta"):
        _guard(tmp_path / "l.jsonl", delta=1e-3)


def _worker(path: str, tag: str, n: int, go) -> None:
    guard = _guard(Path(path))
    go.wait(60)  # both processes start hammering the same ledger at the same moment
    for rnd in range(n):
        res = guard.reserve(_req(f"run-{tag}", rnd), weights_in_sha256=W_IN)
        guard.complete(res, update_sha256=W_OUT)


def test_concurrent_reserve_from_two_processes_loses_nothing(tmp_path: Path) -> None:
    path, n = tmp_path / "l.jsonl", 25
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(str(path), tag, n, go)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    guard = _guard(path)
    records = guard.ledger.records()  # re-validates seq and the hash chain of every line
    assert len(records) == 4 * n
    assert guard.history() == [(SIGMA, Q, STEPS)] * (2 * n)
    assert {(r["run_id"], r["server_round"]) for r in records if r["type"] == "round"} == {
        (f"run-{t}", i) for t in "ab" for i in range(n)}
    assert guard.spent() == pytest.approx(compute_epsilon([(SIGMA, Q, 2 * n * STEPS)], 1e-4), rel=1e-12)
    last = max((r for r in records if r["type"] == "round"), key=lambda r: r["seq"])
    assert last["epsilon_after"] == pytest.approx(guard.spent(), rel=1e-12)
