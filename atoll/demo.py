"""`atoll demo`: a local three-hospital consortium on real chest X-rays, in Flower's simulation engine.

The demo composes both sides (it is one of the two places allowed to): it writes the hospitals'
DICOM folders, runs the real ServerApp and ClientApp under Flower's simulation runtime, then scores
each round's global model on the official held-out test split, which no site ever sees.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from atoll import demo_data

log = logging.getLogger("atoll.demo")

# The demo trains with the lead's default run settings (server.settings.RunSettings: Atoll's DP recipe, ~epsilon 4
# per site over 3 rounds) except two recipe options (demo_settings: the ScatterNet network and the decision threshold
# chosen from the sites' released validation counts); `atoll demo --noise-multiplier/--local-steps/--lr/
# --sample-rate/--model` override them.
_RUN_KEYS = ("model", "lr", "batch_size")                                   # RunSettings fields
_MECHANISM_KEYS = ("steps", "noise_multiplier", "clip_norm", "sample_rate")  # contract.Mechanism fields
#: the X-ray demo's network (the lead's default, RunSettings.model, stays AtollNet: ScatterNet is 2D-only)
DEMO_MODEL = "scatternet"


def demo_settings(rounds: int, *, dp: bool, run_dir: Path, keys_dir: Path, num_sites: int,
                  overrides: dict | None = None):
    """The demo's run settings: the default run (task and DP recipe) with the demo's overrides.

    ``overrides`` keys: RunSettings fields (model, lr, batch_size), Mechanism fields (steps, noise_multiplier,
    clip_norm, sample_rate) and ``image_size`` (the task's input side).
    """
    from server.settings import RunSettings

    o = dict(overrides or {})
    unknown = set(o) - {*_RUN_KEYS, *_MECHANISM_KEYS, "image_size"}
    if unknown:
        raise ValueError(f"unknown demo override(s): {', '.join(sorted(unknown))}")
    base = RunSettings()
    mechanism = dataclasses.replace(base.mechanism, dp=dp, **{k: o[k] for k in _MECHANISM_KEYS if k in o})
    task = base.task if "image_size" not in o else dataclasses.replace(base.task, size=(o["image_size"],) * 2)
    # The demo's binary task decides at the threshold the server picks from the sites' released validation counts
    # (README "Server options"; bench/utility): under DP the ranking (AUC) survives but argmax's 0.5 drifts.
    server_options = base.server_options
    run = {k: o[k] for k in _RUN_KEYS if k in o}
    if task.kind == "classification" and len(task.classes) == 2:
        server_options = dataclasses.replace(server_options, decision_threshold="validation")
        # ScatterNet features (Tramer & Boneh 2021) + the released threshold: the recipe with the best validation
        # ACC/AUC at epsilon 3 and 8 over 3 seeds in bench/utility.py (README "Recipe by recipe"), well inside the
        # demo's time limit. `--model` still picks any other network.
        run.setdefault("model", DEMO_MODEL)
    return RunSettings(num_server_rounds=rounds, run_dir=str(run_dir), keys_dir=str(keys_dir), min_sites=2,
                       num_sites=num_sites, task=task, mechanism=mechanism, server_options=server_options, **run)


def setup_console_logging(verbose: bool) -> None:
    """Atoll's progress on stdout; Flower/Ray chatter only with --verbose."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%H:%M:%S"))
    atoll_log = logging.getLogger("atoll")
    atoll_log.handlers[:] = [handler]
    atoll_log.setLevel(logging.INFO)
    atoll_log.propagate = False
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def run_demo(out: Path, rounds: int = 3, *, dp: bool = True, verbose: bool = False,
             overrides: dict | None = None, pacs: bool = False) -> dict:
    """Generate (if absent) and train the demo consortium; returns and writes DIR/summary.json.

    ``pacs``: serve each hospital's export from its own Orthanc and have the sites pull it first (atoll.demo_pacs).
    """
    from client.site_config import load_site_config  # noqa: F401 (validates configs before training)

    out = Path(out).resolve()
    t_start = time.perf_counter()
    setup_console_logging(verbose)
    for var, val in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                     ("RAY_DEDUP_LOGS", "0"), ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")):
        os.environ.setdefault(var, val)
    fresh = not (out / "consortium.json").exists()
    log.info("%s the three hospitals' PACS exports in %s%s", "writing" if fresh else "checking", out,
             " (DICOM files from the embedded chest X-rays, first run only)" if fresh else "")
    manifest = demo_data.generate_consortium(out, image_size=(overrides or {}).get("image_size", 28))
    hospitals = manifest["hospitals"]
    configs = [out / h / "site.toml" for h in hospitals]
    if pacs:
        from atoll.demo_pacs import serve_and_pull

        configs, _ = serve_and_pull(out, hospitals)
    for c in configs:
        load_site_config(c)  # a bad site config is rejected here, before any training
    if not dp:
        used = [h for h in hospitals if (out / h / "state" / "ledger.jsonl").exists()]
        if used:
            raise FileExistsError(
                f"the demo sites in {out} already have a privacy history; a non-DP round spends an infinite "
                f"epsilon and would make them refuse every later DP run. Use another --out for --no-dp")
    keys_dir = prepare_site_keys(out, hospitals)
    settings = demo_settings(rounds, dp=dp, run_dir=out / "runs", keys_dir=keys_dir, num_sites=len(hospitals),
                             overrides=overrides)
    settings.check()
    log.info("each site's admin approves the run manifest (hashing the app bundle and the model's outputs) ...")
    digest = approve_run(configs, settings)
    log.info("each site's admin approved run manifest %s (as `atoll site approve` records it)", digest[:16])
    ingest_sites(configs, settings.task.image_size)
    settings = resume_if_interrupted(settings)
    log.info("training %d rounds of %s with %s (%s) across %s", rounds, settings.task.describe(), settings.model,
             f"DP-SGD {settings.mechanism.describe()}" if dp else "no DP", ", ".join(hospitals))
    outputs = simulate(settings, configs, verbose=verbose)
    summary = summarise(out, manifest, settings, outputs, time.perf_counter() - t_start)
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)  # the whole demo, held-out evaluation included
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, out)
    return summary


def resume_if_interrupted(settings):
    """The settings to run: those of an interrupted demo run in the same folder with the same settings, resumed
    (server.resume; it says so on screen), else ``settings`` as given (a new run)."""
    from server.resume import interrupted_run

    found = interrupted_run(Path(settings.run_dir), settings)
    if found is None:
        return settings
    name, point = found
    log.info("RESUMING the interrupted demo run %s after round %d of %d (its process was stopped before the end); "
             "the sites answer a round they already completed at no new privacy charge. To start over instead, "
             "give a new --out", name, point.round, settings.num_server_rounds)
    return dataclasses.replace(settings, run_name=name, resume=True)


def write_demo_data(out: Path) -> dict:
    """`atoll demo --data-only`: the hospitals' PACS exports (DICOM + labels CSV), and where they are."""
    out = Path(out).resolve()
    print(f"writing the demo hospitals' PACS exports in {out} (first run only) ...", flush=True)
    manifest = demo_data.generate_consortium(out)
    for h in manifest["hospitals"]:
        info = manifest["sites"][h]
        key = next((spec.label_key for spec in demo_data.HOSPITALS if spec.name == h), "SOPInstanceUID")
        print(f"  {h}: {out / h / 'dicom'}  labels {out / h / 'labels.csv'} (key {key}, column "
              f"{manifest['label_column']}; {info.get('images', '?')} images)")
    return manifest


def ingest_sites(site_configs: list[Path], image_size: int) -> None:
    """Index, quarantine, decode and cache each site's DICOM export before round 1, saying so site by site.

    The ClientApps would do this themselves in round 1 (silently, for minutes on a small machine); done here
    first, they find every image in the site's on-disk cache. The counts printed are the site's own view
    (as `atoll site check` shows its admin), including the files it quarantined and why.
    """
    from client.ingest import build_site_dataset
    from client.ingest.progress import ingest_progress
    from client.site_config import load_site_config

    for path in site_configs:
        cfg = dataclasses.replace(load_site_config(path), image_size=image_size)
        log.info("%s: indexing its DICOM export, decoding and caching the images (first time only) ...", cfg.name)
        t0 = time.perf_counter()
        with _quiet("atoll.ingest"), ingest_progress() as progress:  # a bar on a terminal, nothing in logs
            data = build_site_dataset(cfg, progress=progress)
        report = data.report.get("quarantined", [])
        reasons: dict[str, int] = {}
        for q in report:
            reasons[q.get("reason", "?")] = reasons.get(q.get("reason", "?"), 0) + 1
        why = (" — " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))) if reasons else ""
        log.info("%s: %d images of %d patients ready (%d train / %d validation patients), %d file(s) quarantined%s "
                 "(%.0f s)", cfg.name, len(data.train.labels) + len(data.val.labels),
                 data.train.num_patients + data.val.num_patients, data.train.num_patients, data.val.num_patients,
                 len(report), why, time.perf_counter() - t0)


class _quiet:
    """Silence one logger's INFO lines (the demo says the same in its own words)."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *exc) -> None:
        self.logger.setLevel(self.level)


def prepare_site_keys(out: Path, hospitals: list[str]) -> Path:
    """Each demo site gets its signing key (as `atoll site init` would make); the consortium enrolls
    the public keys in DIR/consortium/keys, which the server verifies every ledger record against."""
    from privacy.keys import ensure_site_key

    keys_dir = out / "consortium" / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    for h in hospitals:
        pub_pem = ensure_site_key(out / h / "keys" / "site_ed25519.pem")
        (keys_dir / f"{h}.pub").write_bytes(pub_pem)
    return keys_dir


def approve_run(site_configs: list[Path], settings, by: str = "atoll demo, for the site admin") -> str:
    """Record each site's approval of the run manifest (what `atoll site approve --yes` does)."""
    from client.approval import ApprovalStore, manifest_hash
    from client.manifest import build_run_manifest
    from client.site_config import load_site_config

    manifest = build_run_manifest(settings.round_config("approval", 1))
    digest = manifest_hash(manifest)
    for c in site_configs:
        store = ApprovalStore(load_site_config(c).state_dir)
        if not store.is_approved(digest):
            store.approve(manifest, by=by)
    return digest


def simulate(settings, site_configs: list[Path], *, verbose: bool = False):
    """Run the ServerApp and one ClientApp per site config in Flower's simulation runtime."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from atoll import simulation
    from client.app import app as client_app
    from client.runtime import SIM_SITE_CONFIGS_ENV
    from server.app import run_consortium

    if not verbose:
        _only_flower_warnings()
    holder: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        holder["outputs"] = run_consortium(grid, settings, context.run_id)

    os.environ[SIM_SITE_CONFIGS_ENV] = os.pathsep.join(str(p) for p in site_configs)
    gpus = 1.0 / len(site_configs) if torch.cuda.is_available() else 0.0
    from atoll.demo_progress import round_progress  # a bar per round and site on a terminal
    from client.site_config import load_site_config

    ledgers = {(c := load_site_config(p)).name: Path(c.state_dir) / "ledger.jsonl" for p in site_configs}
    with round_progress(Path(settings.run_dir), settings.num_server_rounds, ledgers, enabled=None if not verbose
                        else False):
        # each site's actor gets its fair share of the cores, at nice 0 (atoll/simulation.py)
        simulation.run_sites(server_app, client_app, len(site_configs), gpus_per_site=gpus, verbose=verbose)
    if "outputs" not in holder:
        raise RuntimeError("the simulation ended before the ServerApp finished; rerun with --verbose")
    return holder["outputs"]


def _only_flower_warnings() -> None:
    """Without --verbose: Flower's warnings once, not its INFO/DEBUG lines twice.

    Opacus adds a root handler on import and Flower's simulation resets its own logger to DEBUG, so every Flower
    line would print twice between Atoll's own progress lines; Atoll's demo-internal use of the deprecated
    `run_simulation` is no news to the user either.
    """
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False
    flwr_log.addFilter(lambda r: r.levelno >= logging.WARNING and "DEPRECATED FEATURE" not in str(r.msg))


def evaluate_heldout(out: Path, settings, outputs) -> list[dict]:
    """Score the global model of every round on the official test split (never seen by a site)."""
    from client.ingest import build_site_dataset
    from client.site_config import load_site_config
    from client.task_fit import fit_task
    from client.task_metrics import task_metrics
    from models import build_task_model

    cfg = load_site_config(out / demo_data.HELDOUT / "site.toml")
    cfg = dataclasses.replace(cfg, image_size=settings.task.image_size)
    log.info("scoring each round's global model on the held-out test split (seen by no site) ...")
    with _quiet("atoll.ingest"):  # its split into train/val patients means nothing for a test set
        ds = fit_task(settings.task, cfg, build_site_dataset(cfg))
    images = torch.cat([ds.train.images, ds.val.images])
    labels = torch.cat([ds.train.labels, ds.val.labels])
    from client.task_metrics import accuracy_at_threshold
    from server.server_ema import ema_path

    by_validation = settings.server_options.decision_threshold == "validation"

    def score(path: Path, chosen: dict | None) -> dict:
        model = build_task_model(settings.model, settings.task)
        model.load_state_dict(torch.load(path, weights_only=True))
        m = task_metrics(settings.task, model, images, labels, torch.device("cpu"))
        row = {"test_images": m.pop("n"), **{k.replace("val_", "test_", 1): v for k, v in m.items()
                                             if not k.startswith("val_threshold_counts")}}
        if chosen:  # the threshold the server chose from the sites' released validation counts (never this set)
            acc = accuracy_at_threshold(model, images, labels, torch.device("cpu"), chosen["threshold"])
            row.update(test_threshold=chosen["threshold"], test_accuracy_at_threshold=acc)
            if by_validation:  # the run's model decides at that threshold: its accuracy is that one
                row.update(test_accuracy_argmax=row["test_accuracy"], test_accuracy=acc)
        return row

    scores = []
    for entry in [{"round": 0}] + outputs.history:
        rnd = entry["round"]
        path = outputs.weights_path(rnd)
        if not path.exists():
            continue
        row = {"round": rnd, **score(path, entry.get("decision_threshold"))}
        if ema_path(path).is_file():  # the server's EMA (server-ema > 0), at the global model's threshold
            row["ema"] = score(ema_path(path), entry.get("decision_threshold"))
        scores.append(row)
    return scores


def summarise(out: Path, manifest: dict, settings, outputs, wall: float) -> dict:
    test = evaluate_heldout(out, settings, outputs)
    final = test[-1] if test else {}
    history = []
    by_round = {t["round"]: t for t in test}
    for entry in outputs.history:
        rnd = entry["round"]
        history.append({**entry, "test": by_round.get(rnd, {}),
                        "weights": str(outputs.weights_path(rnd).relative_to(out))})
    epsilon: dict[str, float | None] = {}
    delta: dict[str, float | None] = {}
    for entry in outputs.history:
        for site, s in entry["sites"].items():
            if s.get("epsilon") is not None:
                epsilon[site] = s["epsilon"]
                delta[site] = s.get("delta")
    status = json.loads((outputs.root / "status.json").read_text())
    return {
        "rounds": len(outputs.history),
        "sites": manifest["hospitals"],
        "run": outputs.name,
        "run_dir": str(outputs.root.relative_to(out)),
        "status": status["status"],
        "status_reason": status.get("reason", ""),
        "test_accuracy": final.get("test_accuracy"),
        "test_auc": final.get("test_auc"),
        "test_threshold": final.get("test_threshold"),
        "test_accuracy_argmax": final.get("test_accuracy_argmax"),
        "dp": settings.mechanism.dp,
        "task": settings.task.to_manifest(),
        "epsilon": epsilon,
        "delta": delta,
        "settings": dataclasses.asdict(settings),
        "history": history,
        "initial_weights": str(outputs.weights_path(0).relative_to(out)),
        "wall_seconds": round(wall, 1),
        "reference": "MedMNIST v2 centralised ResNet-18 (28 px): ACC 0.854 / AUC 0.944",
    }


def print_privacy(s: dict) -> None:
    """The privacy each site spent (from a demo summary), or that DP was off: both demos print it so."""
    if s["epsilon"]:
        print("  privacy spent (patient-level, lifetime of each site's dataset):")
        for site, eps in s["epsilon"].items():
            d = s["delta"].get(site)
            print(f"    {site}: epsilon {eps:.2f}" + (f" at delta {d:.1e}" if d else ""))
    elif not s["dp"]:
        print("  DP was off for this run (--no-dp): the updates carry no privacy guarantee")


def print_summary(s: dict, out: Path) -> None:
    print()
    print(f"Atoll demo: {s['rounds']} round(s) across {', '.join(s['sites'])} — {s['status']}"
          + (f" ({s['status_reason']})" if s["status_reason"] else ""))
    if s["test_accuracy"] is not None:
        print(f"  held-out test (official PneumoniaMNIST test split, 624 images): "
              f"accuracy {s['test_accuracy']:.3f}, AUC {s['test_auc']:.3f}")
        if s.get("test_threshold") is not None and s.get("test_accuracy_argmax") is not None:
            print(f"  decided at threshold {s['test_threshold']:.2f}, chosen from the sites' released validation "
                  f"counts (argmax would score accuracy {s['test_accuracy_argmax']:.3f})")
        print(f"  reference: {s['reference']}")
    print_privacy(s)
    print(f"  wall time {s['wall_seconds']:.0f} s; summary: {out / 'summary.json'}; run folder: {out / s['run_dir']}")
    print("next:")
    run = out / s["run_dir"]
    ledgers = " ".join(f"--site-ledger {out / site / 'state' / 'ledger.jsonl'}" for site in s["sites"])
    print(f"  atoll audit verify {run} {ledgers}")
    print(f"  atoll audit report {run} --out {out / 'privacy-report.html'}")
    print(f"  atoll run status {run}")
    print(f"  atoll demo --out {out} --evaluate      # every model (global, each site's local) at every site")
