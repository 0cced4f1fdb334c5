"""``atoll site check``: what a site will train on, what is rejected and why, before any training.

    atoll site check --data DIR [--labels CSV] [--report PATH] [--card PATH]
    atoll site check --config site.toml [--report PATH]
    atoll site check --data DIR --volumes [--labels CSV] [--modalities MR CT] [--report PATH]

``--volumes`` (or ``[data] kind = "volumes"`` in the site config) looks at 3D series instead of 2D images: each
series is assembled by geometry and its mask (DICOM SEG in the folder, or a NIfTI named in the labels CSV by
SeriesInstanceUID, column ``mask``) checked against the image grid; each ``used`` entry of the report is a series
with its ``files``, ``native_shape`` (slices, rows, columns) and ``native_spacing_mm``.

Prints the dataset card (counts only; the part that may be shown to the consortium). ``--report`` writes the
on-site JSON report (every file used or quarantined with its reason; stays on site, written 0600). Exit codes:
0 at least one usable image, 1 none usable, 2 configuration/usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from client.ingest.card import DEFAULT_THRESHOLD, format_card
from client.ingest.dataset import NoUsableImagesError, SiteDataset, build_site_dataset
from client.volumes import build_volume_dataset
from client.volumes.card import format_volume_card
from client.site_config import LABEL_KEYS, ConfigError, SiteConfig, default_site_config, load_site_config

EXIT_OK, EXIT_NO_DATA, EXIT_CONFIG = 0, 1, 2


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
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="site TOML file (owned by the hospital)")
    src.add_argument("--data", type=Path, help="DICOM folder, for a first look without a site TOML")
    p.add_argument("--labels", type=Path, help="labels CSV (with --data); without it every decodable image counts")
    p.add_argument("--label-key", choices=LABEL_KEYS, help="CSV column joined to the DICOM header (with --data)")
    p.add_argument("--label-column", help="CSV column holding the class label (with --data)")
    p.add_argument("--modalities", nargs="+", metavar="CODE",
                   help='allowed modalities with --data (default CR DX; "*" allows any)')
    p.add_argument("--volumes", action="store_true",
                   help="3D series (CT/MR volumes with DICOM SEG or NIfTI masks) instead of 2D images (with --data)")
    p.add_argument("--image-size", type=int, help="preprocessed image side (with --data; default 28)")
    p.add_argument("--report", type=Path, help="write the on-site JSON report here (never share it)")
    p.add_argument("--card", type=Path, help="also write the dataset card as JSON here (shareable)")
    p.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD,
                   help=f"small-count suppression threshold of the card (default {DEFAULT_THRESHOLD})")
    p.set_defaults(func=run_check)


def _config(args: argparse.Namespace) -> SiteConfig:
    if args.config is not None:
        flags = [f for f in ("labels", "label_key", "label_column", "modalities", "image_size")
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
    if args.image_size is not None:
        if not 4 <= args.image_size <= 1024:
            raise ConfigError(f"--image-size must be between 4 and 1024, got {args.image_size}")
        overrides["image_size"] = args.image_size
    return default_site_config(args.data, args.labels, **overrides)


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
        try:
            dataset: SiteDataset = (build_volume_dataset(cfg, None, threshold=args.threshold) if cfg.kind == "volumes"
                                    else build_site_dataset(cfg, threshold=args.threshold))
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
            print(f"\nOn-site report (per-file reasons; do not share): {args.report}")
        if args.card is not None:
            args.card.parent.mkdir(parents=True, exist_ok=True)
            args.card.write_text(json.dumps(dataset.card, indent=2) + "\n", encoding="utf-8")
            print(f"Dataset card (shareable): {args.card}")
    except OSError as e:
        print(f"error: cannot write output ({e.strerror or e.__class__.__name__}): {e.filename}", file=sys.stderr)
        return EXIT_CONFIG
    if failure is not None:
        print(f"\nerror: {failure}", file=sys.stderr)
        if args.report is None:
            print("hint: add --report report.json to see the reason for every file", file=sys.stderr)
        return EXIT_NO_DATA
    if cfg.labels_csv is None and not dataset.card.get("labels", {}).get("provided"):
        print("\nNo labels given: every decodable image counts as used. Training needs a labels CSV.")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m client.site_check site check ...``) until the lead wires ``atoll``."""
    parser = argparse.ArgumentParser(prog="atoll")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
