"""`atoll site approve`: the site operator reviews a run manifest and records (or revokes) the approval.

The approval store, the manifest and its hash live in :mod:`client.approval` (the ClientApp checks them every
round); this module is only the command, so it stays out of the app bundle sites approve (pyproject
``fab-exclude``): the policy and budget checks it runs before approving load the site's data and ledger.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.approval import (ApprovalStore, ApprovalStoreError, ManifestError, RunManifest, describe_manifest,
                             load_manifest, manifest_hash)


def _state_dir_from_config(path: str) -> Path:
    """The site's state directory from its site.toml (the site config parser when present)."""
    try:
        from client.site_config import load_site_config
    except ImportError:  # pragma: no cover - transitional, until client/site_config.py lands
        import tomllib

        p = Path(path).expanduser()
        try:
            table = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(f"site config {p} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ManifestError(f"site config {p} is not valid TOML ({err})") from None
        state = table.get("site", {}).get("state_dir")
        if not isinstance(state, str) or not state:
            raise ManifestError(f"site config {p}: [site].state_dir is required")
        sp = Path(state).expanduser()
        return sp if sp.is_absolute() else (p.parent / sp).resolve()
    return Path(load_site_config(path).state_dir)


def _cmd_approve(args: argparse.Namespace) -> int:
    try:
        state_dir = Path(args.state_dir).expanduser() if args.state_dir else _state_dir_from_config(args.config)
    except Exception as err:  # ManifestError or the site config parser's ConfigError
        print(f"atoll site approve: {err}")
        return 2
    store = ApprovalStore(state_dir)
    try:
        if args.list:
            return _list(store)
        if args.revoke:
            store.revoke(args.revoke, by=args.by, reason=args.reason or "")
            print(f"Approval of run {args.revoke} revoked; further rounds of it will be refused.")
            return 0
        if not args.manifest:
            print("atoll site approve: pass --manifest run-manifest.json (or --list / --revoke HASH)")
            return 2
        manifest = load_manifest(args.manifest)
        digest = manifest_hash(manifest)
        print(describe_manifest(manifest))
        print()
        if not _policy_allows(args, manifest):
            return 1
        if store.is_approved(digest):
            print(f"Already approved at this site ({digest[:12]}).")
            return 0
        if not args.yes:
            if not sys.stdin.isatty():
                print("atoll site approve: not approved; review the above and re-run with --yes to approve")
                return 1
            answer = input("Approve this run for this site? [y/N] ").strip().lower()
            if answer not in ("y", "yes"):
                print("Not approved.")
                return 1
        rec = store.approve(manifest, by=args.by)
        print(f"Approved run {digest[:12]} by {rec['by']} at {rec['at']} (recorded in {store.path}).")
        return 0
    except (ManifestError, ApprovalStoreError) as err:
        print(f"atoll site approve: {err}")
        return 2


def _policy_allows(args: argparse.Namespace, manifest: RunManifest) -> bool:
    """Check the run against the site's privacy policy, data and ledger, as the guard will at every round.

    One call into the check ``atoll site check`` runs (``client.site_check.policy_findings``). Needs ``--config``
    (the policy lives there); with ``--state-dir`` only, it says that it could not check.
    """
    if not args.config:
        print("note: the run was not checked against the site's privacy policy (pass --config to check it)")
        return True
    from client.ingest import NoUsableImagesError, build_site_dataset
    from client.ingest.progress import ingest_progress
    from client.site_check import policy_findings
    from client.site_config import load_site_config

    cfg = load_site_config(args.config)
    try:
        with ingest_progress() as progress:
            dataset = build_site_dataset(cfg, progress=progress)
    except NoUsableImagesError as err:  # data not ready yet: the run's own rules can still be checked
        dataset = err.dataset
        print("note: no usable image at this site yet, so the delta and budget rules were not checked; "
              "`atoll site check --config` checks them once the data is in place")
    findings = policy_findings(cfg, dataset, run=manifest.mechanism, rounds=manifest.num_rounds)
    for f in findings:
        print(f"{'not approved' if f.blocking else 'warning'}: {f}")
    if any(f.blocking for f in findings):
        print("atoll site approve: not approved: this site's privacy policy would refuse every round of this run "
              f"(fix the run, or the [privacy] section of {args.config})")
        return False
    return True


def _list(store: ApprovalStore) -> int:
    status = store.status()
    if not status:
        print("No runs approved at this site.")
        return 0
    print(f"{'manifest':<14}{'status':<10}{'when (UTC)':<27}{'by':<14}{'model':<14}{'rounds':>6}  app")
    manifests = {r["manifest_sha256"]: r["manifest"] for r in store.records() if r["action"] == "approve"}
    for digest, rec in status.items():
        m = manifests[digest]
        state = "approved" if rec["action"] == "approve" else "revoked"
        print(f"{digest[:12]:<14}{state:<10}{rec['at']:<27}{rec['by'][:13]:<14}{m['model'][:13]:<14}"
              f"{m['num_rounds']:>6}  {m['app_hash'][:12]}")
    return 0


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register ``approve`` in the ``atoll site`` group (``subparsers`` = that group's sub-parsers)."""
    p = subparsers.add_parser(
        "approve",
        help="review and approve a run manifest for this site (or list/revoke approvals)",
        description="Show what a run will do with this site's data and what leaves the site, and record "
        "the operator's approval in the site's append-only approval log.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", metavar="SITE_TOML", help="the site config (its [site].state_dir holds approvals)")
    where.add_argument("--state-dir", metavar="DIR", help="the site's state directory, instead of --config")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--manifest", metavar="JSON", help="run-manifest.json from the consortium lead")
    what.add_argument("--list", action="store_true", help="list approved and revoked runs")
    what.add_argument("--revoke", metavar="HASH", help="withdraw the approval of a manifest (full hash)")
    p.add_argument("--yes", action="store_true", help="approve without the interactive question")
    p.add_argument("--by", default=None, help="who approves (default: the login name)")
    p.add_argument("--reason", default=None, help="reason recorded with --revoke")
    p.set_defaults(func=_cmd_approve)
