"""The consortium side of Atoll: a Flower ServerApp.

The round loop is Atoll's own (not `Strategy.start`) because each reply must pass through checks
Flower's loop has no place for: a site may refuse (budget, policy), its signed ledger record must
verify against its enrolled key, and its update must be sane before any Flower strategy aggregates
it. Sampling and aggregation stay Flower's (FedAvg or a robust strategy), wrapped, not rewritten.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from models import build_task_model
from server import robust
from server.outputs import RunFolderError, RunOutputs
from server.released_updates import keep_released
from server.secagg import SecAggRounds
from server.server_opt import is_server_optimizer
from server.settings import RunSettings, SettingsError
from server.sitebook import RoundBook, SiteTrust
from server.validation import make_validator

log = logging.getLogger("atoll.server")

app = ServerApp()


class RunStopped(RuntimeError):
    """Too few sites took part in a round for the run to go on."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    from server.evaluate_run import is_evaluation_run, main_evaluate

    if is_evaluation_run(dict(context.run_config)):  # `atoll run evaluate`: score a run's models, train nothing
        main_evaluate(grid, dict(context.run_config), context.run_id)
        return
    settings = RunSettings.from_run_config(dict(context.run_config))
    build_strategy(settings)  # a bad strategy setting fails here, before round 1
    out = run_consortium(grid, settings, context.run_id)
    if out.status != "completed" and not out.stopped_by_lead:
        # Flower then lists the run as finished:failed with this reason (`flwr ls`), not as completed
        raise RunStopped(f"run {out.name} {out.status}: {out.reason} (details: {out.root / 'history.json'})")


def check_trust(settings: RunSettings) -> SiteTrust:
    """The run's node/site bindings; refuses a run without enrolled site keys unless it is the local demo.

    Without ``keys-dir`` nothing ties a reply to a hospital: any node admitted to the SuperLink (the open-source
    Control API lets a stranger holding only ca.crt register a node key) could replace the global model.
    """
    from privacy.registry import RegistryError, SiteRegistry

    if not settings.keys_dir:
        if not settings.allow_unverified_demo:
            raise SettingsError("run config 'keys-dir' is empty: a run needs the enrolled site keys (<site>.pub and "
                                "registry.json, see `atoll consortium register`) so that only enrolled hospitals' "
                                "nodes and signed records count. For the local demo only, set "
                                "allow-unverified-demo = true")
        log.warning("UNVERIFIED DEMO RUN: no enrolled site keys; any node's update and ledger record is taken as "
                    "it claims to be. Never run a consortium like this")
        return SiteTrust(verified=False)
    try:
        registry = SiteRegistry.load(settings.keys_dir)
    except RegistryError as exc:
        raise SettingsError(f"run config 'keys-dir': {exc}") from None
    if registry is not None:
        _check_ledger_keys(registry, Path(settings.keys_dir))
    if registry is None:
        log.warning("keys-dir %s has no registry.json: each site's node is bound by its first signed update of the "
                    "run (register nodes with `atoll consortium register` to bind them in advance)",
                    settings.keys_dir)
    return SiteTrust(registry)


def _check_ledger_keys(registry, keys_dir: Path) -> None:
    """The registry's ledger key id of each site must be the enrolled <site>.pub (one site, one key)."""
    from privacy.keys import KeyFileError, key_id, load_public_key

    for entry in registry.entries.values():
        if entry.ledger_key_id is None:
            continue
        try:
            got = key_id(load_public_key(keys_dir / f"{entry.name}.pub"))
        except KeyFileError as exc:
            raise SettingsError(f"run config 'keys-dir': site {entry.name!r}: {exc}") from None
        if got != entry.ledger_key_id:
            raise SettingsError(f"run config 'keys-dir': {keys_dir / (entry.name + '.pub')} has key id {got}, but "
                                f"registry.json binds site {entry.name!r} to ledger key {entry.ledger_key_id}")


def build_strategy(settings: RunSettings) -> Strategy:
    """Flower's strategy for the run (FedAvg or a robust one), every connected site each round."""
    n = settings.num_sites or settings.min_sites
    extra: dict = {}
    opts = settings.server_options
    params = robust.strategy_parameters(settings.strategy)
    if "server_momentum" in params:  # fedavgm
        extra.update(server_learning_rate=opts.server_lr, server_momentum=opts.server_momentum)
    if "tau" in params:  # fedadam
        extra.update(eta=opts.fedadam_eta, beta_1=opts.fedadam_beta1, beta_2=opts.fedadam_beta2, tau=opts.fedadam_tau)
    if "proximal_mu" in robust.strategy_parameters(settings.strategy):
        extra["proximal_mu"] = settings.proximal_mu
    if "num_malicious_nodes" in robust.strategy_parameters(settings.strategy):
        extra["num_malicious_nodes"] = settings.num_malicious
    return robust.build_strategy(settings.strategy, fraction_train=1.0, fraction_evaluate=1.0,
                                 min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n, **extra)


def run_consortium(grid: Grid, settings: RunSettings, flower_run_id: int) -> RunOutputs:
    """Run all rounds (or, with ``settings.resume``, the rounds after the run's checkpoint); returns the outputs
    (also on disk under settings.run_dir)."""
    if settings.resume and not settings.run_name:
        raise SettingsError("run config 'resume' is true but 'run-name' is empty: name the run to resume")
    run_name = settings.name_for(flower_run_id)
    trust = check_trust(settings)
    strategy = build_strategy(settings)
    try:
        if settings.resume:
            out, arrays, prev, first = _resume(settings, run_name, flower_run_id, strategy)
        else:
            out = RunOutputs.create(Path(settings.run_dir), run_name, settings, flower_run_id)
    except RunFolderError as exc:
        raise SettingsError(str(exc)) from None
    if not settings.resume:
        torch.manual_seed(settings.seed)
        model = build_task_model(settings.model, settings.task)
        arrays = ArrayRecord(model.state_dict())
        prev = out.digest(0, arrays, [])  # round 0: the settings and initial weights, countersigned in round 1
        out.commit(0, out.save_weights(0, arrays), strategy, settings)
        first = 1
    log.info("run %s: %d rounds, task %s, model %s, %s", run_name, settings.num_server_rounds,
             settings.task.describe(), settings.model, settings.mechanism.describe())
    secagg = SecAggRounds(grid, settings) if settings.secagg else None  # the fit under SecAgg+
    try:
        for rnd in range(first, settings.num_server_rounds + 1):
            if (request := out.stop_requested()) is not None:  # `atoll run stop`: a clean stop between rounds
                out.finish_stopped_by_lead(request, settings.num_server_rounds)
                log.warning("run %s: %s", run_name, out.reason)
                break
            arrays, prev = _one_round(grid, strategy, settings, run_name, rnd, arrays, out, secagg, trust, prev)
        else:
            out.finish("completed")
    except RunStopped as stop:
        log.error("run %s stopped: %s", run_name, stop)
        out.finish("stopped", str(stop))
    finally:
        if secagg is not None:
            secagg.close()
        out.close()
    return out


def _resume(settings: RunSettings, run_name: str, flower_run_id: int,
            strategy: Strategy) -> tuple[RunOutputs, ArrayRecord, str, int]:
    """Reopen the run at its checkpoint (server.resume): outputs, global weights, last digest hash, next round."""
    from server.checkpoint import load_strategy_state, restore_rng
    from server.resume import resume_run

    resumed = resume_run(Path(settings.run_dir), run_name, settings, flower_run_id)
    out, point = resumed.outputs, resumed.checkpoint
    load_strategy_state(strategy, resumed.state["strategy"])
    restore_rng(resumed.state["rng"])
    arrays = ArrayRecord(torch.load(out.weights_path(point.round), map_location="cpu", weights_only=True))
    aside = ", ".join(f"{k} ({v if not isinstance(v, bool) else 'moved'})" for k, v in resumed.set_aside.items())
    log.warning("run %s RESUMED after round %d of %d (checkpoint of Flower run %s)%s; the sites answer a round "
                "they already completed from their release cache, at no new privacy charge", run_name, point.round,
                settings.num_server_rounds, point.flower_run_id,
                f"; set aside from the unfinished round: {aside}" if aside else "")
    return out, arrays, point.last_digest, point.round + 1


def _one_round(grid: Grid, strategy: Strategy, settings: RunSettings, run_name: str, rnd: int,
               arrays: ArrayRecord, out: RunOutputs, secagg: SecAggRounds | None = None,
               trust: SiteTrust | None = None, prev: str = "") -> tuple[ArrayRecord, str]:
    """One round; returns the new global weights and the hash of this round's signed digest."""
    # Under SecAgg+ the server never holds one site's update: nothing to validate one by one.
    one_pass = secagg is None and robust.sums_in_one_pass(settings.strategy)  # FedAvg/FedProx: summed on admission
    book = RoundBook(rnd, out.ledger, None if secagg else make_validator(settings.max_update_norm or None,
                                                                         accumulate=one_pass),
                     bind_updates=not secagg, trust=trust)
    cfg = dataclasses.replace(settings.round_config(run_name, rnd), prev_digest=prev).to_record()
    t0 = time.perf_counter()
    if secagg is not None:
        new_arrays = secagg.train(rnd, arrays, cfg, book)
        accepted = book.contributors()
    else:
        replies = list(grid.send_and_receive(strategy.configure_train(rnd, arrays, cfg, grid),
                                             timeout=settings.round_timeout))
        accepted = [m for m in replies if book.admit_train_reply(m, arrays)]
    if len(accepted) < settings.min_sites:
        out.digest(rnd, None, book.accepted_records)  # records were accepted: the chain still names them
        out.record_round(book, time.perf_counter() - t0)
        raise RunStopped(f"round {rnd}: only {len(accepted)} site(s) contributed an update, "
                         f"min-sites is {settings.min_sites} ({book.refusal_summary()})")
    if one_pass:
        new_arrays = book.aggregate()  # the same weighted mean as Flower's FedAvg (tests/test_update_pass.py)
    elif secagg is None:
        new_arrays, _ = strategy.aggregate_train(rnd, accepted)
    if new_arrays is None:
        out.digest(rnd, None, book.accepted_records)
        if secagg is not None:  # who contributed, refused or dropped before the protocol failed
            out.record_round(book, time.perf_counter() - t0)
        raise RunStopped(f"round {rnd}: the strategy could not aggregate the accepted updates"
                         + (f" ({secagg.problem})" if secagg is not None else ""))
    if is_server_optimizer(strategy):  # FedAvgM / FedAdam: a step on the released aggregate, nothing else
        new_arrays = strategy.step(rnd, arrays, new_arrays)
    train_wall = time.perf_counter() - t0
    digest = out.digest(rnd, new_arrays, book.accepted_records)  # signed before the weights are saved
    ev_cfg = dataclasses.replace(settings.round_config(run_name, rnd), prev_digest=prev).to_record()
    ev_replies = grid.send_and_receive(strategy.configure_evaluate(rnd, new_arrays, ev_cfg, grid),
                                       timeout=settings.round_timeout)
    for m in ev_replies:
        book.admit_evaluate_reply(m)
    weights_sha = out.save_weights(rnd, new_arrays)
    if settings.server_options.server_ema > 0:  # beside the round's weights, before the commit names the round
        from server.server_ema import save_round_ema

        save_round_ema(out.weights_path, rnd, new_arrays.to_torch_state_dict(), settings.server_options.server_ema)
    if secagg is None:  # each site's released weights, for `atoll run evaluate` (none exist under SecAgg+)
        keep_released(out.root, rnd, book, accepted)
    out.record_round(book, train_wall)
    out.commit(rnd, weights_sha, strategy, settings)  # the resume point: written last, atomically
    log.info("round %d/%d: %s", rnd, settings.num_server_rounds, book.one_line())
    return new_arrays, digest
