"""`atoll run evaluate RUN_FOLDER`: score a run's global model and each site's local model at every site.

Submits the Atoll app to the SuperLink with `flwr run` in evaluation mode (``evaluate-run`` in the run config,
server/evaluate_run.py), waits for the run folder's ``evaluation.json`` of this very request and prints the matrix.
Run it on the SuperLink host, where the run folder is (as `atoll run stop`). Only the standard library is imported
here: the ML stack loads in the ServerApp.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from server.run_cli import (APP_DIR, EXIT_FAILED, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, HelpFormatter, _err,
                            _run_folder, _unreachable)

EVALUATION_FILE = "evaluation.json"  # as server.evaluate_run.EVALUATION_FILE (that module imports Flower)


def add_parser(run_sub: argparse._SubParsersAction) -> None:
    p = run_sub.add_parser(
        "evaluate", help="score the run's global model and each site's local model at every site",
        formatter_class=HelpFormatter,
        description="Sends the chosen round's global model and each site's last released local model (the global "
                    "weights plus that site's released DP-SGD update, kept by the ServerApp in RUN_FOLDER/released/) "
                    "to every site, which scores each on its validation split. It is a Flower run of the same app on "
                    "the run's own settings, so each site's approval of the run covers it (same app hash and "
                    "manifest; a site that changed its Atoll since must approve again); it trains nothing and "
                    "charges no site any epsilon: evaluating a DP output is post-processing. Each site releases only "
                    "the metrics its policy lists (shown as WITHHELD otherwise); counts under 5 are suppressed. "
                    "Writes RUN_FOLDER/evaluation.json (model x site x metric) and a heatmap "
                    "(evaluation-heatmap.png with matplotlib installed, else .svg). Under SecAgg+ only the global "
                    "model is evaluated (the server never saw one site's update). Run it on the SuperLink host.",
        epilog="example:\n  atoll run evaluate /srv/atoll/runs/first-run --superlink my-consortium --round 2\n"
               "  atoll run evaluate /srv/atoll/runs/first-run --show      # print the last evaluation.json")
    p.add_argument("run_dir", metavar="RUN_FOLDER", help="the run's folder (RUN_DIR/<run-name>) on this host")
    p.add_argument("--round", type=int, default=0, metavar="N",
                   help="round whose global model is evaluated, and up to which each site's last released update "
                        "is taken (0 = the last completed round)")
    p.add_argument("--superlink", metavar="NAME", default=None,
                   help="connection name in $FLWR_HOME/config.toml (default: its [superlink] default)")
    p.add_argument("--wait", type=float, default=1800.0, metavar="SECONDS",
                   help="wait this long for the evaluation to finish (0 = submit and return)")
    p.add_argument("--show", action="store_true", help="print the run folder's last evaluation.json; submit nothing")
    p.add_argument("--allow-insecure-demo", action="store_true",
                   help="let the run go to a connection marked `insecure = true` (local demos and tests only)")
    p.add_argument("--app", metavar="DIR", default=str(APP_DIR), help="Flower app folder")
    p.set_defaults(func=_evaluate)


def _completed_rounds(root: Path) -> list[int]:
    return sorted(int(p.stem[6:]) for p in (root / "weights").glob("round-*.pt") if p.stem[6:].isdigit())


def print_evaluation(doc: dict, root: Path) -> None:
    from server.evaluate_matrix import table_lines

    print("\n".join(table_lines(doc)))
    if doc.get("heatmap"):
        print(f"heatmap: {root / doc['heatmap']}")
    print(f"matrix:  {root / EVALUATION_FILE}")


def _read(root: Path) -> dict | None:
    try:
        return json.loads((root / EVALUATION_FILE).read_text())
    except (OSError, ValueError):
        return None


def _evaluate(args: argparse.Namespace) -> int:
    from server.connections import ConnectionNotFound, resolve

    root = _run_folder(args.run_dir)
    if root is None:
        return EXIT_NOT_FOUND
    root = root.resolve()
    if args.show:
        doc = _read(root)
        if doc is None:
            _err(f"evaluate: {root / EVALUATION_FILE} does not exist yet; run `atoll run evaluate {root}` first")
            return EXIT_NOT_FOUND
        print_evaluation(doc, root)
        return EXIT_OK
    rounds = [r for r in _completed_rounds(root) if r > 0]
    if not rounds:
        _err(f"evaluate: run {root.name} has no completed round (no weights/round-NNN.pt besides the initial model)")
        return EXIT_FAILED
    if args.round < 0 or (args.round and args.round not in rounds):
        _err(f"evaluate: run {root.name} has no global model of round {args.round}; completed rounds: "
             f"{', '.join(map(str, rounds))}")
        return EXIT_USAGE
    if not (Path(args.app) / "pyproject.toml").exists():
        _err(f"evaluate: {args.app} is not a Flower app folder (no pyproject.toml); pass --app")
        return EXIT_USAGE
    try:
        conn = resolve(args.superlink)
    except ConnectionNotFound as exc:
        _err(f"evaluate: {exc}")
        return EXIT_NOT_FOUND
    if conn.insecure and not args.allow_insecure_demo:
        _err(f"evaluate: connection {conn.name!r} in {conn.path} is marked insecure = true; for a local demo or "
             "test only, pass --allow-insecure-demo")
        return EXIT_USAGE
    problem = _unreachable(conn)
    if problem:
        _err(f"evaluate: {problem}")
        return EXIT_FAILED
    evaluate_id = secrets.token_hex(8)
    cfg = {"evaluate-run": str(root), "evaluate-round": args.round, "evaluate-id": evaluate_id}
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())
    flwr = shutil.which("flwr") or str(Path(sys.executable).parent / "flwr")
    cmd = [flwr, "run", args.app, conn.name, "--run-config", overrides]
    print(f"evaluating run {root.name} round {args.round or rounds[-1]} at every site (no training, no privacy "
          "charge)", flush=True)
    print("$ " + " ".join(cmd[:4]) + " --run-config '" + overrides + "'", flush=True)
    rc = subprocess.call(cmd)
    if rc != 0 or args.wait <= 0:
        return rc
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        doc = _read(root)
        if doc is not None and doc.get("evaluate_id") == evaluate_id:
            if doc.get("status") != "completed":
                _err(f"evaluate: {doc.get('reason') or doc.get('status')}")
                return EXIT_FAILED
            print_evaluation(doc, root)
            return EXIT_OK
        time.sleep(1.0)
    _err(f"evaluate: no evaluation.json of this request in {root} after {args.wait:.0f} s (`flwr ls` shows the "
         "Flower run's state)")
    return EXIT_FAILED
