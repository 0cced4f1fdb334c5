"""Round overhead: how much of a federated round is not the slowest site's local training.

For 3 demo sites, in one run: round wall time (server: send -> all replies -> aggregated) against the
slowest site's local training time (reported by each site as `train_seconds`).
overhead = (round wall - slowest local training) / round wall. Round 1 also pays each site's data
loading (header index + preprocessing cache), so it is reported apart from the steady-state rounds.

    python bench/round_overhead.py [--quick] [--deployment]

--deployment uses real flower-superlink / flower-supernode processes on 127.0.0.1 (each message
then starts a fresh ClientApp process, as in production) instead of the simulation engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 20 steps instead of 5 rounds of 60")
    ap.add_argument("--deployment", action="store_true", help="SuperLink + SuperNode processes, not simulation")
    args = ap.parse_args()
    rounds, steps = (3, 20) if args.quick else (5, 60)

    from atoll.demo import approve_run, prepare_site_keys, simulate
    from atoll.demo_data import HOSPITALS, generate_consortium
    from contract import Mechanism
    from server.settings import RunSettings

    work = Path(tempfile.mkdtemp(prefix="atoll-bench-overhead-"))
    generate_consortium(work)
    names = [h.name for h in HOSPITALS]
    configs = [work / n / "site.toml" for n in names]
    keys = prepare_site_keys(work, names)
    settings = RunSettings(num_server_rounds=rounds, run_dir=str(work / "runs"), run_name="bench",
                           keys_dir=str(keys), mechanism=Mechanism(steps=steps), num_sites=3)
    approve_run(configs, settings)
    t0 = time.perf_counter()
    if args.deployment:
        from atoll.localnet import LocalConsortium

        with LocalConsortium(REPO, configs, insecure=True, workdir=work / "net") as net:
            net.wait(net.submit(settings.to_run_config()), timeout=1800)
        history = json.loads((work / "runs" / "bench" / "history.json").read_text())
    else:
        history = simulate(settings, configs).history
    total = time.perf_counter() - t0

    per_round = []
    for h in history:
        slowest = max(s["train"].get("train_seconds", 0.0) for s in h["sites"].values())
        wall = h["train_wall_seconds"]
        per_round.append({"round": h["round"], "round_wall_s": round(wall, 3), "slowest_train_s": round(slowest, 3),
                          "overhead": round((wall - slowest) / wall, 4)})
    steady = [r["overhead"] for r in per_round[1:]] or [per_round[0]["overhead"]]
    result = {
        "bench": "round_overhead",
        "engine": "deployment" if args.deployment else "simulation",
        "sites": 3, "rounds": rounds, "local_steps": steps,
        "overhead": round(statistics.mean(steady), 4),
        "overhead_first_round": per_round[0]["overhead"],
        "per_round": per_round,
        "total_seconds": round(total, 1),
        "definition": "(round wall - slowest site's local training) / round wall; headline = mean over rounds >= 2",
    }
    out = REPO / "bench" / "results" / "round_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
