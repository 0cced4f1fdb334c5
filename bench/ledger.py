"""Ledger cost over a dataset's lifetime, and ledger throughput (site and server side).

Part 1, lifetime (``--rounds``, default 10,000; ``--quick``: 1,000): one signed site ledger, every round through the
real site path — ``BudgetGuard.reserve`` (lifetime epsilon, write-ahead reservation, Ed25519-signed, fdatasync) then
``BudgetGuard.complete`` (signed round record), two records a round. At rounds 100, 1,000 and 10,000 it reports the
per-round cost three ways, side by side:

* ``warm``: one long-lived guard (a simulation, or a SuperNode that keeps its process): median over the 50 rounds
  before the mark (and the lifetime mean, which includes the periodic full recomputations of the running state);
* ``cold``: a fresh guard per round, from the state file, with Opacus' per-mechanism RDP curve not cached (deployment:
  Flower starts a ClientApp process per message; interpreter start and imports are not counted), on copies of the
  ledger and state file as they were at each mark, interleaved across the marks so all share the same load;
  median of 7 (after one that may run the periodic full recomputation, which ``full_checks`` counts), also without
  the time inside fdatasync (``cold_excl_fsync_ms``: the part that could grow with the ledger);
* ``cold_no_state``: a fresh guard with the state file removed: it re-reads, re-verifies and re-scans the whole
  ledger (what every round cost before the running state); one round.

``fsync_share``: the time spent inside ``fdatasync``/``fsync`` over the warm window ÷ that window's time (measured
by timing every call, not assumed). ``growth`` (headline): cold per-round cost at the last mark ÷ at round 100
(1.0 = O(1) per round); ``growth_excl_fsync`` the same without the disk's sync time (less noisy under load).

Part 2, throughput (``--sites`` x ``--site-rounds``, default 10 x 100; ``--quick``: 3 x 50): sites round-robin as
in a run; then the server side: ``ConsortiumLedger.accept`` (signature check + durable append) of every round
record and the round's signed digest (``server.outputs.RunOutputs.digest``), an offline verification of every record
in every file (signature + hash chain), and the full ``atoll audit verify`` over the run (signatures, chains,
cross-check, epsilon recomputed with Opacus and dp_accounting). Keys ``append_per_s``, ``verify_per_s``,
``accept_per_s``, ``audit_records_per_s``.

Prints the conditions (load, threads), one JSON object on the last line, and writes bench/results/ledger.json.
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
# part 1: sigma 2, q 0.001, 5 steps a round: 10,000 rounds (50k steps) stay well inside the budget below
LIFETIME_POLICY = SitePolicy.from_table({"max_epsilon": 1000.0, "noise_multiplier": [0.5, 10.0],
                                         "local_steps": [1, 100]})
COLD_SAMPLES = 7
LIFETIME_MECHANISM = Mechanism(noise_multiplier=2.0, clip_norm=1.0, sample_rate=0.001, steps=5)
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
                 "write+fdatasync per record, running state file); verify = Ed25519 verify + chain link per record; accept = "
                 "ConsortiumLedger.accept (verify + fsync append); audit = privacy.audit.verify_run end to end",
    }


class _SyncTimer:
    """Times every ``os.fdatasync``/``os.fsync`` call of the process (the bench's own instrumentation)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._orig = {}

    def __enter__(self) -> "_SyncTimer":
        for name in ("fdatasync", "fsync"):
            fn = getattr(os, name, None)
            if fn is None:
                continue
            self._orig[name] = fn

            def timed(fd, _fn=fn):
                t0 = time.perf_counter()
                try:
                    return _fn(fd)
                finally:
                    self.seconds += time.perf_counter() - t0
                    self.calls += 1
            setattr(os, name, timed)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._orig.items():
            setattr(os, name, fn)


def _one_round(guard: BudgetGuard, r: int) -> None:
    req = RoundRequest(RUN_ID, r, LIFETIME_MECHANISM)
    res = guard.reserve(req, weights_in_sha256=_hex(r, "w"))
    guard.complete(res, update_sha256=_hex(r, "u"), num_examples=100)


def lifetime(rounds: int, workdir: Path) -> dict:
    """Per-round cost of one site's ledger at rounds 100, 1,000, 10,000 (those <= ``rounds``): see the module doc."""
    import shutil
    import statistics

    from privacy.accounting import _rdp_curve
    from privacy.ledger_state import StateFile

    key = generate_private_key()
    path = workdir / "lifetime" / "ledger.jsonl"

    def guard_on(p: Path) -> BudgetGuard:
        return BudgetGuard(SiteLedger(p, site="site-00", signing_key=key), LIFETIME_POLICY, num_patients=500)

    warm = guard_on(path)
    state_name = StateFile(warm.ledger).path.name
    full_checks = {"n": 0, "seconds": 0.0}
    orig_full = BudgetGuard._full_check

    def counted(self, txn, st):
        t0 = time.perf_counter()
        try:
            return orig_full(self, txn, st)
        finally:
            full_checks["n"] += 1
            full_checks["seconds"] += time.perf_counter() - t0
    BudgetGuard._full_check = counted  # type: ignore[method-assign]
    marks = [m for m in (100, 1000, 10_000) if m <= rounds]
    todo = list(marks)
    out: dict[str, dict] = {}
    snapshots: dict[int, Path] = {}
    per_round: list[float] = []
    r = 0
    try:
        with _SyncTimer() as sync:
            window_sync = 0.0
            while r < rounds:
                r += 1
                if todo and r == todo[0] - 49:
                    window_sync = sync.seconds
                t0 = time.perf_counter()
                _one_round(warm, r)
                per_round.append(time.perf_counter() - t0)
                if todo and r == todo[0]:
                    m = todo.pop(0)
                    window = per_round[-50:]
                    out[str(m)] = {"warm_ms": round(1e3 * statistics.median(window), 2),
                                   "warm_mean_ms_so_far": round(1e3 * statistics.fmean(per_round), 2),
                                   "fsync_share": round((sync.seconds - window_sync) / sum(window), 3),
                                   "records": warm.ledger.count}
                    snap = workdir / "snapshots" / str(m)
                    snap.mkdir(parents=True)
                    for f in (path, path.with_name(state_name)):
                        shutil.copy(f, snap / f.name)
                    snapshots[m] = snap
            total_sync, sync_calls = sync.seconds, sync.calls

            # cold rounds on copies of every mark's ledger, interleaved so that all marks share the same load
            cold: dict[int, list[float]] = {m: [] for m in marks}
            cold_cpu: dict[int, list[float]] = {m: [] for m in marks}

            def cold_round(m: int, *, keep_state: bool = True, rnd: int = 0) -> tuple[float, float]:
                scratch = workdir / "scratch"
                shutil.rmtree(scratch, ignore_errors=True)
                shutil.copytree(snapshots[m], scratch)
                if not keep_state:
                    (scratch / state_name).unlink()
                _rdp_curve.cache_clear()  # a new process has no per-mechanism RDP curve cached either
                guard = guard_on(scratch / path.name)
                s0, t0 = sync.seconds, time.perf_counter()
                _one_round(guard, rnd or m + 2)
                wall = time.perf_counter() - t0
                return wall, wall - (sync.seconds - s0)
            for m in marks:  # the first cold round after a mark may run the periodic full recomputation: once,
                cold_round(m, rnd=m + 1)  # then its result (one more round, the state file) is what later ones see
                shutil.rmtree(snapshots[m])
                shutil.copytree(workdir / "scratch", snapshots[m])
            for _ in range(COLD_SAMPLES):
                for m in marks:
                    wall, cpu = cold_round(m)
                    cold[m].append(wall)
                    cold_cpu[m].append(cpu)
            for m in marks:
                out[str(m)]["cold_ms"] = round(1e3 * statistics.median(cold[m]), 2)
                out[str(m)]["cold_excl_fsync_ms"] = round(1e3 * statistics.median(cold_cpu[m]), 2)
                out[str(m)]["cold_no_state_ms"] = round(1e3 * cold_round(m, keep_state=False)[0], 1)
    finally:
        BudgetGuard._full_check = orig_full  # type: ignore[method-assign]
    first, last = out[str(marks[0])], out[str(marks[-1])]
    return {"marks": out, "rounds": r, "records": warm.ledger.count,
            "growth": round(last["cold_ms"] / first["cold_ms"], 2),
            "growth_excl_fsync": round(last["cold_excl_fsync_ms"] / first["cold_excl_fsync_ms"], 2),
            "warm_growth": round(last["warm_ms"] / first["warm_ms"], 2),
            "fsync_share_lifetime": round(total_sync / sum(per_round), 3), "syncs": sync_calls,
            "full_checks": full_checks["n"], "full_check_seconds": round(full_checks["seconds"], 2),
            "final_epsilon": round(warm.spent(), 4)}


def _conditions() -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"load_1_5_15": [round(x, 2) for x in load], "cpus": os.cpu_count(), "torch_threads":
            torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} cpu, python "
            f"{platform.python_version()}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="lifetime to 1,000 rounds; throughput 3 sites x 50 rounds")
    ap.add_argument("--rounds", type=int, default=None, help="lifetime rounds of one site (default 10,000)")
    ap.add_argument("--sites", type=int, default=None, help="throughput part: sites (default 10)")
    ap.add_argument("--site-rounds", type=int, default=None, help="throughput part: rounds (default 100)")
    args = ap.parse_args(argv)
    rounds = args.rounds or (1000 if args.quick else 10_000)
    sites = args.sites or (3 if args.quick else 10)
    site_rounds = args.site_rounds or (50 if args.quick else 100)
    warnings.filterwarnings("ignore", module="opacus")  # "optimal order is the largest alpha" chatter
    before = _conditions()
    print(f"conditions: {json.dumps(before)}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="atoll-bench-ledger-") as tmp:
        life = lifetime(rounds, Path(tmp))
        out = run(sites, site_rounds, Path(tmp))
    out = {"growth": life["growth"], "growth_excl_fsync": life["growth_excl_fsync"],
           "ms_per_round_cold": {m: v["cold_ms"] for m, v in life["marks"].items()},
           "ms_per_round_warm": {m: v["warm_ms"] for m, v in life["marks"].items()},
           "ms_per_round_no_state": {m: v["cold_no_state_ms"] for m, v in life["marks"].items()},
           "fsync_share": life["fsync_share_lifetime"], "lifetime": life, **out,
           "conditions": {"before": before, "after": _conditions()}}
    out["quick"] = bool(args.quick)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "ledger.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
