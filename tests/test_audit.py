"""`atoll audit verify`: a clean run passes; every kind of tampering is detected with a precise message."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from anchored_run import make_sites, run_anchored
from privacy.audit import verify_run
from contract import Mechanism
from privacy.guard import BudgetRefused, RoundRequest
from privacy.keys import generate_private_key, load_private_key, public_key_pem
from privacy.ledger import canonical_json, sign_record

RUN = "run-1"
SITES = {"hospital-a": 10.0, "hospital-b": 8.0}


def make_consortium(root: Path, *, rounds: int = 3, accountant: str = "rdp", prior_run: bool = True) -> Path:
    """The demo's layout: DIR/runs/<run>/ledger.jsonl, DIR/<site>/state/ledger.jsonl, DIR/consortium/keys.

    Written by the real server outputs (settings, consortium ledger, signed round digests, weights, history,
    status: tests/anchored_run.py). hospital-a also has an earlier run on the same dataset (so epsilon spans
    runs) and one refusal. Returns the run folder.
    """
    keys = root / "consortium" / "keys"
    sites = make_sites(root, keys, SITES, accountant=accountant)
    if prior_run:
        run_anchored(root, {"hospital-a": sites["hospital-a"]}, keys, run_name="run-0", rounds=rounds, min_sites=1)
    run = run_anchored(root, sites, keys, run_name=RUN, rounds=rounds)
    if prior_run:
        with pytest.raises(BudgetRefused):
            sites["hospital-a"].guard.reserve(RoundRequest(RUN, 9, Mechanism(noise_multiplier=0.1, clip_norm=1.0, sample_rate=0.04, steps=30)), weights_in_sha256="0" * 64)
    return run.run_dir


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_consortium(tmp_path_factory.mktemp("audit"))


@pytest.fixture
def run_dir(pristine: Path, tmp_path: Path) -> Path:
    shutil.copytree(pristine.parent.parent, tmp_path / "c")
    return tmp_path / "c" / "runs" / RUN


def _site_ledgers(run_dir: Path) -> list[Path]:
    return [run_dir.parent.parent / s / "state" / "ledger.jsonl" for s in SITES]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def _errors(run_dir: Path, **kw) -> list[str]:
    res = verify_run(run_dir, kw.pop("site_ledgers", _site_ledgers(run_dir)), **kw)
    return [str(f) for f in res.errors]


def test_clean_run_passes_with_default_keys(run_dir: Path) -> None:
    res = verify_run(run_dir, _site_ledgers(run_dir))
    assert res.ok, res.text()
    assert res.keys_dir == str(run_dir.parent.parent / "consortium" / "keys")
    a = res.sites["hospital-a"]
    assert a.cross_checked and a.server_records == 3 and a.reservations == 6 and a.refusals == 1
    assert a.points[0].epsilon_before > 0  # the earlier run on the same dataset is included
    for p in a.points:
        assert p.opacus_epsilon == pytest.approx(p.epsilon_after, rel=1e-9)
        assert p.independent_epsilon == pytest.approx(p.epsilon_after, rel=0.01)
    assert "verdict: PASS" in res.text()


# (what is tampered, how, the exact expected finding) — each must be detected, naming source, line, site, run,
# round and field.
def _edit_server_field(run_dir: Path) -> None:
    p = run_dir / "ledger.jsonl"
    lines = _lines(p)
    rec = json.loads(lines[1])
    rec["epsilon_after"] = rec["epsilon_after"] / 2
    lines[1] = canonical_json(rec).decode()
    _write(p, lines)


def _edit_site_field(run_dir: Path) -> None:
    p = _site_ledgers(run_dir)[1]
    lines = _lines(p)
    lines[2] = lines[2].replace('"steps":30', '"steps":3')
    _write(p, lines)


def _drop_server(run_dir: Path) -> None:
    p = run_dir / "ledger.jsonl"
    lines = _lines(p)
    del lines[1]
    _write(p, lines)


def _drop_site(run_dir: Path) -> None:
    p = _site_ledgers(run_dir)[1]
    lines = _lines(p)
    del lines[2]
    _write(p, lines)


def _swap_server(run_dir: Path) -> None:
    p = run_dir / "ledger.jsonl"
    lines = _lines(p)
    lines[0], lines[2] = lines[2], lines[0]  # hospital-a round 1 <-> round 2 (the server copy interleaves sites)
    _write(p, lines)


def _swap_site(run_dir: Path) -> None:
    p = _site_ledgers(run_dir)[1]
    lines = _lines(p)
    lines[2], lines[3] = lines[3], lines[2]
    _write(p, lines)


def _append_foreign_signed(run_dir: Path) -> None:
    p = run_dir / "ledger.jsonl"
    lines = _lines(p)
    forged = json.loads(lines[-1])
    forged.update(seq=forged["seq"] + 2, server_round=4)
    lines.append(canonical_json(sign_record(forged, generate_private_key())).decode())
    _write(p, lines)


def _replace_public_key(run_dir: Path) -> None:
    (run_dir.parent.parent / "consortium" / "keys" / "hospital-b.pub").write_bytes(
        public_key_pem(generate_private_key()))


TAMPER = [
    ("edit one field (server copy)", _edit_server_field,
     ["ERROR server copy line 2 (site hospital-b, run run-1, round 1) field 'sig': signature does not verify",
      "ERROR server copy line 2 (site hospital-b, run run-1, round 1): this record is not in the site's own ledger",
      "ERROR server copy line 2 (site hospital-b, run run-1, round 1) field 'epsilon_after': recorded ε=",
      "ERROR server copy line 2 (site hospital-b, run run-1, round 1): is not the record (seq 1) round 1's signed "
      "digest accepted"]),
    ("edit one field (site ledger)", _edit_site_field,
     ["hospital-b/state/ledger.jsonl line 3 (site hospital-b, run run-1, round 2) field 'sig': signature does not",
      "hospital-b/state/ledger.jsonl line 4 (site hospital-b, run run-1, round 2) field 'prev': does not match",
      "hospital-b/state/ledger.jsonl line 4 (site hospital-b, run run-1, round 2) field 'steps': 3 in the res"]),
    ("drop a record (server copy)", _drop_server,
     ["hospital-b/state/ledger.jsonl line 2 (site hospital-b, run run-1, round 1): this round record of the run is "
      "missing from the server copy (dropped)",
      "ERROR digests.jsonl line 2 (site hospital-b, run run-1, round 1) field 'accepted': round 1's signed digest "
      "names site 'hospital-b' record seq 1, which the server copy lacks"]),
    ("drop a record (site ledger)", _drop_site,
     ["hospital-b/state/ledger.jsonl line 3 (site hospital-b, run run-1, round 2) field 'seq': seq is 3, expected 2",
      "hospital-b/state/ledger.jsonl line 3 (site hospital-b, run run-1, round 2) field 'history'"]),
    ("swap two records (server copy)", _swap_server,
     ["ERROR server copy line 3 (site hospital-a, run run-1, round 1) field 'seq': seq 7 does not follow seq 9",
      "ERROR server copy line 1 (site hospital-a, run run-1, round 2): records of this site are in a different order"]),
    ("swap two records (site ledger)", _swap_site,
     ["hospital-b/state/ledger.jsonl line 3 (site hospital-b, run run-1, round 2) field 'seq': seq is 3, expected 2",
      "hospital-b/state/ledger.jsonl line 4 (site hospital-b, run run-1, round 2) field 'seq': seq is 2, expected 3"]),
    ("append a record signed by another key", _append_foreign_signed,
     ["ERROR server copy line 7 (site hospital-b, run run-1, round 4) field 'key_id': record names key",
      "ERROR server copy line 7 (site hospital-b, run run-1, round 4): this record is not in the site's own ledger"]),
    ("replace a public key", _replace_public_key,
     ["ERROR server copy line 2 (site hospital-b, run run-1, round 1) field 'key_id': record names key",
      "hospital-b/state/ledger.jsonl line 1 (site hospital-b, run run-1, round 1) field 'key_id'"]),
]


@pytest.mark.parametrize(("name", "tamper", "expected"), TAMPER, ids=[t[0] for t in TAMPER])
def test_tampering_is_detected_precisely(run_dir: Path, name: str, tamper, expected: list[str]) -> None:
    tamper(run_dir)
    errors = _errors(run_dir)
    assert errors, f"{name}: not detected"
    for fragment in expected:
        assert any(fragment in e for e in errors), f"{name}: no finding containing {fragment!r} in:\n" + "\n".join(errors)


def _resign_last_server_record(run_dir: Path, change) -> None:
    """A site that signs a wrong number with its own, valid key (a bug or a lie): signatures hold, accounting not."""
    p = run_dir / "ledger.jsonl"
    lines = _lines(p)
    rec = json.loads(lines[-1])
    change(rec)
    key = load_private_key(run_dir.parent.parent / rec["site"] / "keys" / "site_ed25519.pem")
    lines[-1] = canonical_json(sign_record(rec, key)).decode()
    _write(p, lines)


def test_validly_signed_under_count_is_an_error(run_dir: Path) -> None:
    # x0.5: below even the tight PLD epsilon, so the independent check fires too (a 10% under-count of an RDP bound
    # that is still above dp_accounting's PLD is flagged by the Opacus recomputation only: see audit.py tolerances)
    _resign_last_server_record(run_dir, lambda r: r.update(epsilon_after=r["epsilon_after"] * 0.5))
    errors = _errors(run_dir, site_ledgers=[])
    assert any("server copy line 6 (site hospital-b, run run-1, round 3) field 'epsilon_after': recorded ε=" in e
               and "LOWER than Opacus rdp" in e for e in errors), errors
    assert any("LOWER than dp_accounting" in e and "recomputed independently" in e for e in errors), errors


def test_dropped_reservation_in_history_is_an_error(run_dir: Path) -> None:
    def shrink(r: dict) -> None:
        r["history"] = [[s, q, n - 30 if i == 0 else n] for i, (s, q, n) in enumerate(r["history"])]
    _resign_last_server_record(run_dir, shrink)
    errors = _errors(run_dir, site_ledgers=[])
    assert any("field 'history'" in e or "field 'epsilon_after'" in e for e in errors), errors


def test_over_budget_is_an_error(run_dir: Path) -> None:
    _resign_last_server_record(run_dir, lambda r: r.update(max_epsilon=0.5))
    errors = _errors(run_dir, site_ledgers=[])
    assert any("field 'epsilon_after'" in e and "over the site's declared budget max_epsilon=0.5" in e
               for e in errors), errors


def test_missing_keys_and_unenrolled_site(run_dir: Path, tmp_path: Path) -> None:
    shutil.rmtree(run_dir.parent.parent / "consortium")
    assert any("no enrolled site keys found" in e for e in _errors(run_dir))
    keys = tmp_path / "k"
    keys.mkdir()
    errors = _errors(run_dir, keys_dir=keys)
    assert any("site 'hospital-a' is not enrolled" in e for e in errors), errors


def _cli(argv: list[str]) -> argparse.Namespace:
    from privacy.cli import add_audit_parser

    parser = argparse.ArgumentParser(prog="atoll audit")
    add_audit_parser(parser.add_subparsers(dest="cmd"))
    return parser.parse_args(argv)


def test_cli_exit_codes_and_output(run_dir: Path, capsys) -> None:
    ledgers = [a for p in _site_ledgers(run_dir) for a in ("--site-ledger", str(p))]
    args = _cli(["verify", str(run_dir), *ledgers])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "hospital-a: OK" in out and "verdict: PASS (0 error(s)" in out
    _drop_server(run_dir)
    args = _cli(["verify", str(run_dir), *ledgers, "--keys", str(run_dir.parent.parent / "consortium" / "keys")])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "hospital-b: FAIL" in out and "verdict: FAIL" in out and "(dropped)" in out
    args = _cli(["verify", str(run_dir), "--json"])
    assert args.func(args) == 1  # without the site ledgers the consortium's signed round digests show the drop
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and any("which the server copy lacks" in f["message"] for f in result["findings"])


def test_prv_records_are_checked_against_google_pld(tmp_path: Path) -> None:
    run_dir = make_consortium(tmp_path, rounds=2, accountant="prv", prior_run=False)
    res = verify_run(run_dir, _site_ledgers(run_dir))
    assert res.ok, res.text()
    p = res.sites["hospital-b"].points[-1]
    assert p.accountant == "prv" and p.independent_method == "dp_accounting PLD"
    assert p.independent_epsilon <= p.epsilon_after * 1.01
