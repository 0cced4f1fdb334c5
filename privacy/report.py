"""``atoll audit report``: one self-contained HTML privacy report of a run.

No network assets: styles are inline and every figure is an SVG generated here, so the file can be archived,
mailed to an ethics board and opened offline. Content: verdict, epsilon per site over rounds against each site's
budget, the recorded mechanism parameters with both recomputations, what each site released in the clear
(metric names its policy allows and the values the server recorded), refusals, and every audit finding.
"""

from __future__ import annotations

import html
import json
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from contract.threshold import METRIC as THRESHOLD_METRIC
from privacy.audit import AuditResult, SiteVerdict

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ccc;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .5em;
text-align:right;white-space:nowrap}th{background:#f3f3f3;white-space:normal}
td.l,th.l{text-align:left;white-space:normal}
.pass{color:#fff;background:#2e7d32;padding:.15em .6em;border-radius:.3em}
.fail{color:#fff;background:#c62828;padding:.15em .6em;border-radius:.3em}
.warn{color:#8a5a00}.err{color:#c62828}.muted{color:#666;font-size:.9em}
figure{margin:1em 0}figcaption{font-size:.9em;color:#444}
.wide{max-width:100%;overflow-x:auto}#mechanism{font-size:.8em}#mechanism td.l{word-break:break-all;min-width:6em}
@media print{body{margin:0}h2{page-break-after:avoid}}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _eps(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "—"
    if math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}"


def epsilon_svg(sites: dict[str, SiteVerdict], width: int = 760, height: int = 340) -> str:
    """Line chart: epsilon after each round per site (solid) and each site's budget (dashed), inline SVG."""
    ml, mr, mt, mb = 60, 170, 20, 45
    pw, ph = width - ml - mr, height - mt - mb
    series = {n: v for n, v in sorted(sites.items()) if v.points}
    finite = [p.epsilon_after for v in series.values() for p in v.points if math.isfinite(p.epsilon_after)]
    budgets = [v.max_epsilon for v in series.values() if v.max_epsilon is not None]
    ymax = max(finite + budgets + [1e-9]) * 1.12
    nmax = max((len(v.points) for v in series.values()), default=1)
    xs = lambda i: ml + (pw * (i + 0.5) / nmax)  # noqa: E731
    ys = lambda y: mt + ph - ph * min(y, ymax) / ymax  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="epsilon-chart" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           '<title>Epsilon per site over rounds against each budget</title>',
           f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    for k in range(6):
        yv = ymax * k / 5
        y = ys(yv)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{yv:.2f}</text>')
    step = max(1, nmax // 12)
    for i in range(0, nmax, step):
        out.append(f'<text x="{xs(i):.1f}" y="{mt + ph + 16}" text-anchor="middle">{i + 1}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 8}" text-anchor="middle">round record (in order)</text>'
               f'<text transform="translate(14 {mt + ph / 2}) rotate(-90)" text-anchor="middle">ε (lifetime)</text>')
    for j, (name, v) in enumerate(series.items()):
        c = PALETTE[j % len(PALETTE)]
        if v.max_epsilon is not None:
            yb = ys(v.max_epsilon)
            out.append(f'<line class="budget" x1="{ml}" x2="{ml + pw}" y1="{yb:.1f}" y2="{yb:.1f}" stroke="{c}" '
                       f'stroke-dasharray="6 4" stroke-width="1.5"/>')
        pts = [(xs(i), ys(p.epsilon_after if math.isfinite(p.epsilon_after) else ymax), p)
               for i, p in enumerate(v.points)]
        out.append(f'<polyline class="series" fill="none" stroke="{c}" stroke-width="2" points="'
                   + " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts) + '"/>')
        for x, y, p in pts:
            label = f"{name} run {p.run_id} round {p.server_round}: ε={_eps(p.epsilon_after)}"
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{c}"><title>{_e(label)}</title></circle>')
            if not math.isfinite(p.epsilon_after):
                out.append(f'<text x="{x:.1f}" y="{y - 6:.1f}" text-anchor="middle" fill="{c}">∞</text>')
        ly = mt + 14 + 34 * j
        lx = ml + pw + 14
        out.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"/>'
                   f'<text x="{lx + 28}" y="{ly + 4}">{_e(name)}</text>'
                   f'<line x1="{lx}" x2="{lx + 22}" y1="{ly + 15}" y2="{ly + 15}" stroke="{c}" stroke-dasharray="6 4"/>'
                   f'<text x="{lx + 28}" y="{ly + 19}">budget {_eps(v.max_epsilon, 2)}</text>')
    if not series:
        out.append(f'<text x="{ml + pw / 2}" y="{mt + ph / 2}" text-anchor="middle">no round records</text>')
    out.append("</svg>")
    return "".join(out)


def _history(run_dir: Path) -> list[dict]:
    try:
        data = json.loads((run_dir / "history.json").read_text())
        return data if isinstance(data, list) else []
    except (OSError, ValueError):
        return []


def _dataset_section(result: AuditResult) -> str:
    """Per site and run, the dataset fingerprint its signed records carry (a keyed hash with the site's secret:
    equal means the same images, and it reveals nothing else), and where it changed between runs."""
    rows = []
    for site, v in sorted(result.sites.items()):
        if not v.datasets:
            rows.append(f"<tr><td>{_e(site)}</td><td colspan=2 class=muted>no fingerprint recorded</td></tr>")
            continue
        runs = "<br>".join(f"{_e(run)}: {', '.join(_e(fp.split(':')[-1][:12]) for fp in fps)}"
                           for run, fps in v.datasets.items())
        changes = "<br>".join(_e(c) for c in v.dataset_changes()) or "unchanged"
        rows.append(f"<tr><td>{_e(site)}</td><td>{runs}</td><td>{changes}</td></tr>")
    return ("<table><tr><th>site</th><th>fingerprint per run (first 12 hex)</th><th>changes</th></tr>"
            + "".join(rows) + "</table><p class=muted>Runs before this one are seen through the site ledgers "
            "given to the audit (<code>--site-ledger</code>).</p>")


def _released_section(result: AuditResult, history: list[dict]) -> str:
    seen: dict[str, dict[str, list[float]]] = {}
    refused: dict[str, list[str]] = {}
    for entry in history:
        for site, s in (entry.get("sites") or {}).items():
            if not isinstance(s, dict):
                continue
            for part in ("train", "val"):
                for k, val in (s.get(part) or {}).items():
                    if k.startswith(THRESHOLD_METRIC):  # ~40 counts per round: one line, not 40
                        continue
                    seen.setdefault(site, {}).setdefault(f"{part}: {k}", []).append(val)
            if any(k.startswith(THRESHOLD_METRIC) for k in (s.get("val") or {})):
                chosen = (entry.get("decision_threshold") or {}).get("threshold")
                seen.setdefault(site, {}).setdefault(
                    f"val: {THRESHOLD_METRIC} (counts, NOT DP; decision threshold chosen)", []).append(
                    "—" if chosen is None else chosen)
            if s.get("status") in ("refused", "rejected", "error"):
                refused.setdefault(site, []).append(f"round {entry.get('round')}: {s.get('status')} "
                                                    f"[{s.get('code', '')}] {s.get('message', '')}")
    rows = []
    for name in sorted(set(result.sites) | set(seen)):
        v = result.sites.get(name)
        allowed = ", ".join(f"{m} (per-threshold validation counts, in the clear, not DP)"
                            if m == THRESHOLD_METRIC else m for m in v.released_metrics) \
            if v and v.released_metrics else "—"
        mech = sorted({(p.noise_multiplier, p.clip_norm) for p in v.points if p.dp}) if v else []
        upd = ("model update, DP-SGD " + "; ".join(f"σ={s:g}, C={c:g}" for s, c in mech)) if mech else "model update"
        if v and v.non_dp_rounds:
            upd += f"; {v.non_dp_rounds} NON-DP update(s) (no guarantee)"
        values = "<br>".join(f"{_e(k)}: {', '.join(f'{x:.4g}' if isinstance(x, (int, float)) else _e(x) for x in vals)}"
                             for k, vals in sorted(seen.get(name, {}).items())) or "—"
        ref = "<br>".join(_e(r) for r in refused.get(name, [])) or "—"
        rows.append(f'<tr><td class="l">{_e(name)}</td><td class="l">{_e(upd)}</td><td class="l">{_e(allowed)}</td>'
                    f'<td class="l">{values}</td><td class="l">{ref}</td></tr>')
    return ('<table id="released"><tr><th class="l">site</th><th class="l">protected by DP</th>'
            '<th class="l">released in the clear (site policy)</th><th class="l">values recorded by the server</th>'
            '<th class="l">refusals / rejections</th></tr>' + "".join(rows) + "</table>")


def _clip(p) -> str:
    """C, or for adaptive clipping its start and the noise split (σ_b on the count, σ_z on the gradient)."""
    if p.count_noise is None:
        return f"{p.clip_norm:g}"
    return (f'{p.clip_norm:g} <span class="muted">(adaptive start; σ_b={p.count_noise:g}, '
            f'σ_z={p.gradient_noise_multiplier:.4g})</span>')


def _mechanism_table(result: AuditResult) -> str:
    rows = []
    for name in sorted(result.sites):
        for p in result.sites[name].points:
            rows.append(
                f'<tr><td class="l">{_e(name)}</td><td class="l">{_e(p.run_id)}</td><td>{p.server_round}</td>'
                f'<td>{"yes" if p.dp else "<b>NO</b>"}</td><td>{p.noise_multiplier:g}</td><td>{_clip(p)}</td>'
                f'<td>{p.sample_rate:.4g}</td><td>{p.steps}</td><td>{_e(p.accountant)}</td><td>{p.delta:.2e}</td>'
                f'<td>{_eps(p.epsilon_before)}</td><td>{_eps(p.epsilon_after)}</td><td>{_eps(p.opacus_epsilon)}</td>'
                f'<td>{_eps(p.independent_epsilon)}<br><span class="muted">({_e(p.independent_method)})</span></td>'
                f'<td>{_eps(p.max_epsilon, 2)}</td></tr>')
    return ('<table id="mechanism"><tr><th class="l">site</th><th class="l">run</th><th>round</th><th>DP</th>'
            '<th>σ</th><th>C</th><th>q</th><th>steps</th><th>accountant</th><th>δ</th><th>ε before</th>'
            '<th>ε after (recorded)</th><th>ε Opacus (recomputed)</th><th>ε independent</th><th>budget</th></tr>'
            + "".join(rows) + "</table>")


def _run_status(run_dir: Path) -> str:
    """How the run ended (its status.json), e.g. a stop the lead asked for; empty when the run has no status."""
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return ""
    reason = f" — {status['reason']}" if status.get("reason") else ""
    return f'<p id="run-status">Run status: {_e(status.get("status"))}{_e(reason)}</p>\n'


def render_report(result: AuditResult, run_dir: Path | None = None) -> str:
    """The whole report as one HTML string."""
    run_dir = Path(run_dir or result.run_dir)
    verdict = '<span class="pass">PASS</span>' if result.ok else '<span class="fail">FAIL</span>'
    site_rows = "".join(
        f'<tr><td class="l">{_e(n)}</td><td>{"OK" if v.ok else "<b class=err>FAIL</b>"}</td><td>{v.server_records}</td>'
        f'<td>{_eps(v.epsilon)}</td><td>{_eps(v.max_epsilon, 2)}</td><td>{(v.delta or 0):.2e}</td>'
        f'<td class="l">{_e(v.accountant or "—")}</td>'
        f'<td class="l">{_e(v.site_ledger) if v.cross_checked else "no (server copy only)"}</td>'
        f'<td>{v.reservations if v.cross_checked else "—"}</td><td>{v.refusals if v.cross_checked else "—"}</td></tr>'
        for n, v in sorted(result.sites.items()))
    unchecked = sorted(n for n, v in result.sites.items() if not v.cross_checked)
    findings = "".join(
        f'<li class="{"err" if f.level == "error" else "warn"}">{_e(str(f))}</li>' for f in result.findings
    ) or ("<li>none: every signature, chain link, cross-check and recomputation holds</li>" if not unchecked else
          "<li>none: every signature, chain link and recomputation of the server copy holds</li>")
    if unchecked:  # say what was not checked, next to what was: a PASS without site ledgers is a weaker PASS
        findings += (f'<li class="warn">not cross-checked against the site\'s own ledger (no --site-ledger given): '
                     f'{_e(", ".join(unchecked))}; rounds a site charged but the server copy lacks cannot be seen '
                     "without it</li>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>Atoll privacy report — {_e(run_dir.name)}</title><style>{_CSS}</style></head>
<body>
<h1>Atoll privacy report: run {_e(run_dir.name)}</h1>
<p class="muted">Generated {_e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))} from {_e(result.run_dir)};
enrolled keys: {_e(result.keys_dir or 'none found')}. Unit of privacy: one patient (all of their images).</p>
{_run_status(run_dir)}<p id="verdict">Verification: {verdict} — {len(result.errors)} error(s),
{sum(f.level == 'warning' for f in result.findings)} warning(s), {result.server_records} record(s) in the server copy.</p>

<h2>Privacy spent per site</h2>
<figure>{epsilon_svg(result.sites)}
<figcaption>Lifetime ε of each site's dataset after each round of this run (solid), against the site's declared
budget (dashed). ε includes earlier runs on the same dataset. ∞ marks a non-DP round.</figcaption></figure>
<table id="sites"><tr><th class="l">site</th><th>verdict</th><th>round records</th><th>ε now</th><th>budget</th>
<th>δ</th><th class="l">accountant</th><th class="l">site ledger checked</th><th>reservations</th><th>refusals</th></tr>
{site_rows}</table>

<h2>Mechanism parameters (as recorded and signed by each site)</h2>
<div class="wide">{_mechanism_table(result)}</div>

<h2>What left each site</h2>
{_released_section(result, _history(run_dir))}

<h2>Datasets trained on</h2>
{_dataset_section(result)}

<h2>Verification</h2>
<p class="muted">Checks: Ed25519 signatures against enrolled keys; hash chains; the server copy against each site's
own ledger; budgets; ε recomputed from the recorded (σ, q, steps) history with Opacus and independently with Google
dp_accounting (RDP records: RdpAccountant; PRV records: PLDAccountant).</p>
<ul id="findings">{findings}</ul>
</body></html>
"""


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_command(chromium: str, user_data_dir: str, *extra: str) -> list[str]:
    return [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", *extra]


def print_pdf(html_path: Path, pdf_path: Path, timeout: float = 120.0) -> str | None:
    """Print the report to PDF with headless Chromium; returns a problem description, or None on success."""
    chromium = find_chromium()
    if chromium is None:
        return "Chromium is not installed (apt-get install chromium)"
    pdf_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = chromium_command(chromium, profile, "--no-pdf-header-footer", f"--print-to-pdf={pdf_path.resolve()}",
                               html_path.resolve().as_uri())
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout, text=True)
        except subprocess.TimeoutExpired:
            return f"Chromium did not finish within {timeout:.0f} s"
    if not pdf_path.exists() or pdf_path.stat().st_size == 0 or not pdf_path.read_bytes().startswith(b"%PDF"):
        return f"Chromium wrote no PDF (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
    return None
