"""Validation metrics a site may release: loss, accuracy and ROC AUC of a binary/multiclass classifier."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   device: torch.device, batch_size: int = 512) -> dict[str, float]:
    """Loss, accuracy and AUC over a whole split.

    AUC is one-vs-rest macro for more than two classes, and NaN when the split holds a single class
    (a small site's validation split can): callers must treat NaN as "not available", not as 0.
    """
    model.eval().to(device)
    losses, probs = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        y = labels[i:i + batch_size].to(device)
        logits = model(x)
        losses.append(torch.nn.functional.cross_entropy(logits, y, reduction="sum").item())
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    n = len(images)
    if n == 0:
        return {"loss": math.nan, "accuracy": math.nan, "auc": math.nan, "n": 0}
    p = torch.cat(probs).numpy()
    y = labels.numpy()
    acc = float((p.argmax(1) == y).mean())
    auc = math.nan
    if len(np.unique(y)) > 1 and np.isfinite(p).all():
        auc = float(roc_auc_score(y, p[:, 1]) if p.shape[1] == 2 else
                    roc_auc_score(y, p, multi_class="ovr", labels=list(range(p.shape[1]))))
    return {"loss": sum(losses) / n, "accuracy": acc, "auc": auc, "n": n}


def missing_reasons(result: dict[str, float], labels: torch.Tensor) -> dict[str, str]:
    """Why each undefined (NaN) value of :func:`evaluate_model`'s result is missing, as a code of
    ``contract.wire.MISSING_REASONS``: ``NO_DATA`` (empty split), ``SINGLE_CLASS`` (AUC of one class is undefined);
    any other NaN is left to the caller's default (``NOT_FINITE``). Codes only: they travel in the clear."""
    out: dict[str, str] = {}
    if int(result.get("n", 0)) == 0:
        return {k: "NO_DATA" for k in ("loss", "accuracy", "auc")}
    if math.isnan(result.get("auc", 0.0)) and len(np.unique(labels.numpy())) < 2:
        out["auc"] = "SINGLE_CLASS"
    return out


def sign_evaluation(content, *, site: str, run_id: str, server_round: int, weights_sha256: str,
                    signing_key_path) -> dict | None:
    """The site's signed statement over an evaluation reply (``contract.wire.evaluation_statement``), or None
    when the site has no signing key.

    It lets the lead tell a site's answer from a stranger's in an evaluation run, where no training reply (and
    so no signed ledger record) has bound the site's Flower node yet, and ties the released metrics to the exact
    weights scored. It is not a ledger record: evaluation charges nothing and writes nothing to the ledger.
    """
    from pathlib import Path

    from contract import wire
    from privacy.keys import load_private_key
    from privacy.ledger import sign_record

    if not signing_key_path or not Path(signing_key_path).exists():
        return None
    statement = wire.evaluation_statement(site, run_id, server_round, weights_sha256, wire.released_sha256(content))
    return sign_record(statement, load_private_key(signing_key_path))
