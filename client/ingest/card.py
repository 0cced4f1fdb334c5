"""Dataset card (may be shown to the consortium) and on-site ingestion report (never leaves the site).

The card holds counts only, keyed by modality codes, class names/indices and reason codes: no identifiers, UIDs,
paths, dates or pseudonyms. Small cells are suppressed: a count ``1 <= n < threshold`` is shown as ``"<threshold"``.
Where a group's total is published, a single suppressed cell could be recovered by subtraction, so the smallest other
non-zero cell of that group is suppressed too (shown as ``"suppressed"``; secondary suppression).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping

from client.site_config import FIRST_LOOK_NAME

CARD_SCHEMA = "atoll.dataset-card/1"
REPORT_SCHEMA = "atoll.ingest-report/1"
DEFAULT_THRESHOLD = 5
SECONDARY = "suppressed"


def suppress(n: int, threshold: int) -> int | str:
    """Primary small-cell suppression of one count."""
    return f"<{threshold}" if 0 < n < threshold else n


def suppress_group(counts: Mapping[str, int], threshold: int) -> dict[str, int | str]:
    """Suppress a group of counts whose total is published elsewhere (primary + one secondary cell)."""
    out: dict[str, int | str] = {k: suppress(v, threshold) for k, v in sorted(counts.items())}
    primary = [k for k, v in out.items() if isinstance(v, str)]
    if len(primary) == 1:
        others = sorted((v, k) for k, v in counts.items() if k not in primary and v > 0)
        if others:
            out[others[0][1]] = SECONDARY
    return out


def _pair(a: int, b: int, threshold: int) -> tuple[int | str, int | str]:
    """Two counts summing to a published total: suppress both if either is small."""
    sa, sb = suppress(a, threshold), suppress(b, threshold)
    if isinstance(sa, str) or isinstance(sb, str):
        return (sa if isinstance(sa, str) else SECONDARY), (sb if isinstance(sb, str) else SECONDARY)
    return sa, sb


def make_card(
    *,
    site: str,
    task: str,
    image_size: int,
    used: Iterable[Mapping[str, Any]],
    quarantined: Iterable[str],
    labels_unmatched: int,
    labelled: bool,
    class_names: tuple[str, ...] | None,
    threshold: int = DEFAULT_THRESHOLD,
) -> dict[str, Any]:
    """Build the identifier-free card.

    Parameters
    ----------
    used: one mapping per used image with ``modality``, ``label`` (int or None), ``patient``, ``study``,
        ``series``, ``split`` (only counted, never copied).
    quarantined: reason code per quarantined file.
    """
    used = list(used)
    reasons = Counter(quarantined)
    n_used = len(used)

    def label_name(v: int | None) -> str:
        if v is None:
            return "unlabelled"
        return class_names[v] if class_names and 0 <= v < len(class_names) else str(v)

    by_split = {s: [u for u in used if u["split"] == s] for s in ("train", "val")}
    ti, vi = _pair(len(by_split["train"]), len(by_split["val"]), threshold)
    tp, vp = _pair(len({u["patient"] for u in by_split["train"]}), len({u["patient"] for u in by_split["val"]}), threshold)
    n_quarantined = sum(reasons.values())
    return {
        "schema": CARD_SCHEMA,
        "site": site,
        "task": task,
        "image_size": image_size,
        "suppression_threshold": threshold,
        # files seen = used + quarantined: publishing all three exactly would undo a suppressed quarantine total
        "files_seen": (SECONDARY if isinstance(suppress(n_quarantined, threshold), str) and n_used >= threshold
                       else suppress(n_used + n_quarantined, threshold)),
        "images_used": suppress(n_used, threshold),
        "patients": suppress(len({u["patient"] for u in used}), threshold),
        "studies": suppress(len({u["study"] for u in used}), threshold),
        "series": suppress(len({u["series"] for u in used}), threshold),
        "by_modality": suppress_group(Counter(u["modality"] or "UNKNOWN" for u in used), threshold),
        "by_class": suppress_group(Counter(label_name(u["label"]) for u in used), threshold),
        "split": {"train": {"images": ti, "patients": tp}, "val": {"images": vi, "patients": vp}},
        "quarantined": {"total": suppress(n_quarantined, threshold),
                        "by_reason": suppress_group(dict(reasons), threshold)},
        "labels": {"provided": labelled, "unmatched": suppress(labels_unmatched, threshold)},
    }


def format_card(card: Mapping[str, Any]) -> str:
    """Human-readable rendering of a card for the terminal (same content, nothing added)."""
    who = "first look (no site config)" if card["site"] == FIRST_LOOK_NAME else f"site {card['site']}"
    lines = [
        f"Dataset card - {who} ({card['task']}, {card['image_size']}x{card['image_size']})",
        f"  files seen      {card['files_seen']}",
        f"  images used     {card['images_used']}   patients {card['patients']}   studies {card['studies']}"
        f"   series {card['series']}",
        f"  train           {card['split']['train']['images']} images / {card['split']['train']['patients']} patients",
        f"  validation      {card['split']['val']['images']} images / {card['split']['val']['patients']} patients",
        "  by modality     " + (", ".join(f"{k}: {v}" for k, v in card["by_modality"].items()) or "-"),
        "  by class        " + (", ".join(f"{k}: {v}" for k, v in card["by_class"].items()) or "-"),
        f"  quarantined     {card['quarantined']['total']}",
    ]
    for reason, n in card["quarantined"]["by_reason"].items():
        lines.append(f"    {reason:<28} {n}")
    labels = card["labels"]
    lines.append(f"  labels          {'provided' if labels['provided'] else 'none (every decodable image counts)'}"
                 + (f", {labels['unmatched']} match no image" if labels["provided"] else ""))
    lines.append(f"  (counts below {card['suppression_threshold']} shown as <{card['suppression_threshold']})")
    return "\n".join(lines)
