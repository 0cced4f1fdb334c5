"""CLI of the privacy room: ``atoll site init`` and ``atoll audit verify|report``.

The lead's ``atoll/cli.py`` passes its sub-parser objects in; every handler returns an exit code and prints human
messages (expected errors never show a traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3  # as atoll.cli.EXIT_CODES
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEY_FILE = "site_ed25519.pem"
SECRET_FILE = "pseudonym.secret"
CONFIG_FILE = "site.toml"


def add_site_init_parser(site_subparsers: argparse._SubParsersAction) -> None:
    p = site_subparsers.add_parser(
        "init", help="create a site identity: signing key, pseudonym secret, site.toml template",
        description="Creates DIR/site_ed25519.pem (Ed25519 private key, mode 0600), DIR/site_ed25519.pub, "
                    "DIR/pseudonym.secret (32 random bytes, hex, mode 0600) and a commented DIR/site.toml. "
                    "Refuses to overwrite any of them. Send only the .pub file and the key id to the consortium.")
    p.add_argument("--out", required=True, help="folder for the site's files (created if absent)")
    p.add_argument("--name", required=True, help="the site's name as the consortium will know it (no PHI)")
    p.add_argument("--dicom", metavar="DIR", default=None,
                   help="the site's DICOM folder (PACS export) to write into site.toml [data] (else: edit it there)")
    p.add_argument("--labels", metavar="CSV", default=None, help="the labels CSV to write into site.toml [data]")
    p.add_argument("--label-key", metavar="KEY", default="SOPInstanceUID",
                   choices=("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "AccessionNumber"),
                   help="the DICOM attribute the CSV's first column holds (SOPInstanceUID, SeriesInstanceUID, "
                        "StudyInstanceUID or AccessionNumber)")
    p.add_argument("--label-column", metavar="NAME", default="label", help="the CSV column with the class label")
    p.add_argument("--passphrase-env", metavar="VAR", default=None,
                   help="encrypt the private key with the passphrase in environment variable VAR "
                        "(the ClientApp reads it from $ATOLL_SITE_KEY_PASSPHRASE)")
    p.set_defaults(func=site_init)


def add_audit_parser(audit_subparsers: argparse._SubParsersAction) -> None:
    v = audit_subparsers.add_parser(
        "verify", help="verify a run's signed privacy ledger against site ledgers and enrolled keys",
        description="Checks signatures, hash chains, the server copy against each site's own ledger, budgets, and "
                    "recomputes every epsilon with Opacus and independently with Google's dp_accounting. "
                    "Exit 0 only when everything holds, 1 when a check fails, 3 when RUN_DIR is not a run folder.")
    _common(v)
    v.add_argument("--json", action="store_true", help="print the full result as JSON")
    v.set_defaults(func=audit_verify)

    r = audit_subparsers.add_parser(
        "report", help="render a self-contained HTML privacy report of a run",
        description="One HTML file with inline SVG (no network assets): epsilon per site over rounds against each "
                    "budget, mechanism parameters, what each site released in the clear, verification results.")
    _common(r)
    r.add_argument("--out", required=True, help="HTML file to write")
    r.add_argument("--pdf", default=None, help="also print the report to this PDF with headless Chromium")
    r.set_defaults(func=audit_report)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder (holds ledger.jsonl)")
    p.add_argument("--site-ledger", action="append", default=[], metavar="FILE",
                   help="a site's own ledger.jsonl to cross-check (repeat per site)")
    p.add_argument("--keys-dir", "--keys", dest="keys", default=None, metavar="DIR",
                   help="folder of the enrolled sites' ledger public keys, one <site>.pub per site (each site's "
                        "site_ed25519.pub from `atoll site init`, renamed to its site name). Default: the "
                        "--keys-dir the run was started with (RUN_DIR/settings.json) if that folder exists here, "
                        "else RUN_DIR/../../consortium/keys (the demo's layout), else RUN_DIR/keys")
    p.add_argument("--consortium-key", default=None, metavar="FILE",
                   help="the consortium's pinned digest public key (default: consortium_ed25519.pub in the keys "
                        "folder); it verifies the signed round digests that anchor the ledgers")


# ------------------------------------------------------------------------------------------------ site init


def site_toml_template(name: str, dicom_dir: str | None = None, labels_csv: str | None = None,
                       label_key: str = "SOPInstanceUID", label_column: str = "label") -> str:
    """The commented site.toml of `atoll site init`; the [data] lines given are filled in, the rest say EDIT."""
    dicom_line = (f'dicom_dir = {_toml_str(dicom_dir)}' if dicom_dir
                  else 'dicom_dir = "dicom"                 # EDIT: your PACS export folder')
    labels_line = (f'labels_csv = {_toml_str(labels_csv)}' if labels_csv
                   else '# labels_csv = "labels.csv"         # EDIT: required for training; one row per labelled '
                        'image/series/study')
    return f'''# Atoll site configuration for "{name}". Owned by the hospital, never by the consortium.
# Relative paths resolve against this file's folder. Unknown keys are errors (a typo never falls back silently).

[site]
name = "{name}"                     # label shown to the consortium (no patient or staff data)
state_dir = "state"                 # ledger (privacy budget history) and cache live here; back it up, never delete
secret_file = "{SECRET_FILE}"       # HMAC key for patient pseudonyms (0600); losing it re-keys every patient
signing_key = "{KEY_FILE}"          # Ed25519 key that signs the privacy ledger (0600)
device = "auto"                     # auto | cpu | cuda | cuda:N

[data]
{dicom_line}
{labels_line}
label_key = "{label_key}"        # SOPInstanceUID | SeriesInstanceUID | StudyInstanceUID | AccessionNumber
label_column = {_toml_str(label_column)}
task = "classification"
modalities = ["CR", "DX"]
image_size = 28
val_fraction = 0.2
seed = 0

[privacy]
# The site's lifetime privacy budget for this dataset (patient-level). Rounds that would exceed it are refused.
max_epsilon = 8.0
# 0 = auto: 1/(10 x patients). A larger explicit delta is refused unless allow_large_delta = true.
delta = 0.0
accountant = "rdp"                  # rdp | prv (Opacus accountants)
noise_multiplier = [0.5, 10.0]      # allowed sigma range [min, max]
clip_norm = [0.1, 10.0]             # allowed clip norm C range
local_steps = [1, 1000]             # allowed DP-SGD steps per round
max_sample_rate = 1.0               # largest fraction of patients sampled per step
allow_non_dp = false                # true lets the consortium train WITHOUT privacy (epsilon becomes infinite)
# What leaves the site in the clear besides the DP-protected update:
released_metrics = ["num-examples", "train_loss", "val_loss", "val_accuracy", "val_auc"]
'''


def _toml_str(text: str) -> str:
    import json

    return json.dumps(str(text))  # a JSON string is a valid TOML basic string


def site_init(args: argparse.Namespace) -> int:
    from privacy.keys import KeyFileError, generate_private_key, key_id, write_private_key, write_public_key

    name = args.name
    if not _SITE_NAME.match(name or ""):
        print(f"error: --name {name!r}: use letters, digits, '.', '_' or '-' (at most 64 characters, no spaces)",
              file=sys.stderr)
        return 2
    out = Path(args.out).expanduser().resolve()
    dicom = labels = None
    for flag, value in (("--dicom", getattr(args, "dicom", None)), ("--labels", getattr(args, "labels", None))):
        if value is None:
            continue
        path = Path(value).expanduser().resolve()
        if not (path.is_dir() if flag == "--dicom" else path.is_file()):
            print(f"error: {flag} {value}: no such {'folder' if flag == '--dicom' else 'file'}", file=sys.stderr)
            return EXIT_NOT_FOUND
        dicom, labels = (str(path), labels) if flag == "--dicom" else (dicom, str(path))
    key_path, pub_path = out / KEY_FILE, out / KEY_FILE.replace(".pem", ".pub")
    secret_path, cfg_path = out / SECRET_FILE, out / CONFIG_FILE
    existing = [p for p in (key_path, pub_path, secret_path, cfg_path) if p.exists()]
    if existing:
        print(f"error: {', '.join(str(p) for p in existing)} already exist(s); refusing to overwrite a site identity "
              "(choose another --out or move the files away)", file=sys.stderr)
        return 1
    passphrase = None
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if not value:
            print(f"error: --passphrase-env {args.passphrase_env}: that environment variable is unset or empty",
                  file=sys.stderr)
            return 2
        passphrase = value.encode("utf-8")
    try:
        out.mkdir(parents=True, exist_ok=True)
        key = generate_private_key()
        write_private_key(key, key_path, passphrase=passphrase)
        write_public_key(key, pub_path)
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(site_toml_template(name, dicom, labels, getattr(args, "label_key", "SOPInstanceUID"),
                                        getattr(args, "label_column", "label")))
    except (KeyFileError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    kid = key_id(key)
    print(f"site {name!r} initialised in {out}")
    print(f"  private key   {key_path} (0600{', passphrase-protected' if passphrase else ''}) — never leaves the site")
    print(f"  pseudonym key {secret_path} (0600) — never leaves the site; back it up")
    print(f"  config        {cfg_path} — " + ("review [data] and [privacy]" if dicom and labels
                                                else "edit [data] (dicom_dir, labels_csv) and review [privacy]"))
    print(f"check the data next:  atoll site check --config {cfg_path}")
    print("send to the consortium (and nothing else):")
    print(f"  public key    {pub_path}")
    print(f"  key id        {kid}")
    print(f"  site name     {name}   (the lead stores the key as KEYS_DIR/{name}.pub: `atoll run start --keys-dir`)")
    if passphrase and args.passphrase_env != "ATOLL_SITE_KEY_PASSPHRASE":
        print("note: the ClientApp reads the passphrase from $ATOLL_SITE_KEY_PASSPHRASE")
    return 0


# ------------------------------------------------------------------------------------------------ audit


def _run_folder_problem(run_dir: str) -> str | None:
    """Why ``run_dir`` is not a run folder (no ledger copy, no settings), or None."""
    root = Path(run_dir)
    if not root.is_dir():
        return f"{root} does not exist (give the run's folder, RUN_DIR/<run-name>)"
    if not (root / "ledger.jsonl").is_file() and not (root / "settings.json").is_file():
        runs = sorted(p.name for p in root.iterdir() if (p / "settings.json").is_file())
        hint = f"; it holds the runs {', '.join(runs[-5:])}: pass {root / runs[-1]}" if runs else ""
        return f"{root} is not a run folder (no ledger.jsonl, no settings.json){hint}"
    return None


def _keys_dir(args: argparse.Namespace) -> str | None:
    """--keys-dir, else the keys folder the run was started with when it exists on this machine."""
    import json

    if args.keys:
        return args.keys
    try:
        recorded = json.loads((Path(args.run_dir) / "settings.json").read_text()).get("keys_dir") or ""
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if recorded and Path(recorded).is_dir() else None


def run_status_line(run_dir: str | Path) -> str | None:
    """How the run ended, from its status.json (e.g. 'stopped by the lead at round 2 of 3 ...'), or None."""
    import json

    try:
        status = json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return f"{status.get('status')}" + (f" — {status['reason']}" if status.get("reason") else "")


@contextlib.contextmanager
def audit_progress():
    """A progress bar on stderr while records are recomputed (a terminal only; nothing in pipes or logs)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("recomputing ε of each record"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("audit", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def audit_verify(args: argparse.Namespace) -> int:
    problem = _run_folder_problem(args.run_dir)
    if problem:
        print(f"atoll audit verify: {problem}", file=sys.stderr)
        return EXIT_NOT_FOUND
    from privacy.audit import result_json, verify_run

    with audit_progress() as progress:
        result = verify_run(args.run_dir, args.site_ledger, _keys_dir(args), args.consortium_key, progress)
    status = run_status_line(args.run_dir)
    if args.json:
        import json

        print(json.dumps({**json.loads(result_json(result)), "run_status": status}, indent=2))
    else:
        text = result.text()
        if status:  # how the run ended, next to the verdict: a lead's stop is a stop, not a gap
            text = text.replace("\n", f"\nrun status: {status}\n", 1)
        print(text)
    return EXIT_OK if result.ok else EXIT_FAILED


def audit_report(args: argparse.Namespace) -> int:
    problem = _run_folder_problem(args.run_dir)
    if problem:
        print(f"atoll audit report: {problem}", file=sys.stderr)
        return EXIT_NOT_FOUND
    from privacy.audit import verify_run
    from privacy.report import print_pdf, render_report

    with audit_progress() as progress:
        result = verify_run(args.run_dir, args.site_ledger, _keys_dir(args), args.consortium_key, progress)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_report(result, Path(args.run_dir)), encoding="utf-8")
    except OSError as exc:
        print(f"error: cannot write {out}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    print(f"report written: {out} (verification {'PASS' if result.ok else 'FAIL'})")
    if args.pdf:
        problem = print_pdf(out, Path(args.pdf))
        if problem:
            print(f"error: PDF not written: {problem}", file=sys.stderr)
            return EXIT_FAILED
        print(f"PDF written: {args.pdf}")
    return EXIT_OK
