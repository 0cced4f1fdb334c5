"""Timing marks for bench/round_overhead.py, taken inside every process of a run without touching product code.

What a round costs beyond training is only visible across processes: the sites train in Ray workers (simulation) or
in a fresh ClientApp process per message (deployment), the ServerApp runs in yet another. The bench therefore puts a
``sitecustomize`` module on ``PYTHONPATH`` (:func:`write_sitecustomize`) that calls :func:`install` in every Python
process of the run. When ``ATOLL_BENCH_TIMING`` names a file, :func:`install` wraps, as they are imported,

* ``privacy.dpsgd.train_local`` — each call appends ``{"kind": "train", "start", "end", "pid"}`` (a site's own
  training: the model on its device, Opacus' wrapping, the DP steps; not data loading or the reply);
* ``server.outputs.RunOutputs.record_round`` — each call appends ``{"kind": "round", "t"}`` when Atoll's ServerApp
  has recorded a round (after aggregation, the signed digest, the sites' evaluation and the checkpoint).

The plain Flower app of the bench (bench/plain_flower_app.py) calls ``train_local`` too and marks its rounds with
:func:`mark` after its own evaluation and checkpoint, so both apps are timed by the same clock and definitions.
Lines are appended with one ``write`` on an ``O_APPEND`` file (atomic for lines this short) and wall-clock time, which
all processes on one machine share.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ENV = "ATOLL_BENCH_TIMING"


def mark(kind: str, **fields: Any) -> None:
    """Append one timing line (no-op unless ``ATOLL_BENCH_TIMING`` is set)."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"kind": kind, "pid": os.getpid(), **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _timed_train(fn):
    @functools.wraps(fn)
    def train_local(*args, **kwargs):
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            mark("train", start=start, end=time.time())

    return train_local


def _marked_round(fn):
    @functools.wraps(fn)
    def record_round(self, *args, **kwargs):
        out = fn(self, *args, **kwargs)
        mark("round", t=time.time())
        return out

    return record_round


def _patch(module) -> None:
    if module.__name__ == "privacy.dpsgd":
        module.train_local = _timed_train(module.train_local)
    elif module.__name__ == "server.outputs":
        module.RunOutputs.record_round = _marked_round(module.RunOutputs.record_round)


class _PostImport(importlib.abc.MetaPathFinder):
    """Wraps the two functions right after their modules execute, before anyone imports them by name."""

    names = ("privacy.dpsgd", "server.outputs")

    def find_spec(self, name, path, target=None):
        if name not in self.names:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Register the post-import wrapping in this process when ``ATOLL_BENCH_TIMING`` is set."""
    if os.environ.get(ENV) and not any(isinstance(f, _PostImport) for f in sys.meta_path):
        for name in _PostImport.names:
            if name in sys.modules:
                _patch(sys.modules[name])
        sys.meta_path.insert(0, _PostImport())


def write_sitecustomize(folder: Path) -> Path:
    """A ``sitecustomize.py`` in ``folder`` that installs the marks; put ``folder`` first on ``PYTHONPATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"sys.path.append({str(repo)!r})\n"
        "try:\n    from bench.round_timing import install\n    install()\n"
        "except Exception as exc:  # a timing hook must never break the process it sits in\n"
        "    print('round_timing: not installed:', exc, file=sys.stderr)\n")
    return folder


# ---------------------------------------------------------------------------------------------------- analysis


def read_marks(path: Path) -> tuple[list[tuple[float, float]], list[float]]:
    """(training intervals, round-end times) from a timing file."""
    trains, rounds = [], []
    for line in Path(path).read_text().splitlines():
        m = json.loads(line)
        if m["kind"] == "train":
            trains.append((float(m["start"]), float(m["end"])))
        elif m["kind"] == "round":
            rounds.append(float(m["t"]))
    return sorted(trains), sorted(rounds)


def busy_seconds(intervals: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of ``intervals`` within ``[lo, hi]``: the time at least one site was training.

    The union, not the slowest site: sites that queue for cores (two at a time in a simulation on 2 cores) train
    one after another, so their training times add up on the critical path; sites that run at once overlap.
    """
    total, cur_lo, cur_hi = 0.0, None, None
    for a, b in sorted(intervals):
        a, b = max(a, lo), min(b, hi)
        if b <= a:
            continue
        if cur_hi is None or a > cur_hi:
            if cur_hi is not None:
                total += cur_hi - cur_lo
            cur_lo, cur_hi = a, b
        else:
            cur_hi = max(cur_hi, b)
    if cur_hi is not None:
        total += cur_hi - cur_lo
    return total


def round_cycles(path: Path) -> list[dict[str, float]]:
    """One entry per round after the first: its wall (previous round's end to its end: sending the weights, the
    sites' training, replies, checks, aggregation, evaluation, checkpoint), the busy training time in it, and
    ``non_training_share = 1 - busy / wall``. Round 1 pays start-up and each site's first data load: left out."""
    trains, ends = read_marks(path)
    out = []
    for i in range(1, len(ends)):
        lo, hi = ends[i - 1], ends[i]
        busy = busy_seconds(trains, lo, hi)
        wall = hi - lo
        out.append({"round": i + 1, "wall_s": round(wall, 3), "training_s": round(busy, 3),
                    "non_training_share": round(1 - busy / wall, 4) if wall > 0 else float("nan"),
                    "wall_per_training": round(wall / busy, 4) if busy > 0 else float("nan")})
    return out
