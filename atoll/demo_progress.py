"""The demo's progress bar per round and per site (``rich``), drawn while Flower's simulation trains.

The demo runs every site on this machine, so it can watch what each site writes as it goes: a site's ledger gets a
*reservation* record when it starts training a round (write-ahead, before it touches data) and a signed *round*
record when it is done; the run folder's ``history.json`` grows when the server has aggregated a round. A thread
reads those files (:func:`progress_state`) and moves one bar for the rounds and one per site, so nothing is added
to the ServerApp or the ClientApp. Shown on stderr only when it is a terminal (logs and CI stay clean).
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from pathlib import Path
from typing import Any, Iterator


def _records(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # the line being written
    return out


def find_run(run_dir: Path, started_after: float) -> Path | None:
    """The run folder the ServerApp created after ``started_after`` (its settings.json), if any yet."""
    cands = [p.parent for p in Path(run_dir).glob("*/settings.json") if p.stat().st_mtime >= started_after]
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def progress_state(run: Path | None, ledgers: dict[str, Path]) -> dict[str, Any]:
    """Rounds aggregated, and per site the rounds it completed and the round it is training (or None)."""
    history = json.loads((run / "history.json").read_text()) if run and (run / "history.json").is_file() else []
    sites = {}
    for site, path in ledgers.items():
        recs = [r for r in _records(path) if run is not None and r.get("run_id") == run.name]
        done = {r.get("server_round") for r in recs if r.get("type") == "round"}
        reserved = {r.get("server_round") for r in recs if r.get("type") == "reservation"}
        status = {e["round"]: e["sites"].get(site, {}).get("status") for e in history}
        sites[site] = {"done": len(done), "training": max(reserved - done, default=None),
                       "refused": sorted(k for k, s in status.items() if s in ("refused", "rejected", "error"))}
    return {"rounds_done": len(history), "sites": sites}


@contextlib.contextmanager
def round_progress(run_dir: Path, rounds: int, ledgers: dict[str, Path], *, enabled: bool | None = None,
                   console=None, interval: float = 0.5) -> Iterator[None]:
    """Bars for the rounds and each site while the body (the simulation) runs."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield
        return
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.time() - 1.0
    stop = threading.Event()
    with Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console or Console(stderr=True)) as bar:
        total = bar.add_task("rounds aggregated", total=rounds)
        tasks = {s: bar.add_task(f"{s}: waiting for round 1", total=rounds) for s in ledgers}

        def update() -> None:
            st = progress_state(find_run(run_dir, started), ledgers)
            bar.update(total, completed=st["rounds_done"])
            for s, t in tasks.items():
                d = st["sites"][s]
                what = (f"training round {d['training']}" if d["training"] is not None else
                        f"refused round {d['refused'][-1]}" if d["refused"] and d["refused"][-1] == st["rounds_done"]
                        else "done" if d["done"] >= rounds else f"waiting for round {st['rounds_done'] + 1}")
                bar.update(t, completed=d["done"], description=f"{s}: {what}")

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    update()
                except Exception:  # noqa: BLE001 - a bar never stops the demo
                    pass

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            with contextlib.suppress(Exception):
                update()
