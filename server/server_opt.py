"""Server momentum (FedAvgM) and FedAdam as post-processing of the round's released aggregate.

Why a wrapper and not Flower's ``aggregate_train`` on the sites' replies: Atoll computes the weighted mean of
the admitted updates itself (``RoundBook.aggregate`` in one pass with the checks, or SecAgg+'s unmasked sum),
and a server optimiser must see nothing else. The DP guarantee of each site covers its update; the mean of the
updates is a function of them, and whatever the server computes from that mean alone (momentum, Adam moments, a
new global model) is post-processing and costs no privacy. It would not be if the optimiser could read a single
site's update (under SecAgg+ it must not even exist at the server).

So the strategies here are Flower's own ``FedAvgM`` and ``FedAdam`` (their update rules and state, unchanged) with
the one thing under them replaced: where Flower's FedAvg would average the replies, :class:`AggregateOnly` hands
up the aggregate Atoll already computed, and refuses anything else. ``step(rnd, global, aggregate)`` is the only
way in.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

__all__ = ["AggregateOnly", "ServerFedAdam", "ServerFedAvgM", "is_server_optimizer"]


class _Released:
    """The round's aggregate (weighted mean of the admitted updates), the only input a server optimiser gets."""

    def __init__(self, arrays: ArrayRecord) -> None:
        self.arrays = arrays


class AggregateOnly(FedAvg):
    """Sits under Flower's FedAvgM/FedAdam in the MRO: their ``super().aggregate_train`` returns the released
    aggregate instead of averaging replies; individual replies are refused (a TypeError, never a silent mean)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[ArrayRecord | None,
                                                                                   MetricRecord | None]:
        if not isinstance(replies, _Released):
            raise TypeError(f"{type(self).__name__} post-processes the round's released aggregate only "
                            "(server.server_opt.step); it never takes the sites' replies")
        # a copy: FedAvgM clears the record it is given
        return ArrayRecord({k: Array(np.array(v.numpy(), copy=True)) for k, v in replies.arrays.items()}), None

    def _set_global(self, arrays: ArrayRecord) -> None:
        raise NotImplementedError

    def step(self, server_round: int, global_arrays: ArrayRecord, aggregate: ArrayRecord) -> ArrayRecord:
        """The new global model from the global model the round sent and the round's released aggregate.

        The result keeps each tensor's dtype (FedAdam's float64 step size would otherwise promote float32)."""
        self._set_global(global_arrays)
        new, _ = self.aggregate_train(server_round, _Released(aggregate))
        assert new is not None
        return ArrayRecord({k: Array(np.asarray(new[k].numpy(), dtype=aggregate[k].numpy().dtype))
                            for k in aggregate.keys()})


class ServerFedAvgM(FedAvgM, AggregateOnly):
    """Flower's FedAvgM (server learning rate, heavy-ball momentum on the pseudo-gradient) on the aggregate."""

    def _set_global(self, arrays: ArrayRecord) -> None:
        self.current_arrays = arrays


class ServerFedAdam(FedAdam, AggregateOnly):
    """Flower's FedAdam (Reddi et al. 2021: Adam on the pseudo-gradient, eta/beta_1/beta_2/tau) on the aggregate."""

    def _set_global(self, arrays: ArrayRecord) -> None:
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}


def is_server_optimizer(strategy: Any) -> bool:
    """Whether the round's aggregate goes through a server optimiser step before it becomes the global model."""
    return isinstance(strategy, AggregateOnly)
