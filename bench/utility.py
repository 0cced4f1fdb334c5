"""Utility of Atoll's training on the PneumoniaMNIST test split: pooled vs FedAvg vs DP-FedAvg, recipe by recipe.

On the demo consortium (3 non-IID hospitals) and the official test split (624 images, 62.5 % pneumonia: a
model that always answers "pneumonia" scores ACC 0.625):

- pooled: one non-DP model on all three hospitals' training data (the centralised reference) with the default
  recipe's network, optimizer, lr and minibatch, rounds x local steps x 3 steps;
- fedavg: Atoll's FedAvg over the 3 sites without DP (minibatches of batch-size images), default recipe;
- dp-fedavg at each ``--eps`` target, for the default recipe (``server.settings.RunSettings``: the lead's run
  settings) and for every ``--arm NAME:key=value,...`` (run-config overrides on top of it: any option that lands
  as a run-config key is an arm, see bench/utility_arms.py). Only the noise multiplier is set by the bench: it is
  calibrated with Opacus' ``get_noise_multiplier`` (the mechanism's accountant, RDP when the run leaves it to the
  sites' policy) so that the site with the most patients (smallest delta = 1/(10 x patients), hence the largest
  epsilon) ends the run at the target; the other sites land slightly below it. The epsilon each site actually
  spent is read back from the run history (its signed ledger records), and an arm that spends more than its
  target (an option with its own privacy cost) is flagged ``over_target``.

Each arm runs once per seed (``--seeds``; the seed drives the initial weights and the non-DP shuffling, the DP
noise comes from OS entropy, so runs differ) on fresh site state, and reports mean, sample std, max - min and
every run of test ACC/AUC, the epsilon spent per site and seconds per run — and the sites' VALIDATION metrics of
the final global model (the example-weighted mean of what each site released on its own validation split, as
the run history records it). Recipes are compared, and ``best_on_validation`` chosen, on those validation
metrics only; the test split is reported, never used to choose. Evaluation: argmax of the softmax (threshold
0.5). Reference: MedMNIST v2 centralised ResNet-18 at 28 px, ACC 0.854 / AUC 0.944.

    python bench/utility.py [--quick] [--seeds N] [--eps 1,3,8] [--arm NAME:key=value,...]... [--skip pooled,fedavg]
    python bench/utility.py --task hippocampus [--quick]   (3D segmentation: bench/utility_hippocampus.py)

A sweep like this trains on the sites' data: on real hospitals' data every arm spends epsilon like any other run.
Here the data are the demo's embedded, public chest X-rays and every run starts with a fresh, unspent budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.utility_arms import Arm, ArmError, arm_settings, parse_arm, run_config_keys, spread  # noqa: E402

REFERENCE = "MedMNIST v2 centralised ResNet-18 (28 px): ACC 0.854 / AUC 0.944"
QUICK = {"num-server-rounds": 2, "local-steps": 50}
CHOSEN_ON = ("validation: the sites' released validation metrics of the final global model (example-weighted "
             "mean over the sites); never the test split")


def _floats(text: str) -> list[float]:
    try:
        out = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1,3,8; got {text!r}") from None
    if not out or any(not (e > 0 and math.isfinite(e)) for e in out):
        raise argparse.ArgumentTypeError(f"every epsilon must be a positive number; got {text!r}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 50 local steps, 1 seed")
    ap.add_argument("--seeds", type=int, default=None, help="runs per arm, seeds 0..N-1 (default 3; 1 with --quick)")
    ap.add_argument("--eps", type=_floats, default=[1.0, 3.0, 8.0], help="DP targets, comma-separated (default 1,3,8)")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME:key=value,...",
                    help="a recipe to measure: run-config overrides on top of the default recipe (repeatable), e.g. "
                         "--arm 'lr01:lr=0.1' --arm 'fedadam:strategy=\"fedadam\"'")
    ap.add_argument("--skip", default="", help="comma-separated reference arms to leave out: pooled, fedavg, default")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "utility.json",
                    help="where to write the JSON (default bench/results/utility.json)")
    ap.add_argument("--markdown", type=Path, nargs="+", metavar="JSON",
                    help="train nothing: print the README table rows of these result files (e.g. before and after)")
    args = ap.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        ap.error("--seeds must be >= 1")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - {"pooled", "fedavg", "default"}:
        ap.error(f"--skip: unknown arm(s) {', '.join(sorted(args.skip - {'pooled', 'fedavg', 'default'}))} "
                 "(pooled, fedavg, default)")
    try:
        allowed = run_config_keys()
        args.arms = [parse_arm(a, allowed) for a in args.arm]
    except ArmError as exc:
        ap.error(str(exc))
    names = [a.name for a in args.arms]
    if len(set(names)) != len(names):
        ap.error(f"--arm: two arms share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    return args


def _val(entry: dict) -> dict[str, Any]:
    """The validation metrics a history entry records: aggregated and per site (what the sites released)."""
    agg = entry.get("aggregated", {})
    return {"val_accuracy": agg.get("val_accuracy"), "val_auc": agg.get("val_auc"), "val_loss": agg.get("val_loss"),
            "val_sites": {n: {k: v for k, v in s.get("val", {}).items() if k.startswith("val_")}
                          for n, s in entry.get("sites", {}).items()}}


def _row(setting: str, arm: Arm | None, runs: list[dict], **extra: Any) -> dict:
    row = {"setting": setting, "arm": arm.name if arm else None, "overrides": dict(arm.overrides) if arm else {},
           **extra}
    for key in ("test_accuracy", "test_auc", "val_accuracy", "val_auc", "seconds"):
        row[key] = spread([r.get(key) for r in runs])
    for key in ("test_ema_accuracy", "test_ema_auc", "test_accuracy_argmax"):
        if any(key in r for r in runs):
            row[key] = spread([r.get(key) for r in runs])
    spent = [max(r["epsilon_spent"].values()) for r in runs if r.get("epsilon_spent")
             and all(v is not None for v in r["epsilon_spent"].values())]
    if spent:
        row["epsilon_spent_max"] = max(spent)
        target = extra.get("epsilon_target")
        row["over_target"] = bool(target is not None and max(spent) > target * 1.01)
    row["runs"] = runs
    return row


class Consortium:
    """The demo consortium written once; every federated run gets a fresh copy of the sites (unspent budgets)."""

    def __init__(self, work: Path) -> None:
        from atoll.demo import prepare_site_keys
        from atoll.demo_data import HOSPITALS, generate_consortium

        self.work = work
        generate_consortium(work)
        self.names = [h.name for h in HOSPITALS]
        self.keys = prepare_site_keys(work, self.names)

    def run(self, settings, tag: str) -> dict:
        from atoll.demo import approve_run, evaluate_heldout, simulate

        site_root = self.work / f"sites-{tag}"
        for n in self.names:
            shutil.copytree(self.work / n, site_root / n, ignore=shutil.ignore_patterns("ledger.jsonl", "approvals.jsonl"))
        cfgs = [site_root / n / "site.toml" for n in self.names]
        approve_run(cfgs, settings)
        t0 = time.perf_counter()
        outputs = simulate(settings, cfgs)
        seconds = round(time.perf_counter() - t0, 1)
        test = evaluate_heldout(self.work, settings, outputs)[-1]
        last = outputs.history[-1]
        sites = last["sites"]
        out = {"test_accuracy": test["test_accuracy"], "test_auc": test["test_auc"], **_val(last),
               "val_by_round": [{"round": e["round"], "val_accuracy": e.get("aggregated", {}).get("val_accuracy"),
                                 "val_auc": e.get("aggregated", {}).get("val_auc")} for e in outputs.history],
               "epsilon_spent": {n: s.get("epsilon") for n, s in sites.items()} if settings.mechanism.dp else {},
               "contributed": sorted(n for n, s in sites.items() if s.get("status") == "contributed"),
               "seconds": seconds}
        if "decision_threshold" in last:  # decision-threshold = "validation": chosen from released val counts
            out["decision_threshold"] = last["decision_threshold"]
            out["test_accuracy_argmax"] = test.get("test_accuracy_argmax", test["test_accuracy"])
        if "ema" in test:  # server-ema > 0: the server's EMA of the global model (never sent to the sites, so
            # the sites released no validation metrics for it: reported, not chosen on)
            out["test_ema_accuracy"], out["test_ema_auc"] = test["ema"]["test_accuracy"], test["ema"]["test_auc"]
        shutil.rmtree(site_root, ignore_errors=True)
        shutil.rmtree(settings.run_dir, ignore_errors=True)
        return out


class _Pooled:
    """One non-DP model on the three sites' training splits together; validation on their validation splits."""

    def __init__(self, con: Consortium, recipe) -> None:
        import torch

        from client.ingest import SplitTensors, build_site_dataset
        from client.site_config import load_site_config

        datasets = [build_site_dataset(load_site_config(con.work / n / "site.toml")) for n in con.names]
        offset, pats = 0, []
        for d in datasets:
            pats.append(d.train.patients + offset)
            offset += d.train.num_patients
        self.train = SplitTensors(torch.cat([d.train.images for d in datasets]),
                                  torch.cat([d.train.labels for d in datasets]), torch.cat(pats))
        self.val = (torch.cat([d.val.images for d in datasets]), torch.cat([d.val.labels for d in datasets]))
        heldout = build_site_dataset(load_site_config(con.work / "heldout-test" / "site.toml"))
        self.test = (torch.cat([heldout.train.images, heldout.val.images]),
                     torch.cat([heldout.train.labels, heldout.val.labels]))
        self.recipe = recipe
        self.steps = recipe.num_server_rounds * recipe.mechanism.steps * len(con.names)

    def run(self, seed: int) -> dict:
        import torch

        from client.evaluation import evaluate_model
        from models import build_task_model
        from privacy.dpsgd import train_local

        recipe, cpu = self.recipe, torch.device("cpu")
        torch.manual_seed(seed)
        model = build_task_model(recipe.model, recipe.task)
        t0 = time.perf_counter()
        train_local(model, self.train, dataclasses.replace(recipe.mechanism, dp=False, steps=self.steps),
                    lr=recipe.lr, device="cpu", batch_size=recipe.batch_size, seed=seed)
        seconds = round(time.perf_counter() - t0, 1)
        t, v = evaluate_model(model, *self.test, cpu), evaluate_model(model, *self.val, cpu)
        return {"test_accuracy": t["accuracy"], "test_auc": t["auc"], "val_accuracy": v["accuracy"],
                "val_auc": v["auc"], "val_loss": v["loss"], "seconds": seconds}


def _brief(run: dict) -> str:
    def f(v: Any) -> str:
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    eps = run.get("epsilon_spent") or {}
    return (f"test ACC {f(run['test_accuracy'])} AUC {f(run['test_auc'])} | val ACC {f(run.get('val_accuracy'))} "
            f"AUC {f(run.get('val_auc'))}" + (" | eps " + " ".join(f"{e:.2f}" for e in eps.values() if e is not None)
                                              if eps else "") + f" | {run['seconds']} s")


def calibrate(settings, epsilon: float, delta: float) -> float:
    """The noise multiplier that makes ``settings``' run spend ``epsilon`` at ``delta`` (Opacus)."""
    from opacus.accountants.utils import get_noise_multiplier

    m = settings.mechanism
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=m.sample_rate,
                                      steps=settings.num_server_rounds * m.steps, accountant=m.accountant or "rdp"))


def best_on_validation(rows: list[dict]) -> dict[str, dict]:
    """Per epsilon target: the DP arm with the highest mean validation accuracy (then validation AUC)."""
    best: dict[str, dict] = {}
    for row in rows:
        eps = row.get("epsilon_target")
        if eps is None or row["val_accuracy"]["mean"] is None:
            continue
        key = (row["val_accuracy"]["mean"], row["val_auc"]["mean"] or 0.0)
        cur = best.get(f"{eps:g}")
        if cur is None or key > (cur["val_accuracy"], cur["val_auc"] or 0.0):
            best[f"{eps:g}"] = {"arm": row["arm"], "val_accuracy": key[0], "val_auc": row["val_auc"]["mean"],
                                "test_accuracy": row["test_accuracy"]["mean"], "test_auc": row["test_auc"]["mean"]}
    return best


def print_table(rows: list[dict]) -> None:
    def ms(s: dict) -> str:
        return "     —      " if s["mean"] is None else f"{s['mean']:.3f}±{s['std']:.3f}"

    print(f"\n{'setting':18s} {'arm':14s} {'eps':>4s} {'sigma':>6s} {'test ACC':>12s} {'test AUC':>12s} "
          f"{'val ACC':>12s} {'val AUC':>12s} {'eps spent':>9s}")
    for r in rows:
        eps = "—" if r.get("epsilon_target") is None else f"{r['epsilon_target']:g}"
        sigma = "—" if r.get("noise_multiplier") is None else f"{r['noise_multiplier']:.2f}"
        spent = f"{r['epsilon_spent_max']:.2f}" if "epsilon_spent_max" in r else "—"
        print(f"{r['setting']:18s} {(r['arm'] or '—'):14s} {eps:>4s} {sigma:>6s} {ms(r['test_accuracy']):>12s} "
              f"{ms(r['test_auc']):>12s} {ms(r['val_accuracy']):>12s} {ms(r['val_auc']):>12s} {spent:>9s}"
              + ("  OVER TARGET" if r.get("over_target") else ""))


def markdown(results: list[dict]) -> str:
    """README table rows (one per row of each result file): test ACC/AUC and validation ACC/AUC, mean ± std
    over the seeds and every run, and the epsilon spent."""
    def cell(s: dict) -> str:
        if s["mean"] is None:
            return "—"
        runs = ", ".join("nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
                         for v in s["runs"])
        if sum(v is not None for v in s["runs"]) < 2:  # one run: no spread to show
            return f"**{s['mean']:.3f}**"
        return f"**{s['mean']:.3f}** ± {s['std']:.3f} ({runs})"

    lines = ["| setting | arm (overrides) | ε | σ | seeds | test ACC | test AUC | val ACC | val AUC | ε spent (max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["results"]:
            arm = "—" if r["arm"] is None else (r["arm"] + (" (" + ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
                                                         + ")" if r["overrides"] else ""))
            eps = "—" if r.get("epsilon_target") is None else f"{r['epsilon_target']:g}"
            sigma = "—" if r.get("noise_multiplier") is None else f"{r['noise_multiplier']:.2f}"
            spent = f"{r['epsilon_spent_max']:.2f}" if "epsilon_spent_max" in r else "—"
            lines.append(f"| {r['setting']} | {arm} | {eps} | {sigma} | {len(r['runs'])} | {cell(r['test_accuracy'])} | "
                         f"{cell(r['test_auc'])} | {cell(r['val_accuracy'])} | {cell(r['val_auc'])} | {spent}"
                         + (" OVER TARGET" if r.get("over_target") else "") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--task" in argv:  # the 3D hippocampus arms live in their own module
        from bench.utility_hippocampus import main as hippocampus_main

        i = argv.index("--task")
        if argv[i + 1:i + 2] != ["hippocampus"]:
            raise SystemExit("--task: only 'hippocampus' (the default, without --task, is the chest X-ray bench)")
        raise SystemExit(hippocampus_main(argv))
    args = parse_args(argv)
    if args.markdown:
        print(markdown([json.loads(p.read_text()) for p in args.markdown]))
        return

    from bench.conditions import conditions
    from client.ingest import build_site_dataset
    from client.site_config import load_site_config
    from privacy.dpsgd import DEFAULT_MOMENTUM, DEFAULT_OPTIMIZER
    from server.settings import RunSettings

    seeds = args.seeds or (1 if args.quick else 3)
    start = conditions()
    print(f"conditions: {start}", flush=True)
    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="atoll-bench-utility-"))
    # Cells (setting, arm, epsilon); seeds run outermost, so a bench stopped early still has every cell's first
    # seeds, and the JSON is rewritten (``"partial": true``) after every run.
    cells: list[tuple[str, Arm | None, float | None]] = []
    if "pooled" not in args.skip:
        cells.append(("pooled (non-DP)", None, None))
    if "fedavg" not in args.skip:
        cells.append(("fedavg (non-DP)", None, None))
    for arm in ([] if "default" in args.skip else [Arm("default")]) + args.arms:
        cells += [("dp-fedavg", arm, eps) for eps in args.eps]
    runs: dict[int, list[dict]] = {i: [] for i in range(len(cells))}
    extra: dict[int, dict] = {i: {"epsilon_target": eps} for i, (_, _, eps) in enumerate(cells)}
    state: dict[str, Any] = {}

    def rows() -> list[dict]:
        return [_row(setting, arm, runs[i], **extra[i]) for i, (setting, arm, _) in enumerate(cells) if runs[i]]

    def write(partial: bool) -> dict:
        result = _result(args, seeds, state, rows(), partial, t_all, start, conditions(),
                         DEFAULT_OPTIMIZER, DEFAULT_MOMENTUM)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        return result

    try:
        con = Consortium(work)
        recipe = arm_settings(Arm("default", dict(QUICK) if args.quick else {}), RunSettings(run_dir=str(work)))
        fixed = {"keys-dir": str(con.keys), "num-sites": len(con.names), "min-sites": 2}
        largest = max(build_site_dataset(load_site_config(work / n / "site.toml")).train.num_patients
                      for n in con.names)
        state.update(recipe=recipe, delta=1.0 / (10 * largest), largest=largest)
        pooled = _Pooled(con, recipe) if "pooled" not in args.skip else None
        for r in range(seeds):
            for i, (setting, arm, eps) in enumerate(cells):
                if setting.startswith("pooled"):
                    runs[i].append(pooled.run(r))
                    extra[i]["steps"] = pooled.steps
                    print(f"pooled seed {r}: {_brief(runs[i][-1])}", flush=True)
                    write(True)
                    continue
                tag = f"{arm.name if arm else 'fedavg'}-{eps}-{r}"
                s = arm_settings(arm or Arm("fedavg"), recipe, **fixed, dp=eps is not None, seed=r,
                                 **{"run-dir": str(work / f"runs-{tag}")})
                if eps is not None:
                    sigma = calibrate(s, eps, state["delta"])
                    s = dataclasses.replace(s, mechanism=dataclasses.replace(s.mechanism, noise_multiplier=sigma))
                    s.check()
                    extra[i].update(noise_multiplier=round(sigma, 3), rounds=s.num_server_rounds,
                                    local_steps=s.mechanism.steps, sample_rate=s.mechanism.sample_rate,
                                    clip_norm=s.mechanism.clip_norm)
                runs[i].append(con.run(s, tag))
                print(f"{setting} {arm.label() if arm else ''} eps={eps} seed {r}: {_brief(runs[i][-1])}", flush=True)
                write(True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = write(False)
    print_table(result["results"])
    for eps, b in result["best_on_validation"].items():
        print(f"best on validation at eps {eps}: {b['arm']} (val ACC {b['val_accuracy']:.3f}; its test ACC "
              f"{b['test_accuracy']:.3f}, AUC {b['test_auc']:.3f})")
    print(json.dumps(result))


def _result(args, seeds: int, state: dict, rows: list[dict], partial: bool, t_all: float, start: dict, end: dict,
            optimizer: str, momentum: float) -> dict:
    """The bench's JSON: recipe, calibration, every row, best-on-validation, headline keys, conditions."""
    def mean(setting: str, key: str, eps: float | None = None) -> float | None:
        for r in rows:
            if r["setting"] == setting and r.get("epsilon_target") == eps and r["arm"] in (None, "default"):
                return r[key]["mean"]
        return None

    recipe = state.get("recipe")
    m = recipe.mechanism if recipe else None
    return {
        "bench": "utility", "partial": partial, "quick": args.quick, "seeds": seeds, "eps": args.eps,
        "recipe": {"model": recipe.model, "optimizer": optimizer, "momentum": momentum,
                   "lr": recipe.lr, "rounds": recipe.num_server_rounds, "local_steps": m.steps,
                   "sample_rate": m.sample_rate, "clip_norm": m.clip_norm, "strategy": recipe.strategy,
                   "batch_size_non_dp": recipe.batch_size} if recipe else None,
        "arms": {a.name: a.overrides for a in args.arms},
        "calibration": {"accountant": "Opacus get_noise_multiplier with the mechanism's accountant (rdp when left "
                                      "to the sites' policy)", "delta": state.get("delta"),
                        "delta_rule": f"1/(10 x {state.get('largest')} patients, the largest site's training "
                                      "patients)"},
        "chosen_on": CHOSEN_ON, "best_on_validation": best_on_validation(rows),
        "reference": REFERENCE, "results": rows,
        "acc_pooled": mean("pooled (non-DP)", "test_accuracy"), "acc_fedavg": mean("fedavg (non-DP)", "test_accuracy"),
        **{f"acc_dp_eps{e:g}": mean("dp-fedavg", "test_accuracy", e) for e in args.eps},
        "auc_pooled": mean("pooled (non-DP)", "test_auc"), "auc_fedavg": mean("fedavg (non-DP)", "test_auc"),
        **{f"auc_dp_eps{e:g}": mean("dp-fedavg", "test_auc", e) for e in args.eps},
        "wall_seconds": round(time.perf_counter() - t_all, 1),
        "conditions": {"start": start, "end": end},
    }


if __name__ == "__main__":
    main()
