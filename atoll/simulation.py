"""Resources of the sites in Flower's simulation runtime: each site's Ray actor gets its fair share of the cores.

Why: left to its defaults, Flower's Ray backend gives every ClientApp actor ``num_cpus=1``, Ray then sets the
actor's ``OMP_NUM_THREADS`` (torch's intra-op threads) to 1, and Ray starts its worker processes at nice 15.
On a shared machine the sites then lose the CPU to every other process, and with fewer sites than cores most
cores sit idle; DP training measured that way took 4-5x its non-DP time. Here:

* ``fair_share``: ``min(sites, cores)`` actors run at once and each gets ``cores // that`` torch threads (at
  least one), so the actors running together use the machine once, neither more nor less;
* ``actor_environment``: the Ray workers start with ``OMP_NUM_THREADS`` = that share (Ray keeps an
  ``OMP_NUM_THREADS`` it finds set, so a fractional or default ``num_cpus`` cannot shrink it to 1) and
  ``RAY_worker_niceness=0`` (Ray's own setting, read when it starts): no nice penalty for the simulated sites.

What the simulation does not tell about a deployment: the sites share one machine's cores, memory bandwidth and
(if any) GPU, and run at most ``cores`` at a time, so a round's wall time is the queue of all sites' training on
this machine, not the slowest hospital's; there is no network, TLS, node authentication or per-message process
start (bench/round_overhead.py measures those with the deployment engine). Per-site training cost, the
privacy accounting and the ledger are the same code as in a deployment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def fair_share(num_sites: int, cpus: int | None = None) -> tuple[int, int]:
    """``(actors running at once, torch threads per actor)`` for ``num_sites`` sites on ``cpus`` cores."""
    if num_sites < 1:
        raise ValueError(f"a simulation needs at least one site, got {num_sites}")
    cpus = available_cpus() if cpus is None else max(1, cpus)
    concurrent = min(num_sites, cpus)
    return concurrent, max(1, cpus // concurrent)


def backend_config(num_sites: int, *, gpus_per_site: float = 0.0, verbose: bool = False,
                   cpus: int | None = None) -> dict[str, Any]:
    """Flower's ``backend_config`` for ``run_simulation``: ``num_cpus`` per actor = its thread share, and Ray
    told about exactly the cores the running actors share."""
    concurrent, threads = fair_share(num_sites, cpus)
    return {"client_resources": {"num_cpus": threads, "num_gpus": gpus_per_site},
            "init_args": {"num_cpus": concurrent * threads, "logging_level": "ERROR", "log_to_driver": verbose}}


@contextmanager
def actor_environment(threads: int) -> Iterator[None]:
    """Within the block, Ray workers started from this process get ``threads`` torch threads and nice 0.

    Ray reads these when it starts (``ray.init`` inside ``run_simulation``); a Ray already running in this
    process keeps the settings it started with. The previous values are restored on exit.
    """
    wanted = {"OMP_NUM_THREADS": str(threads), "RAY_worker_niceness": "0"}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_sites(server_app: Any, client_app: Any, num_sites: int, *, gpus_per_site: float = 0.0,
              verbose: bool = False) -> None:
    """``flwr.simulation.run_simulation`` of ``num_sites`` sites with the resources above (the demo, the
    benchmarks and the tests all run the sites this way, so what one measures is what the others run)."""
    from flwr.simulation import run_simulation

    backend = backend_config(num_sites, gpus_per_site=gpus_per_site, verbose=verbose)
    with actor_environment(int(backend["client_resources"]["num_cpus"])):
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_sites,
                       backend_config=backend, verbose_logging=verbose)
