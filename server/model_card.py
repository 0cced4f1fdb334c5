"""The model card of an exported run: what an ethics board, a regulator's reviewer or a deploying hospital reads.

One record (``docs/model_card.json``) rendered once as Markdown (``docs/README.md``). It holds only what the
consortium already has in the clear: the task, the run's settings and strategy, each site's dataset card (counts,
small cells suppressed by the site itself, no identifiers), the DP guarantee each site signed (epsilon, delta,
accountant, unit = patient) and the independent audit's verdict, the released validation metrics per site and
round, the held-out test metrics, and the hashes that pin the weights and the run (settings digest, the run
manifest and app bundle the sites approved).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

CARD_SCHEMA = "atoll.model-card/1"
DATASET_CARD_SCHEMA = "atoll.dataset-card/1"


class CardInputError(ValueError):
    """A file handed to the model card is unusable; the message names it."""


def _finite(v: Any) -> Any:
    return v if not isinstance(v, float) or math.isfinite(v) else None


def _clean(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _finite(v) for k, v in d.items()}


def heldout_from_summary(path: str | Path, run_name: str, round_: int) -> dict[str, Any] | None:
    """The held-out test metrics of ``round_`` from a demo's summary.json (or a file of the same shape), else None.

    Accepted shapes: the demos' ``summary.json`` (``run`` and per-round ``history[].test``), or
    ``{"round": N, "metrics": {...}, "test_set": "..."}`` for a lead's own held-out evaluation.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CardInputError(f"--heldout {p} does not exist") from None
    except (OSError, ValueError) as exc:
        raise CardInputError(f"--heldout {p} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CardInputError(f"--heldout {p}: expected a JSON object")
    if "history" in data:
        if data.get("run") not in (None, run_name):
            raise CardInputError(f"--heldout {p} is the summary of run {data.get('run')!r}, not of {run_name!r}")
        for e in data["history"]:
            if e.get("round") == round_ and e.get("test"):
                test = {k: v for k, v in e["test"].items() if k != "round"}
                n = test.pop("test_images", None) or test.pop("test_subjects", None)
                return {"source": p.name, "round": round_, "examples": n, "metrics": _flatten(test),
                        "test_set": "the demo's held-out test split (seen by no site)"}
        return None
    if data.get("round") not in (None, round_):
        return None
    if not isinstance(data.get("metrics"), dict):
        raise CardInputError(f"--heldout {p}: expected 'metrics' (an object of name -> number)")
    return {"source": p.name, "round": round_, "examples": data.get("examples"), "metrics": _flatten(data["metrics"]),
            "test_set": str(data.get("test_set", ""))}


def _flatten(m: Mapping[str, Any], prefix: str = "") -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k, v in m.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}_"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = _finite(float(v))
    return out


def load_dataset_cards(folder: str | Path | None, sites: list[str]) -> dict[str, dict]:
    """``<folder>/<site>.json`` for each site that has one (``atoll site check --card``), checked for its schema."""
    if folder is None:
        return {}
    root = Path(folder)
    if not root.is_dir():
        raise CardInputError(f"--cards {root} is not a folder (it holds one <site>.json dataset card per site)")
    cards = {}
    for site in sites:
        p = root / f"{site}.json"
        if not p.is_file():
            continue
        try:
            card = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CardInputError(f"{p} is not readable JSON ({exc})") from None
        if not isinstance(card, dict) or card.get("schema") != DATASET_CARD_SCHEMA:
            raise CardInputError(f"{p} is not a dataset card (schema {DATASET_CARD_SCHEMA}; write it with "
                                 "`atoll site check --card`)")
        cards[site] = card
    return cards


def _site_dp(ledger: list[dict], run_name: str) -> dict[str, dict]:
    """Each site's last signed round record of this run: the epsilon it guarantees after the run."""
    out: dict[str, dict] = {}
    for rec in ledger:
        if rec.get("type") != "round" or rec.get("run_id") != run_name:
            continue
        out[str(rec.get("site"))] = {
            "dp": bool(rec.get("dp", True)), "epsilon": _finite(rec.get("epsilon_after")),
            "delta": rec.get("delta"), "accountant": rec.get("accountant"), "max_epsilon": rec.get("max_epsilon"),
            "unit": "patient", "last_round": rec.get("server_round"),
            "mechanism": {k: rec.get(k) for k in ("noise_multiplier", "clip_norm", "sample_rate", "steps")}}
    return out


def build_card(run, meta: Mapping[str, Any], *, heldout: dict | None = None, dataset_cards: dict | None = None,
               audit: dict | None = None, manifest: dict | None = None, exported_at: str = "",
               registry_counts: dict | None = None) -> dict[str, Any]:
    """The model card of ``run`` (a :class:`server.export.RunRecord`) as data.

    ``audit``: ``{"verdict": "PASS"|"FAIL", "date": ..., "errors": n, "warnings": n, "sites": {site: line},
    "findings": [...]}`` from privacy.audit; ``manifest``: ``{"sha256", "app_hash", "source"}``.
    """
    s = run.settings
    task = run.task
    exported = next((e for e in run.history if e["round"] == run.round), {})
    sites = sorted({name for e in run.history for name in e["sites"]})
    dp = _site_dp(run.ledger, run.root.name)
    per_site = {}
    for site in sites:
        entries = [(e["round"], e["sites"][site]) for e in run.history if site in e["sites"]]
        refusals = {}
        for _, r in entries:
            if r.get("status") in ("refused", "rejected", "error"):
                refusals[r.get("code") or r["status"]] = refusals.get(r.get("code") or r["status"], 0) + 1
        now = exported.get("sites", {}).get(site, {})
        per_site[site] = {
            "rounds_contributed": sum(r.get("status") == "contributed" for _, r in entries),
            "refusals": refusals,
            "validation": _clean({k: v for k, v in now.get("val", {}).items()
                                  if not k.startswith("val_threshold_counts")}) if now else {},
            "status_at_round": now.get("status", "absent"),
            "privacy": dp.get(site) or ({"dp": True, "epsilon": _finite(now.get("epsilon")), "delta": now.get("delta"),
                                         "accountant": None, "unit": "patient", "note": "from history.json (no "
                                         "signed record in the run's ledger copy)"} if now.get("epsilon") is not None
                                        else {"note": "no signed privacy record for this site in this run"}),
            "dataset_card": (dataset_cards or {}).get(site) or (
                {"train_counts_from_registry": (registry_counts or {})[site]} if site in (registry_counts or {})
                else None),
        }
    mech = s.get("mechanism", {})
    return {
        "schema": CARD_SCHEMA,
        "model": {"name": meta.get("name"), "version": meta.get("version"), "network": s.get("model"),
                  "weights_sha256": meta["atoll"]["weights_sha256"], "exported_at": exported_at,
                  "bundle": "MONAI bundle (configs/inference.json, models/model.pt, models/model.ts)"},
        "task": {**task.to_manifest(), "description": task.describe(),
                 "outputs": meta["network_data_format"]["outputs"]["pred"]["channel_def"]},
        "training": {
            "run": run.root.name, "round_exported": run.round, "rounds_recorded": len(run.history),
            "rounds_planned": s.get("num_server_rounds"), "status": run.status.get("status"),
            "status_reason": run.status.get("reason", ""), "strategy": s.get("strategy"),
            "proximal_mu": s.get("proximal_mu"), "secure_aggregation": bool(s.get("secagg")),
            "server_options": s.get("server_options"), "weights": meta["atoll"].get("weights", "global model"),
            # chosen from the sites' released validation counts (never the test set); None = argmax
            "decision_threshold": meta["atoll"].get("decision_threshold"),
            "local_steps": mech.get("steps"), "lr": s.get("lr"), "min_sites": s.get("min_sites"),
            "mechanism": {"dp": mech.get("dp"), "noise_multiplier": mech.get("noise_multiplier"),
                          "clip_norm": mech.get("clip_norm"), "sample_rate": mech.get("sample_rate"),
                          "accountant": mech.get("accountant") or "each site's policy",
                          "unit": "patient (Poisson-sampled patients, per-patient clipping)"},
        },
        "sites": per_site,
        "metrics": {"heldout": heldout, "aggregated_validation": _clean(exported.get("aggregated", {})),
                    "note": "validation metrics are those each site's policy releases, on its own validation split"},
        "provenance": {"settings_sha256": _settings_sha(run), "manifest": manifest,
                       "audit": audit or {"verdict": "not run"}},
    }


def _settings_sha(run) -> str:
    import hashlib

    return hashlib.sha256((run.root / "settings.json").read_bytes()).hexdigest()


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card as Markdown (docs/README.md of the bundle)."""
    m, t, tr, pv = card["model"], card["task"], card["training"], card["provenance"]
    names = t.get("classes") or t.get("labels") or []
    lines = [f"# Model card: {m['name']}", "",
             f"{t['description']}. Trained by federated learning with Atoll: no image left any hospital; "
             + ("each site trained with patient-level DP-SGD and signed what it spent." if tr["mechanism"]["dp"] else
                "DP-SGD was OFF for this run: the model carries no privacy guarantee."), "",
             "## Model", "",
             f"- network: `{m['network']}` (MONAI bundle: `configs/inference.json`, `models/model.pt`, TorchScript "
             "`models/model.ts`)",
             f"- weights SHA-256: `{m['weights_sha256']}`", f"- exported: {m['exported_at'] or '—'}", "",
             "## Task", "",
             f"- kind: {t['kind']}, {t['spatial_dims']}D, input {'x'.join(map(str, t['size']))}, "
             f"modalities {', '.join(t.get('modalities') or []) or 'any'}",
             f"- {'classes' if t.get('classes') else 'labels'}: "
             + ", ".join(f"{k} = {v}" for k, v in t["outputs"].items()),
             "", "## Training", "",
             f"- run `{tr['run']}`: round {tr['round_exported']} exported, {tr['rounds_recorded']} of "
             f"{tr['rounds_planned']} rounds recorded, status {tr['status']}"
             + (f" ({tr['status_reason']})" if tr["status_reason"] else ""),
             f"- strategy {tr['strategy']}" + (f" (mu {tr['proximal_mu']})" if tr['strategy'] == "fedprox" else "")
             + f", secure aggregation {'on' if tr['secure_aggregation'] else 'off'}, {tr['local_steps']} local steps "
             f"per round, lr {tr['lr']}",
             "- DP-SGD: " + (f"sigma {tr['mechanism']['noise_multiplier']}, clip {tr['mechanism']['clip_norm']}, "
                             f"sampling rate {tr['mechanism']['sample_rate']}, accountant "
                             f"{tr['mechanism']['accountant']}; unit of privacy: {tr['mechanism']['unit']}"
                             if tr["mechanism"]["dp"] else "OFF (no privacy guarantee)"),
             "", "## Sites", "",
             "| site | rounds contributed | refusals | epsilon | delta | accountant | budget | training images / "
             "patients |", "|---|---|---|---|---|---|---|---|"]
    for site, d in card["sites"].items():
        p = d["privacy"]
        counts = "—"
        dc = d.get("dataset_card") or {}
        if "split" in dc:
            tr_split = dc["split"].get("train", {})
            counts = f"{_fmt(tr_split.get('images'))} / {_fmt(tr_split.get('patients'))}"
        elif "train_counts_from_registry" in dc:
            c = dc["train_counts_from_registry"]
            counts = f"{_fmt(c.get('train_examples'))} / {_fmt(c.get('train_patients'))}"
        ref = ", ".join(f"{k} x{v}" for k, v in d["refusals"].items()) or "none"
        lines.append(f"| {site} | {d['rounds_contributed']} | {ref} | {_fmt(p.get('epsilon'))} | "
                     f"{_fmt(p.get('delta'))} | {_fmt(p.get('accountant'))} | {_fmt(p.get('max_epsilon'))} | {counts} |")
    lines += ["", "Epsilon is each site's lifetime spend on its dataset after this run (patient-level, "
                  "(epsilon, delta)-DP), from its signed ledger record. Dataset cards hold counts only; the sites "
                  "suppressed small cells themselves.", "", "## Metrics", ""]
    h = card["metrics"]["heldout"]
    if h:
        lines.append(f"Held-out test ({h.get('test_set') or h.get('source')}, {_fmt(h.get('examples'))} examples, "
                     f"round {h['round']}): " + ", ".join(f"{k} {_fmt(v)}" for k, v in h["metrics"].items()))
    else:
        lines.append("Held-out test: none given (pass `--heldout FILE` to `atoll run export`).")
    lines += ["", f"Validation at round {tr['round_exported']} (released by each site's policy):", "",
              "| site | " + " | ".join(_val_keys(card)) + " |", "|---|" + "---|" * len(_val_keys(card))]
    for site, d in card["sites"].items():
        lines.append(f"| {site} | " + " | ".join(_fmt(d["validation"].get(k)) for k in _val_keys(card)) + " |")
    agg = card["metrics"]["aggregated_validation"]
    if agg:
        lines.append("| aggregated | " + " | ".join(_fmt(agg.get(k)) for k in _val_keys(card)) + " |")
    a, mf = pv["audit"], pv.get("manifest") or {}
    lines += ["", "## Provenance", "",
              f"- settings SHA-256 (signed into every round digest): `{pv['settings_sha256']}`",
              f"- run manifest: `{mf.get('sha256', '—')}`, app bundle `{mf.get('app_hash', '—')}`"
              + (f" ({mf['source']})" if mf.get("source") else ""),
              f"- ledger verification (`atoll audit verify`): **{a.get('verdict')}**"
              + (f" on {a['date']}, {a.get('errors', 0)} error(s), {a.get('warnings', 0)} warning(s)"
                 if a.get("date") else "")]
    for line in (a.get("sites") or {}).values():
        lines.append(f"  - {line}")
    lines += ["", f"Labels: {', '.join(names)}.", ""]
    return "\n".join(lines)


def _val_keys(card: Mapping[str, Any]) -> list[str]:
    keys: list[str] = []
    for d in card["sites"].values():
        for k in d["validation"]:
            if k not in keys and k != "num-examples":
                keys.append(k)
    return ["num-examples", *keys] if any("num-examples" in d["validation"] for d in card["sites"].values()) else keys
