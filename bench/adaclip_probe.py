"""Adaptive clipping (Andrew et al. 2021) vs fixed clipping on the demo consortium, same (σ, q, steps), same ε.

Atoll's real simulation (atoll.demo: approve_run, simulate, evaluate_heldout, as bench/utility.py runs it) on the
three demo hospitals, held-out PneumoniaMNIST test split (ACC at threshold 0.5, AUC). Arms per ε (3 and 8; σ
calibrated with Opacus' RDP accountant for the site with the most patients, as bench/utility.py does):

- fixed C 4 (the recipe's default);
- adaptive, target unclipped quantile 0.5, clip-lr 0.2, count noise σ_b = 2σ (σ_z = 1.033σ), starting C 4;
- the same, starting C 0.5.

Every arm charges the same (σ, q, steps), so each ε is the same for all three (the probe checks it on the sites'
ledgers). No hyperparameter is chosen on the test split: the arms are fixed in advance.

    python bench/adaclip_probe.py [--quick] [--seeds N]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 50 local steps, 1 seed")
    ap.add_argument("--seeds", type=int, default=None, help="runs per arm (default 2; 1 with --quick)")
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
    seeds = args.seeds or (1 if args.quick else 2)
    q = recipe.mechanism.sample_rate
    work = Path(tempfile.mkdtemp(prefix="atoll-bench-adaclip-"))
    generate_consortium(work)
    names = [h.name for h in HOSPITALS]
    keys = prepare_site_keys(work, names)
    datasets = [build_site_dataset(load_site_config(work / n / "site.toml")) for n in names]
    patients = {n: d.train.num_patients for n, d in zip(names, datasets)}
    delta = 1.0 / (10 * max(patients.values()))
    base = dict(num_server_rounds=rounds, lr=recipe.lr, num_sites=3, keys_dir=str(keys), run_name="p")
    rows = []
    t_all = time.perf_counter()
    for eps in (3.0, 8.0):
        sigma = float(get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q,
                                           steps=rounds * steps, accountant="rdp"))
        fixed = dataclasses.replace(recipe.mechanism, steps=steps, noise_multiplier=sigma, clip_norm=4.0)
        ada = dict(adaptive_clip=True, target_unclipped_quantile=0.5, clip_lr=0.2, count_noise=2 * sigma)
        arms = {"fixed C 4": fixed,
                "adaptive from C 4": dataclasses.replace(fixed, **ada),
                "adaptive from C 0.5": dataclasses.replace(fixed, clip_norm=0.5, **ada)}
        for label, mech in arms.items():
            runs = []
            for seed in range(seeds):
                tag = f"{eps:g}-{label.replace(' ', '_')}-{seed}"
                settings = RunSettings(run_dir=str(work / f"runs-{tag}"), seed=seed, mechanism=mech, **base)
                site_root = work / f"sites-{tag}"
                for n in names:
                    shutil.copytree(work / n, site_root / n,
                                    ignore=shutil.ignore_patterns("ledger.jsonl", "approvals.jsonl"))
                cfgs = [site_root / n / "site.toml" for n in names]
                approve_run(cfgs, settings)
                t0 = time.perf_counter()
                outputs = simulate(settings, cfgs)
                test = evaluate_heldout(work, settings, outputs)[-1]
                last = outputs.history[-1]["sites"]
                runs.append({"seed": seed, "test_accuracy": test["test_accuracy"], "test_auc": test["test_auc"],
                             "epsilon_spent": {n: s.get("epsilon") for n, s in last.items()},
                             "seconds": round(time.perf_counter() - t0, 1)})
                print(f"eps={eps:g} {label} seed {seed}: {runs[-1]}", flush=True)
            rows.append({"epsilon_target": eps, "arm": label, "noise_multiplier": round(sigma, 4),
                         "gradient_noise_multiplier": round(mech.gradient_noise(), 4),
                         "count_noise": mech.count_noise if mech.adaptive_clip else None,
                         "test_accuracy": statistics.fmean(r["test_accuracy"] for r in runs),
                         "test_auc": statistics.fmean(r["test_auc"] for r in runs), "runs": runs})
    result = {
        "bench": "adaclip_probe", "quick": args.quick, "seeds": seeds, "rounds": rounds, "local_steps": steps,
        "sample_rate": q, "delta_calibration": f"1/(10 x {max(patients.values())} patients)", "patients": patients,
        "conditions": {"load_avg_1m": os.getloadavg()[0], "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - t_all, 1), "results": rows,
    }
    dest = REPO / "bench" / "results" / "adaclip_probe.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
