"""Issue 12, item 3: a torn or damaged ledger line never lowers a spent budget and never lets a rollback through.

* A damaged line in an earlier run's consortium copy used to be skipped: the record it held (e.g. seq 7) was then
  accepted again in a new run, i.e. a site's ledger rolled back to before it went unnoticed.
* A torn tail in a site's own ledger used to be cut with a log warning: when the cut takes a round record and its
  reservation (a truncation, not a crash mid-write), the next run started from a lower epsilon.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contract import Mechanism
from privacy.guard import BudgetGuard, RoundRequest
from privacy.keys import ensure_site_key, load_private_key
from privacy.ledger import ConsortiumLedger, LedgerError, LedgerTornError, SiteLedger
from privacy.policy import SitePolicy
from privacy.repair import repair_torn_tail

W = "ab" * 32
POLICY = {"max_epsilon": 50.0, "accountant": "rdp"}


@pytest.fixture
def site(tmp_path: Path):
    pem = tmp_path / "site" / "keys" / "site_ed25519.pem"
    keys = tmp_path / "consortium" / "keys"
    keys.mkdir(parents=True)
    (keys / "hospital-a.pub").write_bytes(ensure_site_key(pem))
    return load_private_key(pem), keys


def _guard(path: Path, key) -> BudgetGuard:
    return BudgetGuard(SiteLedger(path, site="hospital-a", signing_key=key),
                       SitePolicy.from_table(POLICY, "test [privacy]"), num_patients=500)


def _rounds(guard: BudgetGuard, run: str, n: int, start: int = 1) -> list[dict]:
    out = []
    for rnd in range(start, start + n):
        res = guard.reserve(RoundRequest(run, rnd, Mechanism(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.05, steps=20)), weights_in_sha256=W)
        out.append(json.loads(json.dumps(guard.complete(res, update_sha256=f"{rnd:064x}", num_examples=10))))
    return out


# ------------------------------------------------------------------------------------------------ consortium copy


def test_a_damaged_line_in_an_earlier_runs_copy_stops_the_next_run(tmp_path: Path, site) -> None:
    key, keys = site
    guard = _guard(tmp_path / "site" / "state" / "ledger.jsonl", key)
    recs = _rounds(guard, "run-0", 4)  # round records seq 1, 3, 5, 7
    earlier = tmp_path / "runs" / "run-0"
    cl = ConsortiumLedger(earlier, keys_dir=keys)
    for r in recs:
        cl.accept(r, site="hospital-a")
    # the line holding seq 7 is torn (or edited); the site restores its ledger to before seq 6 and answers again
    path = earlier / "ledger.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]) + lines[3][:40])
    rolled_back = SiteLedger(tmp_path / "rolled" / "ledger.jsonl", site="hospital-a", signing_key=key)
    for r in (json.loads(x) for x in (tmp_path / "site" / "state" / "ledger.jsonl").read_text().splitlines()[:6]):
        rolled_back.append({k: v for k, v in r.items() if k not in ("v", "site", "seq", "prev", "time", "key_id",
                                                                        "sig")})
    replay = _rounds(_guard(rolled_back.path, key), "run-1", 1)[0]
    assert replay["seq"] == 7  # the seq the damaged line held
    with pytest.raises(LedgerError) as err:
        ConsortiumLedger(tmp_path / "runs" / "run-1", keys_dir=keys, earlier_runs=[path]).accept(
            replay, site="hospital-a")
    msg = str(err.value).lower()
    assert f"{path} line 4".lower() in msg and "rollback" in msg and "restore" in msg


def test_the_server_refuses_to_start_a_run_over_a_damaged_earlier_copy(tmp_path: Path, site) -> None:
    """server.outputs reads every earlier run of its runs folder: the damage stops the run with the file and line."""
    from types import SimpleNamespace

    from server.outputs import _consortium_ledger

    key, keys = site
    runs = tmp_path / "runs"
    (runs / "run-0").mkdir(parents=True)
    (runs / "run-0" / "settings.json").write_text("{}")
    guard = _guard(tmp_path / "site" / "state" / "ledger.jsonl", key)
    for r in _rounds(guard, "run-0", 2):
        _consortium_ledger(runs / "run-0", SimpleNamespace(keys_dir=str(keys))).accept(r, site="hospital-a")
    with open(runs / "run-0" / "ledger.jsonl", "ab") as fh:
        fh.write(b'{"charge":[1.0,0.05')
    with pytest.raises(LedgerError, match=r"run-0/ledger.jsonl line 3: not a JSON record"):
        _consortium_ledger(runs / "run-1", SimpleNamespace(keys_dir=str(keys)))


# ------------------------------------------------------------------------------------------------ site ledger


def _cut_mid_line(path: Path, line_no: int) -> None:
    """Truncate the file in the middle of line ``line_no`` (1-based): later lines vanish, that one is torn."""
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:line_no - 1]) + lines[line_no - 1][:70])


def test_a_torn_tail_never_lowers_the_spent_budget(tmp_path: Path, site) -> None:
    key, _ = site
    path = tmp_path / "site" / "state" / "ledger.jsonl"
    guard = _guard(path, key)
    _rounds(guard, "run-1", 3)
    _cut_mid_line(path, 5)  # round 3's reservation torn, its round record gone
    fresh = _guard(path, key)
    for call in (fresh.spent, lambda: fresh.reserve(RoundRequest("run-2", 1, Mechanism(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.05, steps=20)),
                                                    weights_in_sha256=W)):
        with pytest.raises(LedgerTornError) as err:
            call()
        assert f"{path} line 5" in str(err.value) and "atoll site repair-ledger" in str(err.value)
    assert path.read_bytes().count(b"\n") == 4  # nothing was cut: the evidence stays until the repair


def test_the_repair_keeps_the_torn_charge_and_can_only_raise_epsilon(tmp_path: Path, site) -> None:
    key, _ = site
    path = tmp_path / "site" / "state" / "ledger.jsonl"
    guard = _guard(path, key)
    _rounds(guard, "run-1", 3)
    spent = guard.spent()
    _cut_mid_line(path, 5)
    torn = path.read_bytes()[path.read_bytes().rfind(b"\n") + 1:]
    assert b'"charge":[1.0,0.05,20]' in torn  # canonical JSON puts the charge first: readable from a torn line
    fresh = _guard(path, key)
    rec = repair_torn_tail(fresh)
    assert rec["type"] == "reservation" and rec["charge"] == [1.0, 0.05, 20] and rec["repair"]["charge_from"] == "torn line"
    # the torn round-3 reservation is charged again; round 2's, lost with the cut, is not recoverable from the
    # file, but the repair never gives back what is still in it
    after = fresh.spent()
    assert after >= _guard_eps(3, fresh) - 1e-12
    assert after == pytest.approx(spent, rel=1e-9)  # 3 charges, as before the cut
    side = list(path.parent.glob("ledger.jsonl.torn-*"))
    assert len(side) == 1 and side[0].read_bytes() == torn  # the torn bytes are kept for the record
    # the repaired ledger verifies and the site works again
    assert _guard(path, key).reserve(RoundRequest("run-2", 1, Mechanism(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.05, steps=20)), weights_in_sha256=W)


def _guard_eps(n: int, guard: BudgetGuard) -> float:
    return guard.epsilon_of([(1.0, 0.05, 20)] * n)


def test_a_torn_line_without_a_readable_charge_is_charged_at_the_policys_worst_case(tmp_path: Path, site) -> None:
    key, _ = site
    path = tmp_path / "site" / "state" / "ledger.jsonl"
    guard = _guard(path, key)
    _rounds(guard, "run-1", 1)
    spent = guard.spent()
    with open(path, "ab") as fh:
        fh.write(b'{"accountant":"rd')  # torn before the charge
    fresh = _guard(path, key)
    rec = repair_torn_tail(fresh)
    policy = fresh.policy
    assert rec["repair"]["charge_from"] == "policy worst case"
    assert rec["charge"] == [policy.noise_multiplier[0], policy.max_sample_rate, policy.local_steps[1]]
    assert fresh.spent() > spent


def test_the_repair_refuses_a_ledger_without_a_torn_tail(tmp_path: Path, site) -> None:
    key, _ = site
    path = tmp_path / "site" / "state" / "ledger.jsonl"
    guard = _guard(path, key)
    _rounds(guard, "run-1", 1)
    with pytest.raises(LedgerError, match="no torn last line"):
        repair_torn_tail(guard)


def test_repair_ledger_cli(tmp_path: Path, capsys) -> None:
    """`atoll site repair-ledger --config site.toml`: the documented repair, from the site's own config."""
    from atoll.cli import main
    from client.site_config import load_site_config

    site_dir = tmp_path / "site"
    assert main(["site", "init", "--out", str(site_dir), "--name", "hospital-a"]) == 0
    (site_dir / "dicom").mkdir()
    cfg = load_site_config(site_dir / "site.toml")
    guard = BudgetGuard(SiteLedger(cfg.state_dir / "ledger.jsonl", site="hospital-a",
                                   signing_key=load_private_key(cfg.signing_key)), cfg.privacy, num_patients=500)
    _rounds(guard, "run-1", 2)
    spent = guard.spent()
    _cut_mid_line(cfg.state_dir / "ledger.jsonl", 3)
    capsys.readouterr()
    assert main(["site", "repair-ledger", "--config", str(site_dir / "site.toml")]) == 0
    out = capsys.readouterr().out
    assert "line 3: torn line" in out and "charged again" in out and "charge from the torn line" in out
    assert BudgetGuard(SiteLedger(cfg.state_dir / "ledger.jsonl", site="hospital-a",
                                  signing_key=load_private_key(cfg.signing_key)), cfg.privacy,
                       num_patients=500).spent() == pytest.approx(spent, rel=1e-9)
