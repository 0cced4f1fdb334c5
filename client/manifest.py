"""The run manifest a site approves, derived from facts the site sees itself.

Both the lead (`atoll run manifest`, to hand the sites a file to review) and the ClientApp (every
round, to check the run it is asked to join) build it with this one function from the same
inputs: the app bundle hash of the code actually installed, the round config (task, model, DP
mechanism, rounds) and the tensors of the model the task defines. A site never trusts a manifest
sent by the server.
"""

from __future__ import annotations

import functools
from pathlib import Path

from client.approval import AggregationParams, RunManifest, TrainingParams, app_bundle_hash, outputs_from_state_dict
from contract.task import TaskSpec
from contract.wire import RoundConfig
from models import build_task_model

APP_ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=4)
def installed_app_hash(root: str = str(APP_ROOT)) -> str:
    """Hash of the Flower app this process runs (the FAB a SuperNode installed, or a checkout)."""
    return app_bundle_hash(root)


@functools.lru_cache(maxsize=16)
def _outputs(model: str, task: TaskSpec):
    return outputs_from_state_dict(build_task_model(model, task).state_dict())


def build_run_manifest(cfg: RoundConfig, *, app_hash: str | None = None) -> RunManifest:
    """The manifest of the run `cfg` belongs to (independent of the round number)."""
    return RunManifest(app_hash=app_hash or installed_app_hash(), model=cfg.model, task=cfg.task,
                       mechanism=cfg.mechanism,
                       training=TrainingParams(batch_size=cfg.batch_size, lr=cfg.lr, proximal_mu=cfg.proximal_mu,
                                               augment_multiplicity=cfg.augment_multiplicity,
                                               ema_decay=cfg.ema_decay),
                       num_rounds=cfg.num_rounds, outputs=_outputs(cfg.model, cfg.task),
                       metrics=cfg.task.metric_names(), secure_aggregation=cfg.secagg,
                       aggregation=AggregationParams(strategy=_strategy_name(cfg.strategy),
                                                     num_malicious=cfg.num_malicious,
                                                     server_options=cfg.server_options.non_default()))


def _strategy_name(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")
