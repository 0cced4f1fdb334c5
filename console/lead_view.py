"""The lead's pages: the run folders under a runs directory, and one run as it progresses.

Read-only over what ``server/outputs.py`` writes into ``RUN_DIR/<run>/``: ``settings.json`` (rounds asked for),
``history.json`` (per round: each site's status, refusal code and message, released metrics, epsilon),
``status.json`` (completed | stopped, written at the end; absent while the run goes on), ``checkpoint.json``, and
the consortium's copy of the signed ledger (``ledger.jsonl``: each site's declared budget ``max_epsilon``).
Files a later step writes into the run folder (``evaluation.json`` and its heatmap, an exported model) are linked
when they exist (:data:`ARTIFACTS`).
"""

from __future__ import annotations

import io
import json
import math
import re
import time
import zipfile
from pathlib import Path
from typing import Any

from console import svg

# (label, names tried in the run folder): linked when present; folders are downloaded as a zip.
ARTIFACTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Evaluation matrix", ("evaluation.json",)),
    ("Evaluation heatmap", ("evaluation.svg", "evaluation.png")),
    ("Exported model (MONAI bundle)", ("export", "bundle", "model")),
    ("Model card", ("model-card.md", "model_card.md", "model-card.json", "model_card.json")),
    ("Run history (JSON)", ("history.json",)),
)
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_HIDDEN_SETTINGS = ("run_dir", "keys_dir")  # server paths: not shown


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return default  # a file being replaced (atomic rename) or absent: the next poll sees it


def _eps(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return "∞" if math.isinf(x) else f"{x:.3f}"


class LeadConsole:
    def __init__(self, runs_dir: str | Path) -> None:
        self.runs_dir = Path(runs_dir).expanduser().resolve()
        if not self.runs_dir.is_dir():
            raise ValueError(f"--runs {runs_dir}: not a folder (give the lead's runs directory, RUN_DIR)")

    # ------------------------------------------------------------------ runs
    def run_root(self, name: str) -> Path | None:
        """The folder of run ``name`` if it is a run folder directly under the runs directory (no traversal)."""
        if not _RUN_NAME.match(name):
            return None
        root = self.runs_dir / name
        if root.is_dir() and root.resolve().parent == self.runs_dir and self._is_run(root):
            return root
        return None

    @staticmethod
    def _is_run(root: Path) -> bool:
        return any((root / f).is_file() for f in ("settings.json", "history.json", "status.json"))

    def runs(self) -> list[dict[str, Any]]:
        out = []
        for root in sorted(self.runs_dir.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
            if root.is_dir() and _RUN_NAME.match(root.name) and self._is_run(root):
                out.append(self.summary(root))
        return out

    def summary(self, root: Path) -> dict[str, Any]:
        settings = _read_json(root / "settings.json", {})
        history = _read_json(root / "history.json", [])
        status = _read_json(root / "status.json", None)
        total = settings.get("num_server_rounds")
        state = status.get("status", "?") if isinstance(status, dict) else ("running" if history or settings
                                                                             else "starting")
        sites = sorted({s for e in history for s in e.get("sites", {})})
        mtime = max((p.stat().st_mtime for p in (root / "history.json", root / "settings.json") if p.exists()),
                    default=0.0)
        return {"name": root.name, "status": state, "reason": (status or {}).get("reason", "") if isinstance(
                    status, dict) else "", "done": len(history), "total": total, "sites": sites,
                "updated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(mtime)) if mtime else "—",
                "model": settings.get("model"), "dp": settings.get("dp")}

    def budgets(self, root: Path) -> dict[str, float]:
        """Each site's declared lifetime budget, from its newest signed record in the run's ledger copy."""
        from privacy.ledger import read_jsonl

        out: dict[str, float] = {}
        path = root / "ledger.jsonl"
        if path.is_file():
            for _line, rec, _raw in read_jsonl(path):
                if rec and isinstance(rec.get("max_epsilon"), (int, float)):
                    out[str(rec.get("site"))] = float(rec["max_epsilon"])
        return out

    def live(self, root: Path) -> dict[str, Any]:
        """Everything the live panel shows; ``version`` changes whenever the files do."""
        summary = self.summary(root)
        history = _read_json(root / "history.json", [])
        budgets = self.budgets(root)
        sites = summary["sites"]
        latest = history[-1] if history else {"round": 0, "sites": {}}
        rows = []
        for site in sites:
            s = latest.get("sites", {}).get(site)
            eps = next((e["sites"][site].get("epsilon") for e in reversed(history)
                        if site in e.get("sites", {}) and e["sites"][site].get("epsilon") is not None), None)
            budget = budgets.get(site)
            rows.append({"site": site, "status": (s or {}).get("status", "not in this round"),
                         "code": (s or {}).get("code", ""), "message": (s or {}).get("message", ""),
                         "epsilon": _eps(eps), "budget": f"{budget:g}" if budget is not None else "—",
                         "fraction": (min(1.0, eps / budget) if eps is not None and budget and math.isfinite(eps)
                                      else (1.0 if eps is not None and math.isinf(eps) else 0.0))})
        eps_series = [svg.Series(site, [(e["round"], e["sites"][site].get("epsilon"))
                                        for e in history if site in e.get("sites", {})]) for site in sites]
        eps_chart = svg.line_chart("ε per site after each round", "round", "ε (lifetime)", eps_series,
                                   hlines=[(f"budget {s}", b) for s, b in sorted(budgets.items())],
                                   chart_id="epsilon-chart")
        charts = []
        for kind in ("val", "train"):
            names = sorted({k for e in history for s in e.get("sites", {}).values() for k in s.get(kind, {})})
            for metric in names:
                series = [svg.Series(site, [(e["round"], e["sites"][site].get(kind, {}).get(metric))
                                            for e in history if site in e.get("sites", {})]) for site in sites]
                if kind == "val" and any(metric in e.get("aggregated", {}) for e in history):
                    series.append(svg.Series("aggregated", [(e["round"], e.get("aggregated", {}).get(metric))
                                                            for e in history], dashed=True, color="#000"))
                charts.append(svg.line_chart(f"{kind} {metric} per round", "round", metric, series,
                                             chart_id=f"metric-{kind}-{metric}", width=540, height=230))
        version = "|".join(str(p.stat().st_mtime_ns) if p.exists() else "-"
                           for p in (root / "history.json", root / "status.json", root / "ledger.jsonl"))
        return {"run": summary, "latest_round": latest.get("round", 0), "rows": rows, "eps_chart": eps_chart,
                "charts": charts, "version": version, "artifacts": self.artifacts(root),
                "settings": {k: v for k, v in _read_json(root / "settings.json", {}).items()
                             if k not in _HIDDEN_SETTINGS}}

    def artifacts(self, root: Path) -> list[dict[str, str]]:
        out = []
        for label, names in ARTIFACTS:
            for name in names:
                p = root / name
                if p.is_file() or p.is_dir():
                    out.append({"label": label, "name": name, "kind": "folder (zip)" if p.is_dir() else "file"})
                    break
        ckpt = _read_json(root / "checkpoint.json", {})
        weights = ckpt.get("weights") if isinstance(ckpt, dict) else None
        if isinstance(weights, str) and re.match(r"^round-\d{3}\.pt$", weights) and (root / "weights" / weights).is_file():
            out.append({"label": f"Global weights after round {ckpt.get('round')}", "name": f"weights/{weights}",
                        "kind": "file"})
        return out

    def artifact_bytes(self, root: Path, name: str) -> tuple[bytes, str] | None:
        """(content, download name) of a linked artifact; only names :meth:`artifacts` offers are served."""
        offered = {a["name"] for a in self.artifacts(root)}
        if name not in offered:
            return None
        p = root / name
        if p.is_file():
            return p.read_bytes(), f"{root.name}-{Path(name).name}"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(p.rglob("*")):
                if f.is_file() and not f.is_symlink():
                    z.write(f, f.relative_to(p.parent).as_posix())
        return buf.getvalue(), f"{root.name}-{name}.zip"
