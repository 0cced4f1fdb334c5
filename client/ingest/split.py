"""Train/validation split by patient (never by image), deterministic and stable as data arrives.

Each patient pseudonym is hashed with the seed to a number u in [0, 1); ``u < val_fraction`` goes to validation.
The decision depends only on (seed, pseudonym), so adding images or patients never moves an existing patient to the
other split (no leakage across rounds as the PACS export grows). With few patients the threshold can leave a split
empty; then the single nearest patient is moved so both splits are non-empty whenever there are >= 2 patients and
``val_fraction > 0``.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

TRAIN, VAL = "train", "val"


def _unit(seed: int, pseudonym: str) -> float:
    h = hashlib.sha256(f"atoll/split/v1\x00{seed}\x00{pseudonym}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_patients(pseudonyms: Iterable[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Map each distinct pseudonym to ``"train"`` or ``"val"``.

    Parameters
    ----------
    pseudonyms: patient pseudonyms (duplicates ignored).
    val_fraction: target share of patients in validation, in [0, 1).
    seed: split seed from the site config.
    """
    scores = {p: _unit(seed, p) for p in sorted(set(pseudonyms))}
    out = {p: (VAL if u < val_fraction else TRAIN) for p, u in scores.items()}
    if val_fraction > 0 and len(scores) >= 2:
        ranked = sorted(scores, key=lambda p: (scores[p], p))
        if VAL not in out.values():
            out[ranked[0]] = VAL
        if TRAIN not in out.values():
            out[ranked[-1]] = TRAIN
    return out
