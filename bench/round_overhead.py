"""Round overhead: the non-training share of a federated round, for Atoll and for plain Flower on the same work,
in Flower's simulation engine and in a deployment (SuperLink + SuperNode processes on 127.0.0.1).

    python bench/round_overhead.py [--quick] [--engine simulation|deployment|both]

What is measured, per round after the first (round 1 pays start-up and each site's first data load):

* round wall = from the end of the previous round to the end of this one, as the ServerApp records it — sending the
  weights, the sites' training, their replies, the server's checks and aggregation, the federated evaluation at
  every site and the checkpoint are all inside;
* training = the time at least one site was inside ``privacy.dpsgd.train_local`` (the union of the sites'
  training intervals: sites that queue for cores add up, sites that run at once overlap — the critical path of
  the sites' own training, whatever the scheduling);
* ``non_training_share = 1 - training / wall`` and ``wall_per_training = wall / training``.

The two apps do the same work: the 3 demo hospitals, the same model, the same DP-SGD local steps (Atoll's
``train_local`` with the same Mechanism), the same evaluation each round and a checkpoint each round. Atoll is the
real ServerApp/ClientApp (approval, budget guard, signed ledger, egress guard, update validation, signed digests);
the baseline is a plain Flower ``FedAvg`` app (bench/plain_flower_app.py). Timing marks come from a
``sitecustomize`` hook in every process of a run (bench/round_timing.py); product code is not instrumented.

Headline ``ratio`` = Atoll's wall_per_training ÷ plain Flower's, the worse of the engines measured (1.0: Atoll's
orchestration costs nothing beyond Flower's). Prints one JSON object with the conditions (load, threads) and writes
``bench/results/round_overhead.json``. Each (app, engine) run is its own child process, one after another.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.conditions import conditions  # noqa: E402
from bench.round_timing import ENV as TIMING_ENV  # noqa: E402
from bench.round_timing import round_cycles, write_sitecustomize  # noqa: E402

APPS = ("atoll", "plain")
ENGINES = ("simulation", "deployment")


def _settings(work: Path, engine: str, rounds: int, steps: int):
    from contract import Mechanism
    from server.settings import RunSettings

    return RunSettings(num_server_rounds=rounds, run_dir=str(work / "runs"), run_name=f"bench-{engine}",
                       keys_dir=str(work / "consortium" / "keys"), mechanism=Mechanism(steps=steps), num_sites=3)


def child(app: str, engine: str, work: Path, rounds: int, steps: int) -> None:
    """One run of one app on one engine (in its own process, with the timing hook installed by sitecustomize)."""
    from atoll.demo import approve_run, simulate
    from atoll.localnet import LocalConsortium

    configs = json.loads((work / "configs.json").read_text())
    configs = [Path(c) for c in configs]
    settings = _settings(work, engine, rounds, steps)
    if app == "atoll":
        approve_run(configs, settings)
        if engine == "simulation":
            simulate(settings, configs)
        else:
            with LocalConsortium(REPO, configs, insecure=True, workdir=work / f"net-{app}") as net:
                status = net.wait(net.submit(settings.to_run_config()), timeout=3600)
                if status != "finished:completed":
                    raise SystemExit(f"atoll deployment run ended {status}:\n{net.tail('superlink')}")
        return
    from bench import plain_flower_app as plain

    conf = work / f"plain-{engine}.json"
    conf.write_text(json.dumps({"rounds": rounds, "mechanism": dataclasses.asdict(settings.mechanism),
                                "lr": settings.lr, "out_dir": str(work / f"plain-{engine}-out"),
                                "num_sites": len(configs), "model": settings.model}))
    if engine == "simulation":
        from client.runtime import SIM_SITE_CONFIGS_ENV

        os.environ[plain.ENV] = str(conf)
        os.environ[SIM_SITE_CONFIGS_ENV] = os.pathsep.join(str(c) for c in configs)
        from atoll import simulation  # the resources atoll.demo.simulate gives the sites: same actors and threads

        simulation.run_sites(plain.server, plain.client, len(configs))
    else:
        app_dir = plain.write_app_dir(work / "plain-app")
        with LocalConsortium(app_dir, configs, insecure=True, workdir=work / f"net-{app}") as net:
            status = net.wait(net.submit({"bench-config": str(conf)}), timeout=3600)
            if status != "finished:completed":
                raise SystemExit(f"plain deployment run ended {status}:\n{net.tail('superlink')}")


def prepare(work: Path) -> list[Path]:
    """The demo consortium, its keys, and every site's data ingested and cached before any run is timed."""
    from atoll.demo import ingest_sites, prepare_site_keys
    from atoll.demo_data import HOSPITALS, generate_consortium

    generate_consortium(work)
    names = [h.name for h in HOSPITALS]
    configs = [work / n / "site.toml" for n in names]
    prepare_site_keys(work, names)
    ingest_sites(configs, 28)
    (work / "configs.json").write_text(json.dumps([str(c) for c in configs]))
    return configs


def summarise(cycles: list[dict]) -> dict:
    return {"wall_s": round(statistics.median(c["wall_s"] for c in cycles), 3),
            "training_s": round(statistics.median(c["training_s"] for c in cycles), 3),
            "non_training_share": round(statistics.median(c["non_training_share"] for c in cycles), 4),
            "wall_per_training": round(statistics.median(c["wall_per_training"] for c in cycles), 4),
            "per_round": cycles}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 10 steps instead of 5 rounds of 40")
    ap.add_argument("--engine", choices=(*ENGINES, "both"), default="both")
    ap.add_argument("--child", nargs=2, metavar=("APP", "ENGINE"), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    steps = args.steps or (10 if args.quick else 40)
    if args.child:
        child(args.child[0], args.child[1], args.work, rounds, steps)
        return {}

    before = conditions()
    print(f"round_overhead: {rounds} rounds of {steps} DP steps, 3 sites; conditions {before}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="atoll-bench-overhead-"))
    prepare(work)
    hook = write_sitecustomize(work / "timing-hook")
    engines = ENGINES if args.engine == "both" else (args.engine,)
    results: dict[str, dict] = {}
    for engine in engines:
        for app in APPS:  # the same consortium, one run after the other
            timing = work / f"timing-{app}-{engine}.jsonl"
            env = dict(os.environ, **{TIMING_ENV: str(timing)})
            env["PYTHONPATH"] = os.pathsep.join([str(hook), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", app, engine, "--work",
                                   str(work), "--rounds", str(rounds), "--steps", str(steps)], env=env,
                                  capture_output=True, text=True)
            took = time.perf_counter() - t
            if proc.returncode != 0:
                raise SystemExit(f"{app} on {engine} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            cycles = round_cycles(timing)
            if not cycles:
                raise SystemExit(f"{app} on {engine}: no round marks in {timing} (is the timing hook installed?)\n"
                                 f"{proc.stderr[-3000:]}")
            results[f"{app}_{engine}"] = {**summarise(cycles), "run_seconds": round(took, 1)}
            print(f"round_overhead: {app} on {engine}: {results[f'{app}_{engine}']['non_training_share']:.1%} "
                  f"of a round is not training ({took:.0f} s)", file=sys.stderr)
    ratios = {e: round(results[f"atoll_{e}"]["wall_per_training"] / results[f"plain_{e}"]["wall_per_training"], 4)
              for e in engines}
    result = {
        "bench": "round_overhead",
        "ratio": max(ratios.values()),
        **{f"ratio_{e}": r for e, r in ratios.items()},
        **{f"non_training_share_{k}": v["non_training_share"] for k, v in results.items()},
        "sites": 3, "rounds": rounds, "local_steps": steps, "engines": list(engines),
        "runs": results,
        "definition": "per round r >= 2: wall = end of round r-1 to end of round r (ServerApp's record, after "
                      "evaluation and checkpoint); training = union of the sites' train_local intervals in it; "
                      "ratio = Atoll wall/training ÷ plain Flower wall/training (median over rounds), worst engine",
        "conditions_start": before, "conditions_end": conditions(), "quick": args.quick,
    }
    out = REPO / "bench" / "results" / "round_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
