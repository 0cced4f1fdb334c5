"""Site-side recipe options on the demo consortium: baseline vs augmentation multiplicity vs EMA of the iterates.

Atoll's real simulation (atoll.demo simulate / approve_run / evaluate_heldout, as bench/utility.py), DP-FedAvg
with the lead's default recipe, the noise multiplier calibrated with Opacus' RDP accountant so the site with the
most patients ends at the target epsilon (as bench/utility.py). Arms differ only by run-config keys
``augment-multiplicity`` / ``ema-decay``; both keep (sigma, q, steps), so every arm spends the same epsilon.

Choosing a value: only from the sites' VALIDATION metrics (released in the clear; the last round's val_auc as
the server aggregates it over the sites, then val_accuracy); the held-out TEST numbers are reported beside them,
never used to choose.
Each run of an arm trains on the sites' data and spends their budget like any run: this is a benchmark on the
synthetic demo hospitals, not a sweep to run on real site data.

    python bench/recipe_probe.py [--quick] [--repeats N] [--eps 3,8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: (label, augment-multiplicity, ema-decay)
ARMS = [("baseline", 1, 0.0), ("aug-k4", 4, 0.0), ("ema-0.9", 1, 0.9), ("ema-0.99", 1, 0.99)]


def _mean(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.fmean(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 50 local steps, 1 run per arm")
    ap.add_argument("--repeats", type=int, default=None, help="runs per arm (default 2; 1 with --quick)")
    ap.add_argument("--eps", default="3,8", help="comma-separated target epsilons (default 3,8)")
    ap.add_argument("--arms", default=",".join(a[0] for a in ARMS), help="comma-separated arm labels")
    args = ap.parse_args()

    import torch
    from opacus.accountants.utils import get_noise_multiplier

    from atoll.demo import approve_run, evaluate_heldout, prepare_site_keys, simulate
    from atoll.demo_data import HOSPITALS, generate_consortium
    from client.ingest import build_site_dataset
    from client.site_config import load_site_config
    from server.settings import RunSettings

    recipe = RunSettings()
    rounds, steps = (2, 50) if args.quick else (recipe.num_server_rounds, recipe.mechanism.steps)
    repeats = args.repeats or (1 if args.quick else 2)
    q = recipe.mechanism.sample_rate
    by_label = {a[0]: a for a in ARMS}
    arms = [by_label[name] for name in args.arms.split(",")]  # in the order asked
    epsilons = [float(e) for e in args.eps.split(",")]

    work = Path(tempfile.mkdtemp(prefix="atoll-bench-recipe-"))
    generate_consortium(work)
    names = [h.name for h in HOSPITALS]
    keys = prepare_site_keys(work, names)
    largest = max(build_site_dataset(load_site_config(work / n / "site.toml")).train.num_patients for n in names)
    delta = 1.0 / (10 * largest)
    conditions = {"load_1min": round(os.getloadavg()[0], 2), "torch_threads": torch.get_num_threads(),
                  "cpus": os.cpu_count(), "rounds": rounds, "local_steps": steps, "sample_rate": q,
                  "clip_norm": recipe.mechanism.clip_norm, "delta": f"1/(10 x {largest} patients)"}
    print(f"conditions: {conditions}", flush=True)
    results = []
    for eps in epsilons:
        sigma = float(get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q,
                                           steps=rounds * steps, accountant="rdp"))
        mechanism = dataclasses.replace(recipe.mechanism, steps=steps, noise_multiplier=sigma)
        for label, k, decay in arms:
            runs = []
            for r in range(repeats):
                tag = f"{label}-{eps}-{r}"
                settings = RunSettings(run_dir=str(work / f"runs-{tag}"), seed=r, mechanism=mechanism,
                                       num_server_rounds=rounds, num_sites=3, keys_dir=str(keys), run_name="p",
                                       augment_multiplicity=k, ema_decay=decay)
                site_root = work / f"sites-{tag}"
                for n in names:
                    shutil.copytree(work / n, site_root / n,
                                    ignore=shutil.ignore_patterns("ledger.jsonl", "approvals.jsonl"))
                cfgs = [site_root / n / "site.toml" for n in names]
                approve_run(cfgs, settings)
                t0 = time.perf_counter()
                outputs = simulate(settings, cfgs)
                seconds = time.perf_counter() - t0
                test = evaluate_heldout(work, settings, outputs)[-1]
                last = outputs.history[-1]["sites"]
                val = outputs.history[-1].get("aggregated", {})  # the sites' released val metrics, aggregated
                runs.append({
                    "val_auc": val.get("val_auc"), "val_accuracy": val.get("val_accuracy"),
                    "test_accuracy": test["test_accuracy"], "test_auc": test["test_auc"],
                    "epsilon_spent": {n: s.get("epsilon") for n, s in last.items()},
                    "seconds_per_round": round(seconds / rounds, 1)})
                print(f"eps={eps} {label} run {r}: {runs[-1]}", flush=True)
                partial = REPO / "bench" / "results" / "recipe_probe.partial.json"  # what a cut-short run leaves
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps({"conditions": conditions, "done": results, "current": {
                    "epsilon_target": eps, "arm": label, "runs": runs}}, indent=2))
            results.append({"epsilon_target": eps, "noise_multiplier": round(sigma, 3), "arm": label,
                            "augment_multiplicity": k, "ema_decay": decay,
                            **{m: _mean([run[m] for run in runs]) for m in
                               ("val_auc", "val_accuracy", "test_accuracy", "test_auc", "seconds_per_round")},
                            "runs": runs})
    chosen = {}
    for eps in epsilons:
        rows = [r for r in results if r["epsilon_target"] == eps]
        best = max(rows, key=lambda r: ((r["val_auc"] or 0.0), (r["val_accuracy"] or 0.0)))  # validation only
        chosen[str(eps)] = best["arm"]
    base = {r["epsilon_target"]: r for r in results if r["arm"] == "baseline"}
    result = {"bench": "recipe_probe", "quick": args.quick, "repeats": repeats, "conditions": conditions,
              "results": results, "chosen_by_validation": chosen,
              "load_1min_end": round(os.getloadavg()[0], 2),
              "acc_baseline_eps8": base.get(8.0, {}).get("test_accuracy"),
              "acc_chosen_eps8": next((r["test_accuracy"] for r in results
                                       if r["epsilon_target"] == 8.0 and r["arm"] == chosen.get("8.0")), None)}
    dest = REPO / "bench" / "results" / "recipe_probe.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
