"""``atoll site repair-ledger --config SITE.toml [--charge SIGMA,Q,STEPS]``: keep a torn ledger line as charged.

When the site's ledger ends in a torn line (a crash mid-write, or a truncation), every round is refused until the
site admin either restores the ledger from backup or runs this command. It moves the torn bytes aside
(``ledger.jsonl.torn-<time>``) and appends a signed reservation that charges what the torn line charged, or the
policy's worst case when that cannot be read (:mod:`privacy.repair`). It can only raise the spent epsilon.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def add_parser(site_subparsers: argparse._SubParsersAction) -> None:
    p = site_subparsers.add_parser(
        "repair-ledger", help="keep a torn last ledger line as charged (can only raise epsilon)",
        description=__doc__.split("\n\n")[1])
    p.add_argument("--config", required=True, type=Path, help="the site's site.toml")
    p.add_argument("--charge", default=None, metavar="SIGMA,Q,STEPS",
                   help="what to charge if the torn line's own charge is unreadable (default: the most one round "
                        "within the site policy can spend); the larger of the two in epsilon is charged")
    p.set_defaults(func=repair_ledger)


def _charge(text: str | None) -> tuple[float, float, int] | None:
    if text is None:
        return None
    try:
        s, q, n = text.split(",")
        out = (float(s), float(q), int(n))
    except ValueError:
        raise ValueError(f"--charge {text!r}: expected SIGMA,Q,STEPS, e.g. 1.0,0.1,100") from None
    if not (out[0] >= 0 and 0 < out[1] <= 1 and out[2] >= 1 and math.isfinite(out[0])):
        raise ValueError(f"--charge {text!r}: need sigma >= 0, 0 < q <= 1, steps >= 1")
    return out


def repair_ledger(args: argparse.Namespace) -> int:
    from client.runtime import open_site_ledger
    from client.site_config import ConfigError, load_site_config
    from privacy.guard import BudgetGuard
    from privacy.keys import KeyFileError
    from privacy.ledger import LedgerError, LedgerTornError, read_jsonl
    from privacy.repair import repair_torn_tail

    try:
        charge = _charge(args.charge)
        cfg = load_site_config(args.config)
        ledger = open_site_ledger(cfg)
    except (ValueError, ConfigError, KeyFileError) as exc:
        print(f"atoll site repair-ledger: {exc}")
        return 2
    # the patient count the ledger's delta was derived from: the newest record that names it (no data is read)
    patients = None
    if ledger.path.exists():
        for _line, rec, _raw in read_jsonl(ledger.path):
            if rec is not None and isinstance(rec.get("patients"), int):
                patients = rec["patients"]
    if patients is None:
        from client.ingest import build_site_dataset

        patients = build_site_dataset(cfg).train.num_patients
    try:
        guard = BudgetGuard(ledger, cfg.privacy, num_patients=patients)
        try:
            before = guard.epsilon_of(
                [tuple(r["charge"]) for _l, r, _x in read_jsonl(ledger.path) if r and r.get("type") == "reservation"])
        except (KeyError, TypeError, ValueError):
            before = float("nan")
        rec = repair_torn_tail(guard, charge)
    except LedgerTornError as exc:  # pragma: no cover - repair_torn_tail handles the torn tail itself
        print(f"atoll site repair-ledger: {exc}")
        return 1
    except LedgerError as exc:
        print(f"atoll site repair-ledger: {exc}")
        return 1
    info = rec["repair"]
    print(f"{ledger.path} line {info['line']}: torn line ({info['torn_bytes']} bytes) moved to {info['moved_to']}")
    print(f"charged again as a signed reservation (seq {rec['seq']}, charge from the {info['charge_from']}): "
          f"sigma={rec['charge'][0]:g}, q={rec['charge'][1]:g}, {rec['charge'][2]} steps")
    print(f"spent epsilon: {before:.4f} -> {float(rec['epsilon_after']):.4f} of {rec['max_epsilon']:g}")
    return 0
