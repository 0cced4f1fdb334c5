"""What every benchmark prints next to its numbers: the conditions they were measured under, and peak memory.

A number measured on a shared 2-core machine means little without the load it ran under, the threads torch was
allowed, and the niceness of the process; ``conditions()`` gathers them once per run (call it at the start and
at the end: the load may change while the bench runs). ``TreeMemory`` samples the resident memory of a process
and all its descendants (Flower's simulation runs the sites in Ray worker processes, a deployment in SuperNode
and ClientApp processes), which is what "N sites fit in 8 GiB" is about. psutil does the process walking.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from typing import Any

import psutil


def conditions() -> dict[str, Any]:
    """Load averages, cores, torch threads, niceness, Python/torch versions: print these with every result."""
    import torch

    one, five, fifteen = os.getloadavg()
    return {
        "load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(), "nice": os.nice(0),
        "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__,
    }


def tree_rss(pid: int | None = None) -> int:
    """Bytes resident in process ``pid`` (default: this one) and every descendant, summed.

    A sum of RSS counts pages shared between processes (the torch libraries every worker maps) once per process,
    so it over-states what the machine needs: a conservative figure for a memory target.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class TreeMemory:
    """``with TreeMemory() as mem: ...`` then ``mem.peak`` (bytes) and ``mem.peak_processes``: the peak RSS sum
    of this process tree, sampled every ``interval`` seconds on a background thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = tree_rss(me.pid)
            if rss > self.peak:
                self.peak = rss
                try:
                    self.peak_processes = 1 + len(me.children(recursive=True))
                except psutil.NoSuchProcess:
                    pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, tree_rss())

    @property
    def peak_gib(self) -> float:
        return round(self.peak / 2**30, 3)
