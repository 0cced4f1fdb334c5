"""Requirement J, end to end: a real signed run (guards, site ledgers, consortium ledger) is tampered with in
every way an auditor must catch, and `atoll audit verify` must name the exact record and field each time.

Written independently of the guard/ledger/audit modules (second pair of eyes): the run is produced only through
the public APIs a ClientApp/ServerApp use, and every tamper is made on the files as an attacker would.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from anchored_run import make_sites, run_anchored
from privacy.audit import verify_run
from privacy.cli import add_audit_parser
from contract import Mechanism
from privacy.guard import BudgetRefused, RoundRequest
from privacy.keys import generate_private_key, write_public_key
from privacy.ledger import canonical_json, sign_record

RUN = "run-1"
SITES = ("hospital-a", "hospital-b")
W = "ab" * 32


def _h(tag: str) -> str:
    import hashlib

    return hashlib.sha256(tag.encode()).hexdigest()


@dataclass
class World:
    root: Path
    run_dir: Path
    keys_dir: Path
    site_ledgers: dict[str, Path]
    keys: dict


def _build(root: Path) -> World:
    """Two sites; hospital-a also trained in an earlier run (lifetime history) and refused one round.

    The server side is written by the real server outputs (tests/anchored_run.py): settings.json, the consortium
    ledger, the signed round digests, weights per round, history.json and status.json.
    """
    run_dir = root / "runs" / RUN
    keys_dir = run_dir / "keys"
    sites = make_sites(root, keys_dir, {n: 8.0 for n in SITES}, patients=400)
    shape = dict(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.05, local_steps=20)
    # an earlier run at hospital-a: not in this run's server copy, but part of its lifetime budget
    run_anchored(root, {"hospital-a": sites["hospital-a"]}, keys_dir, run_name="run-0", rounds=1, min_sites=1,
                 **shape)
    run_anchored(root, sites, keys_dir, run_name=RUN, rounds=3, **shape)
    with pytest.raises(BudgetRefused):  # out of policy: recorded on site, never sent
        sites["hospital-b"].guard.reserve(RoundRequest(RUN, 4, Mechanism(noise_multiplier=0.1, clip_norm=1.0, sample_rate=0.05, steps=20)), weights_in_sha256=_h("w4"))
    return World(root, run_dir, keys_dir, {n: s.ledger_path for n, s in sites.items()},
                 {n: s.key for n, s in sites.items()})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> World:
    return _build(tmp_path_factory.mktemp("audit-pristine"))


@pytest.fixture()
def world(pristine: World, tmp_path: Path) -> World:
    """A private copy of the pristine run for one tamper."""
    root = tmp_path / "w"
    shutil.copytree(pristine.root, root)
    return World(root, root / "runs" / RUN, root / "runs" / RUN / "keys",
                 {n: root / n / "state" / "ledger.jsonl" for n in SITES}, pristine.keys)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _write(path: Path, records: list[dict]) -> None:
    path.write_bytes(b"".join(canonical_json(r) + b"\n" for r in records))


def _verify(w: World, *, with_sites: bool = True):
    return verify_run(w.run_dir, list(w.site_ledgers.values()) if with_sites else [], w.keys_dir)


def _errors(result) -> list:
    return [f for f in result.findings if f.level == "error"]


def _has(result, *, site: str, line: int, field: str | None = None, source: str | None = None, text: str = ""):
    hits = [f for f in _errors(result) if f.site == site and f.line == line
            and (field is None or f.field == field) and (source is None or source in f.source)
            and text.lower() in f.message.lower()]
    assert hits, f"no error at site={site} line={line} field={field} source={source} {text!r}; got:\n{result.text()}"
    return hits[0]


def _cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    add_audit_parser(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------------------------------------- clean run


def test_clean_run_passes_with_cli_exit_0(pristine: World, capsys) -> None:
    argv = ["verify", str(pristine.run_dir), "--keys", str(pristine.keys_dir)]
    for p in pristine.site_ledgers.values():
        argv += ["--site-ledger", str(p)]
    assert _cli(argv) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    for name in SITES:
        assert f"{name}: OK" in out
    result = _verify(pristine)
    assert result.ok and not _errors(result)
    # lifetime: hospital-a's last epsilon covers the earlier run too (4 rounds), hospital-b's only 3
    assert result.sites["hospital-a"].epsilon > result.sites["hospital-b"].epsilon > 0


def test_keys_default_to_run_dir_keys(pristine: World) -> None:
    assert verify_run(pristine.run_dir, list(pristine.site_ledgers.values())).ok


# ---------------------------------------------------------------------------------------------- server copy


def test_server_copy_edited_field_is_named(world: World, capsys) -> None:
    path = world.run_dir / "ledger.jsonl"
    recs = _lines(path)
    recs[2]["epsilon_after"] = recs[2]["epsilon_after"] / 2  # line 3: hospital-a, round 2
    _write(path, recs)
    result = _verify(world)
    _has(result, site="hospital-a", line=3, field="sig", source="server copy")
    assert _has(result, site="hospital-a", line=3, field="sig").server_round == 2
    # the halved epsilon is also an under-count by recomputation, and not in the site's own ledger
    _has(result, site="hospital-a", line=3, field="epsilon_after", text="LOWER")
    argv = ["verify", str(world.run_dir), "--keys", str(world.keys_dir)]
    assert _cli(argv) != 0
    out = capsys.readouterr().out
    assert "line 3" in out and "hospital-a" in out and "'sig'" in out and "FAIL" in out


def test_server_copy_dropped_record_is_found_in_site_ledger(world: World) -> None:
    path = world.run_dir / "ledger.jsonl"
    recs = _lines(path)
    dropped = recs.pop(3)  # hospital-b round 2
    _write(path, recs)
    result = _verify(world)
    site_line = next(i for i, r in enumerate(_lines(world.site_ledgers["hospital-b"]), 1) if r == dropped)
    f = _has(result, site="hospital-b", line=site_line, text="missing from the server copy")
    assert f.run_id == RUN and f.server_round == 2
    assert result.sites["hospital-a"].ok and not result.sites["hospital-b"].ok


def test_server_copy_swapped_records_are_named(world: World) -> None:
    path = world.run_dir / "ledger.jsonl"
    recs = _lines(path)
    recs[0], recs[2] = recs[2], recs[0]  # hospital-a round 1 <-> round 2
    _write(path, recs)
    result = _verify(world, with_sites=False)
    _has(result, site="hospital-a", line=3, field="seq", source="server copy")
    assert not result.ok


def test_server_copy_record_signed_by_another_key(world: World) -> None:
    path = world.run_dir / "ledger.jsonl"
    recs = _lines(path)
    forged = dict(recs[-1])  # hospital-b's last record, "round 4", signed by a key that is not enrolled
    forged.update(server_round=4, seq=forged["seq"] + 2, prev=_h("x"))
    recs.append(sign_record(forged, generate_private_key()))
    _write(path, recs)
    result = _verify(world)
    _has(result, site="hospital-b", line=len(recs), field="key_id", source="server copy")
    _has(result, site="hospital-b", line=len(recs), text="not in the site's own ledger")


def test_record_re_signed_by_the_site_with_a_lower_epsilon_is_an_under_count(world: World) -> None:
    """A valid signature is not enough: the recomputed epsilon exposes a site (or a bug) under-reporting."""
    path = world.run_dir / "ledger.jsonl"
    recs = _lines(path)
    recs[4]["epsilon_after"] = round(recs[4]["epsilon_after"] * 0.8, 6)  # hospital-a round 3
    recs[4] = sign_record(recs[4], world.keys["hospital-a"])
    _write(path, recs)
    result = _verify(world, with_sites=False)  # no site ledger: only the accounting can tell
    _has(result, site="hospital-a", line=5, field="epsilon_after", text="LOWER")
    assert not any(f.field == "sig" for f in _errors(result))


def test_record_re_signed_with_a_shrunk_history_is_caught_by_the_site_ledger(world: World) -> None:
    """Self-consistent forgery (fewer steps, matching epsilon, valid signature): signature and recomputation agree,
    so the server copy alone only shows epsilon going down; the site's own ledger shows the record is not its own."""
    from privacy.accounting import compute_epsilon

    path = world.run_dir / "ledger.jsonl"
    recs = _lines(path)
    r = recs[4]  # hospital-a round 3: lifetime history 4 x 20 steps
    r["history"] = [[1.0, 0.05, 20]]
    r["epsilon_before"] = 0.0
    r["epsilon_after"] = compute_epsilon([(1.0, 0.05, 20)], r["delta"], "rdp")
    recs[4] = sign_record(r, world.keys["hospital-a"])
    _write(path, recs)
    alone = _verify(world, with_sites=False)
    crossed = _verify(world)
    assert not any(f.line == 5 and f.field == "sig" for f in _errors(alone))
    assert not any(f.line == 5 and "LOWER" in f.message for f in _errors(alone))  # self-consistent numbers
    _has(alone, site="hospital-a", line=5, field="epsilon_after", text="decreased")
    _has(crossed, site="hospital-a", line=5, source="server copy", text="not in the site's own ledger")
    assert not crossed.ok


def test_over_budget_record_is_an_error(world: World) -> None:
    path = world.run_dir / "ledger.jsonl"
    recs = _lines(path)
    recs[1]["max_epsilon"] = recs[1]["epsilon_after"] / 2  # hospital-b round 1 claims a tiny budget
    recs[1] = sign_record(recs[1], world.keys["hospital-b"])
    _write(path, recs)
    result = _verify(world, with_sites=False)
    _has(result, site="hospital-b", line=2, field="epsilon_after", text="budget")


def test_replaced_public_key_fails_every_record_of_that_site(world: World) -> None:
    (world.keys_dir / "hospital-b.pub").unlink()
    write_public_key(generate_private_key(), world.keys_dir / "hospital-b.pub")
    result = _verify(world)
    b_lines = {f.line for f in _errors(result) if f.site == "hospital-b" and f.field == "key_id"
               and f.source == "server copy"}
    assert b_lines == {2, 4, 6}
    assert result.sites["hospital-a"].ok and not result.sites["hospital-b"].ok


def test_unenrolled_site_is_an_error(world: World) -> None:
    (world.keys_dir / "hospital-a.pub").unlink()
    result = _verify(world, with_sites=False)
    assert any(f.site == "hospital-a" and "not enrolled" in f.message for f in _errors(result))


# ---------------------------------------------------------------------------------------------- site ledger


def test_site_ledger_edited_field_breaks_signature_and_chain(world: World) -> None:
    path = world.site_ledgers["hospital-a"]
    recs = _lines(path)
    recs[2]["steps"] = 2  # line 3: run-1 round 1 reservation now claims 2 steps instead of 20
    _write(path, recs)
    result = _verify(world)
    _has(result, site="hospital-a", line=3, field="sig", source=str(path))
    _has(result, site="hospital-a", line=4, field="prev", source=str(path))


def test_site_ledger_dropped_reservation(world: World) -> None:
    path = world.site_ledgers["hospital-a"]
    recs = _lines(path)
    del recs[2]  # run-1 round 1 reservation: its charge vanishes from the lifetime history
    _write(path, recs)
    result = _verify(world)
    _has(result, site="hospital-a", line=3, field="seq", source=str(path))
    _has(result, site="hospital-a", line=3, field="prev", source=str(path))


def test_site_ledger_swapped_lines(world: World) -> None:
    path = world.site_ledgers["hospital-b"]
    recs = _lines(path)
    recs[1], recs[2] = recs[2], recs[1]
    _write(path, recs)
    result = _verify(world)
    _has(result, site="hospital-b", line=2, field="seq", source=str(path))


def test_site_ledger_appended_record_signed_by_another_key(world: World) -> None:
    path = world.site_ledgers["hospital-b"]
    recs = _lines(path)
    from privacy.ledger import record_hash

    extra = dict(recs[-1], seq=len(recs), prev=record_hash(recs[-1]))
    recs.append(sign_record(extra, generate_private_key()))
    _write(path, recs)
    result = _verify(world)
    _has(result, site="hospital-b", line=len(recs), field="key_id", source=str(path))


# ---------------------------------------------------------------------------------------------- no false alarms


def test_honest_large_sample_rate_record_passes(tmp_path: Path) -> None:
    """A small hospital (100 patients, q=0.3): Opacus' exact RDP is ~2% below dp_accounting's looser RDP at
    fractional orders; the audit must not call that an under-count (it confirms with dp_accounting's PLD)."""
    from privacy.audit import google_epsilon

    keys = tmp_path / "keys"
    sites = make_sites(tmp_path, keys, {"small": 12.0}, patients=100, policy_extra={"noise_multiplier": [1.0, 10.0]})
    run = run_anchored(tmp_path, sites, keys, run_name="r1", rounds=1, min_sites=1, noise_multiplier=1.5,
                       clip_norm=1.0, sample_rate=0.3, local_steps=100)
    run_dir = run.run_dir
    rec = [r for r in _lines(run.site_ledgers[0]) if r["type"] == "round"][0]
    hist = ((1.5, 0.3, 100),)
    assert rec["epsilon_after"] < google_epsilon(hist, 1e-3, "rdp") * 0.99 - 0.01  # the situation is real
    assert rec["epsilon_after"] >= google_epsilon(hist, 1e-3, "pld")
    result = verify_run(run_dir, run.site_ledgers, keys)
    assert result.ok, result.text()
    assert result.sites["small"].points[0].independent_method == "dp_accounting PLD"
