"""A plain Flower FedAvg app doing Atoll's work without Atoll: the baseline of bench/round_overhead.py.

Same model (``models.build_task_model`` for the run's task), same sites (each loads its own preprocessed data from
the site's on-disk cache with ``client.ingest.build_site_dataset``), same local work (``privacy.dpsgd.train_local``
with the same Mechanism: steps, Poisson rate, clipping, noise), same federated evaluation of every round at every
site and a checkpoint of the global weights after each round — and none of Atoll's orchestration: no approval
check, budget guard, ledger or egress guard at the sites; no signature check, update validation, signed digest or
history at the server. It is Flower's own ``FedAvg.start`` loop.

Configuration comes from a JSON file named by the run config key ``bench-config`` (deployment) or the
``ATOLL_BENCH_PLAIN`` environment variable (simulation): ``{"rounds", "mechanism": {...}, "lr", "out_dir",
"num_sites", "model", "task": {...}}``. Not part of Atoll: it exists for the benchmark only.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

ENV = "ATOLL_BENCH_PLAIN"

server = ServerApp()
client = ClientApp()


def _conf(context: Context) -> dict:
    path = str(context.run_config.get("bench-config", "") or os.environ.get(ENV, ""))
    return json.loads(Path(path).read_text())


def _task_and_mechanism(conf: dict):
    from contract import Mechanism, TaskSpec

    return TaskSpec(**conf.get("task", {})), Mechanism(**conf["mechanism"])


def _model(conf: dict) -> torch.nn.Module:
    from models import build_task_model

    task, _ = _task_and_mechanism(conf)
    return build_task_model(conf.get("model", "atollnet"), task)


@server.main()
def main(grid: Grid, context: Context) -> None:
    from bench.round_timing import mark

    conf = _conf(context)
    out = Path(conf["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    n = int(conf["num_sites"])

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:  # after the sites' evaluation of this round, as Atoll's ServerApp
            torch.save(arrays.to_torch_state_dict(), out / f"round-{server_round}.pt")
            mark("round", t=__import__("time").time())
        return None

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                      min_available_nodes=n)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(_model(conf).state_dict()),
                   num_rounds=int(conf["rounds"]), train_config=ConfigRecord({"lr": float(conf["lr"])}),
                   evaluate_fn=checkpoint)


@functools.lru_cache(maxsize=8)
def _site_data(node_key: str):
    """The site's preprocessed splits from its on-disk cache (kept per process, as Atoll's site runtime does)."""
    from client.ingest import build_site_dataset
    from client.site_config import load_site_config

    return build_site_dataset(load_site_config(Path(node_key)))


def _data(context: Context):
    from client.runtime import resolve_site_config

    return _site_data(str(resolve_site_config(context.node_config).resolve()))


@client.train()
def train(msg: Message, context: Context) -> Message:
    from privacy.dpsgd import train_local

    conf = _conf(context)
    _, mechanism = _task_and_mechanism(conf)
    data = _data(context).train
    model = _model(conf)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    result = train_local(model, data, mechanism, lr=float(msg.content["config"]["lr"]), device="cpu")
    metrics = {"num-examples": float(len(data.labels))}
    if math.isfinite(result.train_loss):
        metrics["train_loss"] = result.train_loss
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    conf = _conf(context)
    val = _data(context).val
    model = _model(conf)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.eval()
    with torch.no_grad():
        logits = model(val.images)
        loss = torch.nn.functional.cross_entropy(logits, val.labels).item()
        acc = (logits.argmax(1) == val.labels).float().mean().item()
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": float(len(val.labels)), "val_loss": loss,
                                                        "val_accuracy": acc})}), reply_to=msg)


PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "plain-fedavg-bench"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "atoll-bench"

[tool.flwr.app.components]
serverapp = "plain_flower_app:server"
clientapp = "plain_flower_app:client"

[tool.flwr.app.config]
bench-config = ""
"""


def write_app_dir(folder: Path) -> Path:
    """A Flower app folder (pyproject + this module) for ``flwr run`` in a deployment."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "plain_flower_app.py").write_text(Path(__file__).read_text())
    return folder
