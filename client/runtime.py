"""Everything a site keeps between rounds: its config, its preprocessed data, its privacy guard.

A SuperNode may spawn a fresh ClientApp process per message (deployment) or keep one (simulation);
either way the site state is rebuilt from the site's own disk: the config file, the on-disk
preprocessing cache and the append-only ledger. Nothing privacy-relevant lives only in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from client.ingest import SiteDataset, build_site_dataset
from client.site_config import SiteConfig, load_site_config
from contract.task import TaskSpec
from privacy.guard import BudgetGuard
from privacy.keys import load_private_key
from privacy.ledger import SiteLedger

log = logging.getLogger("atoll.site")

SITE_CONFIG_KEY = "site-config"
# Simulation has no per-node config file: the demo launcher lists one site config per partition.
SIM_SITE_CONFIGS_ENV = "ATOLL_SITE_CONFIGS"


class SiteSetupError(RuntimeError):
    """The node cannot act as a site (no config, bad config). Message is local-only."""


def resolve_site_config(node_config: dict) -> Path:
    """Which hospital this node is: `--node-config 'site-config="/abs/site.toml"'`, or in a
    simulation the partition-id'th entry of $ATOLL_SITE_CONFIGS (os.pathsep-separated)."""
    if SITE_CONFIG_KEY in node_config:
        return Path(str(node_config[SITE_CONFIG_KEY]))
    listed = os.environ.get(SIM_SITE_CONFIGS_ENV, "")
    if listed and "partition-id" in node_config:
        paths = listed.split(os.pathsep)
        pid = int(node_config["partition-id"])
        if pid < len(paths):
            return Path(paths[pid])
    raise SiteSetupError(
        "this SuperNode has no site config: start it with "
        "--node-config 'site-config=\"/abs/path/site.toml\"'")


def pick_device(setting: str) -> torch.device:
    """`auto` uses CUDA when present; an explicit cuda request without a GPU falls back loudly."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        log.warning("site config asks for %s but no CUDA device is present; training on CPU", setting)
        return torch.device("cpu")
    return torch.device(setting)


@dataclass
class SiteRuntime:
    config: SiteConfig
    data: SiteDataset
    guard: BudgetGuard
    device: torch.device

    @property
    def name(self) -> str:
        return self.config.name

    @functools.cached_property
    def dataset_fingerprint(self) -> str:
        """Keyed hash of the SOP Instance UIDs this site trains on (client.pacs.fingerprint); reveals nothing."""
        from client.pacs.fingerprint import site_dataset_fingerprint

        return site_dataset_fingerprint(self.config.secret_file, self.data.sop_uids)


_CACHE: dict[tuple, SiteRuntime] = {}


def site_runtime(node_config: dict, image_size: int, task: "TaskSpec | None" = None) -> SiteRuntime:
    """Load (once per process) the site behind this node, preprocessed at the run's image size (2D) or, at a
    volume site (``[data] kind = "volumes"``), to the 3D task's grid (size, spacing, orientation)."""
    path = resolve_site_config(node_config).resolve()
    vol_task = task if task is not None and task.spatial_dims == 3 else None
    key = (str(path), int(image_size), None if vol_task is None else
           (vol_task.size, vol_task.spacing_mm, vol_task.orientation))
    if key not in _CACHE:
        cfg = load_site_config(path)
        if cfg.image_size != image_size:
            cfg = dataclasses.replace(cfg, image_size=int(image_size))
        if cfg.source is not None:  # a PACS site trains on its last complete mirror; a round never pulls
            from client.pacs.mirror import require_complete_mirror

            require_complete_mirror(cfg)
        if cfg.kind == "volumes":  # a 2D task gets the check-only pass; task_fit then refuses it (TASK_MISMATCH)
            from client.volumes import build_volume_dataset

            data = build_volume_dataset(cfg, vol_task)
        else:
            data = build_site_dataset(cfg)
        ledger = open_site_ledger(cfg)
        site = SiteRuntime(cfg, data, None, pick_device(cfg.device))  # type: ignore[arg-type]
        site.guard = BudgetGuard(ledger, cfg.privacy, num_patients=data.train.num_patients,
                                 dataset_fingerprint=site.dataset_fingerprint)
        _CACHE[key] = site
    return _CACHE[key]


def open_site_ledger(cfg: SiteConfig) -> SiteLedger:
    """The site's lifetime ledger for this dataset, signed with the site key when one is configured."""
    key = load_private_key(cfg.signing_key) if cfg.signing_key and cfg.signing_key.exists() else None
    return SiteLedger(cfg.state_dir / "ledger.jsonl", site=cfg.name, signing_key=key)
