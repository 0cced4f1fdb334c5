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
# per site over 3 rounds); `atoll demo --noise-multiplier/--local-steps/--lr/--sample-rate` override them.
_TRAINING_KEYS = ("model", "image_size", "local_steps", "lr", "batch_size", "sample_rate", "noise_multiplier",
                  "clip_norm")


def training_defaults() -> dict:
    """The training parameters of a default run, as `RunSettings` declares them."""
    from server.settings import RunSettings

    return {k: getattr(RunSettings, k) for k in _TRAINING_KEYS}


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
    from server.settings import RunSettings

    out = Path(out).resolve()
    t_start = time.perf_counter()
    setup_console_logging(verbose)
    for var, val in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                     ("RAY_DEDUP_LOGS", "0"), ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")):
        os.environ.setdefault(var, val)
    log.info("preparing the demo consortium in %s", out)
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
    params = {**training_defaults(), **(overrides or {})}
    settings = RunSettings(num_server_rounds=rounds, run_dir=str(out / "runs"), keys_dir=str(keys_dir),
                           dp=dp, min_sites=2, num_sites=len(hospitals), **params)
    settings.check()
    digest = approve_run(configs, settings)
    log.info("each site's admin approved run manifest %s (as `atoll site approve` records it)", digest[:16])
    log.info("training %d rounds with %s (%s) across %s", rounds, settings.model,
             f"DP-SGD, noise multiplier {settings.noise_multiplier}, clip {settings.clip_norm}" if dp else "no DP",
             ", ".join(hospitals))
    outputs = simulate(settings, configs, verbose=verbose)
    summary = summarise(out, manifest, settings, outputs, time.perf_counter() - t_start)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, out)
    return summary


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
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from client.runtime import SIM_SITE_CONFIGS_ENV
    from server.app import run_consortium

    holder: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        holder["outputs"] = run_consortium(grid, settings, context.run_id)

    os.environ[SIM_SITE_CONFIGS_ENV] = os.pathsep.join(str(p) for p in site_configs)
    cpus = max(1, min(len(site_configs), os.cpu_count() or 1))
    gpus = 1.0 / len(site_configs) if torch.cuda.is_available() else 0.0
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(site_configs),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": gpus},
                                   "init_args": {"num_cpus": cpus, "logging_level": "ERROR",
                                                 "log_to_driver": verbose}},
                   verbose_logging=verbose)
    if "outputs" not in holder:
        raise RuntimeError("the simulation ended before the ServerApp finished; rerun with --verbose")
    return holder["outputs"]


def evaluate_heldout(out: Path, settings, outputs) -> list[dict]:
    """Score the global model of every round on the official test split (never seen by a site)."""
    from client.evaluation import evaluate_model
    from client.ingest import build_site_dataset
    from client.site_config import load_site_config
    from models import build_model

    cfg = load_site_config(out / demo_data.HELDOUT / "site.toml")
    cfg = dataclasses.replace(cfg, image_size=settings.image_size)
    ds = build_site_dataset(cfg)
    images = torch.cat([ds.train.images, ds.val.images])
    labels = torch.cat([ds.train.labels, ds.val.labels])
    scores = []
    for entry in [{"round": 0}] + outputs.history:
        rnd = entry["round"]
        path = outputs.weights_path(rnd)
        if not path.exists():
            continue
        model = build_model(settings.model, spatial_dims=2, in_channels=images.shape[1], num_classes=2)
        model.load_state_dict(torch.load(path, weights_only=True))
        m = evaluate_model(model, images, labels, torch.device("cpu"))
        scores.append({"round": rnd, "test_loss": m["loss"], "test_accuracy": m["accuracy"],
                       "test_auc": m["auc"], "test_images": m["n"]})
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
        "dp": settings.dp,
        "epsilon": epsilon,
        "delta": delta,
        "settings": dataclasses.asdict(settings),
        "history": history,
        "initial_weights": str(outputs.weights_path(0).relative_to(out)),
        "wall_seconds": round(wall, 1),
        "reference": "MedMNIST v2 centralised ResNet-18 (28 px): ACC 0.854 / AUC 0.944",
    }


def print_summary(s: dict, out: Path) -> None:
    print()
    print(f"Atoll demo: {s['rounds']} round(s) across {', '.join(s['sites'])} — {s['status']}"
          + (f" ({s['status_reason']})" if s["status_reason"] else ""))
    if s["test_accuracy"] is not None:
        print(f"  held-out test (official PneumoniaMNIST test split, 624 images): "
              f"accuracy {s['test_accuracy']:.3f}, AUC {s['test_auc']:.3f}")
        print(f"  reference: {s['reference']}")
    if s["epsilon"]:
        print("  privacy spent (patient-level, lifetime of each site's dataset):")
        for site, eps in s["epsilon"].items():
            d = s["delta"].get(site)
            print(f"    {site}: epsilon {eps:.2f}" + (f" at delta {d:.1e}" if d else ""))
    elif not s["dp"]:
        print("  DP was off for this run (--no-dp): the updates carry no privacy guarantee")
    print(f"  wall time {s['wall_seconds']:.0f} s; summary: {out / 'summary.json'}; run folder: {out / s['run_dir']}")
