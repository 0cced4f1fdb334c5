"""Utility of 3D segmentation across the hippocampus demo's hospitals: pooled vs FedAvg vs DP-FedAvg at epsilon 1/3/8.

    python bench/utility.py --task hippocampus [--quick] [--seeds N] [--eps 1,3,8] [--skip pooled,fedavg]
                                               [--rounds R] [--local-steps S]

Every arm uses the demo's consortium (``atoll.demo_hippocampus``: three MR DICOM exports, 40 held-out subjects),
its task (32 x 48 x 32 voxels at 1 mm, loss ``dice_ce_fg``) and network (``scalespace``: a 275-parameter head on fixed
features, see models/scalespace.py), and is scored by Dice per label on the held-out subjects through the sites' own
pixel path, and by the validation Dice the sites release for the final global model (what a recipe would be chosen
on; nothing here is tuned on the held-out subjects):

- pooled: one non-DP model trained on the three hospitals' preprocessed training series together, as many
  optimizer steps as the three sites take in total;
- fedavg: the demo's run without DP, on a fresh copy of the exports;
- dp-fedavg at each ``--eps``: the demo's run with DP, the noise multiplier calibrated with Opacus' RDP accountant so
  that the site with the most training patients (smallest delta = 1/(10 x patients), largest epsilon) ends at the
  target.

Each arm runs once per seed (``--seeds``, outermost: a bench stopped early has every arm's first seeds; the seed sets
the initial weights and the non-DP shuffling, DP noise comes from OS entropy) and reports mean, std, max - min and
every run. The sites' ingest cache is built once and copied, so no arm decodes the DICOM series again.
Reference (not comparable in scale): nnU-Net, pooled, full resolution, 260 subjects, Decathlon test set:
Dice about 0.90 anterior / 0.89 posterior. Prints one line per run and a table, then one JSON object (headline
``dice_fedavg``, ``dice_pooled``, ``dice_dp_eps8``) on the last line; writes bench/results/utility_hippocampus.json
(rewritten after every run, ``"partial": true`` until the end).
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
    """A copy of the generated exports with an unspent budget: no ledger, approvals or keys, but the sites' ingest
    cache and pseudonym secret kept (the cache is keyed by the secret), so no arm decodes the DICOM series again."""
    shutil.copytree(template, dest, ignore=shutil.ignore_patterns("state", "runs", "consortium", "keys",
                                                                  "summary.json"))
    for h in (template / d for d in json.loads((template / "manifest.json").read_text())["hospitals"]):
        for part in ("cache", "pseudonym.secret"):
            src = h / "state" / part
            if src.is_dir():
                shutil.copytree(src, dest / h.name / "state" / part)
            elif src.exists():
                (dest / h.name / "state").mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / h.name / "state" / part)
    return dest


def _ingest(template: Path, rounds: int) -> dict[str, int]:
    """Index and cache every site's series once in the template; returns each site's training patients."""
    from atoll import demo_hippocampus as hippo
    from atoll.demo3d import hippocampus_settings
    from client.site_config import load_site_config
    from client.task_fit import fit_task
    from client.volumes import build_volume_dataset

    task = hippocampus_settings(rounds, dp=False, run_dir=template / "runs", keys_dir=template).task
    out = {}
    for h in hippo.HOSPITALS:
        cfg = load_site_config(template / h / "site.toml")
        out[h] = fit_task(task, cfg, build_volume_dataset(cfg, task)).train.num_patients
    return out


def _dice(m: dict, labels, prefix: str) -> dict:
    return {"mean": m.get(f"{prefix}_dice"), **{lab: m.get(f"{prefix}_dice_{lab}") for lab in labels}}


class _Pooled:
    """One non-DP model on the three hospitals' preprocessed training series together (as many optimizer steps as
    the three sites take in total); validation Dice on their validation series together."""

    def __init__(self, template: Path, rounds: int, steps: int, lr: float) -> None:
        import torch

        from atoll import demo_hippocampus as hippo
        from atoll.demo3d import heldout_tensors, hippocampus_settings
        from client.ingest import SplitTensors
        from client.site_config import load_site_config
        from client.task_fit import fit_task
        from client.volumes import build_volume_dataset

        work = _fresh(template, template.parent / "pooled")
        self.settings = hippocampus_settings(rounds, dp=False, run_dir=work / "runs", keys_dir=work)
        parts, vals, offset = [], [], 0
        for h in hippo.HOSPITALS:
            cfg = load_site_config(work / h / "site.toml")
            ds = fit_task(self.settings.task, cfg, build_volume_dataset(cfg, self.settings.task))
            parts.append(SplitTensors(ds.train.images, ds.train.labels, ds.train.patients + offset))
            vals.append(ds.val)
            offset += ds.train.num_patients
        self.train = SplitTensors(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                                  torch.cat([p.patients for p in parts]))
        self.val = (torch.cat([v.images for v in vals]), torch.cat([v.labels for v in vals]))
        self.test = heldout_tensors(work, self.settings.task)
        self.steps, self.lr = rounds * steps * len(hippo.HOSPITALS), lr

    def run(self, seed: int) -> dict:
        import torch

        from atoll.demo3d import DEFAULTS
        from client.task_metrics import segmentation_metrics
        from models import build_loss, build_task_model
        from privacy.dpsgd import train_local

        s = self.settings
        torch.manual_seed(seed)
        model = build_task_model(DEFAULTS["model"], s.task)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        train_local(model, self.train, dataclasses.replace(s.mechanism, steps=self.steps), lr=self.lr,
                    device=device, batch_size=s.batch_size, seed=seed, criterion=build_loss(s.task))
        seconds = round(time.perf_counter() - t0, 1)
        t = segmentation_metrics(s.task, model, *self.test, device)
        v = segmentation_metrics(s.task, model, *self.val, device)
        return {"test_dice": _dice(t, s.task.labels, "val"), "val_dice": _dice(v, s.task.labels, "val"),
                "seconds": seconds}


def _federated(template: Path, tag: str, rounds: int, steps: int, seed: int, *, dp: bool,
               noise: float | None) -> dict:
    """The demo's run (its settings, the real ServerApp and ClientApps in Flower's simulation) on a fresh copy of
    the exports, with ``seed`` for the initial weights and the non-DP shuffling; Dice on the held-out subjects."""
    from atoll import demo_hippocampus as hippo
    from atoll.demo import approve_run, prepare_site_keys, simulate
    from atoll.demo3d import evaluate_heldout, hippocampus_settings

    work = _fresh(template, template.parent / tag)
    keys = prepare_site_keys(work, list(hippo.HOSPITALS))
    settings = hippocampus_settings(rounds, dp=dp, run_dir=work / "runs", keys_dir=keys,
                                    overrides={"steps": steps, "noise_multiplier": noise})
    settings = dataclasses.replace(settings, seed=seed)
    settings.check()
    configs = [work / h / "site.toml" for h in hippo.HOSPITALS]
    approve_run(configs, settings)
    t0 = time.perf_counter()
    outputs = simulate(settings, configs)
    seconds = round(time.perf_counter() - t0, 1)
    test = evaluate_heldout(work, settings, outputs)[-1]
    last = outputs.history[-1]
    out = {"test_dice": test["test_dice"], "val_dice": _dice(last.get("aggregated", {}), settings.task.labels, "val"),
           "epsilon": {n: s.get("epsilon") for n, s in last["sites"].items()} if dp else {},
           "contributed": sorted(n for n, s in last["sites"].items() if s.get("status") == "contributed"),
           "seconds": seconds}
    shutil.rmtree(work, ignore_errors=True)
    return out


def _row(setting: str, runs: list[dict], labels, **extra) -> dict:
    from bench.utility_arms import spread

    row = {"setting": setting, **extra}
    for split in ("test_dice", "val_dice"):
        row[split] = {k: spread([r[split].get(k) for r in runs]) for k in ("mean", *labels)}
    row["seconds"] = spread([r["seconds"] for r in runs])
    spent = [max(r["epsilon"].values()) for r in runs if r.get("epsilon")
             and all(v is not None for v in r["epsilon"].values())]
    if spent:
        row["epsilon_spent_max"] = max(spent)
    row["runs"] = runs
    return row


def main(argv: list[str] | None = None) -> int:
    from bench.utility import _floats

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=("hippocampus",), default="hippocampus")
    ap.add_argument("--quick", action="store_true",
                    help="the demo's recipe (3 rounds of its 12 local steps), 1 seed, DP at epsilon 8 only")
    ap.add_argument("--seeds", type=int, default=None, help="runs per arm, seeds 0..N-1 (default 3; 1 with --quick)")
    ap.add_argument("--eps", type=_floats, default=None, help="DP targets, comma-separated (default 1,3,8; 8 with --quick)")
    ap.add_argument("--skip", default="", help="comma-separated reference arms to leave out: pooled, fedavg")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--local-steps", type=int, default=None)
    args = ap.parse_args(argv)
    from atoll import demo_hippocampus as hippo
    from atoll.demo3d import DEFAULTS, hippocampus_settings
    from bench.conditions import conditions
    from bench.utility import calibrate

    rounds = args.rounds or 3
    steps = args.local_steps or (DEFAULTS["steps"] if args.quick else 40)
    seeds = args.seeds or (1 if args.quick else 3)
    eps_list = args.eps or ([8.0] if args.quick else [1.0, 3.0, 8.0])
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    start = conditions()
    print(f"conditions: {start}", flush=True)
    t0 = time.perf_counter()
    cells = ([] if "pooled" in skip else [("pooled", None)]) + ([] if "fedavg" in skip else [("fedavg", None)]) \
        + [(f"dp-fedavg eps {e:g}", e) for e in eps_list]
    runs: dict[str, list[dict]] = {c: [] for c, _ in cells}
    noise: dict[str, float] = {}
    out = REPO / "bench" / "results" / "utility_hippocampus.json"
    labels = hippo.LABELS

    def summary(partial: bool) -> dict:
        rows = [_row(c, runs[c], labels, epsilon_target=e, noise_multiplier=noise.get(c)) for c, e in cells if runs[c]]
        by = {r["setting"]: r["test_dice"]["mean"]["mean"] for r in rows}
        result = {"bench": "utility_hippocampus", "partial": partial, "quick": args.quick, "seeds": seeds,
                  "eps": eps_list, "rounds": rounds, "local_steps": steps,
                  "dice_pooled": by.get("pooled"), "dice_fedavg": by.get("fedavg"),
                  **{f"dice_dp_eps{e:g}": by.get(f"dp-fedavg eps {e:g}") for e in eps_list},
                  "chosen_on": "nothing is tuned here: the demo's recipe; validation Dice is the sites' released "
                               "val_dice of the final global model, test Dice the 40 held-out subjects",
                  "calibration": "Opacus get_noise_multiplier, RDP, delta = 1/(10 x the largest site's training "
                                 "patients)",
                  "rows": rows, "wall_seconds": round(time.perf_counter() - t0, 1),
                  "conditions": {"start": start, "end": conditions()},
                  "reference": "nnU-Net pooled, full resolution, 260 subjects: Dice ~0.90 / 0.89 (Isensee et al. 2021)"}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        return result

    with tempfile.TemporaryDirectory(prefix="atoll-utility-hippo-") as tmp:
        template = Path(tmp) / "template"
        hippo.generate(template)
        largest = max(_ingest(template, rounds).values())
        pooled = _Pooled(template, rounds, steps, DEFAULTS["lr"]) if "pooled" not in skip else None
        for r in range(seeds):  # seeds outermost: a bench stopped early has every arm's first seeds
            for cell, eps in cells:
                if cell == "pooled":
                    runs[cell].append(pooled.run(r))
                else:
                    if eps is not None and cell not in noise:  # the X-ray bench's calibration, on the demo's run
                        noise[cell] = calibrate(hippocampus_settings(rounds, dp=True, run_dir=template,
                                                                     keys_dir=template, overrides={"steps": steps}),
                                                eps, 1.0 / (10 * largest))
                    runs[cell].append(_federated(template, f"{cell.replace(' ', '-')}-{r}", rounds, steps, r,
                                                 dp=eps is not None, noise=noise.get(cell)))
                d = runs[cell][-1]["test_dice"]
                print(f"{cell} seed {r}: test Dice {d['mean']:.3f} "
                      + " ".join(f"{lab} {d[lab]:.3f}" for lab in labels)
                      + f" | val Dice {runs[cell][-1]['val_dice']['mean'] or float('nan'):.3f}"
                      + f" | {runs[cell][-1]['seconds']} s", flush=True)
                summary(True)
    result = summary(False)
    print(f"\n{'setting':20s} {'Dice mean':>14s} {'anterior':>14s} {'posterior':>14s} {'val Dice':>14s}")
    for row in result["rows"]:
        def ms(s: dict) -> str:
            return "—" if s["mean"] is None else f"{s['mean']:.3f}±{s['std']:.3f}"
        d = row["test_dice"]
        print(f"{row['setting']:20s} {ms(d['mean']):>14s} {ms(d['anterior']):>14s} {ms(d['posterior']):>14s} "
              f"{ms(row['val_dice']['mean']):>14s}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
