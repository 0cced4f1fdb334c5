"""The run manifest a site approves, derived from facts the site sees itself.

Both the lead (`atoll run manifest`, to hand the sites a file to review) and the ClientApp (every
round, to check the run it is asked to join) build it with this one function from the same
inputs: the app bundle hash of the code actually installed, the round config (model, DP
parameters, rounds) and the model's tensors. A site never trusts a manifest sent by the server.
"""

from __future__ import annotations

import functools
from pathlib import Path

from atoll.wire import APP_METRICS, RoundConfig
from client.approval import RunManifest, TrainingParams, app_bundle_hash, outputs_from_state_dict
from models import build_model

APP_ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=4)
def installed_app_hash(root: str = str(APP_ROOT)) -> str:
    """Hash of the Flower app this process runs (the FAB a SuperNode installed, or a checkout)."""
    return app_bundle_hash(root)


@functools.lru_cache(maxsize=16)
def _outputs(model: str, in_channels: int, num_classes: int):
    return outputs_from_state_dict(build_model(model, spatial_dims=2, in_channels=in_channels,
                                               num_classes=num_classes).state_dict())


def build_run_manifest(cfg: RoundConfig, *, app_hash: str | None = None, in_channels: int = 1,
                       num_classes: int = 2) -> RunManifest:
    """The manifest of the run `cfg` belongs to (independent of the round number)."""
    training = TrainingParams(dp=cfg.dp, noise_multiplier=cfg.noise_multiplier if cfg.dp else 0.0,
                              clip_norm=cfg.clip_norm, batch_size=cfg.batch_size, local_steps=cfg.local_steps,
                              lr=cfg.lr, sample_rate=cfg.sample_rate if cfg.dp else None)
    return RunManifest(app_hash=app_hash or installed_app_hash(), model=cfg.model, training=training,
                       num_rounds=cfg.num_rounds, outputs=_outputs(cfg.model, in_channels, num_classes),
                       metrics=APP_METRICS, secure_aggregation=cfg.secagg)
