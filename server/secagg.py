"""SecAgg+ on the consortium side: Flower's workflow with safe parameters and a cryptographic PRG.

Flower 1.41 offers SecAgg+ only through the legacy API (`LegacyContext` + `DefaultWorkflow` +
`SecAggPlusWorkflow` on the server, `NumPyClient` + `secaggplus_mod` on the clients). Two defects
are handled here rather than worked around by each caller:

* masks come from a 32-bit-seeded Mersenne Twister (flwr #7522): `SecureSecAggPlusWorkflow`
  installs `privacy.secagg_prg.pseudo_rand_gen` in the process that runs it, and the sites must
  use `privacy.secagg_prg.csprng_secaggplus_mod` so that both ends generate the same masks;
* an even integer `num_shares` crashes every client: refused up front with a clear message.

The server still sees the aggregate in the clear (that is what SecAgg+ is for); what it no longer
sees is any single site's update.
"""

from __future__ import annotations

from flwr.common import Context
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from privacy.secagg_prg import check_num_shares, install

__all__ = ["SecureSecAggPlusWorkflow", "run_secaggplus"]


class SecureSecAggPlusWorkflow(SecAggPlusWorkflow):
    """`SecAggPlusWorkflow` that refuses crashing parameters and uses the ChaCha20 mask generator.

    Parameters are Flower's (`num_shares`, `reconstruction_threshold`, `max_weight`,
    `clipping_range`, `quantization_range`, `modulus_range`, `timeout`).
    """

    def __init__(self, num_shares: int | float, reconstruction_threshold: int | float, **kwargs) -> None:
        check_num_shares(num_shares, reconstruction_threshold)
        super().__init__(num_shares, reconstruction_threshold, **kwargs)

    def __call__(self, grid: Grid, context: Context) -> None:
        install()  # in this process: the ServerApp's (simulation thread or flwr-serverapp subprocess)
        super().__call__(grid, context)


def run_secaggplus(grid: Grid, context: Context, *, num_rounds: int, strategy: LegacyStrategy | None = None,
                   num_shares: int | float = 1.0, reconstruction_threshold: int | float = 0.6,
                   **workflow_kwargs) -> LegacyContext:
    """Run `num_rounds` of legacy FedAvg (or `strategy`) with every fit aggregated under SecAgg+.

    The sites' ClientApp must be `ClientApp(client_fn=..., mods=[csprng_secaggplus_mod])`.
    Returns the LegacyContext (its `strategy`/`history` hold the outcome).
    """
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds),
                           strategy=strategy or LegacyFedAvg(min_fit_clients=2, min_available_clients=2,
                                                             fraction_evaluate=0.0))
    workflow = DefaultWorkflow(fit_workflow=SecureSecAggPlusWorkflow(num_shares, reconstruction_threshold,
                                                                     **workflow_kwargs))
    workflow(grid, legacy)
    return legacy
