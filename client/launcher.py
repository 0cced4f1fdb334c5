"""The site's approval, enforced outside the code it approves: a checked replacement for `flwr-clientapp`.

Inside the bundle, ``client.app`` checks the run against the site's approvals every round — but a modified bundle
can simply delete that check. So the check must run *before any code of the bundle runs*, in code the hospital
installed itself. Flower's process isolation gives that point (``flower-supernode --isolation process``): an
external process pulls each task's message, context, run and FAB from the SuperNode's runtime API, installs the
FAB and only then imports its ClientApp. This module is that process, with one step added between the pull and
the install:

1. the FAB's app hash (:func:`client.approval.app_bundle_hash_from_fab`, the hash a site approves) must be the
   app hash of a manifest the site approved and did not revoke (``<state_dir>/approvals.jsonl``);
2. for a train/evaluate message, the run manifest — rebuilt by the site's own installed code from the round's
   config and the FAB's hash — must be approved (the same check ``client.app`` makes, now before the bundle runs).

Otherwise the task is answered with a refusal (``RUN_NOT_APPROVED``, the site's name, a message free of paths and
identifiers) that reaches the lead's history like any other refusal, and the bundle is neither installed nor
imported. Approved bundles run exactly as ``flwr-clientapp`` runs them: the steps are Flower's own
(``pull_task_input``, ``install_from_fab``, ``get_load_client_app_fn``, ``push_message``, ``push_task_output``);
Flower has no hook between pull and install, which is the only reason this loop is written here.

``atoll-superexec`` is Flower's ``flower-superexec`` with this launcher in place of ``flwr-clientapp``; a site runs

    flower-supernode --isolation process ... --node-config 'site-config="/etc/atoll/site.toml"'
    atoll-superexec --runtime-api-address 127.0.0.1:9094 --insecure

This module is the site's installed code and is kept out of the app bundle (pyproject ``fab-exclude``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

log = logging.getLogger("atoll.site")

#: top-level packages of Atoll's app bundle; unloaded before an approved bundle is imported, so the ClientApp
#: that runs is the bundle's, never the site-installed copy this launcher used for its check
APP_PACKAGES = ("client", "server", "models", "privacy", "contract")


@dataclass(frozen=True)
class Verdict:
    """Whether a task's bundle may run; ``message`` may cross the wire (no paths, no identifiers)."""

    ok: bool
    site: str = ""
    message: str = ""


def check_task(fab_content: bytes, node_config: dict, round_config=None) -> Verdict:
    """The site's decision for one task, made with the site's installed code before the bundle runs."""
    from client.approval import ApprovalStore, RunNotApproved, app_bundle_hash_from_fab
    from client.runtime import resolve_site_config
    from client.site_config import load_site_config

    cfg = load_site_config(resolve_site_config(node_config))
    store = ApprovalStore(cfg.state_dir)
    app_hash = app_bundle_hash_from_fab(fab_content)
    approved = store.approved_app_hashes()
    if app_hash not in approved:
        log.warning("refused a bundle before running it: app hash %s is not approved at this site", app_hash)
        return Verdict(False, cfg.name,
                       f"the app bundle (app hash {app_hash[:12]}) is not approved at this site, so none of its code "
                       "was run; the site operator must review the run and use `atoll site approve`")
    if round_config is not None:
        from client.manifest import build_run_manifest

        try:
            store.check_approved(build_run_manifest(round_config, app_hash=app_hash))
        except RunNotApproved as exc:
            log.warning("refused a run before running its bundle: %s", exc.message)
            return Verdict(False, cfg.name, exc.message)
    return Verdict(True, cfg.name)


def _round_config(message):
    """The round config of a train/evaluate message (None for SecAgg+ protocol stages and others)."""
    from contract import wire

    if not message.has_content() or wire.CONFIG not in message.content.config_records:
        return None
    try:
        return wire.RoundConfig.from_record(message.content.config_records[wire.CONFIG])
    except ValueError:
        return None  # not an Atoll round config (a SecAgg+ stage): the bundle hash check still applied


def _refusal(message, verdict: Verdict):
    from flwr.app import Message, RecordDict

    from contract import wire

    content = RecordDict({wire.REFUSAL: wire.refusal_record(wire.RUN_NOT_APPROVED, verdict.message)})
    if verdict.site:
        content[wire.SITE] = wire.site_record(verdict.site)
    return Message(content, reply_to=message)


def _unload_app_packages() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in APP_PACKAGES:
            del sys.modules[name]


def run_checked_clientapp(runtime_api_address: str, token: str, insecure: bool, certificates: bytes | None,
                          parent_pid: int | None) -> int:
    """One task: pull, check, then run the approved ClientApp exactly as ``flwr-clientapp`` would (or refuse)."""
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context, status, details, code = None, SubStatus.FAILED, "ClientApp task failed", 1
    try:
        message, context, run, fab = pull_task_input(client)
        try:
            verdict = check_task(fab.content, dict(context.node_config), _round_config(message))
        except Exception:  # noqa: BLE001 - a site that cannot check refuses; details stay in the site log
            log.exception("the site could not check the bundle; refusing the task")
            verdict = Verdict(False, "", "the site could not check the run against its approvals; "
                                         "its administrator must check the site log")
        if not verdict.ok:
            push_message(client, _refusal(message, verdict), context)
            status, details, code = SubStatus.COMPLETED, "", 0
            return code
        _unload_app_packages()
        install_from_fab(fab.content, skip_prompt=True)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        reply = load(run.fab_id, run.fab_version, fab.hash_str)(message=message, context=context)
        push_message(client, reply, context)
        status, details, code = SubStatus.COMPLETED, "", 0
        return code
    except Exception as exc:  # noqa: BLE001 - Flower's runner reports the failure the same way
        log.exception("ClientApp task failed")
        details = type(exc).__name__  # no message text: it may hold a path or an identifier
        return code
    finally:
        retry.max_tries = 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()


def clientapp_main(argv: list[str] | None = None) -> None:
    """``atoll-clientapp``: the arguments of ``flwr-clientapp`` (SuperExec passes them)."""
    from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    parser = argparse.ArgumentParser(prog="atoll-clientapp",
                                     description="Run one ClientApp task of a Flower SuperNode in process isolation, "
                                                 "after checking its app bundle against the site's approvals.")
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094")
    add_args_flwr_app_common(parser=parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s atoll-clientapp %(levelname)s %(message)s")
    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    sys.exit(run_checked_clientapp(args.runtime_api_address, try_obtain_flwr_app_token(args), args.insecure,
                                   certificates, args.parent_pid))


def superexec_main() -> None:
    """``atoll-superexec``: Flower's ``flower-superexec``, launching ``atoll-clientapp`` for every ClientApp task."""
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = "atoll-clientapp"  # read by Flower's executors at launch time
    flower_superexec()
