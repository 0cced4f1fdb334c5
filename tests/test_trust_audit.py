"""Issue 12, items 1-2: an audit that a consistent lie or a cut at the end of history can no longer fool.

The attacker here is the strongest the issue describes: a site that re-signs its own records with its own key in
its ledger *and* in the server's copy, helped by a server that re-signs its round digests with the consortium key
(collusion). Every record stays signed, chained and self-consistent (epsilon recomputed from the forged numbers),
so signatures and recomputation alone pass; what must catch it is the run's own settings (what was asked), the
record's delta basis, and the other traces of the run (history.json, weights, status.json, countersignatures).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from anchored_run import AnchoredRun, make_sites, run_anchored
from privacy.accounting import canonical_history, compute_epsilon
from privacy.audit import verify_run
from privacy.guard import history_json
from privacy.ledger import canonical_json, record_hash, sign_record

SITES = {"hospital-a": 10.0, "hospital-b": 8.0}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> AnchoredRun:
    root = tmp_path_factory.mktemp("anchored")
    keys = root / "consortium" / "keys"
    return run_anchored(root, make_sites(root, keys, SITES), keys)


@pytest.fixture()
def run(pristine: AnchoredRun, tmp_path: Path) -> AnchoredRun:
    root = tmp_path / "c"
    shutil.copytree(pristine.root, root)
    settings = type(pristine.settings)(**{**pristine.settings.__dict__, "run_dir": str(root / "runs"),
                                          "keys_dir": str(root / "consortium" / "keys")})
    sites = {n: type(s)(n, root / n / "keys" / "site_ed25519.pem", root / n / "state" / "ledger.jsonl", s.guard,
                        s.patients) for n, s in pristine.sites.items()}
    return AnchoredRun(root, root / "consortium" / "keys", settings, sites)


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _write(path: Path, records: list[dict]) -> None:
    path.write_bytes(b"".join(canonical_json(r) + b"\n" for r in records))


def _verify(run: AnchoredRun, *, with_sites: bool = True):
    return verify_run(run.run_dir, run.site_ledgers if with_sites else [], run.keys_dir)


def _errors(result) -> list[str]:
    return [str(f) for f in result.errors]


def _rechain_site(run: AnchoredRun, site: str, records: list[dict], start: int) -> list[dict]:
    """Re-sign and re-chain a site's ledger from ``start`` with the site's own key (it can always do that)."""
    key = run.sites[site].key
    for j in range(start, len(records)):
        r = {k: v for k, v in records[j].items() if k != "sig"}
        r["prev"] = record_hash(records[j - 1]) if j else "0" * 64
        if r["type"] == "round":
            rsv = records[r["reservation_seq"]]
            r["reservation_sha256"] = record_hash(rsv)
        records[j] = sign_record(r, key)
    return records


def _collude(run: AnchoredRun, site: str, rounds: int | tuple[int, ...], change) -> dict:
    """The site rewrites its reservations and round records of ``rounds`` of this run self-consistently:
    ``change`` edits them, every history and epsilon from there on is recomputed from the forged mechanism and
    delta, the site re-signs its ledger, the server copy gets the new records, and the server re-signs its digests.
    Returns the forged round record of the last round changed."""
    rounds = (rounds,) if isinstance(rounds, int) else tuple(rounds)
    path = run.sites[site].ledger_path
    recs = _read(path)
    first = None
    charges: list[tuple] = []
    for i, r in enumerate(recs):
        target = r["run_id"] == run.settings.run_name and r["server_round"] in rounds
        if target:
            change(r)
            r["charge"] = [r["noise_multiplier"], r["sample_rate"], r["steps"]]
            first = i if first is None else first
        if r["type"] == "reservation":
            charges.append(tuple(r["charge"]))
        if first is not None:
            before = list(charges)
            before.remove(tuple(r["charge"]))  # a reservation's own charge, or the one its round completes
            hist = list(canonical_history(charges))
            r["history"] = history_json(hist)
            r["epsilon_before"] = compute_epsilon(before, r["delta"], r["accountant"])
            r["epsilon_after"] = compute_epsilon(hist, r["delta"], r["accountant"])
    assert first is not None
    recs = _rechain_site(run, site, recs, first)
    _write(path, recs)
    forged = {r["seq"]: r for r in recs[first:] if r["type"] == "round"}
    server = run.run_dir / "ledger.jsonl"
    _write(server, [forged.get(r["seq"], r) if r["site"] == site else r for r in _read(server)])
    _resign_digests(run, lambda d: [dict(a, record_sha256=record_hash(forged[a["seq"]]))
                                    if a["site"] == site and a["seq"] in forged else a for a in d["accepted"]],
                    countersign=site)
    return max(forged.values(), key=lambda r: r["seq"])


def _resign_digests(run: AnchoredRun, accepted=None, *, keep: int | None = None,
                    countersign: str | None = None) -> None:
    """The server rewrites its digest chain (optionally cut to ``keep`` digests) and re-signs it: collusion.

    ``countersign``: the colluding site, which also re-signs its later records' countersignatures of the new
    digests (an honest site's countersignature of a rewritten digest stays broken, as it would be)."""
    path = run.run_dir / "digests.jsonl"
    ds = _read(path)[:keep]
    key = run.consortium_key
    if accepted is not None:
        for d in ds:
            d["accepted"] = accepted(d)
    for j, d in enumerate(ds):
        d = {k: v for k, v in d.items() if k != "sig"}
        d["prev"] = record_hash(ds[j - 1]) if j else "0" * 64
        ds[j] = sign_record(d, key)
        if countersign is not None and j + 1 < len(ds):
            _countersign(run, countersign, j + 1, record_hash(ds[j]), ds)
    _write(path, ds)


def _countersign(run: AnchoredRun, site: str, rnd: int, digest: str, ds: list[dict]) -> None:
    """The colluding site re-signs its round-``rnd`` record over the rewritten digest (and everything after)."""
    path = run.sites[site].ledger_path
    recs = _read(path)
    i = next((j for j, r in enumerate(recs) if r["type"] == "round" and r["run_id"] == run.settings.run_name
              and r["server_round"] == rnd), None)
    if i is None or recs[i].get("server_prev_digest") == digest:
        return
    old = recs[i]
    recs[i]["server_prev_digest"] = digest
    recs = _rechain_site(run, site, recs, i)
    _write(path, recs)
    new = {r["seq"]: r for r in recs[i:] if r["type"] == "round"}
    server = run.run_dir / "ledger.jsonl"
    _write(server, [new.get(r["seq"], r) if r["site"] == site else r for r in _read(server)])
    for j in range(rnd, len(ds)):
        ds[j]["accepted"] = [dict(a, record_sha256=record_hash(new[a["seq"]])) if a["site"] == site
                             and a["seq"] in new else a for a in ds[j]["accepted"]]
    del old


def _cut_last_round(run: AnchoredRun, site: str) -> None:
    """Drop ``site``'s newest round (its reservation and round record) from its ledger and the server copy."""
    path = run.sites[site].ledger_path
    recs = _read(path)
    last_round = max(i for i, r in enumerate(recs) if r["type"] == "round")
    cut = recs[last_round]
    _write(path, recs[:cut["reservation_seq"]])
    server = run.run_dir / "ledger.jsonl"
    _write(server, [r for r in _read(server) if not (r["site"] == site and r["seq"] == cut["seq"])])


# ------------------------------------------------------------------------------------------------ clean run


def test_a_clean_anchored_run_passes(run: AnchoredRun) -> None:
    result = _verify(run)
    assert result.ok, result.text()
    assert "verdict: PASS (0 error(s), 0 warning(s))" in result.text()


# ------------------------------------------------------------------------------------------------ item 1


def test_consistent_lie_delta_half_fails(run: AnchoredRun) -> None:
    """δ = 0.5 re-signed in both copies (and the digest): ε recomputes to ~0 and used to PASS."""
    forged = _collude(run, "hospital-b", (1, 2, 3), lambda r: r.update(delta=0.5))
    assert forged["epsilon_after"] < 0.01  # the lie: "ε=0.0000 of 8, δ=5.00e-01"
    result = _verify(run)
    errors = _errors(result)
    assert not result.ok
    assert "hospital-b: FAIL — 3 round record(s), ε=0.0000 of 8, δ=5.00e-01" in result.text()
    assert any("server copy line 6 (site hospital-b, run run-1, round 3) field 'delta': δ=0.5 but the site's policy "
               "says auto: 1/(10 x 1500 patients) = 6.66667e-05" in e for e in errors), result.text()
    assert any("field 'delta': δ=0.5 is at least 1/patients" in e for e in errors), result.text()
    assert not any("field 'sig'" in e for e in errors)  # every signature holds: only the delta basis tells


def test_consistent_lie_sample_rate_divided_by_10_fails(run: AnchoredRun) -> None:
    _collude(run, "hospital-a", 3, lambda r: r.update(sample_rate=r["sample_rate"] / 10))
    result = _verify(run)
    errors = _errors(result)
    assert any("server copy line 5 (site hospital-a, run run-1, round 3) field 'sample_rate': 0.004 but the run "
               "asked 0.04 (settings.json)" in e for e in errors), result.text()
    assert not any("LOWER" in e for e in errors)  # the forged numbers are self-consistent


@pytest.mark.parametrize(("field", "change"), [
    ("noise_multiplier", lambda r: r.update(noise_multiplier=r["noise_multiplier"] * 3)),
    ("steps", lambda r: r.update(steps=3)),
    ("clip_norm", lambda r: r.update(clip_norm=0.1)),
])
def test_consistent_lie_on_any_mechanism_field_fails(run: AnchoredRun, field: str, change) -> None:
    _collude(run, "hospital-a", 3, change)
    result = _verify(run, with_sites=False)
    assert any(f.level == "error" and f.field == field and f.source == "server copy" and "the run asked" in f.message
               for f in result.findings), result.text()


def test_delta_changed_on_the_round_record_only_is_an_error(run: AnchoredRun) -> None:
    """The reservation keeps the policy's δ; the round record (what the server sees) says 10x more."""
    path = run.sites["hospital-a"].ledger_path
    recs = _read(path)
    i = max(j for j, r in enumerate(recs) if r["type"] == "round")
    recs[i]["delta"] = recs[i]["delta"] * 10
    recs[i]["epsilon_after"] = compute_epsilon([tuple(e) for e in recs[i]["history"]], recs[i]["delta"], "rdp")
    recs = _rechain_site(run, "hospital-a", recs, i)
    _write(path, recs)
    server = run.run_dir / "ledger.jsonl"
    _write(server, [recs[i] if (r["site"], r["seq"]) == ("hospital-a", recs[i]["seq"]) else r for r in _read(server)])
    _resign_digests(run, lambda d: [dict(a, record_sha256=record_hash(recs[i]))
                                    if (a["site"], a["seq"]) == ("hospital-a", recs[i]["seq"]) else a
                                    for a in d["accepted"]])
    result = _verify(run)
    delta_findings = [f for f in result.findings if f.field == "delta"]
    assert delta_findings and all(f.level == "error" for f in delta_findings), result.text()
    assert any("in the reservation" in f.message for f in delta_findings)


def test_patients_below_the_registered_card_is_an_error(run: AnchoredRun) -> None:
    """Claiming 10 patients makes the auto δ 1/100: consistent with itself, not with the site's dataset card."""
    _collude(run, "hospital-a", 3, lambda r: r.update(patients=10, delta=1 / 100))
    result = _verify(run)
    assert any(f.level == "error" and f.field == "patients" and "dataset card" in f.message
               for f in result.findings), result.text()


def test_settings_changed_after_the_run_fails(run: AnchoredRun) -> None:
    """Rewriting settings.json to match a lie breaks the digests' settings hash."""
    path = run.run_dir / "settings.json"
    settings = json.loads(path.read_text())
    settings["sample_rate"] = 0.004
    path.write_text(json.dumps(settings, indent=2))
    result = _verify(run)
    assert any("field 'settings_sha256'" in e for e in _errors(result)), result.text()


def test_a_run_without_settings_or_digests_fails(run: AnchoredRun) -> None:
    (run.run_dir / "settings.json").unlink()
    (run.run_dir / "digests.jsonl").unlink()
    errors = _errors(_verify(run))
    assert any(e.startswith("ERROR settings.json: missing") for e in errors), errors
    assert any(e.startswith("ERROR digests.jsonl: missing") for e in errors), errors


# ------------------------------------------------------------------------------------------------ item 2


def test_cutting_the_newest_round_from_both_copies_fails(run: AnchoredRun) -> None:
    _cut_last_round(run, "hospital-a")
    result = _verify(run)
    errors = _errors(result)
    assert not result.ok
    assert any("ERROR digests.jsonl line 4 (site hospital-a, run run-1, round 3) field 'accepted': round 3's signed "
               "digest names site 'hospital-a' record seq 5, which the server copy lacks" in e for e in errors), \
        result.text()
    assert any("which its own ledger does not hold" in e for e in errors), result.text()


def test_cutting_the_round_from_the_digests_too_is_caught_by_history_weights_and_status(run: AnchoredRun) -> None:
    """The server colludes: it also cuts and re-signs its digest chain. history.json, the saved weights, status.json
    and the honest site's record (now named in no digest) still show round 3."""
    _cut_last_round(run, "hospital-a")
    _resign_digests(run, keep=3)  # digests of rounds 0, 1, 2
    result = _verify(run)
    errors = _errors(result)
    assert any("history.json line 3 (run run-1, round 3): shows round 3" in e for e in errors), result.text()
    assert any("round-003.pt (run run-1, round 3): global weights of round 3 were saved" in e for e in errors)
    assert any("status.json field 'status': says completed, but the signed digests end at round 2 of 3" in e
               for e in errors)
    assert any("site hospital-b, run run-1, round 3): this record is named in none of the consortium's signed"
               in e for e in errors)


def test_a_record_that_does_not_countersign_the_previous_digest_fails(run: AnchoredRun) -> None:
    path = run.sites["hospital-b"].ledger_path
    recs = _read(path)
    i = max(j for j, r in enumerate(recs) if r["type"] == "round")
    recs[i]["server_prev_digest"] = "f" * 64  # a history the server never signed
    recs = _rechain_site(run, "hospital-b", recs, i)
    _write(path, recs)
    server = run.run_dir / "ledger.jsonl"
    _write(server, [recs[i] if (r["site"], r["seq"]) == ("hospital-b", recs[i]["seq"]) else r for r in _read(server)])
    _resign_digests(run, lambda d: [dict(a, record_sha256=record_hash(recs[i]))
                                    if (a["site"], a["seq"]) == ("hospital-b", recs[i]["seq"]) else a
                                    for a in d["accepted"]])
    errors = _errors(_verify(run))
    assert any("(site hospital-b, run run-1, round 3) field 'server_prev_digest': does not countersign the "
               "consortium's digest of round 2" in e for e in errors), errors


def test_digests_signed_by_another_key_fail(run: AnchoredRun) -> None:
    from privacy.keys import generate_private_key

    path = run.run_dir / "digests.jsonl"
    ds = _read(path)
    ds[-1] = sign_record(ds[-1], generate_private_key())
    _write(path, ds)
    errors = _errors(_verify(run))
    assert any("digests.jsonl line 4 (round 3) field 'sig'" in e for e in errors), errors


def test_replaced_weights_file_fails(run: AnchoredRun) -> None:
    import torch

    torch.save({"w": torch.zeros(2, 3), "b": torch.zeros(3)}, run.run_dir / "weights" / "round-002.pt")
    errors = _errors(_verify(run))
    assert any("round-002.pt (run run-1, round 2): hash" in e and "the saved model was replaced" in e
               for e in errors), errors
