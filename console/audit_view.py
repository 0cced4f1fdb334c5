"""The auditor's page: ``atoll audit verify``'s verdict and findings, the HTML report, and the verified files.

Read-only. The verdict is :func:`privacy.audit.verify_run` itself (recomputed when any input file changes), the
report is :func:`privacy.report.render_report` of that same result, the PDF is :func:`privacy.report.print_pdf`.

Paths never reach a page: the audit names its sources by path (the run folder, the keys folder, each site
ledger), so every string shown or downloaded from the result has them replaced by labels ("run <name>",
"enrolled keys", "site ledger of <site>") first.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import Any


class AuditConsole:
    def __init__(self, run_dir: str | Path, site_ledgers: list[str | Path] = (), keys_dir: str | Path | None = None
                 ) -> None:
        self.run_dir = Path(run_dir).expanduser().resolve()
        if not self.run_dir.is_dir():
            raise ValueError(f"--audit {run_dir}: not a folder (give the run's folder, RUN_DIR/<run>)")
        self.site_ledgers = [Path(p).expanduser().resolve() for p in site_ledgers]
        for p in self.site_ledgers:
            if not p.is_file():
                raise ValueError(f"--site-ledger {p}: no such file")
        self.keys_dir = Path(keys_dir).expanduser().resolve() if keys_dir else None
        self._cache: tuple[tuple, Any] | None = None

    def _inputs_version(self) -> tuple:
        files = [self.run_dir / "ledger.jsonl", self.run_dir / "history.json", *self.site_ledgers]
        if self.keys_dir and self.keys_dir.is_dir():
            files += sorted(self.keys_dir.glob("*.pub"))
        return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else (str(p),) for p in files)

    def result(self):
        """The audit result with paths replaced by labels (cached until an input file changes)."""
        from privacy.audit import verify_run

        version = self._inputs_version()
        if self._cache is None or self._cache[0] != version:
            raw = verify_run(self.run_dir, self.site_ledgers, self.keys_dir)
            self._cache = (version, self._sanitise(raw))
        return self._cache[1]

    # ------------------------------------------------------------------ paths -> labels
    def _labels(self, raw) -> list[tuple[str, str]]:
        pairs = [(str(self.run_dir), f"run {self.run_dir.name}")]
        if raw.keys_dir:
            pairs.append((str(raw.keys_dir), "enrolled keys"))
        if self.keys_dir:
            pairs.append((str(self.keys_dir), "enrolled keys"))
        for name, v in raw.sites.items():
            if v.site_ledger:
                pairs.append((v.site_ledger, f"site ledger of {name}"))
        for i, p in enumerate(self.site_ledgers):
            pairs.append((str(p), f"site ledger {i + 1}"))
        parents = {str(self.run_dir.parent): "runs folder", str(self.run_dir.parent.parent): "consortium folder"}
        pairs += [(k, v) for k, v in parents.items() if len(k) > 1]
        return sorted(pairs, key=lambda kv: len(kv[0]), reverse=True)  # longest first: no partial replacement

    def _sanitise(self, raw):
        labels = self._labels(raw)

        def clean(text: Any) -> Any:
            if not isinstance(text, str):
                return text
            for path, label in labels:
                text = text.replace(path, label)
            return text

        res = copy.deepcopy(raw)
        res.run_dir = f"run {self.run_dir.name}"
        res.keys_dir = "enrolled keys" if raw.keys_dir else None
        res.findings = [dataclasses.replace(f, message=clean(f.message), source=clean(f.source)) for f in res.findings]
        for v in res.sites.values():
            v.site_ledger = clean(v.site_ledger)
        return res

    # ------------------------------------------------------------------ views
    def context(self) -> dict[str, Any]:
        res = self.result()
        warnings = [f for f in res.findings if f.level == "warning"]
        ledgers = [{"index": "server", "label": f"server copy of run {self.run_dir.name}"}] if (
            self.run_dir / "ledger.jsonl").is_file() else []
        ledgers += [{"index": str(i), "label": self._ledger_label(i)} for i in range(len(self.site_ledgers))]
        return {"run": self.run_dir.name, "result": res, "ok": res.ok, "errors": len(res.errors),
                "warnings": len(warnings), "sites": [res.sites[n] for n in sorted(res.sites)],
                "findings": res.findings, "ledgers": ledgers}

    def _ledger_label(self, i: int) -> str:
        site = self._site_of(i)
        return f"site ledger of {site}" if site else f"site ledger {i + 1}"

    def _site_of(self, i: int) -> str | None:
        from privacy.ledger import read_jsonl

        for _line, rec, _raw in read_jsonl(self.site_ledgers[i]):
            if rec and isinstance(rec.get("site"), str):
                return rec["site"]
        return None

    def report_html(self) -> str:
        from privacy.report import render_report

        return render_report(self.result(), self.run_dir)

    def report_pdf(self) -> bytes:
        """The report printed by headless Chromium (``privacy.report.print_pdf``); ValueError says why not."""
        from privacy.report import print_pdf

        with tempfile.TemporaryDirectory() as tmp:
            html_path, pdf_path = Path(tmp) / "report.html", Path(tmp) / "report.pdf"
            html_path.write_text(self.report_html(), encoding="utf-8")
            problem = print_pdf(html_path, pdf_path)
            if problem:
                raise ValueError(f"PDF not available: {problem}")
            return pdf_path.read_bytes()

    def ledger_file(self, index: str) -> tuple[bytes, str] | None:
        """A verified ledger, byte for byte: ``server`` (the run's copy) or a site ledger's position."""
        if index == "server":
            p = self.run_dir / "ledger.jsonl"
            return (p.read_bytes(), f"{self.run_dir.name}-server-ledger.jsonl") if p.is_file() else None
        if index.isdigit() and int(index) < len(self.site_ledgers):
            i = int(index)
            site = self._site_of(i) or f"site-{i + 1}"
            return self.site_ledgers[i].read_bytes(), f"{site}-ledger.jsonl"
        return None
