"""The released metric ``val_threshold_counts`` and the decision threshold the server picks from it.

A DP classifier often ranks well (AUC) while its argmax threshold (0.5) drifts, so its accuracy drops. The
threshold must not come from the test set, and the server never sees a validation image; what it may see is what a
site's policy releases in the clear. ``val_threshold_counts`` is a fixed grid of counts over the site's validation
split: for each threshold t of :data:`GRID`, how many positive and how many negative images have
p(positive) >= t, plus the two class totals. Counts are coarsened to multiples of the dataset card's
small-count threshold (a count below it is never released exactly), and a split with a class smaller than it
releases nothing. They are released in the clear, not under DP; the audit report lists them per site.

Both sides use this module: a site to compute and name the scalars (one MetricRecord value each, under
:func:`metric_keys`), the server to pool them and choose the threshold with the best balanced accuracy (the
same as maximising Youden's J = TPR - FPR, since balanced accuracy = (1 + J) / 2).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

#: the metric name a site policy lists (``[privacy] released_metrics``) to release the counts
METRIC = "val_threshold_counts"
#: thresholds on the positive class's probability: 0.05, 0.10, ..., 0.95
GRID: tuple[float, ...] = tuple(round(k / 20, 2) for k in range(1, 20))
#: as client.ingest.card.DEFAULT_THRESHOLD: no count below it is released exactly
SUPPRESSION = 5


def metric_keys() -> tuple[str, ...]:
    """The scalar metric names the counts travel under (all start with :data:`METRIC`)."""
    return (f"{METRIC}_pos", f"{METRIC}_neg",
            *(f"{METRIC}_{i:02d}_{c}" for i in range(len(GRID)) for c in ("pos", "neg")))


def expand(names: Iterable[str]) -> set[str]:
    """Metric names with :data:`METRIC` replaced by its scalar keys (what a policy listing it lets out)."""
    names = set(names)
    return (names - {METRIC}) | set(metric_keys()) if METRIC in names else names


def counts(probs: Sequence[float], labels: Sequence[int], suppression: int = SUPPRESSION) -> dict[str, float]:
    """The released scalars for one split (``probs``: p(class 1) per image; ``labels``: 0/1); ``{}`` when a class
    has fewer than ``suppression`` images (nothing is released then)."""
    pos = [p for p, y in zip(probs, labels) if int(y) == 1]
    neg = [p for p, y in zip(probs, labels) if int(y) == 0]
    if len(pos) < suppression or len(neg) < suppression:
        return {}

    def coarse(n: int) -> float:
        return float(n - n % suppression)

    out = {f"{METRIC}_pos": coarse(len(pos)), f"{METRIC}_neg": coarse(len(neg))}
    for i, t in enumerate(GRID):
        out[f"{METRIC}_{i:02d}_pos"] = coarse(sum(p >= t for p in pos))
        out[f"{METRIC}_{i:02d}_neg"] = coarse(sum(p >= t for p in neg))
    return out


def pool(per_site: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Sum the counts of the sites that released all of them (a site with some keys missing is left out)."""
    keys = metric_keys()
    total = dict.fromkeys(keys, 0.0)
    for m in per_site:
        if all(k in m for k in keys):
            for k in keys:
                total[k] += float(m[k])
    return total


def choose(pooled: Mapping[str, float]) -> tuple[float, float] | None:
    """(threshold, balanced accuracy) maximising balanced accuracy on the pooled counts; ties go to the threshold
    closest to 0.5. None when no site released counts of both classes."""
    pos, neg = pooled.get(f"{METRIC}_pos", 0.0), pooled.get(f"{METRIC}_neg", 0.0)
    if pos <= 0 or neg <= 0:
        return None
    best: tuple[float, float, float] | None = None
    for i, t in enumerate(GRID):
        tpr = min(1.0, pooled[f"{METRIC}_{i:02d}_pos"] / pos)
        tnr = 1.0 - min(1.0, pooled[f"{METRIC}_{i:02d}_neg"] / neg)
        ba = (tpr + tnr) / 2
        key = (ba, -abs(t - 0.5), t)
        if best is None or key > best:
            best = key
    assert best is not None
    return best[2], best[0]


def accuracy_at(released: Mapping[str, float], t: float) -> float | None:
    """Accuracy at grid threshold ``t`` from one site's released counts (coarsened, so approximate to within the
    suppression step); None when the site did not release them all or ``t`` is not a grid point."""
    keys = metric_keys()
    if not all(k in released for k in keys) or round(t, 2) not in GRID:
        return None
    i = GRID.index(round(t, 2))
    pos, neg = released[f"{METRIC}_pos"], released[f"{METRIC}_neg"]
    if pos + neg <= 0:
        return None
    correct = min(pos, released[f"{METRIC}_{i:02d}_pos"]) + max(0.0, neg - released[f"{METRIC}_{i:02d}_neg"])
    return correct / (pos + neg)
