"""The training loss of a task, shaped for per-sample clipping.

DP-SGD clips each example's gradient, so the loss handed to the trainer must be a *sum of per-example losses*
(``reduction="sum"``; ``"mean"`` divides that sum by the batch size for Opacus' ghost mode). A batch statistic
(a Dice computed over the whole batch, say) would let one patient's pixels change everyone's gradient and break the
per-patient sensitivity bound, so the segmentation loss is computed per example and only then summed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from contract.task import TaskSpec

REDUCTIONS = ("sum", "mean")


class PerSampleDiceCE(nn.Module):
    """Dice + cross-entropy per example (MONAI's soft Dice with softmax over one-hot targets), then summed or
    averaged over the batch.

    logits: [B, K, *spatial]; target: [B, *spatial] int64 label map with values in 0..K-1.
    """

    def __init__(self, reduction: str = "sum", include_background: bool = True) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        # include_background=False: the Dice term scores only the labels (cross-entropy still sees every voxel).
        # With a tiny foreground the background channel's Dice is ~0 already at "all background", which under
        # DP-SGD's noise is where training stalls; the foreground-only Dice keeps pulling the labels up.
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none", include_background=include_background)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        spatial = tuple(range(1, target.ndim))
        ce = F.cross_entropy(logits, target, reduction="none").mean(dim=spatial)
        dice = self.dice(logits, target.unsqueeze(1)).flatten(1).mean(dim=1)
        per_sample = ce + dice
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


_LOSSES: dict[str, Callable[[str], nn.Module]] = {
    "cross_entropy": lambda reduction: nn.CrossEntropyLoss(reduction=reduction),
    "dice_ce": PerSampleDiceCE,
    "dice_ce_fg": lambda reduction: PerSampleDiceCE(reduction, include_background=False),
}


def build_loss(task: TaskSpec) -> Callable[[str], nn.Module]:
    """``criterion(reduction)`` for ``task`` (privacy.dpsgd's ``Criterion``)."""
    name = task.loss_name
    if name not in _LOSSES:
        raise ValueError(f"task loss {name!r} is not one of {', '.join(_LOSSES)}")
    return _LOSSES[name]
