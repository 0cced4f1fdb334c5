"""Each site's released update per round, kept in the run folder so that `atoll run evaluate` can score it.

A site's reply to a training round carries its local model after DP-SGD: the round's global weights plus its
clipped and noised update. That is the DP output itself; anything computed from it (evaluating it at another site,
averaging it) is post-processing and costs the site no privacy. The server holds these weights anyway in a round
without SecAgg+ (it validates and aggregates them); keeping them on the SuperLink host's disk adds durability, not
exposure. Under SecAgg+ the server only ever sees the masked sum, so nothing is kept and only the global model can
be evaluated.

Layout: ``RUN_DIR/<run>/released/round-NNN/<site>.pt`` (torch state dict of the weights the site released and the
server accepted; a rejected or refused reply is not kept).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import Message

    from server.sitebook import RoundBook

RELEASED_DIR = "released"
_ROUND = re.compile(r"^round-(\d{3,})$")
_SITE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def released_path(run_root: Path, server_round: int, site: str) -> Path:
    return Path(run_root) / RELEASED_DIR / f"round-{server_round:03d}" / f"{site}.pt"


def keep_released(run_root: Path, server_round: int, book: "RoundBook", accepted: list["Message"]) -> list[str]:
    """Write each accepted (contributed) update of the round; returns the sites kept.

    Called by the ServerApp after the round's aggregate is signed, with the replies the book admitted: only a
    site name the book resolved (bound node, or the unverified demo's claim) names a file.
    """
    import torch

    from contract import wire

    kept = []
    for msg in accepted:
        site = book.node_names.get(msg.metadata.src_node_id)
        if not site or not _SITE.match(site) or book.sites.get(site) is None \
                or book.sites[site].status != "contributed":
            continue
        path = released_path(run_root, server_round, site)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(msg.content[wire.ARRAYS].to_torch_state_dict(), tmp)
        os.replace(tmp, path)
        kept.append(site)
    return kept


def last_released(run_root: Path, upto_round: int) -> dict[str, tuple[int, Path]]:
    """Each site's latest kept update at or before ``upto_round``: ``{site: (round, path)}``."""
    out: dict[str, tuple[int, Path]] = {}
    base = Path(run_root) / RELEASED_DIR
    if not base.is_dir():
        return out
    rounds = sorted((int(m.group(1)), p) for p in base.iterdir() if (m := _ROUND.match(p.name)) and p.is_dir())
    for rnd, folder in rounds:
        if rnd > upto_round:
            break
        for f in sorted(folder.glob("*.pt")):
            out[f.stem] = (rnd, f)
    return out
