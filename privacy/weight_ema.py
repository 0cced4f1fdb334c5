"""Site-side exponential moving average of the DP-SGD iterates within a round (De et al. 2022).

With ``ema_decay = d > 0`` the site releases ``e_T`` instead of the last iterate ``w_T``, where
``e_0 = w_0`` (the round's global weights) and ``e_t = d * e_{t-1} + (1 - d) * w_t`` after every optimizer step.

Why it costs no privacy: every iterate ``w_t`` is already a DP release of the step's clipped, noised sum (the
sampled Gaussian mechanism the accountant charges for the round's steps), and ``e_T`` is computed from
``w_0 .. w_T`` only — it never reads a gradient, a batch or the data — so it is post-processing and the
round's charge (sigma, q, steps) is unchanged (tests/test_dpsgd.py).

The weight ``d**T`` stays on the global weights ``w_0``: with T local steps a decay close to 1 (d**T not small)
damps the round's update towards the global model.

``torch.optim.swa_utils.AveragedModel`` does the same arithmetic, but it deep-copies the module (here the
Opacus-wrapped one) and reads its own ``n_averaged``; a parameter list keeps the EMA off the Opacus hooks.
"""

from __future__ import annotations

import torch
from torch import nn

from contract.recipe import check_decay


class IterateEMA:
    """The EMA of ``model``'s parameters over the iterates passed to :meth:`update` (buffers are not averaged:
    Atoll's DP networks have none that training changes)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = check_decay(decay)
        self.params = [p for p in model.parameters()]
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current iterate in: ``e <- d * e + (1 - d) * w``."""
        for e, p in zip(self.average, self.params):
            e.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Put the average into the model's parameters (what the site then releases)."""
        for e, p in zip(self.average, self.params):
            p.copy_(e)
