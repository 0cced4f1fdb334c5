"""Ledger throughput: signed records appended per second, and verified per second.

Default: 10 sites x 1000 rounds (``--quick``: 3 x 100). Every round goes through the real site path —
``BudgetGuard.reserve`` (lifetime epsilon, write-ahead reservation, Ed25519-signed, fsynced) then
``BudgetGuard.complete`` (signed round record) — so each round appends two records. Then the server side:
``ConsortiumLedger.accept`` (signature check + fsynced append) of every round record and the round's signed
digest (``server.outputs.RunOutputs.digest``), an offline verification of
every record in every file (signature + hash chain), and the full ``atoll audit verify`` over the run (signatures,
chains, cross-check, epsilon recomputed with Opacus and dp_accounting).

Headline keys: ``append_per_s`` (records appended+signed+fsynced per second, site side, including the guard's
accounting) and ``verify_per_s`` (records whose signature and chain link were verified per second).
Prints one JSON object on the last line and writes bench/results/ledger.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from privacy.audit import verify_run  # noqa: E402
from contract import Mechanism  # noqa: E402
from privacy.guard import BudgetGuard, RoundRequest  # noqa: E402
from privacy.keys import generate_private_key, write_public_key  # noqa: E402
from privacy.ledger import GENESIS, SiteLedger, read_jsonl, record_hash, verify_record  # noqa: E402
from privacy.policy import SitePolicy  # noqa: E402

RUN_ID = "bench-run"
# sigma 1, q 0.01, 10 steps per round: 1000 rounds (10k steps) stay inside the budget below.
POLICY = SitePolicy.from_table({"max_epsilon": 50.0, "noise_multiplier": [0.5, 10.0], "local_steps": [1, 100]})


def _hex(i: int, salt: str) -> str:
    import hashlib

    return hashlib.sha256(f"{salt}{i}".encode()).hexdigest()


def run(sites: int, rounds: int, workdir: Path) -> dict:
    run_dir = workdir / "runs" / RUN_ID
    keys_dir = run_dir / "keys"
    keys_dir.mkdir(parents=True)
    guards, pubs = {}, {}
    for s in range(sites):
        name = f"site-{s:02d}"
        key = generate_private_key()
        write_public_key(key, keys_dir / f"{name}.pub")
        pubs[name] = key.public_key()
        ledger = SiteLedger(workdir / "sites" / name / "ledger.jsonl", site=name, signing_key=key)
        guards[name] = BudgetGuard(ledger, POLICY, num_patients=500)

    # --- site side (reserve + complete, round-robin over sites like a real run) and server side
    # (ConsortiumLedger.accept, then the round's signed digest, as server.app does), timed separately
    from flwr.app import ArrayRecord
    import torch

    from server.outputs import RunOutputs
    from server.settings import RunSettings
    from server.sitebook import RoundBook

    settings = RunSettings(num_server_rounds=rounds, run_dir=str(workdir / "runs"), run_name=RUN_ID, keys_dir=str(keys_dir), min_sites=1, mechanism=Mechanism(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.01, steps=10))
    out = RunOutputs.create(workdir / "runs", RUN_ID, settings)
    weights = ArrayRecord({"w": torch.zeros(4)})
    prev = out.digest(0, weights, [])
    cons = out.ledger
    t_append = t_accept = 0.0
    n_accepted = 0
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        recs = []
        for name, guard in guards.items():
            req = RoundRequest(RUN_ID, r, Mechanism(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.01, steps=10))
            res = guard.reserve(req, weights_in_sha256=_hex(r, "w"))
            recs.append((name, guard.complete(res, update_sha256=_hex(r, name), num_examples=100,
                                              server_prev_digest=prev)))
        t_append += time.perf_counter() - t0
        t0 = time.perf_counter()
        book = RoundBook(r, cons)
        for name, rec in recs:
            wired = json.loads(json.dumps(rec))  # as received over the wire
            cons.accept(wired, site=name)
            book.accepted_records.append(wired)
        prev = out.digest(r, weights, book.accepted_records)
        t_accept += time.perf_counter() - t0
        n_accepted += len(recs)
    out.history = [{"round": r, "sites": {n: {"status": "contributed"} for n in guards}} for r in range(1, rounds + 1)]
    (out.root / "history.json").write_text(json.dumps(out.history))
    out.finish("completed")
    appended = 2 * sites * rounds

    # --- offline verification of every record on disk: signature + hash chain (what the auditor does first)
    files = [(f"site-{s:02d}", workdir / "sites" / f"site-{s:02d}" / "ledger.jsonl") for s in range(sites)]
    t0 = time.perf_counter()
    verified = 0
    for name, path in files:
        prev = GENESIS
        for _line, rec, _raw in read_jsonl(path):
            assert rec is not None and rec["prev"] == prev
            verify_record(rec, pubs[name])
            prev = record_hash(rec)
            verified += 1
    for _line, rec, _raw in read_jsonl(run_dir / "ledger.jsonl"):
        verify_record(rec, pubs[rec["site"]])
        verified += 1
    t_verify = time.perf_counter() - t0

    # --- the full audit (signatures, chains, cross-check, epsilon with Opacus + dp_accounting)
    t0 = time.perf_counter()
    result = verify_run(run_dir, [p for _, p in files], keys_dir)
    t_audit = time.perf_counter() - t0
    audited = verified
    if not result.ok:
        raise SystemExit("bench ledger failed the audit:\n" + result.text())

    last_eps = max(g.spent() for g in guards.values())
    return {
        "append_per_s": round(appended / t_append, 1),
        "verify_per_s": round(verified / t_verify, 1),
        "accept_per_s": round(n_accepted / t_accept, 1),
        "audit_records_per_s": round(audited / t_audit, 1),
        "guarded_rounds_per_s": round(sites * rounds / t_append, 1),
        "sites": sites,
        "rounds": rounds,
        "records_appended": appended,
        "records_verified": verified,
        "seconds": {"append": round(t_append, 3), "accept": round(t_accept, 3), "verify": round(t_verify, 3),
                    "audit": round(t_audit, 3)},
        "final_epsilon": round(last_eps, 4),
        "notes": "append = BudgetGuard.reserve+complete (lifetime epsilon via Opacus RDP, Ed25519 sign, "
                 "write+fsync per record); verify = Ed25519 verify + chain link per record; accept = "
                 "ConsortiumLedger.accept (verify + fsync append); audit = privacy.audit.verify_run end to end",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 sites x 100 rounds")
    ap.add_argument("--sites", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    sites = args.sites or (3 if args.quick else 10)
    rounds = args.rounds or (100 if args.quick else 1000)
    warnings.filterwarnings("ignore", module="opacus")  # "optimal order is the largest alpha" chatter
    with tempfile.TemporaryDirectory(prefix="atoll-bench-ledger-") as tmp:
        out = run(sites, rounds, Path(tmp))
    out["quick"] = bool(args.quick)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "ledger.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
