"""Per-round metrics of a run as TensorBoard event files in ``RUN_FOLDER/tensorboard`` (``tensorboard --logdir``).

Written through tensorboardX's ``SummaryWriter`` (a small, maintained, pure-Python event writer: the
``tensorboard`` package that ``torch.utils.tensorboard`` needs brings a web server and its data server to every
ServerApp host). Each recorded round adds, at step = round:

  site/<site>/<metric>     the metrics the site released (train and validation), e.g. site/hospital-a/val_auc
  site/<site>/epsilon      the site's lifetime epsilon after the round (patient-level)
  site/<site>/contributed  1 if its update was aggregated, 0 if it refused, was rejected or failed
  aggregate/<metric>       the aggregated validation metrics
  round/train_wall_seconds the round's training wall time

Only what history.json already holds (released in the clear by each site's policy) goes in. A writer failure
(tensorboardX absent, a full disk) is logged and never stops a run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("atoll.server")
FOLDER = "tensorboard"


def scalars(entry: dict[str, Any]) -> dict[str, float]:
    """The (tag -> value) scalars of one history.json round entry (finite numbers only)."""
    out: dict[str, float] = {}

    def put(tag: str, v: Any) -> None:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[tag] = float(v)

    for site, s in entry.get("sites", {}).items():
        for part in ("train", "val"):
            for k, v in (s.get(part) or {}).items():
                if k.startswith("val_threshold_counts"):  # counts the threshold is pooled from, not curves
                    continue
                put(f"site/{site}/{k}" if part == "val" or k.startswith("train") else f"site/{site}/{part}_{k}", v)
        put(f"site/{site}/epsilon", s.get("epsilon"))
        put(f"site/{site}/contributed", 1.0 if s.get("status") == "contributed" else 0.0)
    for k, v in (entry.get("aggregated") or {}).items():
        put(f"aggregate/{k}", v)
    put("round/train_wall_seconds", entry.get("train_wall_seconds"))
    put("aggregate/decision_threshold", (entry.get("decision_threshold") or {}).get("threshold"))
    return out


def write_round(root: Path, entry: dict[str, Any]) -> Path | None:
    """Append one round's scalars to the run's event files; returns the folder, or None if it could not."""
    try:
        from tensorboardX import SummaryWriter

        folder = Path(root) / FOLDER
        # one file per round: writers opened within the same second would otherwise share (and truncate) a name
        with SummaryWriter(logdir=str(folder), flush_secs=1,
                           filename_suffix=f".round-{int(entry['round']):03d}") as writer:
            for tag, value in scalars(entry).items():
                writer.add_scalar(tag, value, global_step=int(entry["round"]))
        return folder
    except Exception as exc:  # noqa: BLE001 - a progress view must never stop training
        log.warning("TensorBoard events of round %s not written (%s: %s)", entry.get("round"),
                    exc.__class__.__name__, exc)
        return None
