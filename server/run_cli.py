"""`atoll run start|resume|status|stop`: the consortium lead's commands.

`start` submits the Atoll app to a SuperLink with Flower's own `flwr run` (so Flower builds and
ships the FAB) after checking the settings and the connection locally, so a typo fails here and not
at round 1, and prints the run folder to watch. `status` reads a run folder and shows, per round,
which site contributed, refused or was rejected, the released validation metrics and each site's
reported epsilon. `stop` asks the ServerApp to stop cleanly after the round in flight. `resume` continues an
interrupted run from its checkpoint as the same run (server.resume).

Parsers import only the standard library (and RunSettings, itself light): the ML stack loads in
the ServerApp, never for `--help` or a settings error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from server.connections import ConnectionNotFound, resolve
from server.outputs import SERVER_FILE, STOP_FILE, read_stop_request, write_stop_request
from server.settings import RunSettings, SettingsError

APP_DIR = Path(__file__).resolve().parents[1]
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3  # as atoll.cli.EXIT_CODES

# Names as models.MODEL_NAMES and server.robust.STRATEGIES hold them, listed here so that `--help` and a typo
# need neither MONAI nor Flower's strategies (tests/test_cli_startup.py keeps the lists equal).
MODEL_CHOICES = ("atollnet", "atollnet-wide", "atollnet-ws", "scatternet", "densenet121", "resnet10", "resnet18",
                 "resnet34", "basicunet", "basicunet-small", "scalespace")
STRATEGY_CHOICES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum",
                    "bulyan")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option with a value shows its default (flags and empty defaults do not); the epilog keeps its lines."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", False) or isinstance(action, argparse._StoreTrueAction):
            return action.help
        return super()._get_help_string(action)


def add_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="consortium lead: start, resume, watch, stop and evaluate training runs",
                         description="Start a training run on the consortium's SuperLink, watch its folder, stop it, "
                                     "resume it after a crash, evaluate its models site by site.")
    run_sub = run.add_subparsers(dest="run_command", metavar="COMMAND")
    run.set_defaults(func=lambda a: (run.print_help(), EXIT_USAGE)[1])

    start = run_sub.add_parser(
        "start", help="submit a training run to the consortium's SuperLink", formatter_class=HelpFormatter,
        description="Checks the run settings and the connection, then runs `flwr run APP --run-config ...` "
                    "against the SuperLink connection NAME ([superlink.NAME] in $FLWR_HOME/config.toml, see "
                    "README 'Consortium lead'), and prints the run folder to watch with `atoll run status`. "
                    "Give the same run-shape options as to `atoll run manifest`, or the sites refuse the run.")
    start.add_argument("--superlink", metavar="NAME", default=None,
                       help="connection name in $FLWR_HOME/config.toml (default: its [superlink] default)")
    start.add_argument("connection", nargs="?", default=None, metavar="NAME",
                       help="deprecated spelling of --superlink NAME (still accepted)")
    start.add_argument("--run-dir", metavar="DIR", required=True,
                       help="absolute folder on the SuperLink host under which the run folder is made")
    start.add_argument("--run-name", metavar="NAME", default="", help="name of the run folder (empty: run-DATE-TIME-XXXX)")
    start.add_argument("--keys-dir", metavar="DIR", default="",
                       help="folder on the SuperLink host with each enrolled site's ledger key as <site>.pub "
                            "(the site_ed25519.pub of `atoll site init`, renamed)")
    add_run_shape_arguments(start)
    d = RunSettings()
    start.add_argument("--max-update-norm", metavar="X", type=float, default=d.max_update_norm,
                       help="reject a site's update whose distance to the global model exceeds this (0 = no bound)")
    start.add_argument("--min-sites", metavar="N", type=int, default=d.min_sites,
                       help="stop the run when fewer sites contribute to a round")
    start.add_argument("--num-sites", metavar="N", type=int, default=d.num_sites,
                       help="sites to wait for before each round (0 = --min-sites)")
    start.add_argument("--secagg-num-shares", metavar="X", type=float, default=d.secagg_num_shares,
                       help="SecAgg+: key shares per site, an odd count >= 3 or a fraction of the sites (1 = all)")
    start.add_argument("--secagg-reconstruction-threshold", metavar="X", type=float, default=d.secagg_reconstruction_threshold,
                       help="SecAgg+: shares needed to rebuild a dropped site's masks, a count >= 2 or a fraction")
    start.add_argument("--secagg-max-weight", metavar="X", type=float, default=d.secagg_max_weight,
                       help="SecAgg+: at least the largest number of training examples at any site")
    start.add_argument("--allow-insecure-demo", action="store_true",
                       help="let the run go to a connection marked `insecure = true` (plaintext, no TLS): local "
                            "demos and tests only; refused otherwise")
    start.add_argument("--app", metavar="DIR", default=str(APP_DIR), help="Flower app folder")
    start.add_argument("--stream", action="store_true", help="follow the run's logs")
    start.set_defaults(func=_start)

    resume = run_sub.add_parser(
        "resume", help="continue an interrupted run from its last completed round", formatter_class=HelpFormatter,
        description="Continues a run whose SuperLink or ServerApp died (or that was stopped) as the SAME run: same "
                    "run name, same settings (read from RUN_FOLDER/settings.json), so the sites' approvals of its "
                    "manifest still hold. The ServerApp goes on from RUN_FOLDER/checkpoint.json (the last round "
                    "completed and recorded) and sets aside what an unfinished round left behind in "
                    "RUN_FOLDER/resumed/N/. The sites answer a round they already completed with the very update "
                    "and ledger record they released, at no new privacy charge; a reservation without a completed "
                    "round stays charged and is not charged again. Run it on the SuperLink host (it reads the run "
                    "folder); it submits with `flwr run` like `atoll run start`.",
        epilog="exit codes: 0 submitted, 1 nothing to resume (completed, still running, no checkpoint), "
               "2 usage, 3 run folder or connection not found")
    resume.add_argument("run_dir", metavar="RUN_FOLDER", help="the run's folder (RUN_DIR/<run-name>)")
    resume.add_argument("--superlink", metavar="NAME", default=None,
                        help="connection name in $FLWR_HOME/config.toml (default: its [superlink] default)")
    resume.add_argument("--allow-insecure-demo", action="store_true",
                        help="let the run go to a connection marked `insecure = true` (local demos and tests only)")
    resume.add_argument("--app", metavar="DIR", default=str(APP_DIR), help="Flower app folder")
    resume.add_argument("--stream", action="store_true", help="follow the run's logs")
    resume.set_defaults(func=_resume)

    status = run_sub.add_parser(
        "status", help="show a run's state, rounds, sites, metrics and epsilon", formatter_class=HelpFormatter,
        description="Reads the run folder (on the SuperLink host). A run whose ServerApp is gone without a final "
                    "status (killed, crashed) is reported as such, not as running; with --superlink the answer "
                    "also names Flower's own status of the run (`flwr ls`).")
    status.add_argument("run_dir", metavar="RUN_FOLDER", help="the run's folder (RUN_DIR/<run-name>)")
    status.add_argument("--json", action="store_true", help="print history.json as is")
    status.add_argument("--superlink", metavar="NAME", default=None,
                        help="also ask Flower (`flwr ls`) for the run's status over this connection")
    status.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="follow the run: print each round as it is recorded, until the run ends or SECONDS "
                             "pass (0 = print once); exit 1 if it is still running then")
    status.add_argument("--watch", action="store_true",
                        help="show round k of N, each site's state (training, contributed, refused and why, "
                             "dropped), epsilon against its budget, latest metrics, time per round and an ETA, "
                             "refreshed until the run ends (a live table on a terminal, reprinted lines otherwise)")
    status.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="--watch: refresh period")
    status.set_defaults(func=_status)

    stop = run_sub.add_parser(
        "stop", help="stop a run cleanly after the round in flight", formatter_class=HelpFormatter,
        description="Asks the run's ServerApp to stop: it finishes the round in flight (every site's charge for "
                    "it is recorded in the run's ledger copy), sends no further round, and writes status.json "
                    "'stopped by the lead at round K'; `atoll audit verify` then reports the stop, not a gap. "
                    "Run it on the SuperLink host. `flwr stop RUN_ID` instead kills the run at once: a round in "
                    "flight may then be charged at the sites but missing from the server's record.")
    stop.add_argument("run_dir", metavar="RUN_FOLDER", help="the run's folder (RUN_DIR/<run-name>)")
    stop.add_argument("--reason", default="", help="why, for the record (no patient data)")
    stop.add_argument("--after-round", type=int, default=None, metavar="K",
                      help="stop once round K is done (default: after the round in flight)")
    stop.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                      help="wait up to this long for the run to record the stop (0 = do not wait)")
    stop.set_defaults(func=_stop)

    from server.evaluate_cli import add_parser as add_evaluate_parser  # `atoll run evaluate` (its own module)

    add_evaluate_parser(run_sub)


def add_run_shape_arguments(p: argparse.ArgumentParser) -> None:
    """What a run does with the sites' data, and so what they approve: shared by `atoll run start` and
    `atoll run manifest`, with RunSettings' defaults, so that a default run matches a default manifest."""
    d = RunSettings()
    t, m = d.task, d.mechanism
    p.add_argument("--rounds", metavar="N", type=int, default=d.num_server_rounds, help="federated rounds")
    p.add_argument("--model", default=d.model, choices=MODEL_CHOICES, metavar="NAME",
                   help=f"network: {', '.join(MODEL_CHOICES)} (basicunet*, scalespace: segmentation)")
    task = p.add_argument_group("task (what the sites approve and check against their data; contract.TaskSpec)")
    task.add_argument("--task", default=t.kind, choices=("classification", "segmentation"), help="task kind")
    task.add_argument("--classes", metavar="A,B,...", default=None,
                      help="classification: class names in output order, comma-separated "
                           f"(default: {','.join(t.classes)})")
    task.add_argument("--labels", metavar="A,B,...", default="",
                      help="segmentation: foreground label names (voxel value 1, 2, ...)")
    task.add_argument("--spatial-dims", type=int, default=t.spatial_dims, choices=(2, 3), help="2 images, 3 volumes")
    task.add_argument("--in-channels", metavar="N", type=int, default=t.in_channels, help="input channels")
    task.add_argument("--image-size", metavar="PIXELS", default=str(t.size[0]),
                      help="input side of a square image / cube, or H,W / D,H,W")
    task.add_argument("--spacing-mm", metavar="D,H,W", default="", help="3D: target voxel spacing in mm, e.g. 1,1,1")
    task.add_argument("--orientation", metavar="AXES", default="", help="3D: axis codes to reorient to, e.g. RAS")
    task.add_argument("--modalities", metavar="M,...", default="",
                      help="DICOM modalities the task is for, e.g. CR,DX (default: any)")
    mech = p.add_argument_group("DP mechanism per round and site (contract.Mechanism)")
    mech.add_argument("--local-steps", metavar="N", type=int, default=m.steps, help="local (DP-SGD) steps per round")
    mech.add_argument("--sample-rate", metavar="Q", type=float, default=m.sample_rate,
                      help="DP-SGD: probability that a patient is in a step's batch")
    mech.add_argument("--noise-multiplier", metavar="SIGMA", type=float, default=m.noise_multiplier,
                      help="DP-SGD noise multiplier sigma (noise std = sigma x clip norm)")
    mech.add_argument("--clip-norm", metavar="C", type=float, default=m.clip_norm, help="DP-SGD per-patient clip norm C")
    mech.add_argument("--accountant", default=m.accountant, choices=("", "rdp", "prv"),
                      help="accountant the sites must charge with (default: each site's policy's)")
    mech.add_argument("--adaptive-clip", action="store_true",
                      help="adaptive clipping (Andrew et al. 2021): --clip-norm is the starting C; needs --count-noise")
    mech.add_argument("--target-unclipped-quantile", metavar="GAMMA", type=float, default=m.target_unclipped_quantile,
                      help="adaptive clipping: fraction of sampled patients C should leave unclipped")
    mech.add_argument("--clip-lr", metavar="ETA", type=float, default=m.clip_lr,
                      help="adaptive clipping: geometric step of C per DP step")
    mech.add_argument("--count-noise", metavar="SIGMA_B", type=float, default=m.count_noise,
                      help="adaptive clipping: noise std of the released unclipped count (> noise multiplier / 2)")
    p.add_argument("--lr", metavar="X", type=float, default=d.lr, help="local learning rate (SGD with momentum 0.9)")
    p.add_argument("--batch-size", metavar="N", type=int, default=d.batch_size, help="minibatch size without DP")
    p.add_argument("--no-dp", action="store_true", help="ask for non-DP training (sites refuse unless allowed)")
    p.add_argument("--strategy", type=str.lower, choices=STRATEGY_CHOICES, default=d.strategy, metavar="NAME",
                   help=f"Flower aggregation strategy: {', '.join(STRATEGY_CHOICES)} (sites approve it; robust ones "
                        "need --num-malicious and enough sites)")
    p.add_argument("--proximal-mu", type=float, default=d.proximal_mu,
                   help="fedprox: weight mu of the sites' proximal term (required > 0 with --strategy fedprox)")
    p.add_argument("--num-malicious", type=int, default=d.num_malicious,
                   help="krum/multikrum/bulyan: malicious sites the rule tolerates (required >= 1 with them)")
    so = d.server_options  # contract.server_options: post-processing of the aggregate (README "Server options")
    p.add_argument("--server-lr", type=float, default=so.server_lr, help="fedavgm: server learning rate")
    p.add_argument("--server-momentum", type=float, default=so.server_momentum,
                   help="fedavgm: server momentum in [0, 1) (required > 0 unless --server-lr != 1)")
    for key, default in (("eta", so.fedadam_eta), ("beta1", so.fedadam_beta1), ("beta2", so.fedadam_beta2),
                         ("tau", so.fedadam_tau)):
        p.add_argument(f"--fedadam-{key}", type=float, default=default, help=f"fedadam: Flower's FedAdam {key}")
    p.add_argument("--server-ema", type=float, default=so.server_ema,
                   help="decay of the server's EMA of the global model, saved beside each round (0 = off)")
    p.add_argument("--decision-threshold", choices=("argmax", "validation"), default=so.decision_threshold,
                   help="binary tasks: argmax, or the threshold chosen from the sites' released "
                        "val_threshold_counts (validation splits, released in the clear)")
    p.add_argument("--augment-multiplicity", metavar="K", type=int, default=d.augment_multiplicity,
                   help="K random views (flip, shift) of each sampled image, their gradients averaged before "
                        "clipping: same privacy charge, K-fold compute (1 = off; classification only)")
    p.add_argument("--ema-decay", metavar="D", type=float, default=d.ema_decay,
                   help="sites release the moving average (decay D in [0, 1)) of their DP iterates within a "
                        "round instead of the last one: post-processing, no extra charge (0 = off)")
    p.add_argument("--secagg", action="store_true",
                   help="aggregate under SecAgg+ (the server sees only the sum of the masked updates; "
                        "needs strategy fedavg, fedavgm or fedadam and no max-update-norm; see docs/security.md)")


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
            "strategy": args.strategy, "proximal-mu": args.proximal_mu, "num-malicious": args.num_malicious,
            "server-lr": args.server_lr, "server-momentum": args.server_momentum, "fedadam-eta": args.fedadam_eta,
            "fedadam-beta1": args.fedadam_beta1, "fedadam-beta2": args.fedadam_beta2, "fedadam-tau": args.fedadam_tau,
            "server-ema": args.server_ema, "decision-threshold": args.decision_threshold,
            "adaptive-clip": args.adaptive_clip, "target-unclipped-quantile": args.target_unclipped_quantile,
            "clip-lr": args.clip_lr, "count-noise": args.count_noise,
            "augment-multiplicity": args.augment_multiplicity, "ema-decay": args.ema_decay}


def _err(text: str) -> None:
    print(f"atoll run: {text}", file=sys.stderr)


def new_run_name() -> str:
    """A fresh run folder name, chosen here so that `atoll run start` can say where the run writes."""
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _start(args: argparse.Namespace) -> int:
    if args.connection and args.superlink and args.connection != args.superlink:
        _err(f"two connections given ({args.connection!r} and --superlink {args.superlink!r}); give one")
        return EXIT_USAGE
    if args.connection:
        print(f"note: the positional connection name is deprecated; use --superlink {args.connection}",
              file=sys.stderr)
    run_name = args.run_name or new_run_name()
    cfg = {**run_shape_config(args), "run-dir": args.run_dir, "run-name": run_name, "keys-dir": args.keys_dir,
           "max-update-norm": args.max_update_norm, "min-sites": args.min_sites,
           "num-sites": args.num_sites}
    if args.secagg:
        cfg.update({"secagg-num-shares": args.secagg_num_shares,
                    "secagg-reconstruction-threshold": args.secagg_reconstruction_threshold,
                    "secagg-max-weight": args.secagg_max_weight})
    try:
        RunSettings.from_run_config(cfg)
    except SettingsError as exc:
        _err(f"start: {exc}")
        return EXIT_USAGE
    folder = Path(args.run_dir) / run_name
    if (folder / "settings.json").exists():  # checked here when run on the SuperLink host; the ServerApp refuses too
        _err(f"start: run {run_name!r} already exists in {args.run_dir} (its history is never overwritten): "
             f"`atoll run resume {folder}` continues it; a new run needs a new --run-name")
        return EXIT_USAGE
    return _submit(args, "start", cfg, folder)


def _submit(args: argparse.Namespace, verb: str, cfg: dict, folder: Path) -> int:
    """`flwr run APP CONNECTION --run-config CFG` after checking the app folder and the connection."""
    if not (Path(args.app) / "pyproject.toml").exists():
        _err(f"{verb}: {args.app} is not a Flower app folder (no pyproject.toml); pass --app")
        return EXIT_USAGE
    try:
        conn = resolve(args.superlink or getattr(args, "connection", None))
    except ConnectionNotFound as exc:
        _err(f"{verb}: {exc}")
        return EXIT_NOT_FOUND
    if conn.insecure and not args.allow_insecure_demo:
        _err(f"{verb}: connection {conn.name!r} in {conn.path} is marked insecure = true. A consortium runs over "
             "TLS (README 'Consortium lead'); for a local demo or test only, pass --allow-insecure-demo")
        return EXIT_USAGE
    if conn.insecure:
        print("=" * 78 + f"\nWARNING: INSECURE RUN. connection {conn.name!r} in {conn.path} is marked insecure = "
              "true:\nmodel updates, ledger records and metrics travel in plaintext and anyone on the network\n"
              "can read or alter them. Demo/test use only.\n" + "=" * 78, file=sys.stderr)
    problem = _unreachable(conn)
    if problem:
        _err(f"{verb}: {problem}")
        return EXIT_FAILED
    flwr = shutil.which("flwr") or str(Path(sys.executable).parent / "flwr")
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())
    cmd = [flwr, "run", args.app, conn.name, "--run-config", overrides] + (["--stream"] if args.stream else [])
    print(f"run folder (on the SuperLink host): {folder}")
    print("$ " + " ".join(cmd[:4]) + " --run-config '" + overrides + "'", flush=True)
    rc = subprocess.call(cmd)
    if rc == 0 and not args.stream:
        print(f"watch it:  atoll run status {folder}\nstop it:   atoll run stop {folder}   (after the round in flight)")
    return rc


def _unreachable(conn, timeout: float = 5.0) -> str | None:
    """Why nothing answers at the connection's address (so that `flwr run` does not retry it for two minutes)."""
    address = str(conn.conf.get("address") or "")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None  # Flower's own checks name a malformed or missing address
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        return (f"nothing answers at {address} (connection {conn.name!r} in {conn.path}: "
                f"{exc.strerror or exc.__class__.__name__}); is the SuperLink running there?")
    return None


# ------------------------------------------------------------------------------------------------ resume


def _resume(args: argparse.Namespace) -> int:
    from server.checkpoint import CheckpointError, read_checkpoint

    root = _run_folder(args.run_dir)
    if root is None:
        return EXIT_NOT_FOUND
    try:
        settings = RunSettings.from_json(json.loads((root / "settings.json").read_text()),
                                         where=str(root / "settings.json"))
    except (OSError, ValueError) as exc:
        _err(f"resume: {exc}")
        return EXIT_FAILED
    state = server_state(root)
    if state["status"] == "running":
        _err(f"resume: run {root.name} is still running (its ServerApp writes {root}); resume a run only after its "
             f"ServerApp is gone (`atoll run status {root}` says 'ended'), or stop it: `atoll run stop {root}`")
        return EXIT_FAILED
    if state["status"] == "completed":
        _err(f"resume: run {root.name} is completed; there is nothing to resume")
        return EXIT_FAILED
    try:
        point = read_checkpoint(root)
    except CheckpointError as exc:
        _err(f"resume: {exc}")
        return EXIT_FAILED
    if point is None:
        _err(f"resume: {root} has no checkpoint.json (written by Atoll after each round); start a new run instead")
        return EXIT_FAILED
    if Path(settings.run_dir).resolve() != root.parent.resolve() or settings.run_name != root.name:
        _err(f"resume: {root / 'settings.json'} is the run {settings.run_name!r} in {settings.run_dir}: the folder "
             "was moved or renamed (its settings, whose hash every signed digest carries, name where it was); move "
             "it back to resume it")
        return EXIT_USAGE
    done, total = point.round, settings.num_server_rounds
    history = _history(root)
    print(f"run {root.name}: {state['status']}" + (f" — {state['reason']}" if state.get("reason") else ""))
    print(f"resuming after round {done} of {total} (checkpoint {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(point.time))}, "
          f"Flower run {point.flower_run_id}); {len(history)} round(s) recorded, "
          + (f"rounds {done + 1}-{total} to go" if total > done + 1 else f"round {total} to go" if total > done
             else "no round left: the run is only marked completed"))
    cfg = dataclasses.replace(settings, resume=True).to_run_config()
    return _submit(args, "resume", cfg, root)


# ------------------------------------------------------------------------------------------------ status


def _run_folder(path: str, wait: float = 0.0) -> Path | None:
    """``path`` if it is a run folder, else None after saying what it is (and which runs it holds).

    ``wait`` > 0: a run just submitted has no folder until its ServerApp starts; wait that long for it.
    """
    root = Path(path)
    deadline = time.monotonic() + wait
    if wait > 0 and not (root / "settings.json").is_file():
        print(f"waiting for the ServerApp to create {root} ...", flush=True)
        while time.monotonic() < deadline and not (root / "settings.json").is_file():
            time.sleep(1.0)
    if (root / "settings.json").is_file():
        return root
    if not root.is_dir():
        _err(f"{root} does not exist (give the run's folder, RUN_DIR/<run-name>, on the SuperLink host)")
        return None
    runs = sorted(p.name for p in root.iterdir() if (p / "settings.json").is_file())
    hint = f"; it holds the runs {', '.join(runs[-5:])}: pass {root / runs[-1]}" if runs else ""
    _err(f"{root} is not a run folder (no settings.json){hint}")
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


def server_state(root: Path) -> dict:
    """The run's final status.json, or what can be told of a run without one (running / gone)."""
    server = {}
    try:
        server = json.loads((root / SERVER_FILE).read_text())
    except (OSError, ValueError):
        pass
    status_path = root / "status.json"
    if status_path.is_file():
        return {**json.loads(status_path.read_text()), "flower_run_id": server.get("flower_run_id")}
    pid, host = server.get("pid"), server.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and not _pid_alive(pid):
        return {"status": "ended", "reason": f"the ServerApp (pid {pid}) is gone without a final status: it was "
                                             "killed or crashed; the last round recorded is the last one done",
                "flower_run_id": server.get("flower_run_id")}
    state = {"status": "running", "flower_run_id": server.get("flower_run_id")}
    stop = read_stop_request(root)
    if stop is not None:
        state["reason"] = "the lead asked it to stop; it stops after the round in flight"
    return state


def _flower_status(connection: str, run_id) -> str:
    """Flower's own status of the run (`flwr ls --run-id`), or why it could not be asked."""
    if not isinstance(run_id, int):
        return "unknown (the run folder does not name its Flower run id)"
    try:
        conn = resolve(connection)
    except ConnectionNotFound as exc:
        return f"not asked: {str(exc).splitlines()[0]}"
    flwr = shutil.which("flwr") or str(Path(sys.executable).parent / "flwr")
    try:
        res = subprocess.run([flwr, "ls", conn.name, "--run-id", str(run_id), "--format", "json"],
                             capture_output=True, text=True, timeout=60)
        runs = json.loads(res.stdout[res.stdout.find("{"):]).get("runs", [])
        return str(runs[0].get("status")) if runs else f"run {run_id} unknown to Flower"
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return f"not asked: `flwr ls` failed ({exc.__class__.__name__})"


def _history(root: Path) -> list[dict]:
    try:
        return json.loads((root / "history.json").read_text())
    except FileNotFoundError:
        return []


def _round_lines(entry: dict) -> list[str]:
    agg = entry.get("aggregated", {})
    lines = [f"round {entry['round']}: " + ", ".join(f"{k} {v:.3f}" for k, v in agg.items())]
    for site, s in entry["sites"].items():
        eps = f" epsilon {s['epsilon']:.2f}" if s.get("epsilon") is not None else ""
        why = f" [{s['code']}] {s['message']}" if s.get("code") else ""
        lines.append(f"    {site:<16} {s['status']}{eps}{why}")
    return lines


def _follow(root: Path, seconds: float) -> int:
    """`status --wait`: each round as it lands, then the final state."""
    deadline, shown = time.monotonic() + seconds, 0
    print(f"following run {root.name} (up to {seconds:.0f} s) ...", flush=True)
    while True:
        history, state = _history(root), server_state(root)
        for entry in history[shown:]:
            print("\n".join(_round_lines(entry)), flush=True)
        shown = len(history)
        if state["status"] != "running":
            print(f"run {root.name}: {state['status']}" + (f" — {state['reason']}" if state.get("reason") else ""))
            return EXIT_OK
        if time.monotonic() >= deadline:
            _err(f"status: run {root.name} still running after {seconds:.0f} s ({shown} round(s) recorded)")
            return EXIT_FAILED
        time.sleep(1.0)


def _status(args: argparse.Namespace) -> int:
    start = time.monotonic()
    root = _run_folder(args.run_dir, args.wait)
    if root is None:
        return EXIT_NOT_FOUND
    history = _history(root)
    if args.json:
        print(json.dumps(history, indent=2))
        return EXIT_OK
    if args.watch:
        from server.run_watch import watch

        watch(root, server_state, interval=max(0.1, args.interval),
              timeout=max(1.0, args.wait - (time.monotonic() - start)) if args.wait > 0 else 0.0)
        return EXIT_OK
    if args.wait > 0:
        return _follow(root, max(1.0, args.wait - (time.monotonic() - start)))
    state = server_state(root)
    flower = _flower_status(args.superlink, state.get("flower_run_id")) if args.superlink else None
    if state["status"] == "running" and flower and flower.startswith("finished"):
        state = {**state, "status": "ended", "reason": f"Flower lists the run as {flower} but its ServerApp wrote "
                                                      "no final status (killed or crashed)"}
    settings = json.loads((root / "settings.json").read_text())
    rounds = settings.get("num_server_rounds")
    head = f"run {root.name}: {state['status']}" + (f" — {state['reason']}" if state.get("reason") else "")
    if state["status"] == "running":
        done = len(history)
        head += (f" — started, waiting for round 1 of {rounds}" if not done
                 else f" — {done} of {rounds} round(s) done, round {done + 1} in flight")
    print(head)
    if flower is not None:
        print(f"Flower says: {flower}")
    for entry in history:
        print("\n".join(_round_lines(entry)))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ stop


def _stop(args: argparse.Namespace) -> int:
    root = _run_folder(args.run_dir, args.wait)
    if root is None:
        return EXIT_NOT_FOUND
    state = server_state(root)
    if state["status"] != "running":
        _err(f"stop: run {root.name} is not running ({state['status']}"
             + (f": {state['reason']}" if state.get("reason") else "") + ")")
        return EXIT_FAILED
    if "\n" in args.reason or len(args.reason) > 200:
        _err("stop: --reason must be one line of at most 200 characters")
        return EXIT_USAGE
    if args.after_round is not None and args.after_round < 0:
        _err("stop: --after-round must be >= 0")
        return EXIT_USAGE
    write_stop_request(root, args.reason, args.after_round)
    when = "after the round in flight" if args.after_round is None else f"once round {args.after_round} is done"
    print(f"asked run {root.name} to stop ({root / STOP_FILE}); it stops {when}")
    deadline = time.monotonic() + args.wait
    while args.wait > 0 and time.monotonic() < deadline:
        state = server_state(root)
        if state["status"] != "running":
            print(f"run {root.name}: {state['status']}" + (f" — {state['reason']}" if state.get("reason") else ""))
            return EXIT_OK
        time.sleep(1.0)
    if args.wait > 0:
        _err(f"stop: run {root.name} has not recorded the stop within {args.wait:.0f} s; it will after the round "
             f"in flight (`atoll run status {root}`)")
        return EXIT_FAILED
    print(f"watch it: atoll run status {root}")
    return EXIT_OK
