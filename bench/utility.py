"""Utility of Atoll's training on the PneumoniaMNIST test split: pooled vs FedAvg vs DP-FedAvg.

In one run, on the demo consortium (3 non-IID hospitals) and the official test split:
- pooled: one non-DP model on all three hospitals' training data (the centralised reference);
- fedavg: Atoll's FedAvg over the 3 sites without DP;
- dp-fedavg at epsilon 1, 3, 8: the noise multiplier is calibrated with Opacus so that every site's
  lifetime epsilon after the run is the target (at the site's auto delta).
Reference: MedMNIST v2 centralised ResNet-18 at 28 px, ACC 0.854 / AUC 0.944.

    python bench/utility.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 30 steps instead of 3 rounds of 50")
    args = ap.parse_args()
    rounds, steps = (2, 30) if args.quick else (3, 50)

    import torch
    from opacus.accountants.utils import get_noise_multiplier

    from atoll.demo import approve_run, evaluate_heldout, prepare_site_keys, simulate
    from atoll.demo_data import HOSPITALS, generate_consortium
    from client.evaluation import evaluate_model
    from client.ingest import build_site_dataset
    from client.site_config import load_site_config
    from models import build_model
    from privacy.dpsgd import train_local
    from server.settings import RunSettings

    work = Path(tempfile.mkdtemp(prefix="atoll-bench-utility-"))
    generate_consortium(work)
    names = [h.name for h in HOSPITALS]
    configs = [work / n / "site.toml" for n in names]
    keys = prepare_site_keys(work, names)
    base = dict(local_steps=steps, lr=0.002, sample_rate=0.06, num_sites=3, keys_dir=str(keys))
    results = []

    # Pooled, non-DP: same network, same optimiser, all sites' training splits together.
    datasets = [build_site_dataset(load_site_config(c)) for c in configs]
    imgs = torch.cat([d.train.images for d in datasets])
    labels = torch.cat([d.train.labels for d in datasets])
    offset, pats = 0, []
    for d in datasets:
        pats.append(d.train.patients + offset)
        offset += d.train.num_patients
    pooled = dataclasses.make_dataclass("Pooled", ["images", "labels", "patients"])(imgs, labels, torch.cat(pats))
    torch.manual_seed(0)
    model = build_model("atollnet")
    t0 = time.perf_counter()
    train_local(model, pooled, steps=rounds * steps * 3, lr=0.002, device="cpu", dp=None, seed=0)
    heldout = build_site_dataset(load_site_config(work / "heldout-test" / "site.toml"))
    x = torch.cat([heldout.train.images, heldout.val.images])
    y = torch.cat([heldout.train.labels, heldout.val.labels])
    m = evaluate_model(model, x, y, torch.device("cpu"))
    results.append({"setting": "pooled (non-DP)", "epsilon": None, "test_accuracy": m["accuracy"],
                    "test_auc": m["auc"], "seconds": round(time.perf_counter() - t0, 1)})

    runs = [("fedavg (non-DP)", None), ("dp-fedavg", 1.0), ("dp-fedavg", 3.0), ("dp-fedavg", 8.0)]
    smallest = min(d.train.num_patients for d in datasets)
    for label, eps in runs:
        out = work / f"runs-{label.split()[0]}-{eps}"
        if eps is None:
            # A non-DP round makes a site's epsilon infinite: use fresh site state for it.
            settings = RunSettings(num_server_rounds=rounds, run_dir=str(out), run_name="u", dp=False, **base)
        else:
            delta = 1.0 / (10 * smallest)
            sigma = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=0.06,
                                         steps=rounds * steps, accountant="rdp")
            settings = RunSettings(num_server_rounds=rounds, run_dir=str(out), run_name="u",
                                   noise_multiplier=float(sigma), **base)
        site_root = work / f"sites-{label.split()[0]}-{eps}"
        import shutil

        for n in names:
            shutil.copytree(work / n, site_root / n, ignore=shutil.ignore_patterns("ledger.jsonl", "approvals.jsonl"))
        cfgs = [site_root / n / "site.toml" for n in names]
        approve_run(cfgs, settings)
        t0 = time.perf_counter()
        outputs = simulate(settings, cfgs)
        test = evaluate_heldout(work, settings, outputs)[-1]
        spent = {n: s.get("epsilon") for n, s in outputs.history[-1]["sites"].items()}
        results.append({"setting": label, "epsilon_target": eps,
                        "noise_multiplier": None if eps is None else round(settings.noise_multiplier, 3),
                        "epsilon_spent": spent, "test_accuracy": test["test_accuracy"],
                        "test_auc": test["test_auc"], "seconds": round(time.perf_counter() - t0, 1)})

    result = {"bench": "utility", "rounds": rounds, "local_steps": steps, "sample_rate": 0.06,
              "reference": "MedMNIST v2 centralised ResNet-18 (28 px): ACC 0.854 / AUC 0.944",
              "results": results,
              "auc_pooled": results[0]["test_auc"], "auc_fedavg": results[1]["test_auc"],
              "auc_dp_eps8": results[-1]["test_auc"]}
    dest = REPO / "bench" / "results" / "utility.json"
    dest.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
