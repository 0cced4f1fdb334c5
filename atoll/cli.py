"""`atoll`: one command, shaped by role.

  atoll demo        anyone: a local three-hospital consortium on embedded chest X-rays
  atoll site ...    hospital site admin: check data, create the site identity, approve runs
  atoll run ...     consortium lead: start, resume, watch and stop training runs
  atoll audit ...   auditor: verify the signed privacy ledgers, render a report
  atoll consortium  consortium lead: TLS material, site registration
  atoll console     any role: a web page per role (site approvals and budget, runs live, audit verdict)

Each room registers its own sub-commands (``add_parser``); this module only composes them. Parsers are built
from light modules (argparse, stdlib, ``cryptography``): the ML stack (torch, MONAI, Opacus, Flower's runtime)
is imported by the command functions that train or decode, so ``--help`` and a config error answer at once.
Only the group named on the command line is built in full (``_GROUPS``); the others appear as one help line.
Expected failures print a one-line reason and exit with a documented code (``EXIT_CODES``); no traceback
reaches the user.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

# Exit codes of every `atoll` command (tests/test_cli_startup.py keeps the rooms' own constants equal).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3
EXIT_CODES = """exit codes:
  0  ok
  1  verification failed, or refused (by a policy, a budget, a check)
  2  usage or configuration error (a bad option, a typo in a config file or run setting)
  3  not found (a file, a run folder, a Flower connection that does not exist)"""


def _demo(args: argparse.Namespace) -> int:
    if args.data_only:
        from atoll.demo import write_demo_data

        write_demo_data(Path(args.out))
        return EXIT_OK
    print(f"atoll demo: starting (folder {Path(args.out).resolve()}); loading PyTorch, MONAI and Flower ...",
          flush=True)
    from atoll.demo import run_demo

    if args.evaluate:  # `atoll run evaluate` on the demo's last run, in the simulation engine
        from atoll.demo_evaluate import evaluate_demo

        default = "atoll-demo-hippocampus" if args.task == "hippocampus" and args.out == "atoll-demo" else args.out
        return evaluate_demo(Path(default), verbose=args.verbose)
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
                       overrides=overrides, pacs=args.pacs)
    return EXIT_OK if summary["status"] == "completed" else EXIT_FAILED


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from server.run_cli import MODEL_CHOICES, HelpFormatter

    p = sub.add_parser("demo", help=_GROUPS["demo"][0], formatter_class=HelpFormatter,
                       description="Writes three hospitals' DICOM folders from the embedded PneumoniaMNIST "
                                   "chest X-rays (if absent), trains a MONAI network across them in Flower's "
                                   "simulation engine with patient-level DP-SGD, scores the global model on the "
                                   "official held-out test split and writes DIR/summary.json. Options left unset "
                                   "take the lead's default run settings (`atoll run start --help`). Run again with "
                                   "the same --out and options after an interruption (Ctrl-C, a killed process): it "
                                   "resumes the interrupted run from its last completed round and says so.")
    p.add_argument("--task", choices=("xray", "hippocampus"), default="xray",
                   help="xray: chest X-ray classification on 2D images; hippocampus: 3D segmentation of "
                        "the hippocampus on MR DICOM series (embedded MSD Task04 subset, CC BY-SA 4.0) with DICOM "
                        "SEG and NIfTI masks, scored by Dice on held-out subjects")
    p.add_argument("--out", default="atoll-demo", metavar="DIR",
                   help="demo folder (./atoll-demo-hippocampus with --task hippocampus)")
    p.add_argument("--rounds", type=_positive_int, default=3, metavar="N", help="federated rounds")
    p.add_argument("--no-dp", action="store_true", help="train without DP-SGD (the demo sites allow it)")
    from server.settings import RunSettings

    d = RunSettings()
    p.add_argument("--local-steps", type=_positive_int, default=None, metavar="N",
                   help=f"local steps per round per site (default: {d.mechanism.steps}, as a default run)")
    p.add_argument("--noise-multiplier", type=float, default=None, metavar="SIGMA",
                   help=f"DP-SGD noise multiplier sigma (default: {d.mechanism.noise_multiplier})")
    p.add_argument("--lr", type=float, default=None, metavar="X",
                   help=f"local learning rate, DP-SGD: SGD with momentum 0.9 (default: {d.lr})")
    p.add_argument("--sample-rate", type=float, default=None, metavar="Q",
                   help=f"DP-SGD: probability that a patient is in a step's batch (default: {d.mechanism.sample_rate})")
    p.add_argument("--model", default=None, choices=MODEL_CHOICES, metavar="NAME",
                   help=f"network: {', '.join(MODEL_CHOICES)} (default: scatternet for the X-ray demo, "
                        f"scalespace for --task hippocampus; a lead's run defaults to {d.model})")
    p.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    p.add_argument("--data-only", action="store_true",
                   help="only write the hospitals' DICOM exports and labels CSVs (DIR/hospital-*/dicom, labels.csv), "
                        "e.g. to try the README's deployment walkthrough on them; no training")
    p.add_argument("--pacs", action="store_true",
                   help="serve each hospital's export from its own local Orthanc (apt-get install orthanc "
                        "orthanc-dicomweb) and have the sites `atoll site pull` from it before training")
    p.add_argument("--evaluate", action="store_true",
                   help="train nothing: evaluate the demo's last run as `atoll run evaluate` does (the global model "
                        "and each hospital's released local model, scored at every hospital; no privacy charge); "
                        "writes evaluation.json and a heatmap into the run folder")
    p.set_defaults(func=_demo)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_site(sub: argparse._SubParsersAction) -> None:
    from client.enroll import add_parser as add_site_enroll
    from client.probe import add_parser as add_site_probe
    from client.site_check import add_parser as add_site_check
    from privacy.cli import add_site_init_parser

    site = _group(sub, "site")
    site_sub = site.add_subparsers(dest="site_command", metavar="COMMAND")
    add_site_init_parser(site_sub)
    add_site_check(sub)          # finds the "site" group above and adds "check" to it
    add_site_enroll(site_sub)
    add_site_probe(site_sub)
    from client.pacs.cli import add_parser as add_site_pull

    add_site_pull(site_sub)      # `atoll site pull`: mirror the site's PACS ([data.source])
    from client.ledger_repair import add_parser as add_site_repair_ledger

    add_site_repair_ledger(site_sub)
    from client.approve_cli import add_parser as add_site_approve

    add_site_approve(site_sub)


def _add_run(sub: argparse._SubParsersAction) -> None:
    from server.run_cli import add_parser as add_run

    add_run(sub)
    _add_run_manifest(sub)
    from atoll.export_cli import add_parser as add_run_export
    from server.run_cli import HelpFormatter

    add_run_export(next(a for a in sub.choices["run"]._actions if isinstance(a, argparse._SubParsersAction)),
                   HelpFormatter)


def _add_audit(sub: argparse._SubParsersAction) -> None:
    from privacy.cli import add_audit_parser

    audit = _group(sub, "audit")
    add_audit_parser(audit.add_subparsers(dest="audit_command", metavar="COMMAND"))


def _add_consortium(sub: argparse._SubParsersAction) -> None:
    from server.consortium_cli import add_parser as add_consortium

    add_consortium(sub)


def _add_console(sub: argparse._SubParsersAction) -> None:
    from console.cli import add_parser as add_console

    add_console(sub)


# name -> (one help line, builder). The help line is what `atoll --help` shows without building the group.
_GROUPS: dict[str, tuple[str, Callable[[argparse._SubParsersAction], None]]] = {
    "demo": ("anyone: run a local three-hospital consortium on embedded chest X-rays", _add_demo),
    "site": ("hospital site admin: check data, PACS pull, site identity, run approvals", _add_site),
    "run": ("consortium lead: start, resume, watch and stop training runs", _add_run),
    "audit": ("auditor: verify signed privacy ledgers, render reports", _add_audit),
    "consortium": ("consortium lead: TLS material, site registration", _add_consortium),
    "console": ("any role: a web page per role (site approvals and budget, runs live, audit verdict)", _add_console),
}


def _group(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    group = sub.add_parser(name, help=_GROUPS[name][0], description=_GROUPS[name][0])
    group.set_defaults(func=lambda a: _usage(group))
    return group


def _add_run_manifest(sub: argparse._SubParsersAction) -> None:
    """`atoll run manifest`: the file the lead sends to every site to review with `atoll site approve`.

    Lives here, not in server/, because the manifest is computed exactly as the sites compute it
    (client.manifest), and only the CLI may compose both sides."""
    from server import run_cli

    run = sub.choices["run"]
    run_sub = next(a for a in run._actions if isinstance(a, argparse._SubParsersAction))
    p = run_sub.add_parser("manifest", help="write the run manifest the sites must approve",
                           formatter_class=run_cli.HelpFormatter,
                           description="Builds the run manifest (app bundle hash of this checkout, model, DP "
                                       "parameters, rounds, declared outputs) exactly as each site recomputes it. "
                                       "Give it the options you will give `atoll run start`.")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write run-manifest.json")
    run_cli.add_run_shape_arguments(p)  # the very options (and defaults) of `atoll run start`: the hashes must agree
    p.set_defaults(func=_run_manifest)


def _run_manifest(args: argparse.Namespace) -> int:
    from server.run_cli import run_shape_config
    from server.settings import RunSettings, SettingsError

    try:  # what the ServerApp will send each round, built the way the ServerApp builds it
        settings = RunSettings.from_run_config({**run_shape_config(args), "run-dir": "/manifest"})
    except SettingsError as exc:
        print(f"atoll run manifest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print("atoll run manifest: hashing the app bundle and the model's outputs (loads PyTorch) ...", flush=True)
    from client.approval import manifest_hash, save_manifest
    from client.manifest import build_run_manifest

    manifest = build_run_manifest(settings.round_config("manifest", 1))
    path = save_manifest(manifest, args.out)
    print(f"wrote {path} (manifest {manifest_hash(manifest)}); send it to every site for `atoll site approve`. "
          "Start the run with the same parameters (`atoll run start ...`).")
    return EXIT_OK


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_USAGE


def _finish(parser: argparse.ArgumentParser) -> None:
    """Every parser of the tree: the exit-code table as epilog, and an epilog-preserving formatter."""
    parser.epilog = (parser.epilog + "\n\n" if parser.epilog else "") + EXIT_CODES
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser once
                _finish(child)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `atoll` parser. ``only``: build just that group in full (``""``: none; default: every group)."""
    parser = argparse.ArgumentParser(
        prog="atoll",
        description="Atoll: federated learning for hospitals. Images stay in each hospital; "
                    "every site's privacy spend is signed and auditable. `atoll GROUP --help` for each role.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(_GROUPS) + "}")
    for name, (help_line, build) in _GROUPS.items():
        if only is None or name == only:
            build(sub)
        else:
            sub.add_parser(name, help=help_line, add_help=False)  # placeholder: never parsed (see main)
    _finish(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    group = argv[0] if argv and argv[0] in _GROUPS else ""
    parser = build_parser(only=group)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as exc:
        print(f"atoll: error: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (ValueError, FileExistsError, PermissionError) as exc:
        # Config, settings and file problems carry messages written for the user.
        print(f"atoll: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
