"""Validation metrics by task, under the names ``TaskSpec.metric_names`` declares (and a site policy lists).

Classification: ``val_loss``, ``val_accuracy``, ``val_auc`` (binary ROC AUC; for more than two classes the macro
one-vs-rest AUC), for two classes the ``val_threshold_counts`` scalars (contract.threshold: coarsened counts per
threshold, from which the server picks the decision threshold) and, for more than two classes,
``val_recall_<class>`` per class. Segmentation: ``val_dice_<label>``
per foreground label and their mean ``val_dice`` (MONAI's DiceMetric). A value that is not defined on this split
(AUC or recall of a class the split lacks) is NaN here; the egress path decides what to do with NaN.
"""

from __future__ import annotations

import math

import torch

from client.evaluation import evaluate_model
from contract import threshold
from contract.task import TaskSpec


def classification_metrics(task: TaskSpec, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           device: torch.device) -> dict[str, float]:
    m = evaluate_model(model, images, labels, device)
    out = {"n": m["n"], "val_loss": m["loss"], "val_accuracy": m["accuracy"], "val_auc": m["auc"]}
    if len(task.classes) == 2 and len(images):  # released only where the site's policy lists val_threshold_counts
        out.update(threshold.counts(_positive_probs(model, images, device).tolist(), labels.tolist()))
    if len(task.classes) > 2:
        pred = _predict(model, images, device)
        for i, name in enumerate(task.classes):
            mask = labels == i
            out[f"val_recall_{name}"] = float((pred[mask] == i).float().mean()) if bool(mask.any()) else math.nan
    return out


@torch.no_grad()
def _positive_probs(model: torch.nn.Module, images: torch.Tensor, device: torch.device,
                    batch: int = 512) -> torch.Tensor:
    """p(class 1) per image (binary tasks)."""
    model.eval().to(device)
    return torch.cat([torch.softmax(model(images[i:i + batch].to(device)).float(), 1)[:, 1].cpu()
                      for i in range(0, len(images), batch)])


def accuracy_at_threshold(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                          device: torch.device, threshold: float) -> float:
    """Accuracy of a binary classifier that predicts class 1 when p(class 1) >= ``threshold`` (0.5 ~ argmax)."""
    if not len(images):
        return math.nan
    pred = (_positive_probs(model, images, device) >= threshold).long()
    return float((pred == labels.long()).float().mean())


@torch.no_grad()
def _predict(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 512) -> torch.Tensor:
    model.eval().to(device)
    return torch.cat([model(images[i:i + batch].to(device)).argmax(1).cpu() for i in range(0, len(images), batch)]) \
        if len(images) else torch.zeros(0, dtype=torch.int64)


@torch.no_grad()
def segmentation_metrics(task: TaskSpec, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         device: torch.device, batch: int = 2) -> dict[str, float]:
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from models import build_loss

    model.eval().to(device)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    criterion = build_loss(task)("sum")
    k, loss = task.num_outputs, 0.0
    for i in range(0, len(images), batch):
        x, y = images[i:i + batch].to(device), labels[i:i + batch].to(device)
        logits = model(x)
        loss += float(criterion(logits, y))
        metric(y_pred=one_hot(logits.argmax(1, keepdim=True), k), y=one_hot(y.unsqueeze(1), k))
    n = len(images)
    out: dict[str, float] = {"n": n, "val_loss": loss / n if n else math.nan}
    per = metric.aggregate().cpu() if n else torch.full((0, k - 1), math.nan)  # [N, labels], NaN where empty
    for j, name in enumerate(task.labels):
        col = per[:, j] if per.numel() else torch.tensor([])
        col = col[~torch.isnan(col)]
        out[f"val_dice_{name}"] = float(col.mean()) if col.numel() else math.nan
    vals = [out[f"val_dice_{name}"] for name in task.labels if not math.isnan(out[f"val_dice_{name}"])]
    out["val_dice"] = float(sum(vals) / len(vals)) if vals else math.nan
    return out


def task_metrics(task: TaskSpec, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 device: torch.device) -> dict[str, float]:
    """The task's validation metrics over one split (plus ``n``, the number of examples)."""
    fn = classification_metrics if task.is_classification else segmentation_metrics
    return fn(task, model, images, labels, device)


def missing_reasons(metrics: dict[str, float], labels: torch.Tensor, n: int) -> dict[str, str]:
    """Why each undefined (NaN) metric of :func:`task_metrics` has no value, as a code of ``wire.MISSING_REASONS``
    (codes only: they travel in the clear). ``NO_DATA``: an empty split, or a class / label absent from it;
    ``SINGLE_CLASS``: AUC over one class; anything else is left to the default (``NOT_FINITE``)."""
    from client.evaluation import missing_reasons as base

    core = {"n": n, "loss": metrics.get("val_loss", 0.0), "accuracy": metrics.get("val_accuracy", 0.0),
            "auc": metrics.get("val_auc", 0.0)}
    out = {f"val_{k}": why for k, why in base(core, labels).items() if f"val_{k}" in metrics}
    for key, value in metrics.items():
        if key.startswith(("val_recall_", "val_dice")) and math.isnan(value):
            out[key] = "NO_DATA"
    return out
