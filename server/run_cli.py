"""`atoll run start|status`: the consortium lead's commands.

`start` submits the Atoll app to a SuperLink with Flower's own `flwr run` (so Flower builds and
ships the FAB) after checking the settings locally, so a typo fails here and not at round 1.
`status` reads a run folder and shows, per round, which site contributed, refused or was rejected,
the released validation metrics and each site's reported epsilon.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from server.settings import RunSettings, SettingsError

APP_DIR = Path(__file__).resolve().parents[1]


def add_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="consortium lead: start and watch training runs")
    run_sub = run.add_subparsers(dest="run_command", metavar="COMMAND")
    run.set_defaults(func=lambda a: (run.print_help(), 2)[1])

    start = run_sub.add_parser(
        "start", help="submit a training run to the consortium's SuperLink",
        description="Checks the run settings, then runs `flwr run APP SUPERLINK --run-config ...`. "
                    "SUPERLINK is a connection name from $FLWR_HOME/config.toml (see README, 'Consortium lead').")
    start.add_argument("superlink", help="connection name in $FLWR_HOME/config.toml")
    start.add_argument("--run-dir", required=True, help="absolute folder on the SuperLink host for run outputs")
    start.add_argument("--run-name", default="", help="name of the run folder (default: generated)")
    start.add_argument("--keys-dir", default="", help="enrolled site signing keys (<site>.pub) on the SuperLink host")
    add_run_shape_arguments(start)
    d = RunSettings()
    start.add_argument("--min-sites", type=int, default=d.min_sites)
    start.add_argument("--secagg-num-shares", type=float, default=d.secagg_num_shares,
                       help="SecAgg+: key shares per site, an odd count >= 3 or a fraction of the sites (1 = all)")
    start.add_argument("--secagg-reconstruction-threshold", type=float, default=d.secagg_reconstruction_threshold,
                       help="SecAgg+: shares needed to rebuild a dropped site's masks, a count >= 2 or a fraction")
    start.add_argument("--secagg-max-weight", type=float, default=d.secagg_max_weight,
                       help="SecAgg+: at least the largest number of training examples at any site")
    start.add_argument("--allow-insecure-demo", action="store_true",
                       help="let the run go to a connection marked `insecure = true` (plaintext, no TLS): local "
                            "demos and tests only; refused otherwise")
    start.add_argument("--app", default=str(APP_DIR), help="Flower app folder (default: this Atoll checkout)")
    start.add_argument("--stream", action="store_true", help="follow the run's logs")
    start.set_defaults(func=_start)

    status = run_sub.add_parser("status", help="show a run's rounds, sites, metrics and epsilon")
    status.add_argument("run_dir", help="the run's folder (RUN_DIR/<run-name>)")
    status.add_argument("--json", action="store_true", help="print history.json as is")
    status.set_defaults(func=_status)


def add_run_shape_arguments(p: argparse.ArgumentParser) -> None:
    """What a run does with the sites' data, and so what they approve: shared by `atoll run start` and
    `atoll run manifest`, with RunSettings' defaults, so that a default run matches a default manifest."""
    d = RunSettings()
    t, m = d.task, d.mechanism
    p.add_argument("--rounds", type=int, default=d.num_server_rounds)
    p.add_argument("--model", default=d.model)
    task = p.add_argument_group("task (what the sites approve and check against their data)")
    task.add_argument("--task", default=t.kind, choices=("classification", "segmentation"),
                      help=f"task kind (default: {t.kind})")
    task.add_argument("--classes", default=None,
                      help="classification: class names in output order, comma-separated "
                           f"(default: {','.join(t.classes)})")
    task.add_argument("--labels", default="", help="segmentation: foreground label names, comma-separated")
    task.add_argument("--spatial-dims", type=int, default=t.spatial_dims, choices=(2, 3),
                      help=f"2 (images) or 3 (volumes) (default: {t.spatial_dims})")
    task.add_argument("--in-channels", type=int, default=t.in_channels, help=f"default: {t.in_channels}")
    task.add_argument("--image-size", default=str(t.size[0]),
                      help=f"input side (square / cube) or H,W / D,H,W (default: {t.size[0]})")
    task.add_argument("--spacing-mm", default="", help="3D: target voxel spacing, e.g. 1,1,1")
    task.add_argument("--orientation", default="", help="3D: axis codes to reorient to, e.g. RAS")
    task.add_argument("--modalities", default="", help="DICOM modalities the task is for, e.g. CR,DX (default: any)")
    p.add_argument("--local-steps", type=int, default=m.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="minibatch size without DP")
    p.add_argument("--sample-rate", type=float, default=m.sample_rate,
                   help="DP-SGD: probability that a patient is in a step's batch")
    p.add_argument("--noise-multiplier", type=float, default=m.noise_multiplier)
    p.add_argument("--clip-norm", type=float, default=m.clip_norm)
    p.add_argument("--accountant", default=m.accountant, choices=("", "rdp", "prv"),
                   help="accountant the sites must charge with (default: each site's policy)")
    p.add_argument("--no-dp", action="store_true", help="ask for non-DP training (sites refuse unless allowed)")
    p.add_argument("--strategy", default=d.strategy,
                   help="aggregation: fedavg | fedprox | fedmedian | fedtrimmedavg | krum | multikrum | bulyan "
                        f"(default: {d.strategy})")
    p.add_argument("--proximal-mu", type=float, default=d.proximal_mu,
                   help="fedprox: weight mu of the sites' proximal term (required > 0 with --strategy fedprox)")
    p.add_argument("--num-malicious", type=int, default=d.num_malicious,
                   help="krum/multikrum/bulyan: malicious sites the rule tolerates (required >= 1 with them)")
    p.add_argument("--secagg", action="store_true",
                   help="aggregate under SecAgg+ (the server sees only the sum of the masked updates; "
                        "needs strategy fedavg and no max-update-norm; see docs/security.md)")


def run_shape_config(args: argparse.Namespace) -> dict:
    """The run-config keys set by :func:`add_run_shape_arguments`."""
    return {"num-server-rounds": args.rounds, "model": args.model, "task": args.task,
            "classes": args.classes if args.classes is not None else
            (",".join(RunSettings().task.classes) if args.task == "classification" else ""),
            "labels": args.labels, "spatial-dims": args.spatial_dims, "in-channels": args.in_channels,
            "image-size": args.image_size, "spacing-mm": args.spacing_mm, "orientation": args.orientation,
            "modalities": args.modalities, "local-steps": args.local_steps, "lr": args.lr,
            "batch-size": args.batch_size, "sample-rate": args.sample_rate, "noise-multiplier": args.noise_multiplier,
            "clip-norm": args.clip_norm, "accountant": args.accountant, "dp": not args.no_dp, "secagg": args.secagg,
            "strategy": args.strategy, "proximal-mu": args.proximal_mu, "num-malicious": args.num_malicious}


def _start(args: argparse.Namespace) -> int:
    cfg = {**run_shape_config(args), "run-dir": args.run_dir, "run-name": args.run_name, "keys-dir": args.keys_dir,
           "min-sites": args.min_sites}
    if args.secagg:
        cfg.update({"secagg-num-shares": args.secagg_num_shares,
                    "secagg-reconstruction-threshold": args.secagg_reconstruction_threshold,
                    "secagg-max-weight": args.secagg_max_weight})
    try:
        RunSettings.from_run_config(cfg)
    except SettingsError as exc:
        print(f"atoll run start: {exc}", file=sys.stderr)
        return 2
    if not (Path(args.app) / "pyproject.toml").exists():
        print(f"atoll run start: {args.app} is not a Flower app folder (no pyproject.toml); pass --app",
              file=sys.stderr)
        return 2
    problem = _insecure_connection(args.superlink)
    if problem and not args.allow_insecure_demo:
        print(f"atoll run start: {problem}. A consortium runs over TLS (README 'Consortium lead'); for a local "
              "demo or test only, pass --allow-insecure-demo", file=sys.stderr)
        return 2
    if problem:
        print("=" * 78 + f"\nWARNING: INSECURE RUN. {problem}: model updates, ledger records and metrics travel\n"
              "in plaintext and anyone on the network can read or alter them. Demo/test use only.\n" + "=" * 78,
              file=sys.stderr)
    flwr = shutil.which("flwr") or str(Path(sys.executable).parent / "flwr")
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())
    cmd = [flwr, "run", args.app, args.superlink, "--run-config", overrides] + (["--stream"] if args.stream else [])
    print("$ " + " ".join(cmd[:4]) + " --run-config '" + overrides + "'")
    return subprocess.call(cmd)


def _insecure_connection(name: str) -> str | None:
    """Why the Flower connection ``name`` is plaintext (``insecure = true`` in $FLWR_HOME/config.toml), or None."""
    import os
    import tomllib

    path = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")) / "config.toml"
    try:
        conf = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return None  # flwr itself reports a missing or broken connection file
    conn = conf.get("superlink", {}).get(name, {})
    if isinstance(conn, dict) and conn.get("insecure") is True:
        return f"connection {name!r} in {path} is marked insecure = true"
    return None


def _status(args: argparse.Namespace) -> int:
    root = Path(args.run_dir)
    hist_path = root / "history.json"
    if not hist_path.exists():
        print(f"atoll run status: {hist_path} not found; is {root} a run folder (RUN_DIR/<run-name>)?",
              file=sys.stderr)
        return 2
    history = json.loads(hist_path.read_text())
    if args.json:
        print(json.dumps(history, indent=2))
        return 0
    status_path = root / "status.json"
    status = json.loads(status_path.read_text()) if status_path.exists() else {"status": "running"}
    print(f"run {root.name}: {status['status']}" + (f" — {status['reason']}" if status.get("reason") else ""))
    for entry in history:
        agg = entry.get("aggregated", {})
        line = f"round {entry['round']}: " + ", ".join(f"{k} {v:.3f}" for k, v in agg.items())
        print(line)
        for site, s in entry["sites"].items():
            eps = f" epsilon {s['epsilon']:.2f}" if s.get("epsilon") is not None else ""
            why = f" [{s['code']}] {s['message']}" if s.get("code") else ""
            print(f"    {site:<16} {s['status']}{eps}{why}")
    return 0
