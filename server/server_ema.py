"""The server's exponential moving average of the global model: an extra model per round, never trained on.

ema_1 = w_1 and ema_t = d ema_{t-1} + (1 - d) w_t, with d the run config's ``server-ema`` (De et al. 2022 average
the weights for DP training; here the server averages the global models it already holds). It is post-processing
of the released aggregates, so it costs no privacy. It is never sent to the sites as the model to train: the
rounds go on from w_t. It is saved beside each round's weights (``weights/round-NNN-ema.pt``) and computed from the
previous round's file, so a resumed run picks it up from the checkpointed round's folder without extra state;
``atoll run export --ema`` and ``atoll run evaluate`` can use it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

EMA_SUFFIX = "-ema"


def ema_path(weights_path: Path) -> Path:
    """``round-NNN-ema.pt`` beside ``round-NNN.pt``."""
    return weights_path.with_name(weights_path.stem + EMA_SUFFIX + weights_path.suffix)


def ema_update(previous: dict[str, torch.Tensor] | None, current: dict[str, torch.Tensor],
               decay: float) -> dict[str, torch.Tensor]:
    """``decay * previous + (1 - decay) * current`` per floating tensor (others: the current value)."""
    if previous is None:
        return {k: v.detach().clone() for k, v in current.items()}
    if set(previous) != set(current):
        raise ValueError("the previous round's EMA has other tensors than the global model (another model?)")
    return {k: (decay * previous[k].to(v.dtype) + (1.0 - decay) * v) if v.is_floating_point() else v.clone()
            for k, v in current.items()}


def save_round_ema(weights_dir_path_of, server_round: int, current: dict[str, torch.Tensor], decay: float) -> Path:
    """Write round ``server_round``'s EMA from round ``server_round - 1``'s file (absent: start at this model).

    ``weights_dir_path_of(r)`` is the run's ``weights/round-NNN.pt`` path of round r (RunOutputs.weights_path)."""
    prev_path = ema_path(weights_dir_path_of(server_round - 1))
    previous = torch.load(prev_path, map_location="cpu", weights_only=True) if prev_path.is_file() else None
    state = ema_update(previous, current, decay)
    path = ema_path(weights_dir_path_of(server_round))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
