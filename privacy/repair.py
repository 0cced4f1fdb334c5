"""Repair of a site ledger's torn last line, in the one direction that is safe: charge it.

A torn tail (no trailing newline) stops every read of the ledger (:class:`privacy.ledger.LedgerTornError`). It
is either a crash mid-write (the record was never acknowledged) or a truncation that cut acknowledged records; the
file cannot tell which, so the repair assumes the worse for privacy and never the better for the budget:

1. the torn bytes are moved to ``<ledger>.torn-<UTC time>`` (kept for the record, never deleted);
2. a signed ``reservation`` record is appended that charges what the torn line charged: canonical JSON writes
   ``charge`` among the first keys, so it is usually readable from the torn prefix; when it is not, the charge is
   the site policy's worst case (smallest sigma, largest q, most steps it allows; sigma 0 = non-DP if the policy
   allows non-DP rounds) or one the operator gives, whichever is larger in epsilon.

The appended record is a normal reservation (``run_id`` ``"ledger-repair"``, round 0, ``repair`` saying where the
charge came from and the torn bytes' SHA-256), so the audit and every later guard count it. What the cut may have
removed *beyond* the torn line is not in the file any more; only a backup (or the server's copy, which the audit
compares) can show it, which docs/security.md says.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from typing import Any

from privacy.guard import BudgetGuard, charges, history_json
from privacy.ledger import LedgerError, LedgerTornError, epsilon_json, sha256_hex, utc_now

REPAIR_RUN_ID = "ledger-repair"
_CHARGE = re.compile(rb'"charge":\[([-0-9.eE+]+),([-0-9.eE+]+),([0-9]+)\]')


def torn_charge(torn: bytes) -> tuple[float, float, int] | None:
    """The ``charge`` a torn record carried, if its prefix holds the whole field."""
    m = _CHARGE.search(torn)
    if m is None:
        return None
    try:
        return float(m.group(1)), float(m.group(2)), int(m.group(3))
    except ValueError:
        return None


def worst_case_charge(guard: BudgetGuard) -> tuple[float, float, int]:
    """The most privacy one round within the site's policy can spend."""
    p = guard.policy
    sigma = 0.0 if p.allow_non_dp else float(p.noise_multiplier[0])
    return sigma, float(p.max_sample_rate), int(p.local_steps[1])


def repair_torn_tail(guard: BudgetGuard, charge: tuple[float, float, int] | None = None) -> dict[str, Any]:
    """Keep a torn last line of ``guard``'s ledger as charged (see module doc); return the appended record.

    ``charge``: what to charge when the torn line's own charge is not readable (default: the policy's worst case);
    the larger in epsilon of it and the torn line's charge is used. Raises :class:`LedgerError` if the ledger has
    no torn tail, or if it is damaged in another way (restore it from backup then).
    """
    ledger = guard.ledger
    try:
        ledger.records()
    except LedgerTornError as exc:
        torn, line_no = exc.torn, exc.line_no
    else:
        raise LedgerError(f"{ledger.path}: no torn last line; nothing to repair")
    fd = os.open(ledger.path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        data = os.pread(fd, len(torn), size - len(torn)) if len(torn) <= size else b""
        if data != torn:
            raise LedgerError(f"{ledger.path}: the ledger changed during the repair; run it again")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        side = ledger.path.with_name(f"{ledger.path.name}.torn-{stamp}")
        with open(side, "xb") as fh:
            fh.write(torn)
            fh.flush()
            os.fsync(fh.fileno())
        os.ftruncate(fd, size - len(torn))
        os.fsync(fd)
    finally:
        os.close(fd)
    readable = torn_charge(torn)
    if readable is None:
        chosen, source = (charge, "operator") if charge else (worst_case_charge(guard), "policy worst case")
    elif charge is not None and guard.epsilon_of([charge]) > guard.epsilon_of([readable]):
        chosen, source = charge, "operator"
    else:
        chosen, source = readable, "torn line"
    with ledger.transaction() as txn:
        hist = charges(txn.records)
        before = guard.epsilon_of(hist)
        after_hist = hist + [chosen]
        after = guard.epsilon_of(after_hist)
        sigma, q, steps = chosen
        rec = txn.append({
            "type": "reservation", "run_id": REPAIR_RUN_ID, "server_round": 0, "dp": sigma > 0,
            "noise_multiplier": float(sigma), "clip_norm": float(guard.policy.clip_norm[1]), "sample_rate": float(q),
            "steps": int(steps), "charge": [float(sigma), float(q), int(steps)],
            "accountant": guard.policy.accountant, "delta": guard.delta, "history": history_json(after_hist),
            "epsilon_before": epsilon_json(before), "epsilon_after": epsilon_json(after),
            "max_epsilon": guard.policy.max_epsilon, "weights_in_sha256": sha256_hex(torn),
            "policy_sha256": guard.policy_sha256, **guard._delta_basis(),
            "repair": {"line": line_no, "torn_bytes": len(torn), "torn_sha256": hashlib.sha256(torn).hexdigest(),
                       "charge_from": source, "moved_to": side.name, "time": utc_now()},
        })
    return json.loads(json.dumps(rec))
