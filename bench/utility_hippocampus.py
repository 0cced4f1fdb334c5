"""Utility of 3D segmentation across the hippocampus demo's hospitals: pooled vs FedAvg vs DP-FedAvg at epsilon 3 / 8.

    python bench/utility.py --task hippocampus [--quick] [--rounds R] [--local-steps S]

Every arm uses the demo's consortium (``atoll.demo_hippocampus``: three MR DICOM exports, 40 held-out subjects),
its task (32 x 48 x 32 voxels at 1 mm, loss ``dice_ce_fg``) and network (``scalespace``: a 275-parameter head on fixed
features, see models/scalespace.py), and is scored by Dice per label on the held-out subjects through the sites' own
pixel path:

- pooled: one non-DP model trained on the three hospitals' preprocessed training series together, as many
  optimizer steps as the three sites take in total;
- fedavg: the demo without DP (``--no-dp``), in its own copy of the exports;
- dp-fedavg at epsilon 3 and 8: the demo with DP, the noise multiplier calibrated with Opacus' RDP accountant so
  that the site with the most patients (smallest delta = 1/(10 x patients), largest epsilon) ends at the target.

Reference (not comparable in scale): nnU-Net, pooled, full resolution, 260 subjects, Decathlon test set:
Dice about 0.90 anterior / 0.89 posterior. Prints a table, then one JSON object (headline ``dice_fedavg``,
``dice_pooled``, ``dice_dp_eps8``) on the last line; writes bench/results/utility_hippocampus.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _fresh(template: Path, dest: Path) -> Path:
    """A copy of the generated exports without any site state (each arm starts with an unspent budget)."""
    shutil.copytree(template, dest, ignore=shutil.ignore_patterns("state", "runs", "consortium", "keys",
                                                                  "summary.json"))
    return dest


def _pooled(template: Path, rounds: int, steps: int, lr: float) -> dict:
    import torch

    from atoll import demo_hippocampus as hippo
    from atoll.demo3d import DEFAULTS, hippocampus_settings, heldout_tensors
    from client.ingest import SplitTensors
    from client.site_config import load_site_config
    from client.task_fit import fit_task
    from client.task_metrics import segmentation_metrics
    from client.volumes import build_volume_dataset
    from models import build_loss, build_task_model
    from privacy.dpsgd import train_local

    work = _fresh(template, template.parent / "pooled")
    settings = hippocampus_settings(rounds, dp=False, run_dir=work / "runs", keys_dir=work)
    parts, offset = [], 0
    for h in hippo.HOSPITALS:
        cfg = load_site_config(work / h / "site.toml")
        tr = fit_task(settings.task, cfg, build_volume_dataset(cfg, settings.task)).train
        parts.append(SplitTensors(tr.images, tr.labels, tr.patients + offset))
        offset += tr.num_patients
    pooled = SplitTensors(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                          torch.cat([p.patients for p in parts]))
    model = build_task_model(DEFAULTS["model"], settings.task)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mech = dataclasses.replace(settings.mechanism, steps=rounds * steps * len(hippo.HOSPITALS))
    train_local(model, pooled, mech, lr=lr, device=device, batch_size=settings.batch_size, seed=0,
                criterion=build_loss(settings.task))
    x, y = heldout_tensors(work, settings.task)
    m = segmentation_metrics(settings.task, model, x, y, device)
    return {"setting": "pooled", "test_dice": {"mean": m["val_dice"], **{lab: m[f"val_dice_{lab}"]
                                                                        for lab in settings.task.labels}}}


def _federated(template: Path, label: str, rounds: int, steps: int, *, dp: bool, noise: float | None) -> dict:
    from atoll.demo3d import run_hippocampus_demo

    work = _fresh(template, template.parent / label)
    s = run_hippocampus_demo(work, rounds=rounds, dp=dp, overrides={"steps": steps, "noise_multiplier": noise})
    return {"setting": label, "status": s["status"], "test_dice": s["test_dice"], "epsilon": s["epsilon"],
            "noise_multiplier": s["settings"]["mechanism"]["noise_multiplier"], "wall_seconds": s["wall_seconds"]}


def _noise_for(epsilon: float, template: Path, rounds: int, steps: int, q: float) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    from atoll import demo_hippocampus as hippo

    sizes = json.loads((template / "manifest.json").read_text())["subjects"]
    largest = max(sizes[h] for h in hippo.HOSPITALS)  # upper bound on the largest site's train patients
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=1.0 / (10 * largest), sample_rate=q,
                                      steps=rounds * steps, accountant="rdp"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=("hippocampus",), default="hippocampus")
    ap.add_argument("--quick", action="store_true", help="the demo's recipe (3 rounds, its local steps), no DP eps 3 arm")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--local-steps", type=int, default=None)
    args = ap.parse_args(argv)
    from atoll import demo_hippocampus as hippo
    from atoll.demo3d import DEFAULTS

    rounds = args.rounds or 3
    steps = args.local_steps or (DEFAULTS["steps"] if args.quick else 40)
    import os

    import torch

    load_before = os.getloadavg()[0]
    print(f"conditions: load average {load_before:.1f} on {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, device {'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atoll-utility-hippo-") as tmp:
        template = Path(tmp) / "template"
        hippo.generate(template)
        rows = [_pooled(template, rounds, steps, DEFAULTS["lr"]),
                _federated(template, "fedavg", rounds, steps, dp=False, noise=None)]
        for eps in ((8.0,) if args.quick else (3.0, 8.0)):
            noise = _noise_for(eps, template, rounds, steps, DEFAULTS["sample_rate"])
            rows.append(_federated(template, f"dp-fedavg eps {eps:g}", rounds, steps, dp=True, noise=noise))
    print(f"\n{'setting':20s} {'Dice mean':>10s} {'anterior':>9s} {'posterior':>10s}")
    for r in rows:
        d = r["test_dice"] or {}
        print(f"{r['setting']:20s} {d.get('mean', float('nan')):10.3f} {d.get('anterior', float('nan')):9.3f} "
              f"{d.get('posterior', float('nan')):10.3f}")
    by = {r["setting"]: (r["test_dice"] or {}).get("mean") for r in rows}
    summary = {"dice_pooled": by.get("pooled"), "dice_fedavg": by.get("fedavg"),
               "dice_dp_eps8": by.get("dp-fedavg eps 8"), "dice_dp_eps3": by.get("dp-fedavg eps 3"),
               "rounds": rounds, "local_steps": steps, "quick": args.quick, "rows": rows,
               "wall_seconds": round(time.perf_counter() - t0, 1),
               "conditions": {"load_average_start": round(load_before, 1), "load_average_end":
                              round(os.getloadavg()[0], 1), "cpus": os.cpu_count(), "torch_threads":
                              torch.get_num_threads(), "cuda": torch.cuda.is_available()},
               "reference": "nnU-Net pooled, full resolution, 260 subjects: Dice ~0.90 / 0.89 (Isensee et al. 2021)"}
    out = REPO / "bench" / "results" / "utility_hippocampus.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
