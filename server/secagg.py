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

`SecAggRounds` runs the fit of each Atoll round (`secagg = true` in the run config) through the
workflow while keeping Atoll's bookkeeping: every reply of every protocol stage passes a screen
that books it in the round's `server.sitebook.RoundBook` the way a plain reply would be booked.
In the masked-vector stage a site's reply carries its released metrics and its signed ledger
record (FitRes metrics: the record as canonical JSON text under `wire.LEDGER`, the site name under
`wire.SITE`); RoundBook verifies and stores the record exactly as for a plain update. A refusal
(budget, approval), a reply whose record does not verify, or anything else that is not protocol
material is booked and left out of the protocol: for SecAgg+ that site has dropped, so its
masked vector is never added and the masks it shared are removed from the others' sum.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from contract import wire
from privacy.secagg_prg import check_num_shares, install

__all__ = ["SecAggRounds", "SecureSecAggPlusWorkflow", "run_secaggplus"]

log = logging.getLogger("atoll.server")

#: Called with (stage, messages sent, replies received); returns the replies the protocol may use.
Screen = Callable[[str, list[Message], list[Message]], list[Message]]


class SecureSecAggPlusWorkflow(SecAggPlusWorkflow):
    """`SecAggPlusWorkflow` that refuses crashing parameters and uses the ChaCha20 mask generator.

    Parameters are Flower's (`num_shares`, `reconstruction_threshold`, `max_weight`,
    `clipping_range`, `quantization_range`, `modulus_range`, `timeout`), plus `screen`: when
    given, every stage's replies pass through it before the protocol uses them (it may drop
    replies: a dropped site is a SecAgg+ dropout).
    """

    def __init__(self, num_shares: int | float, reconstruction_threshold: int | float, *,
                 screen: Screen | None = None, **kwargs) -> None:
        check_num_shares(num_shares, reconstruction_threshold)
        super().__init__(num_shares, reconstruction_threshold, **kwargs)
        self.screen = screen

    def __call__(self, grid: Grid, context: Context) -> None:
        install()  # in this process: the ServerApp's (simulation thread or flwr-serverapp subprocess)
        super().__call__(grid, context)

    def _screened(self, grid: Grid, stage: str) -> Grid:
        return grid if self.screen is None else _ScreenedGrid(grid, stage, self.screen)

    def setup_stage(self, grid, context, state) -> bool:
        return super().setup_stage(self._screened(grid, Stage.SETUP), context, state)

    def share_keys_stage(self, grid, context, state) -> bool:
        super().share_keys_stage(self._screened(grid, Stage.SHARE_KEYS), context, state)
        # Flower 1.41 keeps a site that left in 'setup' or 'share_keys' among the sampled nodes and
        # neighbours, so 'unmask' asks the others for key shares of it that nobody ever received
        # (KeyError at every site) and needs shares the server can never collect: one early dropout
        # fails the round. Such a site never masked with anyone; forget it, as if never sampled.
        gone = state.sampled_node_ids - state.active_node_ids
        if gone:
            state.sampled_node_ids = set(state.active_node_ids)
            for neighbours in state.nid_to_neighbours.values():
                neighbours -= gone
        return self._check_threshold(state)  # all that Flower's share_keys_stage returns, on the fixed state

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        return super().collect_masked_vectors_stage(self._screened(grid, Stage.COLLECT_MASKED_VECTORS), context,
                                                    state)

    def unmask_stage(self, grid, context, state) -> bool:
        return super().unmask_stage(self._screened(grid, Stage.UNMASK), context, state)


class _ScreenedGrid:
    """The Grid, with the replies of one SecAgg+ stage passed through a screen."""

    def __init__(self, grid: Grid, stage: str, screen: Screen) -> None:
        self._grid, self._stage, self._screen = grid, stage, screen

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        sent = list(messages)
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        return self._screen(self._stage, sent, replies)


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


# -- Atoll rounds under SecAgg+ --------------------------------------------------------------------


class _SecAggFedAvg(LegacyFedAvg):
    """Legacy FedAvg that samples every site, sends Atoll's round config and keeps the SecAgg+ sum.

    The workflow hands `aggregate_fit` one FitRes per contributing site, each holding the same
    unmasked weighted mean; that mean is the round's aggregate.
    """

    def __init__(self, num_sites: int) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=num_sites,
                         min_evaluate_clients=0, min_available_clients=num_sites,
                         on_fit_config_fn=lambda _rnd: dict(self.fit_config))
        self.fit_config: dict = {}
        self.aggregate: list[np.ndarray] | None = None

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            return None, {}
        parameters: Parameters = results[0][1].parameters
        self.aggregate = parameters_to_ndarrays(parameters)
        return parameters, {}


class SecAggRounds:
    """The fit of each Atoll round through Flower's SecAgg+ workflow (legacy API), booked by RoundBook.

    Create once per run (it starts the legacy client manager's node-polling thread), call
    `train` once per round, `close` at the end. The sites must run Atoll's ClientApp, whose
    `train` hands SecAgg+ messages to `client.secagg`.
    """

    def __init__(self, grid: Grid, settings) -> None:
        num_shares, threshold = settings.secagg_parameters()
        self._grid = grid
        self._strategy = _SecAggFedAvg(settings.num_sites or settings.min_sites)
        self._workflow = SecureSecAggPlusWorkflow(num_shares, threshold, max_weight=float(settings.secagg_max_weight),
                                                  timeout=settings.round_timeout)
        base = Context(run_id=int(getattr(getattr(grid, "run", None), "run_id", 0) or 0), node_id=0,
                       node_config={}, state=RecordDict(), run_config={})
        self._legacy = LegacyContext(context=base, config=ServerConfig(num_rounds=settings.num_server_rounds),
                                     strategy=self._strategy)
        self._names: dict[int, str] = {}  # node id -> site name, learned from earlier rounds
        self._last_book = None
        self.problem = ""
        self._thread, self._stop, ready = start_update_client_manager_thread(grid, self._legacy.client_manager)
        ready.wait()
        log.info("SecAgg+ on: num_shares=%s, reconstruction_threshold=%s, max_weight=%s (ChaCha20 masks)",
                 num_shares, threshold, settings.secagg_max_weight)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, book) -> ArrayRecord | None:
        """One SecAgg+ fit; each site's outcome lands in `book`. Returns the aggregate, or None
        (with `self.problem` saying why) when the protocol could not complete."""
        names = list(arrays.keys())
        self._legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(arrays.to_numpy_ndarrays()), keep_input=True)
        self._legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round, WorkflowKey.START_TIME: time.time()})
        # The round config as plain scalars, plus the tensor order of the legacy parameter list.
        self._strategy.fit_config = {**dict(config), wire.ARRAYS: json.dumps(names)}
        self._strategy.aggregate = None
        self.problem = ""
        self._learn_names(self._last_book)  # including those the last round's evaluation taught
        self._last_book = book
        book.node_names.update(self._names)
        screen = _RoundScreen(book, server_round)
        self._workflow.screen = screen
        try:
            self._workflow(self._grid, self._legacy)
        finally:
            self._workflow.screen = None
        self._learn_names(book)
        if self._strategy.aggregate is None:
            self.problem = screen.problem or "SecAgg+ did not complete (see the ServerApp log)"
            log.error("round %d: %s", server_round, self.problem)
            return None
        if screen.dead:
            log.info("round %d: SecAgg+ removed the masks of %d dropped site(s): %s", server_round,
                     len(screen.dead), ", ".join(sorted(screen.dead)))
        return _as_arrays(self._strategy.aggregate, arrays)

    def _learn_names(self, book) -> None:
        if book is not None:
            self._names.update({n: s for n, s in book.node_names.items() if s != f"node-{n}"})


def _as_arrays(ndarrays: list[np.ndarray], like: ArrayRecord) -> ArrayRecord:
    """The aggregate under the global model's names, dtypes and shapes (SecAgg+ dequantises to float64)."""
    if len(ndarrays) != len(like):
        raise ValueError(f"SecAgg+ returned {len(ndarrays)} tensors for a model of {len(like)}")
    out = {}
    for (name, ref), value in zip(like.items(), ndarrays):
        out[name] = Array(np.asarray(value).astype(np.dtype(ref.dtype)).reshape(tuple(ref.shape)))
    return ArrayRecord(out)


class _RoundScreen:
    """Books every SecAgg+ reply of one round in its RoundBook and keeps out what is not protocol material."""

    _EMPTY = ArrayRecord()

    def __init__(self, book, server_round: int) -> None:
        self.book = book
        self.round = server_round
        self.dead: set[str] = set()   # sites that left after sharing keys: their pairwise masks are removed
        self.problem = ""

    def __call__(self, stage: str, sent: list[Message], replies: list[Message]) -> list[Message]:
        kept: list[Message] = []
        for reply in replies:
            if reply.has_error():
                self._dropped(stage, reply)
                kept.append(reply)  # the workflow counts it as a failure and treats the node as dropped
            elif RECORD_KEY_CONFIGS not in reply.content.config_records:
                self._not_protocol(stage, reply)
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                if self.book.admit_train_reply(_booked_view(reply), self._EMPTY):
                    kept.append(reply)
                else:
                    self._left_out(stage, reply)
            else:
                kept.append(reply)
        answered = {r.metadata.src_node_id for r in replies}
        for msg in sent:
            if msg.metadata.dst_node_id not in answered:
                self._dropped(stage, Message(Error(ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                                                   f"no reply in SecAgg+ stage '{stage}' within the round timeout"),
                                             reply_to=msg))
        if len(kept) < len(sent):
            self.problem = (f"SecAgg+ stage '{stage}': {len(kept)} of {len(sent)} site(s) went on "
                            f"({self.book.refusal_summary()})")
        return kept

    def _name(self, node: int) -> str:
        return self.book.node_names.get(node, f"node-{node}")

    def _dropped(self, stage: str, reply: Message) -> None:
        name = self._name(reply.metadata.src_node_id)
        if stage == Stage.UNMASK:  # its masked vector is in the sum; the others' shares remove its masks
            log.warning("round %d: %s dropped in SecAgg+ stage '%s' (its update still counts): %s", self.round,
                        name, stage, str(reply.error.reason)[:300])
            return
        site = self.book.sites.get(name)
        if site is None or site.status == "pending":
            self.book.admit_train_reply(reply, self._EMPTY)
        if stage == Stage.COLLECT_MASKED_VECTORS:
            self.dead.add(name)

    def _not_protocol(self, stage: str, reply: Message) -> None:
        """A refusal (or anything else that is not SecAgg+ material): booked, site left out of the round."""
        if stage == Stage.UNMASK:
            log.warning("round %d: %s sent no key shares in SecAgg+ stage '%s'", self.round,
                        self._name(reply.metadata.src_node_id), stage)
            return
        self.book.admit_train_reply(reply, self._EMPTY)
        self._left_out(stage, reply)

    def _left_out(self, stage: str, reply: Message) -> None:
        if stage == Stage.COLLECT_MASKED_VECTORS:  # it shared keys: the others' masks towards it must go
            self.dead.add(self._name(reply.metadata.src_node_id))


def _booked_view(reply: Message) -> Message:
    """A masked-vector reply as RoundBook reads a plain one: released metrics, ledger record, site name.

    The update itself stays out of the view (the server holds only its masked form), so the
    ArrayRecord is empty; a reply that does not parse gives an empty view (RoundBook: malformed).
    """
    view = RecordDict()
    try:
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        metrics = dict(fitres.metrics)
        record, site = metrics.pop(wire.LEDGER, None), metrics.pop(wire.SITE, None)
        metrics[wire.NUM_EXAMPLES] = fitres.num_examples
        view[wire.ARRAYS] = ArrayRecord()
        view[wire.METRICS] = MetricRecord({k: float(v) for k, v in metrics.items()})
        if isinstance(record, str):
            view[wire.LEDGER] = ConfigRecord({"record": record})
        if isinstance(site, str):
            view[wire.SITE] = wire.site_record(site)
    except (KeyError, TypeError, ValueError):
        view = RecordDict()
    return Message(view, metadata=reply.metadata)
