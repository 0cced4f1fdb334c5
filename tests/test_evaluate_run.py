"""`atoll run evaluate` as a real Flower run: one short DP training round, then the evaluation mode of the ServerApp
sends the global model and each site's released local model to every site (Flower simulation, real ClientApp)."""

from __future__ import annotations

import json
import math
import os

import pytest
from flwr.app import Context
from flwr.serverapp import ServerApp

from atoll import simulation
from atoll.demo import approve_run, prepare_site_keys
from atoll.demo_data import CANARY_ID, CANARY_NAME, HOSPITALS
from client.app import app as client_app
from client.runtime import SIM_SITE_CONFIGS_ENV
from contract import Mechanism
from server.app import run_consortium
from server.evaluate_run import EVALUATION_FILE, run_evaluation
from server.settings import RunSettings

pytestmark = pytest.mark.slow


def _ledger_lines(root, names) -> dict[str, int]:
    return {n: len((root / n / "state" / "ledger.jsonl").read_text().splitlines()) for n in names}


def test_evaluate_after_training_scores_every_model_at_every_site_for_free(fresh_consortium, tmp_path):
    names = [h.name for h in HOSPITALS[:2]]  # two sites: 3 models x 2 sites, each cell signed
    configs = [fresh_consortium / n / "site.toml" for n in names]
    keys = prepare_site_keys(fresh_consortium, names)
    settings = RunSettings(num_server_rounds=1, run_dir=str(tmp_path), run_name="ev", keys_dir=str(keys),
                           num_sites=2, min_sites=2, mechanism=Mechanism(steps=3))
    approve_run(configs, settings)
    seen: dict = {}
    app = ServerApp()

    @app.main()
    def _main(grid, context: Context):
        out = run_consortium(grid, settings, context.run_id)
        seen["trained"] = out.status
        seen["ledger_before"] = _ledger_lines(fresh_consortium, names)
        # a fresh SiteTrust: no training reply of this "run" binds the nodes; the signed statements must
        seen["matrix"] = run_evaluation(grid, out.root, 0, evaluate_id="t1", flower_run_id=context.run_id)
        seen["ledger_after"] = _ledger_lines(fresh_consortium, names)

    os.environ[SIM_SITE_CONFIGS_ENV] = os.pathsep.join(str(c) for c in configs)
    simulation.run_sites(app, client_app, len(configs))  # the demo's resources: fair share of the cores, nice 0
    assert seen["trained"] == "completed"
    assert seen["ledger_after"] == seen["ledger_before"], "evaluation charges nothing and writes no ledger record"
    root = tmp_path / "ev"
    assert sorted(p.stem for p in (root / "released" / "round-001").glob("*.pt")) == sorted(names)
    doc = json.loads((root / EVALUATION_FILE).read_text())
    assert doc["status"] == "completed" and doc["evaluate_id"] == "t1" and doc["round"] == 1
    assert [m["name"] for m in doc["models"]] == ["global"] + [f"{n} local" for n in sorted(names)]
    assert doc["sites"] == sorted(names) and doc["headline_metric"] == "val_auc"
    for model, row in doc["matrix"].items():
        for site, cell in row.items():
            assert cell["status"] == "evaluated" and cell["signed"], (model, site, cell)
            assert set(cell["metrics"]) | set(cell.get("missing", {})) == {"val_loss", "val_accuracy", "val_auc"}
            assert all(math.isfinite(v) for v in cell["metrics"].values())
    # a site's local model is not the global one: its released update moved it
    a = names[0]
    assert doc["matrix"]["global"][a]["metrics"] != doc["matrix"][f"{a} local"][a]["metrics"]
    assert (root / doc["heatmap"]).is_file()
    text = (root / EVALUATION_FILE).read_text()
    for canary in (CANARY_NAME, CANARY_ID, str(fresh_consortium)):
        assert canary not in text
    print("\n".join(seen["matrix"].lines()))
