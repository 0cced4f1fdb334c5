"""Bounds of the site-side training options that keep the DP mechanism (``privacy.augment``,
``privacy.weight_ema``): checked once here, by the lead's run settings before any round and by the site's
trainer, so both sides name the same limits. Standard library only (a settings check must not import torch).
"""

from __future__ import annotations

import math

#: K = 1 is training without augmentation; the per-sample gradients held at once grow K-fold with K.
MAX_AUGMENT_MULTIPLICITY = 32


def check_multiplicity(k: object, where: str = "augment_multiplicity") -> int:
    """``k`` as a whole number in [1, MAX_AUGMENT_MULTIPLICITY], else ``ValueError`` naming ``where``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_AUGMENT_MULTIPLICITY:
        raise ValueError(f"{where} must be a whole number in [1, {MAX_AUGMENT_MULTIPLICITY}] (1 = no augmentation), "
                         f"got {k!r}")
    return k


def check_decay(decay: object, where: str = "ema_decay") -> float:
    """``decay`` as a float in [0, 1) (0 = off: the last iterate is released), else ``ValueError`` naming ``where``."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (
            math.isfinite(decay) and 0 <= decay < 1):
        raise ValueError(f"{where} must be a number in [0, 1) (0 = off), got {decay!r}")
    return float(decay)
