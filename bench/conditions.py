"""What every benchmark prints next to its numbers: the conditions they were measured under, and peak memory.

A number measured on a shared 2-core machine means little without the load it ran under, the threads torch was
allowed, and the niceness of the process; ``conditions()`` gathers them once per run (call it at the start and
at the end: the load may change while the bench runs). ``TreeMemory`` samples the resident memory of a process
and every process it starts (Flower's simulation runs the sites in Ray worker processes, a deployment in SuperNode
and ClientApp processes), which is what "N sites fit in 8 GiB" is about. psutil does the process walking.
"""

from __future__ import annotations

import os
import platform
import secrets
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


#: set (to a fresh token) by TreeMemory for the processes it counts: every process started afterwards inherits it
MARK_ENV = "ATOLL_BENCH_TREE"


def _rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


class TreeMemory:
    """``with TreeMemory() as mem: ...`` then ``mem.peak`` (bytes) and ``mem.peak_processes``: the peak RSS sum
    over this process and every process started inside the block, sampled every ``interval`` seconds.

    "Started inside the block" is not "a child": Ray's workers are re-parented to init, so a walk of the
    children misses them. On entry this process's environment gets a fresh token (``MARK_ENV``) that every
    process it starts inherits (Ray's daemons and workers, SuperNodes, ClientApps); a process counts when it is a
    descendant or carries the token. A sum of RSS counts pages shared between processes (the torch libraries
    every worker maps) once per process, so it over-states what the machine needs: a conservative figure.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self.peak_processes = 0
        self.token = secrets.token_hex(8)
        self._ours: dict[tuple[int, float], bool] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def _is_ours(self, p: psutil.Process, descendants: set[int]) -> bool:
        try:
            key = (p.pid, p.create_time())
            if key not in self._ours:
                self._ours[key] = p.pid in descendants or p.environ().get(MARK_ENV) == self.token
            return self._ours[key]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    def sample(self) -> int:
        me = psutil.Process()
        descendants = {me.pid, *(c.pid for c in me.children(recursive=True))}
        procs = [p for p in psutil.process_iter() if self._is_ours(p, descendants)]
        rss = sum(_rss(p) for p in procs)
        if rss > self.peak:
            self.peak, self.peak_processes = rss, len(procs)
        return rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        os.environ[MARK_ENV] = self.token
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        os.environ.pop(MARK_ENV, None)

    @property
    def peak_gib(self) -> float:
        return round(self.peak / 2**30, 3)
