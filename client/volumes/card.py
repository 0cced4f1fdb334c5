"""Dataset card of a volume site: counts and ranges only, with the 2D card's small-count suppression.

Series, patients and studies are counted; native shapes and spacings are summarised as ranges (min, max per
axis). A range over fewer series than the threshold would describe individual scans, so it is suppressed then.
No identifiers, paths, dates or pseudonyms.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping

from client.ingest.card import CARD_SCHEMA, SECONDARY, _pair, suppress, suppress_group


def _ranges(values: list[list[float]], threshold: int) -> dict[str, Any] | str:
    if len(values) < threshold:
        return SECONDARY if values else "-"
    axes = ("slices", "rows", "columns")
    return {a: [min(v[i] for v in values), max(v[i] for v in values)] for i, a in enumerate(axes)}


def make_volume_card(*, site: str, used: Iterable[Mapping[str, Any]], quarantined: Iterable[str], labelled: bool,
                     label_names: tuple[str, ...] | None, threshold: int, size: list[int] | None) -> dict[str, Any]:
    used = list(used)
    reasons = Counter(quarantined)
    by_split = {s: [u for u in used if u["split"] == s] for s in ("train", "val")}
    ts, vs = _pair(len(by_split["train"]), len(by_split["val"]), threshold)
    tp, vp = _pair(len({u["patient"] for u in by_split["train"]}), len({u["patient"] for u in by_split["val"]}),
                   threshold)

    def name(v: int) -> str:
        return label_names[v - 1] if label_names and 0 < v <= len(label_names) else str(v)

    n_q = sum(reasons.values())
    return {
        "schema": CARD_SCHEMA,
        "site": site,
        "kind": "volumes",
        "task": "segmentation",
        "input_size": size,
        "suppression_threshold": threshold,
        "series_used": suppress(len(used), threshold),
        "patients": suppress(len({u["patient"] for u in used}), threshold),
        "studies": suppress(len({u["study"] for u in used}), threshold),
        "by_modality": suppress_group(Counter(u["modality"] or "UNKNOWN" for u in used), threshold),
        "series_with_label": suppress_group(Counter(name(v) for u in used for v in u["labels_present"]), threshold),
        "native_shape": _ranges([u["native_shape"] for u in used], threshold),
        "native_spacing_mm": _ranges([u["native_spacing_mm"] for u in used], threshold),
        "split": {"train": {"series": ts, "patients": tp}, "val": {"series": vs, "patients": vp}},
        "quarantined": {"total": suppress(n_q, threshold), "by_reason": suppress_group(dict(reasons), threshold)},
        "labels": {"provided": labelled},
    }


def format_volume_card(card: Mapping[str, Any]) -> str:
    def rng(r: Any) -> str:
        return r if isinstance(r, str) else " x ".join(f"{a:g}-{b:g}" if a != b else f"{a:g}" for a, b in r.values())

    lines = [
        f"Dataset card - site {card['site']} (volumes, segmentation"
        + (f", input {'x'.join(map(str, card['input_size']))})" if card.get("input_size") else ")"),
        f"  series used     {card['series_used']}   patients {card['patients']}   studies {card['studies']}",
        f"  train           {card['split']['train']['series']} series / {card['split']['train']['patients']} patients",
        f"  validation      {card['split']['val']['series']} series / {card['split']['val']['patients']} patients",
        "  by modality     " + (", ".join(f"{k}: {v}" for k, v in card["by_modality"].items()) or "-"),
        "  series with     " + (", ".join(f"{k}: {v}" for k, v in card["series_with_label"].items()) or "-"),
        f"  native shape    {rng(card['native_shape'])} (slices x rows x columns)",
        f"  native spacing  {rng(card['native_spacing_mm'])} mm",
        f"  quarantined     {card['quarantined']['total']}",
    ]
    for reason, n in card["quarantined"]["by_reason"].items():
        lines.append(f"    {reason:<28} {n}")
    lines.append(f"  labels          {'provided (NIfTI or DICOM SEG)' if card['labels']['provided'] else 'none'}")
    lines.append(f"  (counts below {card['suppression_threshold']} shown as <{card['suppression_threshold']})")
    return "\n".join(lines)
