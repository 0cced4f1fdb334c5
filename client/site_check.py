"""``atoll site check``: what a site will train on, what is rejected and why, before any training.

    atoll site check --data DIR [--labels CSV [--classes A B ...]] [--report PATH] [--card PATH] [--quiet]
    atoll site check --config site.toml [--report PATH]
    atoll site check --data DIR --volumes [--labels CSV] [--modalities MR CT] [--report PATH]

``--volumes`` (or ``[data] kind = "volumes"`` in the site config) looks at 3D series instead of 2D images: each
series is assembled by geometry and its mask (DICOM SEG in the folder, or a NIfTI named in the labels CSV by
SeriesInstanceUID, column ``mask``) checked against the image grid; each ``used`` entry of the report is a series
with its ``files``, ``native_shape`` (slices, rows, columns) and ``native_spacing_mm``.

Prints the dataset card (counts only; the part that may be shown to the consortium). ``--report`` writes the
on-site JSON report (every file used or quarantined with its reason; stays on site, written 0600). Then applies
every rule of the site's budget guard that can be judged before a round (the ``[privacy]`` policy on this data,
the budget left in the ledger): what would refuse every round is an error here. Exit codes: 0 at least one usable
image and a policy the guard accepts, 1 none usable or the budget spent, 2 configuration/usage error (including
a policy the guard would refuse, e.g. DELTA_TOO_LARGE).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.ingest.card import DEFAULT_THRESHOLD, format_card
from client.site_config import LABEL_KEYS, ConfigError, SiteConfig, default_site_config, load_site_config

if TYPE_CHECKING:  # the dataset module loads MONAI and torch: only when a check actually runs
    from client.ingest.dataset import SiteDataset

EXIT_OK, EXIT_NO_DATA, EXIT_CONFIG = 0, 1, 2

if TYPE_CHECKING:  # pragma: no cover - typing only
    from privacy.policy import PolicyFinding
    from contract.mechanism import Mechanism


def add_parser(subparsers: Any) -> None:
    """Register ``site check`` under the ``atoll`` CLI (reusing a ``site`` command another room registered)."""
    site = subparsers.choices.get("site") if hasattr(subparsers, "choices") else None
    if site is None:
        site = subparsers.add_parser("site", help="hospital-site tools (data check)", description="Hospital-site tools.")
    site_sub = next((a for a in site._actions if isinstance(a, argparse._SubParsersAction)), None)
    if site_sub is None:
        site_sub = site.add_subparsers(dest="site_command", metavar="COMMAND")
        site_sub.required = True
    p = site_sub.add_parser(
        "check",
        help="index a DICOM folder: what will be used, what is quarantined and why",
        description=__doc__.split("\n\n")[0],
        epilog="exit codes: 0 usable data and a policy the guard accepts; 1 no usable image, or the privacy budget "
               "is spent; 2 usage or configuration error, including a [privacy] policy the guard would refuse "
               "(e.g. DELTA_TOO_LARGE)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="site TOML file (owned by the hospital)")
    src.add_argument("--data", type=Path, help="DICOM folder, for a first look without a site TOML")
    p.add_argument("--labels", type=Path, help="labels CSV (with --data); without it every decodable image counts")
    p.add_argument("--label-key", choices=LABEL_KEYS, help="CSV column joined to the DICOM header (with --data)")
    p.add_argument("--label-column", help="CSV column holding the class label (with --data)")
    p.add_argument("--modalities", nargs="+", metavar="CODE",
                   help='allowed modalities with --data (default CR DX; "*" allows any)')
    p.add_argument("--classes", nargs="+", metavar="NAME",
                   help="class names when the labels are text, in index order (with --data; e.g. normal pneumonia)")
    p.add_argument("--volumes", action="store_true",
                   help="3D series (CT/MR volumes with DICOM SEG or NIfTI masks) instead of 2D images (with --data)")
    p.add_argument("--image-size", type=int, help="preprocessed image side (with --data; default 28)")
    p.add_argument("--report", type=Path, help="write the on-site JSON report here (never share it)")
    p.add_argument("--card", type=Path, help="also write the dataset card as JSON here (shareable)")
    p.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD,
                   help=f"small-count suppression threshold of the card (default {DEFAULT_THRESHOLD})")
    p.add_argument("--quiet", action="store_true", help="no progress bar (it is shown only on a terminal anyway)")
    p.set_defaults(func=run_check)


def _config(args: argparse.Namespace) -> SiteConfig:
    if args.config is not None:
        flags = [f for f in ("labels", "label_key", "label_column", "classes", "modalities", "image_size")
                 if getattr(args, f, None) is not None] + (["volumes"] if getattr(args, "volumes", False) else [])
        if flags:
            raise ConfigError(f"--{flags[0].replace('_', '-')} only applies with --data; with --config set it in "
                              f"the [data] section of {args.config}")
        return load_site_config(args.config)
    overrides: dict[str, Any] = {}
    if getattr(args, "volumes", False):
        overrides.update(kind="volumes", task="segmentation", modalities=("MR", "CT"),
                         label_key="SeriesInstanceUID", label_column="mask")
    if args.label_key:
        overrides["label_key"] = args.label_key
    if args.label_column:
        overrides["label_column"] = args.label_column
    if args.modalities:
        overrides["modalities"] = tuple(m.upper() for m in args.modalities)
    if args.classes:
        overrides["classes"] = _classes(args.classes)
    if args.image_size is not None:
        if not 4 <= args.image_size <= 1024:
            raise ConfigError(f"--image-size must be between 4 and 1024, got {args.image_size}")
        overrides["image_size"] = args.image_size
    return default_site_config(args.data, args.labels, **overrides)


def _classes(names: list[str]) -> tuple[str, ...]:
    cleaned = tuple(n.strip() for n in names)
    if len(cleaned) < 2 or not all(cleaned):
        raise ConfigError(f"--classes needs at least two non-empty class names, got {' '.join(names)!r}")
    if len(set(cleaned)) != len(cleaned):
        raise ConfigError("--classes: class names must be unique")
    return cleaned


def _write_private(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def run_check(args: argparse.Namespace) -> int:
    """Handler of ``atoll site check``; returns the exit code and prints human messages (no tracebacks)."""
    if args.threshold < 1:
        print("error: --threshold must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    try:
        cfg = _config(args)
        if cfg.source is not None:  # a PACS site: its data is the last complete mirror (`atoll site pull`)
            from client.pacs.mirror import require_complete_mirror

            require_complete_mirror(cfg)
        from client.ingest.dataset import NoUsableImagesError, build_site_dataset  # after config errors
        from client.ingest.progress import ingest_progress
        from client.ingest.quarantine import printable_name
        from client.volumes import build_volume_dataset
        from client.volumes.card import format_volume_card

        try:
            with ingest_progress(False if args.quiet else None) as progress:
                dataset: SiteDataset = (
                    build_volume_dataset(cfg, None, threshold=args.threshold) if cfg.kind == "volumes"
                    else build_site_dataset(cfg, threshold=args.threshold, progress=progress))
            failure = None
        except NoUsableImagesError as e:
            dataset, failure = e.dataset, str(e)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(format_volume_card(dataset.card) if cfg.kind == "volumes" else format_card(dataset.card))
    try:
        if args.report is not None:
            _write_private(args.report, dataset.report)
            print(f"\nOn-site report (per-file reasons; do not share): {printable_name(str(args.report))}")
        if args.card is not None:
            args.card.parent.mkdir(parents=True, exist_ok=True)
            args.card.write_text(json.dumps(dataset.card, indent=2) + "\n", encoding="utf-8")
            print(f"Dataset card (shareable): {printable_name(str(args.card))}")
    except OSError as e:
        print(f"error: cannot write output ({e.strerror or e.__class__.__name__}): {e.filename}", file=sys.stderr)
        return EXIT_CONFIG
    hints = dataset.report.get("hints", [])
    if failure is not None:
        print(f"\nerror: {failure}", file=sys.stderr)
        for hint in hints:
            print(f"hint: {hint}", file=sys.stderr)
        if args.report is None:
            print("hint: add --report report.json to see the reason for every file", file=sys.stderr)
        return EXIT_NO_DATA
    for hint in hints:
        print(f"hint: {hint}", file=sys.stderr)
    code = _check_policy(cfg, dataset)
    if code != EXIT_OK:
        return code
    if cfg.labels_csv is None and not dataset.card.get("labels", {}).get("provided"):
        print("\nNo labels given: every decodable image counts as used. Training needs a labels CSV.")
    return EXIT_OK


def policy_findings(cfg: SiteConfig, dataset: SiteDataset, run: "Mechanism | None" = None,
                    rounds: int = 1) -> list["PolicyFinding"]:
    """The budget guard's rules on this site's data, its ledger and (for ``site approve``) a run's mechanism.

    One call into :func:`privacy.policy.check_policy` with the facts the guard will see at round time: the
    training split's patients (delta rule) and the lifetime history in the site ledger (budget).

    Raises
    ------
    ConfigError: the ledger exists but cannot be read.
    """
    from privacy.guard import charges
    from privacy.ledger import LedgerError
    from privacy.policy import check_policy

    history: list = []
    ledger_path = cfg.state_dir / "ledger.jsonl"
    if cfg.path is not None and ledger_path.is_file():
        from client.runtime import open_site_ledger

        try:
            history = charges(open_site_ledger(cfg).records())
        except (LedgerError, OSError, ValueError) as e:
            raise ConfigError(f"{ledger_path}: the privacy ledger cannot be read ({e})") from None
    patients = dataset.train.num_patients
    return check_policy(cfg.privacy, num_patients=patients or None, history=history, run=run, rounds=rounds)


def _check_policy(cfg: SiteConfig, dataset: SiteDataset) -> int:
    """Print the policy findings; exit 2 for a policy the guard would refuse on this data, 1 for a spent budget."""
    from privacy.policy import BUDGET_EXCEEDED

    try:
        findings = policy_findings(cfg, dataset)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    where = f"{cfg.path}: " if cfg.path is not None else ""
    for f in findings:
        print(f"{'error' if f.blocking else 'warning'}: {where}{f}", file=sys.stderr)
    blocking = [f for f in findings if f.blocking]
    if not blocking:
        return EXIT_OK
    return EXIT_NO_DATA if all(f.code == BUDGET_EXCEEDED for f in blocking) else EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m client.site_check site check ...``) until the lead wires ``atoll``."""
    parser = argparse.ArgumentParser(prog="atoll")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
