"""Each simulated site's Ray actor gets its fair share of the cores, at nice 0 (atoll/simulation.py).

The unit tests check the arithmetic and the environment handling; the slow one runs a real Flower simulation
whose ClientApp reports the niceness and torch thread count it actually got inside its Ray actor.
"""

from __future__ import annotations

import os

import pytest

from atoll import simulation


@pytest.mark.parametrize(("sites", "cpus", "expected"), [
    (3, 2, (2, 1)),     # more sites than cores: two at a time, one thread each
    (2, 16, (2, 8)),    # fewer sites than cores: each takes half the machine
    (3, 16, (3, 5)),    # 15 of 16 cores: never more threads than cores
    (1, 4, (1, 4)),
    (500, 2, (2, 1)),
])
def test_fair_share_uses_the_cores_once(sites: int, cpus: int, expected: tuple[int, int]) -> None:
    concurrent, threads = simulation.fair_share(sites, cpus)
    assert (concurrent, threads) == expected
    assert concurrent * threads <= cpus


def test_fair_share_refuses_no_sites() -> None:
    with pytest.raises(ValueError, match="at least one site"):
        simulation.fair_share(0, 2)


def test_backend_config_tells_ray_exactly_the_shared_cores() -> None:
    cfg = simulation.backend_config(2, gpus_per_site=0.5, cpus=16)
    assert cfg["client_resources"] == {"num_cpus": 8, "num_gpus": 0.5}
    assert cfg["init_args"]["num_cpus"] == 16
    # Flower's actor pool holds num_cpus(init) / num_cpus(actor) actors: one per concurrently running site
    assert cfg["init_args"]["num_cpus"] // cfg["client_resources"]["num_cpus"] == 2


def test_actor_environment_sets_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    with simulation.actor_environment(3):
        assert os.environ["OMP_NUM_THREADS"] == "3"
        assert os.environ["RAY_worker_niceness"] == "0"
    assert os.environ["OMP_NUM_THREADS"] == "7"
    assert "RAY_worker_niceness" not in os.environ


@pytest.mark.slow
def test_simulated_sites_run_at_nice_zero_with_their_thread_share() -> None:
    """A real run_simulation: the ClientApp, inside its Ray actor, runs at this process's niceness (Ray's default
    would add 15) with the fair torch thread count."""
    import ray
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    if ray.is_initialized():  # a Ray started by an earlier test keeps its own settings
        ray.shutdown()
    sites = 2
    cpus = simulation.available_cpus()
    _, threads = simulation.fair_share(sites, cpus)
    client = ClientApp()

    @client.query()
    def _report(msg: Message, context: Context) -> Message:
        import torch

        return Message(RecordDict({"m": MetricRecord({"nice": os.nice(0), "threads": torch.get_num_threads()})}),
                       reply_to=msg)

    got: list[dict] = []
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        import time

        while len(nodes := list(grid.get_node_ids())) < sites:  # as Flower's strategies wait for nodes
            time.sleep(0.5)
        msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
        for reply in grid.send_and_receive(msgs):
            got.append(dict(reply.content["m"]))

    try:
        simulation.run_sites(server, client, sites)  # what the demo, the benchmarks and the slow tests run
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert len(got) == sites
    # no nice penalty beyond this process's own niceness (0 unless the whole test run was niced)
    assert all(r["nice"] == os.nice(0) and r["threads"] == threads for r in got), got
