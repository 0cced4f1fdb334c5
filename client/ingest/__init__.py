"""Hospital-site data room: DICOM indexing, quarantine, MONAI preprocessing with an on-disk cache, patient split.

Entry point: :func:`build_site_dataset` (see ``docs/site-data.md``).

The names below load lazily (PEP 562): importing a light submodule such as ``client.ingest.card`` (the `atoll`
CLI's parsers do) must not pull in MONAI and torch through ``client.ingest.dataset``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client.ingest.dataset import NoUsableImagesError, SiteDataset, SplitTensors, build_site_dataset
    from client.ingest.quarantine import Reason

_LAZY = {"NoUsableImagesError": "dataset", "SiteDataset": "dataset", "SplitTensors": "dataset",
         "build_site_dataset": "dataset", "Reason": "quarantine"}

__all__ = ["NoUsableImagesError", "Reason", "SiteDataset", "SplitTensors", "build_site_dataset"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"client.ingest.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
