"""Utility of Atoll's training on the PneumoniaMNIST test split: pooled vs FedAvg vs DP-FedAvg.

On the demo consortium (3 non-IID hospitals) and the official test split (624 images, 62.5 % pneumonia: a
model that always answers "pneumonia" scores ACC 0.625), every arm with ONE recipe — the lead's default run
settings (server.settings.RunSettings: AtollNet, SGD momentum 0.9 (privacy.dpsgd's default optimizer),
lr 0.05, 3 rounds x 100 local steps, DP patient sampling rate q 0.1, clip norm C 4):
- pooled: one non-DP model on all three hospitals' training data (the centralised reference): same network,
  optimizer, lr and minibatch as the non-DP sites, rounds x local steps x 3 steps;
- fedavg: Atoll's FedAvg over the 3 sites without DP (minibatches of batch-size images);
- dp-fedavg at epsilon 1, 3, 8: only the noise multiplier changes; it is calibrated with Opacus' RDP accountant
  so that the site with the most patients (smallest delta = 1/(10 x patients), hence the largest epsilon)
  ends the run at the target; the other sites land slightly below it.
Each arm runs ``--repeats`` times (fresh site state each time; the DP noise comes from OS entropy, so runs
differ) and the table reports the mean and every run. Evaluation: argmax of the softmax (threshold 0.5), no
tuning on the test split. Reference: MedMNIST v2 centralised ResNet-18 at 28 px, ACC 0.854 / AUC 0.944.

    python bench/utility.py [--quick] [--repeats N]
    python bench/utility.py --task hippocampus [--quick]   (3D segmentation: bench/utility_hippocampus.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REFERENCE = "MedMNIST v2 centralised ResNet-18 (28 px): ACC 0.854 / AUC 0.944"


def _summary(label: str, runs: list[dict], **extra) -> dict:
    acc = [r["test_accuracy"] for r in runs]
    auc = [r["test_auc"] for r in runs]
    return {"setting": label, **extra, "test_accuracy": statistics.fmean(acc), "test_auc": statistics.fmean(auc),
            "test_accuracy_runs": acc, "test_auc_runs": auc, "runs": runs}


def main() -> None:
    if "--task" in sys.argv[1:]:  # the 3D hippocampus arms live in their own module
        from bench.utility_hippocampus import main as hippocampus_main

        args = sys.argv[1:]
        i = args.index("--task")
        if args[i + 1:i + 2] != ["hippocampus"]:
            raise SystemExit("--task: only 'hippocampus' (the default, without --task, is the chest X-ray bench)")
        raise SystemExit(hippocampus_main(args))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 50 local steps, 1 run per arm")
    ap.add_argument("--repeats", type=int, default=None, help="runs per arm (default 3; 1 with --quick)")
    args = ap.parse_args()

    import torch
    from opacus.accountants.utils import get_noise_multiplier

    from atoll.demo import approve_run, evaluate_heldout, prepare_site_keys, simulate
    from atoll.demo_data import HOSPITALS, generate_consortium
    from client.evaluation import evaluate_model
    from client.ingest import build_site_dataset
    from client.site_config import load_site_config
    from models import build_model
    from privacy.dpsgd import DEFAULT_MOMENTUM, DEFAULT_OPTIMIZER, train_local
    from contract import Mechanism
    from server.settings import RunSettings

    recipe = RunSettings()
    rounds, steps = (2, 50) if args.quick else (recipe.num_server_rounds, recipe.mechanism.steps)
    repeats = args.repeats or (1 if args.quick else 3)
    q, lr = recipe.mechanism.sample_rate, recipe.lr
    recipe_mechanism = dataclasses.replace(recipe.mechanism, steps=steps)

    work = Path(tempfile.mkdtemp(prefix="atoll-bench-utility-"))
    generate_consortium(work)
    names = [h.name for h in HOSPITALS]
    configs = [work / n / "site.toml" for n in names]
    keys = prepare_site_keys(work, names)
    base = dict(num_server_rounds=rounds, lr=lr, num_sites=3, keys_dir=str(keys), run_name="u")
    results = []

    # Pooled, non-DP: same network and optimiser, all sites' training splits together.
    datasets = [build_site_dataset(load_site_config(c)) for c in configs]
    imgs = torch.cat([d.train.images for d in datasets])
    labels = torch.cat([d.train.labels for d in datasets])
    offset, pats = 0, []
    for d in datasets:
        pats.append(d.train.patients + offset)
        offset += d.train.num_patients
    pooled = dataclasses.make_dataclass("Pooled", ["images", "labels", "patients"])(imgs, labels, torch.cat(pats))
    heldout = build_site_dataset(load_site_config(work / "heldout-test" / "site.toml"))
    x = torch.cat([heldout.train.images, heldout.val.images])
    y = torch.cat([heldout.train.labels, heldout.val.labels])
    runs = []
    for r in range(repeats):
        torch.manual_seed(r)
        model = build_model(recipe.model)
        t0 = time.perf_counter()
        train_local(model, pooled, Mechanism(dp=False, steps=rounds * steps * 3), lr=lr, device="cpu",
                    batch_size=recipe.batch_size, seed=r)
        m = evaluate_model(model, x, y, torch.device("cpu"))
        runs.append({"test_accuracy": m["accuracy"], "test_auc": m["auc"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"pooled run {r}: {runs[-1]}", flush=True)
    results.append(_summary("pooled (non-DP)", runs, epsilon_target=None))

    largest = max(d.train.num_patients for d in datasets)
    delta = 1.0 / (10 * largest)
    for label, eps in [("fedavg (non-DP)", None), ("dp-fedavg", 1.0), ("dp-fedavg", 3.0), ("dp-fedavg", 8.0)]:
        sigma = None if eps is None else float(get_noise_multiplier(
            target_epsilon=eps, target_delta=delta, sample_rate=q, steps=rounds * steps, accountant="rdp"))
        runs = []
        for r in range(repeats):
            tag = f"{label.split()[0]}-{eps}-{r}"
            if eps is None:
                # A non-DP round makes a site's epsilon infinite: fresh site state for every arm and run.
                settings = RunSettings(run_dir=str(work / f"runs-{tag}"), seed=r,
                                       mechanism=dataclasses.replace(recipe_mechanism, dp=False), **base)
            else:
                settings = RunSettings(run_dir=str(work / f"runs-{tag}"), seed=r,
                                       mechanism=dataclasses.replace(recipe_mechanism, noise_multiplier=sigma), **base)
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
            runs.append({"test_accuracy": test["test_accuracy"], "test_auc": test["test_auc"],
                         "epsilon_spent": {n: s.get("epsilon") for n, s in last.items()},
                         "contributed": sorted(n for n, s in last.items() if s.get("status") == "contributed"),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{label} eps={eps} run {r}: {runs[-1]}", flush=True)
        results.append(_summary(label, runs, epsilon_target=eps,
                                noise_multiplier=None if sigma is None else round(sigma, 3)))

    by = {(r["setting"], r.get("epsilon_target")): r for r in results}
    result = {
        "bench": "utility", "quick": args.quick, "repeats": repeats,
        "recipe": {"model": recipe.model, "optimizer": DEFAULT_OPTIMIZER, "momentum": DEFAULT_MOMENTUM, "lr": lr,
                   "rounds": rounds, "local_steps": steps, "sample_rate": q, "clip_norm": clip,
                   "batch_size_non_dp": recipe.batch_size, "pooled_steps": rounds * steps * 3,
                   "delta_calibration": f"1/(10 x {largest} patients)"},
        "rounds": rounds, "local_steps": steps, "sample_rate": q,
        "reference": REFERENCE,
        "results": results,
        "acc_pooled": by[("pooled (non-DP)", None)]["test_accuracy"],
        "acc_fedavg": by[("fedavg (non-DP)", None)]["test_accuracy"],
        "acc_dp_eps8": by[("dp-fedavg", 8.0)]["test_accuracy"],
        "auc_pooled": by[("pooled (non-DP)", None)]["test_auc"],
        "auc_fedavg": by[("fedavg (non-DP)", None)]["test_auc"],
        "auc_dp_eps8": by[("dp-fedavg", 8.0)]["test_auc"],
    }
    dest = REPO / "bench" / "results" / "utility.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
