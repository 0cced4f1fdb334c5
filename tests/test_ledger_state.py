"""The guard's running ledger state (privacy.ledger_state): exactly a full recomputation, never trusted blindly.

Every epsilon here is compared with ``==`` against Opacus over the canonical history of every reservation record
read back from disk: the running state may not differ from a full recomputation by a single ulp.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest

from contract import Mechanism
from privacy.accounting import canonical_history, compute_epsilon
from privacy.guard import BUDGET_EXCEEDED, BudgetGuard, BudgetRefused, RoundRequest, charges
from privacy.keys import generate_private_key
from privacy.ledger import LedgerError, SiteLedger, canonical_json
from privacy.ledger_state import RunningState, StateFile, _add_to_ranges
from privacy.policy import SitePolicy

PATIENTS = 1000  # auto delta = 1e-4
DELTA = 1e-4
W_IN, W_OUT = "11" * 32, "22" * 32
KEY = generate_private_key()


def _guard(path: Path, key=KEY, accountant: str = "rdp", max_epsilon: float = 1e6, **kw) -> BudgetGuard:
    pol = SitePolicy.from_table({"max_epsilon": max_epsilon, "accountant": accountant,
                                 "noise_multiplier": [0.5, 10.0], "local_steps": [1, 200],
                                 "max_sample_rate": 0.5}, where="test [privacy]")
    return BudgetGuard(SiteLedger(path, site="hospital-a", signing_key=key), pol, num_patients=PATIENTS, **kw)


def _req(run: str, rnd: int, sigma: float = 1.0, q: float = 0.05, steps: int = 20) -> RoundRequest:
    return RoundRequest(run, rnd, Mechanism(noise_multiplier=sigma, clip_norm=1.0, sample_rate=q, steps=steps))


def _round(guard: BudgetGuard, req: RoundRequest) -> dict:
    return guard.complete(guard.reserve(req, weights_in_sha256=W_IN), update_sha256=W_OUT)


_RECOMPUTED: dict[tuple, float] = {}


def _full(path: Path, accountant: str = "rdp") -> float:
    """Epsilon recomputed from every record on disk, as the auditor would, without the running state (memoised
    by the history read back: Opacus' PRV costs about a second a call on a loaded 2-core machine)."""
    records = SiteLedger(path, site="hospital-a", signing_key=KEY).records()
    key = (accountant, canonical_history(charges(records)))
    if key not in _RECOMPUTED:
        _RECOMPUTED[key] = compute_epsilon(list(key[1]), DELTA, accountant)
    return _RECOMPUTED[key]


def _state_path(path: Path) -> Path:
    return path.with_name(path.stem + ".state.json")


def _assert_state_exact(guard: BudgetGuard, path: Path) -> None:
    records = SiteLedger(path, site="hospital-a", signing_key=KEY).records()
    full = RunningState.from_records("hospital-a", records, guard.ledger.checkpoint())
    assert guard._state is not None and guard._state.same_summary(full)


# ------------------------------------------------------------------------------------------------ property


@pytest.mark.parametrize("accountant,seed,ops", [("rdp", 1, 30), ("rdp", 2, 30), ("rdp", 3, 30), ("prv", 4, 8)])
def test_running_state_gives_exactly_the_epsilon_of_a_full_recomputation(tmp_path: Path, accountant: str,
                                                                         seed: int, ops: int) -> None:
    """Random mechanisms, crashes (reservation without completion), replays, refusals, restarts (a cold guard
    from the state file), lost state files and a small full-check interval: after every step the recorded and the
    reported epsilon equal a recomputation from every record, bit for bit."""
    rng = random.Random(seed)
    path = tmp_path / "ledger.jsonl"
    sigmas, rates = ([0.6, 0.8, 1.0, 1.3, 2.0, 3.7], [0.01, 0.02, 0.05, 0.1, 0.3]) if accountant == "rdp" else \
        ([1.0, 2.0, 3.7], [0.01, 0.02, 0.05])  # PRV: moderate epsilons keep its grid (and the test) small
    mechs = [(rng.choice(sigmas), rng.choice(rates), rng.randint(1, 40 if accountant == "rdp" else 8))
             for _ in range(5)]
    guard = _guard(path, accountant=accountant, full_check_every=rng.choice([3, 7, 1000]))
    rnd = 0
    for _ in range(ops):
        op = rng.random()
        if op < 0.1:
            guard = _guard(path, accountant=accountant, full_check_every=guard.full_check_every)  # a new process
        elif op < 0.15:
            _state_path(path).unlink(missing_ok=True)
            guard = _guard(path, accountant=accountant)
        rnd += 1
        sigma, q, steps = rng.choice(mechs)
        req = _req(f"run-{rnd // 10}", rnd, sigma, q, steps)
        if rng.random() < 0.1:  # out of policy: a refusal record, nothing charged
            req = _req(f"run-{rnd // 10}", rnd, sigma, q, 500)
            with pytest.raises(BudgetRefused):
                guard.reserve(req, weights_in_sha256=W_IN)
            assert guard.spent() == _full(path, accountant)
            continue
        res = guard.reserve(req, weights_in_sha256=W_IN)
        assert res.epsilon_after == _full(path, accountant)
        if rng.random() < 0.15:  # crash during training: reserved, never completed; maybe replayed later
            if rng.random() < 0.5:
                guard = _guard(path, accountant=accountant)
                again = guard.reserve(req, weights_in_sha256=W_IN)
                assert again.replayed and again.seq == res.seq
            continue
        rec = guard.complete(res, update_sha256=W_OUT)
        assert rec["epsilon_after"] == _full(path, accountant) == guard.spent()
        assert rec["history"] == [list(h) for h in canonical_history(charges(guard.ledger.records()))]
        assert guard.answered(req.run_id, req.server_round)
        _assert_state_exact(guard, path)
    cold = _guard(path, accountant=accountant)
    assert cold.spent() == _full(path, accountant)
    assert not cold.answered("run-0", 10_000)


def test_answered_rounds_as_ranges_equal_the_set_of_rounds() -> None:
    rng = random.Random(7)
    for _ in range(200):
        xs = [rng.randint(0, 30) for _ in range(rng.randint(0, 25))]
        ranges: list[list[int]] = []
        for x in xs:
            _add_to_ranges(ranges, x)
        assert {x for lo, hi in ranges for x in range(lo, hi + 1)} == set(xs)
        assert all(a[1] + 1 < b[0] for a, b in zip(ranges, ranges[1:]))  # disjoint, not adjacent, sorted


# ------------------------------------------------------------------------------------------------ trust


def _rounds(path: Path, n: int, start: int = 1, **kw) -> BudgetGuard:
    guard = _guard(path, **kw)
    for r in range(start, start + n):
        _round(guard, _req("run-1", r))
    return guard


def _edit_state(path: Path, change, *, resign: bool = False) -> None:
    sp = _state_path(path)
    obj = json.loads(sp.read_text())
    change(obj["state"])
    if resign:  # what a bug in the running state (not an attacker: it has no key) would leave on disk
        obj["mac"] = StateFile(SiteLedger(path, site="hospital-a", signing_key=KEY))._tag(canonical_json(obj["state"]))
    sp.write_text(json.dumps(obj))


@pytest.mark.parametrize("change", [
    pytest.param(lambda s: s.update(charges=[[c[0], c[1], 1] for c in s["charges"]]), id="charges-lowered"),
    pytest.param(lambda s: s.update(charges=[]), id="charges-emptied"),
    pytest.param(lambda s: s["spent"][0].update(epsilon=0.001), id="cached-epsilon-lowered"),
    pytest.param(lambda s: s.update(open=[]), id="open-reservation-dropped"),
])
def test_a_tampered_state_file_is_detected_and_recomputed(tmp_path: Path, caplog, change) -> None:
    path = tmp_path / "ledger.jsonl"
    _rounds(path, 3)
    _guard(path).reserve(_req("run-1", 4), weights_in_sha256=W_IN)  # an open reservation, charged
    honest = _full(path)
    _edit_state(path, change)
    with caplog.at_level(logging.WARNING, logger="atoll.ledger"):
        guard = _guard(path)
        assert guard.spent() == honest
    assert "altered" in caplog.text
    again = guard.reserve(_req("run-1", 4), weights_in_sha256=W_IN)
    assert again.replayed  # the open reservation was found again: not charged twice, not lost
    assert StateFile(guard.ledger).load()[0] is not None  # rewritten, authentic again


@pytest.mark.parametrize("content", [b"", b"{", b'{"state": {}, "mac": "00"}', b"\x00" * 40])
def test_a_torn_or_garbage_state_file_is_recomputed(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ledger.jsonl"
    _rounds(path, 2)
    _state_path(path).write_bytes(content)
    assert _guard(path).spent() == _full(path)


def test_a_state_file_of_another_ledger_or_key_is_not_used(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / "ledger.jsonl", tmp_path / "b" / "ledger.jsonl"
    _rounds(a, 1)
    _rounds(b, 4)
    shutil.copy(_state_path(b), _state_path(a))  # same key, another dataset's ledger: its checkpoint cannot bind
    assert _guard(a).spent() == _full(a) < _full(b)
    other_key = generate_private_key()
    c = tmp_path / "c" / "ledger.jsonl"
    _rounds(c, 4, key=other_key)
    shutil.copy(_state_path(c), _state_path(a))  # another site key: its tag does not verify
    assert _guard(a).spent() == _full(a)


def test_a_stale_state_is_folded_forward_exactly(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    _rounds(path, 3)
    old = _state_path(path).read_bytes()
    _rounds(path, 5, start=4)
    _state_path(path).write_bytes(old)  # 10 records behind
    guard = _guard(path)
    assert guard.spent() == _full(path)
    _assert_state_exact(guard, path)


def test_a_state_ahead_of_its_ledger_follows_the_ledger_and_says_so(tmp_path: Path, caplog) -> None:
    """The ledger restored from an older copy: the state's checkpoint is not in it, so the ledger is recomputed
    (the consortium refuses the rolled-back site, tests/test_ledger.py); the log says what happened."""
    path = tmp_path / "ledger.jsonl"
    _rounds(path, 2)
    older = path.read_bytes()
    _rounds(path, 3, start=3)
    path.write_bytes(older)
    with caplog.at_level(logging.WARNING, logger="atoll.ledger"):
        assert _guard(path).spent() == _full(path)
    assert "fewer records than the state summarised" in caplog.text


def test_crash_between_the_ledger_append_and_the_state_write(tmp_path: Path) -> None:
    """The reservation is fsynced before the state file is written; a crash in between leaves the old state on
    disk. The next process folds the reservation in: charged (write-ahead), and its replay is not charged twice."""
    path = tmp_path / "ledger.jsonl"
    _rounds(path, 2)
    before_state = _state_path(path).read_bytes()
    before = _full(path)
    res = _guard(path).reserve(_req("run-1", 3), weights_in_sha256=W_IN)
    _state_path(path).write_bytes(before_state)  # the state write never happened
    guard = _guard(path)
    assert guard.spent() == _full(path) == res.epsilon_after > before
    again = guard.reserve(_req("run-1", 3), weights_in_sha256=W_IN)
    assert again.replayed and again.seq == res.seq
    rec = guard.complete(again, update_sha256=W_OUT)
    assert rec["epsilon_after"] == _full(path)
    # and between the round record and its state write: the completed round is answered, not open any more
    _state_path(path).write_bytes(before_state)
    cold = _guard(path)
    assert cold.answered("run-1", 3) and cold._state is not None and res.seq not in cold._state.open


def test_a_wrong_but_authentic_state_is_caught_by_the_periodic_full_check(tmp_path: Path, caplog) -> None:
    """A state file with a valid tag but a lowered history (what a bug would write) binds, so it is used, until the
    next full recomputation; that one restores the ledger's number."""
    path = tmp_path / "ledger.jsonl"
    _rounds(path, 4, full_check_every=1000)
    honest = _full(path)
    _edit_state(path, lambda s: s.update(charges=[[c[0], c[1], 1] for c in s["charges"]]), resign=True)
    with caplog.at_level(logging.ERROR, logger="atoll.ledger"):
        guard = _guard(path, full_check_every=2)
        _round(guard, _req("run-1", 5))
    assert "differed from a full recomputation" in caplog.text
    assert guard.spent() == _full(path) > honest


def test_the_guard_still_refuses_over_budget_rounds_from_a_cold_state(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    budget = compute_epsilon([(1.0, 0.05, 20 * 3)], DELTA) * 1.0001  # exactly three rounds fit
    guard = _guard(path, max_epsilon=budget)
    for r in (1, 2, 3):
        _round(guard, _req("run-1", r))
    for g in (guard, _guard(path, max_epsilon=budget)):  # warm, then a new process from the state file
        with pytest.raises(BudgetRefused) as err:
            g.reserve(_req("run-1", 4), weights_in_sha256=W_IN)
        assert err.value.code == BUDGET_EXCEEDED
    _state_path(path).unlink()
    with pytest.raises(BudgetRefused):
        _guard(path, max_epsilon=budget).reserve(_req("run-1", 4), weights_in_sha256=W_IN)
    assert [r["type"] for r in guard.ledger.records()].count("refusal") == 3


def test_an_unsigned_ledgers_state_file_is_never_trusted(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    guard = _guard(path, key=None)
    for r in (1, 2):
        _round(guard, _req("run-1", r))
    sp = _state_path(path)
    obj = json.loads(sp.read_text())
    obj["state"]["charges"] = []
    sp.write_text(json.dumps(obj))
    records = SiteLedger(path, site="hospital-a").records()
    assert _guard(path, key=None).spent() == compute_epsilon(charges(records), DELTA) > 0


def test_a_cold_guard_reads_only_the_tail_of_the_ledger(tmp_path: Path) -> None:
    """What makes it O(1): with a bound state the prefix is not parsed (an edit there is the periodic full check's
    and the auditor's to find, and it cannot lower the state's numbers); without the state it is found at once."""
    path = tmp_path / "ledger.jsonl"
    _rounds(path, 3)
    honest = _full(path)
    lines = path.read_text().splitlines()
    assert '"server_round":1,' in lines[1]
    lines[1] = lines[1].replace('"server_round":1,', '"server_round":7,')  # same length: offsets unchanged
    path.write_text("\n".join(lines) + "\n")
    guard = _guard(path)
    assert guard.spent() == honest and guard.ledger._base == 6
    _state_path(path).unlink()
    with pytest.raises(LedgerError, match="line 2"):
        _guard(path).spent()


def test_replay_of_a_completed_round_still_resends_from_a_cold_state(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    _rounds(path, 2)
    before = _full(path)
    again = _guard(path).reserve(_req("run-1", 2), weights_in_sha256=W_IN, resend=lambda sha: b"same bytes")
    assert again.completed is not None and again.resent == b"same bytes" and _full(path) == before


# ------------------------------------------------------------------------------------------------ durability


def test_site_records_are_durable_one_by_one_and_the_consortium_commits_a_round_at_once(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """Write-ahead is not weakened: each site record is synced before reserve/complete return (the state file adds
    no sync). The consortium's copy syncs once per group, when the server is about to sign the round's digest."""
    import os

    from privacy.ledger import ConsortiumLedger

    syncs: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
    guard = _guard(tmp_path / "site" / "ledger.jsonl")
    recs = []
    for r in (1, 2, 3):
        n = len(syncs)
        res = guard.reserve(_req("run-1", r), weights_in_sha256=W_IN)
        assert len(syncs) == n + 1  # the reservation is on disk before training may start
        recs.append(json.loads(json.dumps(guard.complete(res, update_sha256=W_OUT))))
        assert len(syncs) == n + 2  # the round record is on disk before the update may leave
    cons = ConsortiumLedger(tmp_path / "run", group_commit=True)
    n = len(syncs)
    for rec in recs:
        cons.accept(rec, site="hospital-a")
    assert len(syncs) == n and len(cons.records()) == 3
    cons.sync()
    cons.sync()
    assert len(syncs) == n + 1
    assert [json.loads(x)["seq"] for x in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()] == [1, 3, 5]
