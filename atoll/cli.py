"""`atoll`: one command, shaped by role.

  atoll demo        anyone: a local three-hospital consortium on embedded chest X-rays
  atoll site ...    hospital site admin: check data, create the site identity, approve runs
  atoll run ...     consortium lead: start and watch training runs
  atoll audit ...   auditor: verify the signed privacy ledgers, render a report

Each room registers its own sub-commands (``add_parser``); this module only composes them.
Expected failures print a one-line reason and exit non-zero; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from atoll.demo import run_demo

    if args.task == "hippocampus":
        from atoll.demo3d import run_hippocampus_demo

        summary = run_hippocampus_demo(Path(args.out if args.out != "atoll-demo" else "atoll-demo-hippocampus"),
                                       rounds=args.rounds, dp=not args.no_dp, verbose=args.verbose,
                                       overrides={"steps": args.local_steps, "noise_multiplier": args.noise_multiplier,
                                                  "model": args.model, "lr": args.lr,
                                                  "sample_rate": args.sample_rate})
        return 0 if summary["status"] == "completed" else 1
    overrides = {k: v for k, v in {"steps": args.local_steps, "noise_multiplier": args.noise_multiplier,
                                   "model": args.model, "lr": args.lr,
                                   "sample_rate": args.sample_rate}.items() if v is not None}
    summary = run_demo(Path(args.out), rounds=args.rounds, dp=not args.no_dp, verbose=args.verbose,
                       overrides=overrides)
    return 0 if summary["status"] == "completed" else 1


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a local three-hospital consortium on embedded chest X-rays",
                       description="Writes three hospitals' DICOM folders from the embedded PneumoniaMNIST "
                                   "chest X-rays (if absent), trains a MONAI network across them in Flower's "
                                   "simulation engine with patient-level DP-SGD, scores the global model on the "
                                   "official held-out test split and writes DIR/summary.json.")
    p.add_argument("--task", choices=("xray", "hippocampus"), default="xray",
                   help="xray (default): chest X-ray classification on 2D images; hippocampus: 3D segmentation of "
                        "the hippocampus on MR DICOM series (embedded MSD Task04 subset, CC BY-SA 4.0) with DICOM "
                        "SEG and NIfTI masks, scored by Dice on held-out subjects")
    p.add_argument("--out", default="atoll-demo",
                   help="demo folder (default: ./atoll-demo, or ./atoll-demo-hippocampus with --task hippocampus)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="federated rounds (default: 3)")
    p.add_argument("--no-dp", action="store_true", help="train without DP-SGD (the demo sites allow it)")
    p.add_argument("--local-steps", type=_positive_int, default=None, help="local steps per round per site")
    p.add_argument("--noise-multiplier", type=float, default=None, help="DP-SGD noise multiplier sigma")
    p.add_argument("--lr", type=float, default=None, help="local learning rate (DP-SGD: SGD with momentum 0.9)")
    p.add_argument("--sample-rate", type=float, default=None,
                   help="DP-SGD: probability that a patient is in a step's batch")
    p.add_argument("--model", default=None, help="network name (see models.MODEL_NAMES)")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    p.set_defaults(func=_demo)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atoll",
        description="Atoll: federated learning for hospitals. Images stay in each hospital; "
                    "every site's privacy spend is signed and auditable.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,site,run,audit,consortium}")
    _add_demo(sub)
    _add_rooms(sub)
    return parser


def _add_rooms(sub: argparse._SubParsersAction) -> None:
    """Role commands, each defined in its own room (the room's ``add_parser`` registers it)."""
    from client.enroll import add_parser as add_site_enroll
    from client.site_check import add_parser as add_site_check
    from privacy.cli import add_audit_parser, add_site_init_parser
    from server.consortium_cli import add_parser as add_consortium
    from server.run_cli import add_parser as add_run

    site = sub.add_parser("site", help="hospital site admin: check data, site identity, run approvals")
    site_sub = site.add_subparsers(dest="site_command", metavar="COMMAND")
    site.set_defaults(func=lambda a: _usage(site))
    add_site_init_parser(site_sub)
    add_site_check(sub)          # finds the "site" group above and adds "check" to it
    add_site_enroll(site_sub)
    try:
        from client.approval import add_parser as add_site_approve
    except ImportError:
        add_site_approve = None
    if add_site_approve:
        add_site_approve(site_sub)
    add_run(sub)
    _add_run_manifest(sub)
    audit = sub.add_parser("audit", help="auditor: verify signed privacy ledgers, render reports")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND")
    audit.set_defaults(func=lambda a: _usage(audit))
    add_audit_parser(audit_sub)
    add_consortium(sub)


def _add_run_manifest(sub: argparse._SubParsersAction) -> None:
    """`atoll run manifest`: the file the lead sends to every site to review with `atoll site approve`.

    Lives here, not in server/, because the manifest is computed exactly as the sites compute it
    (client.manifest), and only the CLI may compose both sides."""
    run = sub.choices["run"]
    run_sub = next(a for a in run._actions if isinstance(a, argparse._SubParsersAction))
    p = run_sub.add_parser("manifest", help="write the run manifest the sites must approve",
                           description="Builds the run manifest (app bundle hash of this checkout, model, DP "
                                       "parameters, rounds, declared outputs) exactly as each site recomputes it.")
    p.add_argument("--out", required=True, help="where to write run-manifest.json")
    from server.run_cli import add_run_shape_arguments

    add_run_shape_arguments(p)  # the very options (and defaults) of `atoll run start`: the hashes must agree
    p.set_defaults(func=_run_manifest)


def _run_manifest(args: argparse.Namespace) -> int:
    from client.approval import manifest_hash, save_manifest
    from client.manifest import build_run_manifest
    from server.run_cli import run_shape_config
    from server.settings import RunSettings, SettingsError

    try:  # what the ServerApp will send each round, built the way the ServerApp builds it
        settings = RunSettings.from_run_config({**run_shape_config(args), "run-dir": "/manifest"})
    except SettingsError as exc:
        print(f"atoll run manifest: {exc}", file=sys.stderr)
        return 2
    manifest = build_run_manifest(settings.round_config("manifest", 1))
    path = save_manifest(manifest, args.out)
    print(f"wrote {path} (manifest {manifest_hash(manifest)}); send it to every site for `atoll site approve`. "
          "Start the run with the same parameters (`atoll run start ...`).")
    return 0


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        # Config, settings and file problems carry messages written for the user.
        print(f"atoll: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
