"""The hospital side of Atoll: a Flower ClientApp.

One round at a site, in order (DESIGN.md "One round, as data"):
1. load the site (config, cached preprocessed data, ledger) — all from the site's own disk;
2. ask the budget guard to check the request against the hospital's policy and lifetime budget and
   write a reservation to the ledger BEFORE any data is touched (write-ahead);
3. train with DP-SGD (patient-level) on the site's device;
4. reply with the update, the released metrics and the signed ledger record — nothing else.

Anything that goes wrong is logged in full on the site only; what crosses the wire is a refusal
code and a message free of identifiers, paths and stack traces.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import secrets
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from contract import threshold, wire
from client import secagg as client_secagg
from client.approval import ApprovalStore, RunManifest, RunNotApproved
from client.egress import EgressBlocked, EgressPolicy, check_reply, release_metrics
from client.evaluation import sign_evaluation
from client.ingest import NoUsableImagesError
from client.manifest import build_run_manifest
from client.pacs.errors import NoCompleteMirror
from client.release_cache import ReleaseCache, Released
from client.runtime import SiteRuntime, SiteSetupError, site_runtime
from client.site_config import SITE_CONFIG_INVALID, ConfigError
from client.task_fit import FittedData, TaskMismatch, check_task_shape, fit_task
from client.task_metrics import missing_reasons, task_metrics
from models import UPDATE_HASH, build_loss, build_task_model, state_dict_sha256
from privacy.dpsgd import train_local
from privacy.guard import BudgetRefused, RoundRequest
from privacy.policy import PolicyError

log = logging.getLogger("atoll.site")

app = ClientApp()


def _refuse(msg: Message, code: str, message: str, site: str | None = None) -> Message:
    content = RecordDict({wire.REFUSAL: wire.refusal_record(code, message)})
    if site:
        content[wire.SITE] = wire.site_record(site)
    return Message(content, reply_to=msg)


def site_errors_stay_local(handler: Callable[[Message, Context], Message]):
    """Turn any exception into a sanitised refusal; the details go to the site's own log.

    Flower would otherwise ship `str(exception)` (which may hold a file path or a UID) to the
    server as the error reason. The incident id lets the site admin find the full trace locally.
    """

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except NoUsableImagesError as exc:
            log.error("no usable images: %s", exc)
            return _refuse(msg, wire.NO_USABLE_DATA, str(exc))
        except NoCompleteMirror as exc:  # the local message names the PACS; the refusal does not
            log.error("%s", exc)
            return _refuse(msg, wire.NO_COMPLETE_MIRROR, NoCompleteMirror.public)
        except _Refusal as exc:
            return _refuse(msg, exc.code, exc.message, exc.site)
        except EgressBlocked:
            return _refuse(msg, wire.EGRESS_BLOCKED, "the site's egress guard blocked the reply "
                                                     "(details in the site log)")
        except (PolicyError, ConfigError) as exc:  # a rule of the site's own config or policy: its code, no paths
            log.error("the site's configuration or privacy policy refused the round [%s]: %s", exc.code, exc)
            what = "configuration is invalid" if exc.code == SITE_CONFIG_INVALID else "privacy policy refuses the round"
            return _refuse(msg, exc.code, f"the site's {what} ({exc.code}); its administrator must run "
                                          "`atoll site check --config` (details in the site log)")
        except SiteSetupError as exc:
            log.error("site setup failed: %s", exc)
            return _refuse(msg, wire.NO_SITE_CONFIG,
                           "the site is not configured for Atoll; its administrator must check the site log")
        except Exception:  # noqa: BLE001 - deliberately broad: nothing may leak as a traceback
            incident = secrets.token_hex(4)
            log.exception("incident %s: round handler failed", incident)
            return _refuse(msg, wire.SITE_ERROR,
                           f"the site could not complete the round (incident {incident}; see the site log)")

    return wrapped


def _load_global(cfg: wire.RoundConfig, arrays: ArrayRecord) -> torch.nn.Module:
    """The round's global model, built from the run's task (never from what the site's labels suggest)."""
    model = build_task_model(cfg.model, cfg.task)
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def _site_for(context: Context, cfg: wire.RoundConfig) -> tuple[SiteRuntime, RunManifest, FittedData]:
    """The site, the run's approved manifest, and the site's data as the run's task sees it.

    The approval comes first (an unapproved run learns nothing of the site's data); then the task is checked
    against the data, before any privacy is charged: a task that does not fit is refused with TASK_MISMATCH.
    """
    site = site_runtime(context.node_config, cfg.task.image_size, cfg.task)
    manifest = _approved_manifest(site, cfg)
    try:
        check_task_shape(cfg.task, site.config)
        return site, manifest, fit_task(cfg.task, site.config, site.data)
    except TaskMismatch as exc:
        log.warning("refused a run whose task does not fit this site's data: %s", exc.message)
        raise _Refusal(exc.code, exc.message, site.name) from None


class _Refusal(Exception):
    """A refusal raised deep in a handler, carrying the site's name to the reply."""

    def __init__(self, code: str, message: str, site: str) -> None:
        super().__init__(message)
        self.code, self.message, self.site = code, message, site


def _approved_manifest(site: SiteRuntime, cfg: wire.RoundConfig) -> RunManifest:
    """The manifest of this run as the site computes it; refuses unless the site approved it."""
    manifest = build_run_manifest(cfg)
    try:
        ApprovalStore(site.config.state_dir).check_approved(manifest)
    except RunNotApproved as exc:
        log.warning("refused an unapproved run: %s", exc.message)
        raise _Refusal(wire.RUN_NOT_APPROVED, exc.message, site.name) from None
    return manifest


def _checked(site: SiteRuntime, manifest: RunManifest, content: RecordDict) -> RecordDict:
    """Egress guard: only the approved tensors and the policy's metrics may leave."""
    allowed = threshold.expand(set(manifest.metrics) & (set(site.config.privacy.released_metrics)
                                                        | {wire.NUM_EXAMPLES}))
    policy = EgressPolicy.from_manifest(manifest)
    check_reply(content, EgressPolicy(policy.tensors, frozenset(allowed) | {wire.NUM_EXAMPLES}))
    return content


def _released(site: SiteRuntime, metrics: dict[str, float], reasons: dict[str, str] | None = None) -> RecordDict:
    """Only what the hospital's policy lists as released in the clear leaves the site; a metric without a
    finite value is named in "missing" with its reason instead of blocking the whole reply."""
    allowed = threshold.expand(set(site.config.privacy.released_metrics) | {wire.NUM_EXAMPLES})
    values, missing = release_metrics(metrics, allowed, reasons)
    return RecordDict({wire.METRICS: values, **({wire.MISSING: missing} if missing is not None else {})})


@app.train()
@site_errors_stay_local
def train(msg: Message, context: Context) -> Message:
    if client_secagg.is_secaggplus(msg):  # secagg = true: the protocol runs this handler on a plain round
        return client_secagg.handle(msg, context, train)
    cfg = wire.RoundConfig.from_record(msg.content[wire.CONFIG])
    site, manifest, data = _site_for(context, cfg)
    if len(data.train.labels) == 0 or int(data.train.labels.min()) < 0:
        return _refuse(msg, wire.NO_USABLE_DATA, "the site has no labelled training images", site.name)
    masked = client_secagg.masking()
    if masked != manifest.secure_aggregation:
        # The approved manifest says whether the update leaves masked; the server cannot change that.
        return _refuse(msg, wire.SECAGG_MISMATCH,
                       "the approved run sends its update masked under SecAgg+, but this round asked for it in the "
                       "clear" if manifest.secure_aggregation else
                       "this round uses SecAgg+ but the approved run does not; approve the SecAgg+ run first",
                       site.name)
    arrays: ArrayRecord = msg.content[wire.ARRAYS]
    global_sd = arrays.to_torch_state_dict()
    train_split = data.train
    request = RoundRequest(run_id=cfg.run_id, server_round=cfg.server_round, mechanism=cfg.mechanism)
    if masked and site.guard.answered(cfg.run_id, cfg.server_round):
        # Under SecAgg+ the server only learns sums; answering one round twice (resent bytes or fresh
        # ones) would let it subtract two sums over different site sets and isolate one update.
        return _refuse(msg, wire.ROUND_ALREADY_ANSWERED,
                       f"this site already answered round {cfg.server_round} of this run under secure "
                       "aggregation; a second answer would let the server isolate an update", site.name)
    released = ReleaseCache(site.config.state_dir)
    try:
        reservation = site.guard.reserve(request, weights_in_sha256=state_dict_sha256(global_sd),
                                         resend=None if masked else released.get)
    except BudgetRefused as refusal:
        log.warning("refused round %s of run %s: %s", cfg.server_round, cfg.run_id, refusal.message)
        return _refuse(msg, refusal.code, refusal.message, site.name)
    if reservation.completed is not None:  # the same round again: the same bytes again, not charged
        again: Released = reservation.resent
        return _train_reply(msg, site, manifest, again.update, again.metrics, reservation.completed)

    model = _load_global(cfg, arrays)
    seed = int.from_bytes(hashlib.sha256(
        f"{cfg.seed}|{cfg.run_id}|{cfg.server_round}|{site.name}".encode()).digest()[:4], "big")
    result = train_local(model, train_split, cfg.mechanism, lr=cfg.lr, device=site.device,
                         batch_size=cfg.batch_size, seed=seed, criterion=build_loss(cfg.task),
                         proximal_mu=cfg.proximal_mu, augment_multiplicity=cfg.augment_multiplicity,
                         ema_decay=cfg.ema_decay)
    update = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    raw_metrics = {wire.NUM_EXAMPLES: len(train_split.labels), "train_loss": result.train_loss,
                   "train_seconds": result.seconds,
                   # site-local (no policy releases it): lets a resend name why train_loss is missing
                   EMPTY_STEPS: float(result.empty_steps)}
    update_sha = released.put(update, raw_metrics)  # before the round record: completed => resendable
    record = site.guard.complete(reservation, update_sha256=update_sha, num_examples=len(train_split.labels),
                                 server_prev_digest=cfg.prev_digest or None, update_hash=UPDATE_HASH)
    log.info("round %s of run %s: %d steps in %.1fs, epsilon now %.3f", cfg.server_round, cfg.run_id,
             result.steps, result.seconds, float(record.get("epsilon_after", float("nan"))))
    return _train_reply(msg, site, manifest, update, raw_metrics, record)


#: kept with a released reply's metrics on the site only (never in a policy's released metrics)
EMPTY_STEPS = "atoll_empty_steps"


def _train_missing_reasons(metrics: dict[str, float]) -> dict[str, str]:
    """Why train_loss has no value: every DP step drew an empty Poisson batch (noise only) -> EMPTY_BATCHES.

    That round's update is a valid DP release and its privacy is charged, so it goes out; only the loss, which
    no batch defined, is named missing (client.egress.release_metrics) instead of blocking the reply.
    """
    loss = float(metrics.get("train_loss", 0.0))
    if not math.isfinite(loss) and metrics.get(EMPTY_STEPS, 0) > 0:
        return {"train_loss": "EMPTY_BATCHES"}
    return {}


def _train_reply(msg: Message, site: SiteRuntime, manifest: RunManifest, update: dict[str, torch.Tensor],
                 metrics: dict[str, float], record: dict) -> Message:
    """The update, the policy's metrics and the signed round record, through the egress guard."""
    content = RecordDict({
        wire.ARRAYS: ArrayRecord(update),
        **_released(site, metrics, _train_missing_reasons(metrics)),
        wire.LEDGER: wire.ledger_record(record),
        wire.SITE: wire.site_record(site.name),
    })
    return Message(_checked(site, manifest, content), reply_to=msg)


@app.evaluate()
@site_errors_stay_local
def evaluate(msg: Message, context: Context) -> Message:
    cfg = wire.RoundConfig.from_record(msg.content[wire.CONFIG])
    site, manifest, data = _site_for(context, cfg)
    arrays: ArrayRecord = msg.content[wire.ARRAYS]
    model = _load_global(cfg, arrays)
    val = data.val
    m = task_metrics(cfg.task, model, val.images, val.labels, site.device)
    n = m.pop("n")
    content = RecordDict({**_released(site, {wire.NUM_EXAMPLES: n, **m}, missing_reasons(m, val.labels, n)),
                          wire.SITE: wire.site_record(site.name)})
    # Evaluation trains nothing and charges nothing (no guard, no ledger record): the approved manifest and the
    # policy's released metrics are its only gates. The signature lets an evaluation-only run (`atoll run
    # evaluate`) know this answer is the site's and which weights it scored.
    statement = sign_evaluation(content, site=site.name, run_id=cfg.run_id, server_round=cfg.server_round,
                                weights_sha256=state_dict_sha256(arrays.to_torch_state_dict()),
                                signing_key_path=site.config.signing_key)
    if statement is not None:
        content[wire.ATTESTATION] = wire.attestation_record(statement)
    return Message(_checked(site, manifest, content), reply_to=msg)
