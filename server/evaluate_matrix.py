"""The cross-site evaluation matrix: models x sites x metrics, as `atoll run evaluate` publishes it.

Rows are the models (the chosen round's global model, then each site's last released local model), columns the
sites that evaluated them on their validation split, a cell the metrics that site released. What a cell may hold
is decided twice, and both rules are applied here, to the published file, whatever a reply carried:

* the site's policy: a site releases only the metrics its ``[privacy] released_metrics`` lists (its ClientApp and
  egress guard drop the rest). A metric of the task that a site did not release is shown as ``WITHHELD``; one it
  released without a value carries the site's own reason code (``NO_DATA``, ``SINGLE_CLASS``, ``NOT_FINITE``).
* small counts: a cell computed on fewer validation examples than the dataset card's suppression threshold would
  describe a handful of patients, so its count is shown as ``"<T"`` and its metrics as ``SMALL_COUNT`` (the rule
  of ``client.ingest.card.suppress``, applied to a published count; the card's threshold, 5, is the default).

The headline metric of a task kind (the heatmap's cell) is the ROC AUC for classification (macro one-vs-rest for
more than two classes) and the mean foreground Dice for segmentation (``client.task_metrics``' names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from contract import wire
from contract.task import TaskSpec

SCHEMA = "atoll.evaluation/1"
DEFAULT_THRESHOLD = 5  # as client.ingest.card.DEFAULT_THRESHOLD (the server does not import client code)
WITHHELD = "WITHHELD"
SMALL_COUNT = "SMALL_COUNT"

CellStatus = Literal["evaluated", "refused", "error", "no_reply", "ignored"]
ModelKind = Literal["global", "local"]


def headline_metric(task: TaskSpec) -> str:
    """The one metric a heatmap cell shows for this task kind."""
    return "val_auc" if task.is_classification else "val_dice"


def suppress_count(n: int, threshold: int) -> int | str:
    """A published count: ``"<T"`` for 1 <= n < T (as the dataset card shows small cells)."""
    return f"<{threshold}" if 0 < n < threshold else n


@dataclass(frozen=True)
class ModelRow:
    """One evaluated model. ``site`` is the site whose released update it is (None for the global model)."""

    name: str
    kind: ModelKind
    round: int
    site: str | None = None
    weights_sha256: str = ""

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "round": self.round,
                             "weights_sha256": self.weights_sha256}
        if self.site is not None:
            d["site"] = self.site
        return d


@dataclass
class Cell:
    """What one site answered for one model, as published."""

    status: CellStatus
    metrics: dict[str, float] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    num_examples: int | str | None = None
    code: str = ""
    message: str = ""
    signed: bool = False  # the reply carried the site's signature over these metrics and this model

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"status": self.status}
        if self.status == "evaluated":
            d.update(num_examples=self.num_examples, metrics=dict(sorted(self.metrics.items())), signed=self.signed)
            if self.missing:
                d["missing"] = dict(sorted(self.missing.items()))
        if self.code:
            d.update(code=self.code, message=self.message)
        return d


def evaluated_cell(task: TaskSpec, released: dict[str, float], missing: dict[str, str], *,
                   threshold: int = DEFAULT_THRESHOLD, signed: bool = False,
                   decision_threshold: float | None = None) -> Cell:
    """A site's released validation metrics for one model, filtered and suppressed for publication.

    Parameters
    ----------
    released: the MetricRecord the site sent (``num-examples`` and the metrics its policy releases).
    missing: the site's ``missing`` record (metric -> reason code) for released metrics without a value.
    threshold: small-count suppression threshold.
    decision_threshold: the run's threshold chosen from the released validation counts (decision-threshold =
        "validation"); the cell then adds ``val_accuracy_at_threshold`` from the site's own released counts.
    """
    names = [m for m in task.metric_names() if m.startswith("val_") and m != "val_threshold_counts"]  # pooled
    n_raw = released.get(wire.NUM_EXAMPLES)
    n = int(n_raw) if isinstance(n_raw, (int, float)) and math.isfinite(n_raw) else None
    cell = Cell("evaluated", num_examples=None if n is None else suppress_count(n, threshold), signed=signed)
    small = n is not None and 0 < n < threshold
    for name in names:
        value = released.get(name)
        if small and (value is not None or name in missing):
            cell.missing[name] = SMALL_COUNT
        elif value is not None and isinstance(value, (int, float)) and math.isfinite(value):
            cell.metrics[name] = float(value)
        elif name in missing:
            code = missing[name]
            cell.missing[name] = code if code in wire.MISSING_REASONS else "NOT_FINITE"
        else:
            cell.missing[name] = WITHHELD  # the site's policy does not release it
    if decision_threshold is not None and not small:
        from contract.threshold import accuracy_at

        acc = accuracy_at(released, decision_threshold)
        if acc is not None:
            cell.metrics["val_accuracy_at_threshold"] = acc
    return cell


@dataclass
class EvaluationMatrix:
    """Rows (models) x columns (sites) of :class:`Cell`; ``notes`` say what could not be evaluated and why."""

    task: TaskSpec
    run: str
    round: int
    models: list[ModelRow] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    threshold: int = DEFAULT_THRESHOLD

    @property
    def headline(self) -> str:
        return headline_metric(self.task)

    def put(self, model: str, site: str, cell: Cell) -> None:
        if site not in self.sites:
            self.sites.append(site)
        self.cells[(model, site)] = cell

    def cell(self, model: str, site: str) -> Cell:
        return self.cells.get((model, site), Cell("no_reply", code="NO_REPLY",
                                                  message="the site sent no answer for this model"))

    def headline_value(self, model: str, site: str) -> tuple[float | None, str]:
        """The heatmap's value of one cell and, when it has none, the short reason shown instead."""
        c = self.cell(model, site)
        if c.status != "evaluated":
            return None, c.code or c.status
        if self.headline in c.metrics:
            return c.metrics[self.headline], ""
        return None, c.missing.get(self.headline, WITHHELD)

    def as_dict(self) -> dict[str, Any]:
        sites = sorted(self.sites)
        return {
            "schema": SCHEMA,
            "run": self.run,
            "round": self.round,
            "task": self.task.to_manifest(),
            "headline_metric": self.headline,
            "suppression_threshold": self.threshold,
            "models": [m.as_dict() for m in self.models],
            "sites": sites,
            "matrix": {m.name: {s: self.cell(m.name, s).as_dict() for s in sites} for m in self.models},
            "notes": list(self.notes),
            "privacy": "Evaluation trains nothing and charges no site any epsilon: each local model is the round's "
                       "global weights plus that site's released DP-SGD update, so scoring it anywhere is "
                       "post-processing of a DP output. Each cell holds only what the evaluating site's policy "
                       "releases in the clear; counts below the suppression threshold are suppressed.",
        }

    def lines(self) -> list[str]:
        """The matrix as text (rows models, columns sites, cell the headline metric)."""
        return table_lines(self.as_dict())


def table_lines(doc: dict[str, Any]) -> list[str]:
    """An evaluation.json (``EvaluationMatrix.as_dict``) as text: rows models, columns sites, cell the headline
    metric or, where a cell has none, its reason code."""
    headline, sites, matrix = doc.get("headline_metric", ""), list(doc.get("sites", [])), doc.get("matrix", {})
    models = [m["name"] for m in doc.get("models", [])]
    width = max([len(m) for m in models] + [5])
    out = [f"{headline} on each site's validation split (round {doc.get('round')}; rows: models, columns: sites):",
           " " * width + "  " + "  ".join(f"{s:>14}" for s in sites)]
    for m in models:
        vals = []
        for s in sites:
            c = matrix.get(m, {}).get(s, {"status": "no_reply", "code": "NO_REPLY"})
            v = c.get("metrics", {}).get(headline) if c.get("status") == "evaluated" else None
            why = (c.get("missing", {}).get(headline, WITHHELD) if c.get("status") == "evaluated"
                   else c.get("code") or c.get("status", ""))
            vals.append(f"{v:>14.3f}" if isinstance(v, (int, float)) else f"{str(why)[:14]:>14}")
        out.append(f"{m:<{width}}  " + "  ".join(vals))
    return out + [f"note: {n}" for n in doc.get("notes", [])]
