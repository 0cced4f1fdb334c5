"""`atoll run export RUN_FOLDER --out DIR [--round N]`: the run's model as a MONAI bundle plus its model card.

Lives in atoll/ (like `atoll run manifest`) because the model card names the run manifest as the sites compute it
(client.manifest) and the verdict of the auditor's own verification (privacy.audit); only the CLI composes sides.
The bundle itself is written by server.export, the card by server.model_card.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3  # as atoll.cli.EXIT_CODES


def add_parser(run_sub: argparse._SubParsersAction, formatter) -> None:
    p = run_sub.add_parser(
        "export", help="export a run's global model as a MONAI bundle with a model card",
        formatter_class=formatter,
        description="Writes DIR as a MONAI bundle: configs/metadata.json, configs/inference.json (network "
                    "definition and the task's preprocessing, the sites' own transforms), models/model.pt (the "
                    "round's global weights), models/model.ts (TorchScript, MONAI ckpt_export), and the model card "
                    "docs/README.md + docs/model_card.json (task and labels, sites with their dataset cards, each "
                    "site's DP guarantee, rounds and strategy, held-out and per-site metrics, manifest and app "
                    "hash, the ledger verification verdict and its date). Run the bundle with MONAI: python -m "
                    "monai.bundle run --config_file DIR/configs/inference.json --meta_file "
                    "DIR/configs/metadata.json --bundle_root DIR --input_dir FOLDER (DICOM images, or NIfTI "
                    "volumes / DICOM series folders for a 3D task); predictions go to DIR/predictions.")
    p.add_argument("run_dir", metavar="RUN_FOLDER", help="the run's folder (RUN_DIR/<run-name>)")
    p.add_argument("--out", required=True, metavar="DIR", help="the bundle folder to write (must not exist)")
    p.add_argument("--round", type=int, default=None, metavar="N",
                   help="export the global model after round N (default: the last completed round)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in DIR")
    p.add_argument("--ema", action="store_true",
                   help="export the server's EMA of the global model (run config server-ema > 0) instead")
    p.add_argument("--heldout", metavar="FILE", default=None,
                   help="held-out test metrics for the card: a demo's summary.json or {\"round\": N, \"metrics\": "
                        "{...}} (default: the demo's summary.json two folders above the run, when it is this run's)")
    p.add_argument("--cards", metavar="DIR", default=None,
                   help="folder of the sites' dataset cards as <site>.json (`atoll site check --card`)")
    p.add_argument("--manifest", metavar="FILE", default=None,
                   help="the run-manifest.json the sites approved (default: computed from the run's settings with "
                        "this installation's app bundle, as `atoll run manifest` does)")
    p.add_argument("--keys", metavar="DIR", default=None,
                   help="enrolled site keys for the audit (default: the run's keys folder when it exists here)")
    p.add_argument("--site-ledger", action="append", default=[], metavar="FILE",
                   help="a site's own ledger for the audit's cross-check (repeatable)")
    p.set_defaults(func=run_export)


def _err(text: str) -> None:
    print(f"atoll run export: {text}", file=sys.stderr)


def _manifest(path: str | None, settings) -> dict:
    from client.approval import ManifestError, load_manifest, manifest_hash

    if path:
        try:
            m = load_manifest(path)
        except ManifestError as exc:
            raise ValueError(f"--manifest: {exc}") from None
        return {"sha256": manifest_hash(m), "app_hash": m.app_hash, "source": f"{Path(path).name}, as approved"}
    from client.manifest import build_run_manifest

    m = build_run_manifest(settings.round_config("manifest", 1))
    return {"sha256": manifest_hash(m), "app_hash": m.app_hash,
            "source": "recomputed at export from the run's settings and the app installed there"}


def _settings(run):
    """RunSettings of the run folder (settings.json is ``dataclasses.asdict`` of it)."""
    from contract import Mechanism
    from server.settings import RunSettings

    s = dict(run.settings)
    s["task"] = run.task
    s["mechanism"] = Mechanism(**{k: tuple(v) if isinstance(v, list) else v for k, v in s["mechanism"].items()})
    if isinstance(s.get("server_options"), dict):
        from contract.server_options import ServerOptions

        s["server_options"] = ServerOptions(**s["server_options"])
    known = set(RunSettings.__dataclass_fields__)
    return RunSettings(**{k: v for k, v in s.items() if k in known})


def _audit(run_dir: Path, keys: str | None, site_ledgers: list[str]) -> dict:
    from privacy.audit import verify_run
    from server.export import exported_at

    recorded = run_dir / "settings.json"
    if keys is None:
        k = json.loads(recorded.read_text()).get("keys_dir") or ""
        keys = k if k and Path(k).is_dir() else None
    result = verify_run(run_dir, site_ledgers, keys)
    return {"verdict": "PASS" if result.ok else "FAIL", "date": exported_at(), "errors": len(result.errors),
            "warnings": sum(f.level == "warning" for f in result.findings),
            "cross_checked_sites": sorted(s for s, v in result.sites.items() if v.cross_checked),
            "sites": {s: v.one_line() for s, v in sorted(result.sites.items())},
            "findings": [str(f) for f in result.findings][:50]}


def run_export(args: argparse.Namespace) -> int:
    from server.export import ExportError, bundle_layout, export_bundle, exported_at, read_run
    from server.model_card import CardInputError, heldout_from_summary, load_dataset_cards

    try:
        run = read_run(args.run_dir, args.round, ema=args.ema)
    except ExportError as exc:
        _err(str(exc))
        missing = (not Path(args.run_dir).is_dir() or not (Path(args.run_dir) / "settings.json").is_file()
                   or str(exc).startswith("--round"))
        return EXIT_NOT_FOUND if missing else EXIT_USAGE  # as `atoll run status`: not a run folder is "not found"
    print(f"exporting run {run.root.name}, round {run.round} ({run.task.describe()}, model {run.settings['model']})"
          " — loads PyTorch and MONAI ...", flush=True)
    sites = sorted({name for e in run.history for name in e["sites"]})
    try:
        heldout = None
        summary = Path(args.heldout) if args.heldout else run.root.parent.parent / "summary.json"
        if args.heldout or summary.is_file():
            try:
                heldout = heldout_from_summary(summary, run.root.name, run.round)
            except CardInputError:
                if args.heldout:
                    raise
        cards = load_dataset_cards(args.cards, sites)
        try:
            settings = _settings(run)
        except (KeyError, TypeError, ValueError) as exc:  # a settings.json from an older Atoll
            if args.manifest is None:
                print(f"note: the run manifest cannot be recomputed from {run.root / 'settings.json'} "
                      f"({exc.__class__.__name__}: {exc}); pass --manifest run-manifest.json to name it in the card")
            settings = None
        manifest = _manifest(args.manifest, settings) if (args.manifest or settings is not None) else None
    except (CardInputError, ValueError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    registry = {}
    keys_dir = args.keys or run.settings.get("keys_dir") or ""
    if keys_dir and Path(keys_dir).is_dir():
        from privacy.registry import RegistryError, SiteRegistry

        try:
            reg = SiteRegistry.load(keys_dir)
        except RegistryError:
            reg = None
        if reg is not None:
            registry = {e.name: {"train_examples": e.train_examples, "train_patients": e.train_patients}
                        for e in reg.entries.values()}
    print("verifying the run's privacy ledger (atoll audit verify) for the model card ...", flush=True)
    audit = _audit(run.root, args.keys, args.site_ledger)
    try:
        card = export_bundle(run.root, args.out, round_=run.round, overwrite=args.overwrite, ema=args.ema,
                             card_facts={"heldout": heldout, "dataset_cards": cards, "audit": audit,
                                         "manifest": manifest, "exported_at": exported_at(),
                                         "registry_counts": registry})
    except ExportError as exc:
        _err(str(exc))
        return EXIT_USAGE
    print(f"wrote the MONAI bundle {args.out}:")
    for line in bundle_layout(args.out):
        print(f"  {line}")
    h = card["metrics"]["heldout"]
    if h:
        print("held-out test (round %d): %s" % (h["round"], ", ".join(f"{k} {v:.4f}" for k, v in h["metrics"].items()
                                                                      if isinstance(v, float))))
    print(f"ledger verification: {audit['verdict']} ({audit['errors']} error(s), {audit['warnings']} warning(s))")
    print(f"run it: python -m monai.bundle run --config_file {args.out}/configs/inference.json --meta_file "
          f"{args.out}/configs/metadata.json --bundle_root {args.out} --input_dir FOLDER")
    return EXIT_OK
