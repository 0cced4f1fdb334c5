"""`atoll run status RUN_FOLDER --watch`: the run's progress as a person watches it, refreshed until it ends.

:func:`run_view` reads the run folder (stdlib only: the lead's CLI has no ML stack loaded) into one record: round
k of N, each site's state (training, contributed, refused with its reason, rejected, dropped), epsilon spent
against the site's budget, the latest released metrics, time per round and an ETA. :func:`view_lines` renders it
as text; :func:`watch` refreshes it with ``rich.live.Live`` on a terminal, or reprints it when it changes
(a log file, a pipe).

Where the numbers come from: rounds, site states, epsilon and metrics from ``history.json`` (what the ServerApp
recorded); each site's budget (``max_epsilon``) from its last signed record in ``ledger.jsonl``; round times from
the global weights' files (``weights/round-000.pt`` is written when the run starts, ``round-NNN.pt`` when round
NNN ends), so no extra bookkeeping is needed in the ServerApp.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

#: the states a site can be shown in
SITE_STATES = ("training", "contributed", "refused", "rejected", "error", "dropped", "waiting")


def _json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def _budgets(root: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        lines = (root / "ledger.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line of a ledger being written
        if isinstance(rec, dict) and isinstance(rec.get("max_epsilon"), (int, float)):
            out[str(rec.get("site"))] = float(rec["max_epsilon"])
    return out


def _round_times(root: Path, rounds: list[int]) -> tuple[list[float], float | None]:
    """(seconds each recorded round took, when the last one ended) from the weights files' times."""
    try:
        t0 = (root / "weights" / "round-000.pt").stat().st_mtime
    except OSError:
        return [], None
    times, prev = [], t0
    for k in rounds:
        try:
            t = (root / "weights" / f"round-{k:03d}.pt").stat().st_mtime
        except OSError:
            continue  # a round that ended without weights (it stopped the run)
        times.append(max(0.0, t - prev))
        prev = t
    return times, prev


def run_view(root: Path, state: dict, now: float | None = None) -> dict[str, Any]:
    """Everything `--watch` shows, as data. ``state``: the run's status (``server.run_cli.server_state``)."""
    now = time.time() if now is None else now
    settings = _json(root / "settings.json", {})
    history = _json(root / "history.json", [])
    total = settings.get("num_server_rounds")
    done = len(history)
    running = state.get("status") == "running"
    budgets = _budgets(root)
    seen: list[str] = []
    for e in history:
        for s in e.get("sites", {}):
            if s not in seen:
                seen.append(s)
    last = history[-1]["sites"] if history else {}
    sites = {}
    for name in seen:
        entry = next((e["sites"][name] for e in reversed(history) if name in e.get("sites", {})), {})
        eps = next((e["sites"][name].get("epsilon") for e in reversed(history)
                    if e.get("sites", {}).get(name, {}).get("epsilon") is not None), None)
        row: dict[str, Any] = {"epsilon": eps, "budget": budgets.get(name), "metrics": dict(entry.get("val", {}))}
        if name not in last:
            row.update(state="dropped", reason=f"no reply in round {done} (last answered round "
                                               f"{max(e['round'] for e in history if name in e['sites'])})")
        else:
            s = last[name]
            row.update(state=s.get("status", "?"),
                       reason=(f"[{s['code']}] {s.get('message', '')}".strip() if s.get("code") else ""))
            if running and s.get("status") == "contributed" and (total is None or done < total):
                row.update(state="training", reason=f"round {done + 1} in flight (contributed to round {done})")
        sites[name] = row
    times, last_end = _round_times(root, [e["round"] for e in history])
    per_round = sum(times) / len(times) if times else None
    in_flight = (now - last_end) if (running and last_end is not None) else None
    eta = None
    if running and per_round is not None and isinstance(total, int):
        eta = max(0.0, per_round * (total - done) - (in_flight or 0.0))
    return {"run": root.name, "status": state.get("status"), "reason": state.get("reason", ""), "round": done,
            "rounds": total, "sites": sites, "aggregated": dict(history[-1].get("aggregated", {})) if history else {},
            "round_seconds": times, "seconds_per_round": per_round, "in_flight_seconds": in_flight,
            "eta_seconds": eta}


def _dur(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "—"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _metrics(m: dict) -> str:
    return ", ".join(f"{k.removeprefix('val_')} {v:.3f}" for k, v in m.items()
                     if k != "num-examples" and isinstance(v, (int, float)) and math.isfinite(v))


def view_lines(v: dict[str, Any]) -> list[str]:
    """The view as plain text lines (the same content the terminal table shows)."""
    head = f"run {v['run']}: {v['status']} — round {v['round']} of {v['rounds']}"
    if v["status"] == "running":
        head += (f", round {v['round'] + 1} in flight for {_dur(v['in_flight_seconds'])}"
                 if v["in_flight_seconds"] is not None else "")
        head += f"; {_dur(v['seconds_per_round'])} per round, ETA {_dur(v['eta_seconds'])}"
    elif v["reason"]:
        head += f" — {v['reason']}"
    lines = [head]
    if not v["sites"]:
        lines.append("  (no round recorded yet: the sites are training round 1)" if v["status"] == "running" else
                     "  (no round recorded)")
    for name, s in v["sites"].items():
        eps = "ε —" if s["epsilon"] is None else f"ε {s['epsilon']:.2f}"
        if s["budget"] is not None and s["epsilon"] is not None:
            eps += f" of {s['budget']:g} ({100 * s['epsilon'] / s['budget']:.0f} %)"
        lines.append(f"  {name:<16} {s['state']:<12} {eps:<24} {_metrics(s['metrics'])}"
                     + (f"  {s['reason']}" if s["reason"] else ""))
    if v["aggregated"]:
        lines.append(f"  {'aggregated':<16} {'':<12} {'':<24} {_metrics(v['aggregated'])}")
    return lines


def _table(v: dict[str, Any]):
    from rich.table import Table

    t = Table(title=view_lines(v)[0], title_justify="left", expand=False)
    for col in ("site", "state", "ε spent / budget", "latest validation", "why"):
        t.add_column(col)
    for name, s in v["sites"].items():
        eps = "—" if s["epsilon"] is None else f"{s['epsilon']:.2f}"
        if s["budget"] is not None and s["epsilon"] is not None:
            eps += f" / {s['budget']:g}"
        colour = {"contributed": "green", "training": "cyan", "refused": "yellow", "dropped": "red",
                  "rejected": "red", "error": "red"}.get(s["state"], "")
        t.add_row(name, f"[{colour}]{s['state']}[/]" if colour else s["state"], eps, _metrics(s["metrics"]),
                  s["reason"])
    if v["aggregated"]:
        t.add_row("aggregated", "", "", _metrics(v["aggregated"]), "")
    return t


def watch(root: Path, state_of: Callable[[Path], dict], *, interval: float = 2.0, timeout: float = 0.0,
          out=None) -> dict[str, Any]:
    """Refresh the view until the run is no longer running (or ``timeout`` > 0 seconds pass); return the last view.

    On a terminal: a ``rich`` Live table redrawn in place. Otherwise the text lines, printed again whenever they
    change (so a log of the watch reads as the run's progress).
    """
    out = out or sys.stdout
    deadline = time.monotonic() + timeout if timeout > 0 else None
    tty = hasattr(out, "isatty") and out.isatty()
    v = run_view(root, state_of(root))
    if tty:
        from rich.console import Console
        from rich.live import Live

        with Live(_table(v), console=Console(file=out), refresh_per_second=2, transient=False) as live:
            while v["status"] == "running" and (deadline is None or time.monotonic() < deadline):
                time.sleep(interval)
                v = run_view(root, state_of(root))
                live.update(_table(v))
        return v
    shown: list[str] = []
    while True:
        lines = view_lines(v)
        key = [lines[0].split(" in flight for ")[0]] + lines[1:]  # the seconds ticking alone is no news
        if key != shown:
            print(time.strftime("%H:%M:%S ") + "\n".join(lines), file=out, flush=True)
            shown = key
        if v["status"] != "running" or (deadline is not None and time.monotonic() >= deadline):
            return v
        time.sleep(interval)
        v = run_view(root, state_of(root))
