"""`atoll demo --evaluate`: the demo's `atoll run evaluate`, in Flower's simulation engine.

A consortium evaluates a run with `atoll run evaluate` against its SuperLink; the demo has none, so this runs the
same evaluation (server.evaluate_run.run_evaluation: the global model and each hospital's released local model,
scored at every hospital through the real ClientApp, no training, no privacy charge) on the demo's last run.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def evaluate_demo(out: Path, server_round: int = 0, *, verbose: bool = False) -> int:
    """Evaluate the last run of the demo folder ``out``; prints the matrix; returns an exit code."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from atoll.demo import _only_flower_warnings, setup_console_logging
    from client.app import app as client_app
    from client.runtime import SIM_SITE_CONFIGS_ENV
    from server.evaluate_matrix import table_lines
    from server.evaluate_run import EVALUATION_FILE, run_evaluation

    out = Path(out).resolve()
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        print(f"atoll demo: {out / 'summary.json'} is missing: run `atoll demo --out {out}` first, then --evaluate")
        return 3
    root = out / summary["run_dir"]
    configs = [out / h / "site.toml" for h in summary["sites"]]
    setup_console_logging(verbose)
    if not verbose:
        _only_flower_warnings()
    for var, val in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"), ("RAY_DEDUP_LOGS", "0")):
        os.environ.setdefault(var, val)
    evaluate_id = secrets.token_hex(8)
    holder: dict = {}
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        holder["matrix"] = run_evaluation(grid, root, server_round, evaluate_id=evaluate_id,
                                          flower_run_id=context.run_id)

    os.environ[SIM_SITE_CONFIGS_ENV] = os.pathsep.join(str(p) for p in configs)
    try:
        run_simulation(server_app=app, client_app=client_app, num_supernodes=len(configs),
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": max(1, min(len(configs), os.cpu_count() or 1)),
                                                     "logging_level": "ERROR", "log_to_driver": verbose}},
                       verbose_logging=verbose)
    except RuntimeError as exc:  # Flower's simulation runtime (Ray) failed to start or crashed: say so, no trace
        print(f"atoll demo: Flower's simulation engine failed ({exc}); rerun, with --verbose for its logs",
              flush=True)
        # The ServerApp's thread still waits for simulated nodes that will never come and would keep the
        # process alive forever; nothing of Atoll's is left unwritten (evaluation.json is written last, atomically).
        os._exit(1)
    doc = json.loads((root / EVALUATION_FILE).read_text()) if (root / EVALUATION_FILE).is_file() else {}
    if doc.get("evaluate_id") != evaluate_id or doc.get("status") != "completed":
        print(f"atoll demo: the evaluation did not finish ({doc.get('reason') or 'rerun with --verbose'})")
        return 1
    print("\n".join(table_lines(doc)))
    print(f"matrix: {root / EVALUATION_FILE}\nheatmap: {root / doc['heatmap']}")
    return 0
