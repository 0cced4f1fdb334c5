"""Independent audit of a run's privacy ledger: ``atoll audit verify RUN_DIR [--site-ledger FILE ...] [--keys DIR]``.

What is checked (every failure is a :class:`Finding` naming the source, line, site, run, round and field):

1. **Signatures** of every record (server copy and site ledgers) against the enrolled ``<site>.pub`` in the keys
   folder; an unsigned record, an unenrolled site, a key-id mismatch or a bad signature is an error.
2. **Chains.** Site ledger: ``seq`` equals line - 1 and ``prev`` equals the hash of the previous line (so an
   edited, dropped, swapped or inserted record breaks it). Server copy: per site, ``seq`` strictly increasing,
   ``prev`` linked where ``seq`` is consecutive, ``epsilon_after`` never decreasing.
3. **Server copy vs each site's own ledger:** the site's ``round`` records of this run, in order, are exactly the
   server's records of that site (nothing dropped, reordered or added; compared by record hash).
4. **Accounting.** Site ledger: every record's ``history`` equals the merge of all ``charge`` s of the
   reservations before it (a reservation that disappeared or was altered shows here); every round completes a
   reservation with the same mechanism. Every record (both copies): ``epsilon_after`` (and ``epsilon_before``)
   recomputed from the recorded ``history`` with **Opacus** (the recorded accountant, same code as the site) and
   **independently with Google's dp_accounting**: ``RdpAccountant`` composing
   ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` ``steps`` times for RDP records, and for PRV records its
   ``PLDAccountant`` (PRV and PLD are both tight numerical accountants; comparing a PRV number to an RDP bound
   would flag every honest PRV record). A recorded epsilon *lower* than a recomputation by more than the
   tolerance is an error (an under-count); higher is a warning (over-counting is safe).
   Tolerances: Opacus recomputation ``rel 1e-6`` (same code, only float noise); dp_accounting
   ``rel 1% + abs 0.01``. dp_accounting's RDP at fractional orders is looser than Opacus' (Opacus matches a
   high-precision integration), so at large sampling rates (q >= 0.1) an honest RDP record can be 2-5% below
   dp_accounting's RDP (e.g. sigma=1.5, q=0.3, 100 steps, delta=1e-3: 9.948 vs 10.15). Such a record is then
   checked against dp_accounting's tight ``PLDAccountant`` instead, and is an error only if below that too.
5. **Budgets:** no DP record's ``epsilon_after`` above the site's declared ``max_epsilon``. A non-DP round
   (epsilon infinite, allowed only by ``allow_non_dp``) is a warning, shown in the verdict.

Keys folder default: ``RUN_DIR/../../consortium/keys`` if it exists (the demo's layout: DIR/runs/<run>), else
``RUN_DIR/keys``. Without any keys folder signatures cannot be checked, which is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from privacy.accounting import AccountingError, canonical_history, compute_epsilon
from privacy.ledger import (
    GENESIS, LedgerError, envelope_problems, epsilon_value, read_jsonl, record_hash, verify_record,
)

OPACUS_RTOL = 1e-6
INDEPENDENT_RTOL = 0.01
INDEPENDENT_ATOL = 0.01
BUDGET_ATOL = 1e-9


@dataclass
class Finding:
    level: str                  # error | warning
    message: str
    site: str | None = None
    source: str = ""            # "server copy" or a site ledger path
    line: int | None = None
    run_id: str | None = None
    server_round: int | None = None
    field: str | None = None

    def where(self) -> str:
        parts = [self.source or "?"]
        if self.line is not None:
            parts.append(f"line {self.line}")
        ctx = []
        if self.site:
            ctx.append(f"site {self.site}")
        if self.run_id is not None:
            ctx.append(f"run {self.run_id}")
        if self.server_round is not None:
            ctx.append(f"round {self.server_round}")
        s = " ".join(parts) + (f" ({', '.join(ctx)})" if ctx else "")
        if self.field:
            s += f" field '{self.field}'"
        return s

    def __str__(self) -> str:
        return f"{self.level.upper()} {self.where()}: {self.message}"


@dataclass
class RoundPoint:
    """One round record of the server copy, as the report draws it."""

    run_id: str
    server_round: int
    seq: int
    line: int
    dp: bool
    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps: int
    accountant: str
    delta: float
    epsilon_before: float
    epsilon_after: float
    max_epsilon: float
    opacus_epsilon: float | None
    independent_epsilon: float | None
    independent_method: str
    released_metrics: list[str]


@dataclass
class SiteVerdict:
    site: str
    ok: bool = True
    server_records: int = 0
    site_ledger: str | None = None
    site_ledger_records: int = 0
    reservations: int = 0
    refusals: int = 0
    cross_checked: bool = False
    max_epsilon: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    non_dp_rounds: int = 0
    points: list[RoundPoint] = field(default_factory=list)
    refusal_codes: dict[str, int] = field(default_factory=dict)
    released_metrics: list[str] = field(default_factory=list)

    def one_line(self) -> str:
        verdict = "OK" if self.ok else "FAIL"
        eps = "ε=∞ (non-DP round)" if self.epsilon is not None and math.isinf(self.epsilon) else (
            f"ε={self.epsilon:.4f}" if self.epsilon is not None else "ε=n/a")
        budget = f" of {self.max_epsilon:g}" if self.max_epsilon is not None else ""
        d = f", δ={self.delta:.2e}" if self.delta else ""
        acc = f", {self.accountant}" if self.accountant else ""
        led = (f"; matches its own ledger ({self.site_ledger_records} records)" if self.cross_checked and self.ok
               else "; own ledger checked" if self.cross_checked else "; no site ledger given (not cross-checked)")
        return f"{self.site}: {verdict} — {self.server_records} round record(s), {eps}{budget}{d}{acc}{led}"


@dataclass
class AuditResult:
    run_dir: str
    keys_dir: str | None
    findings: list[Finding] = field(default_factory=list)
    sites: dict[str, SiteVerdict] = field(default_factory=dict)
    server_records: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def text(self) -> str:
        lines = [f"run: {self.run_dir}", f"keys: {self.keys_dir or '(none found)'}",
                 f"server copy: {self.server_records} record(s)"]
        for name in sorted(self.sites):
            lines.append("  " + self.sites[name].one_line())
        for f in self.findings:
            lines.append("  " + str(f))
        n_err, n_warn = len(self.errors), sum(f.level == "warning" for f in self.findings)
        lines.append(f"verdict: {'PASS' if self.ok else 'FAIL'} ({n_err} error(s), {n_warn} warning(s))")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ recomputation


@lru_cache(maxsize=1024)
def _google_rdp_step(sigma: float, q: float):
    import dp_accounting

    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 1)
    return acc.orders, acc.rdp


@lru_cache(maxsize=8192)
def google_epsilon(hist: tuple[tuple[float, float, int], ...], delta: float, method: str = "rdp") -> float:
    """Epsilon of a canonical history with Google's dp_accounting (``rdp``: RdpAccountant; ``pld``: PLDAccountant).

    RDP: the per-step curve of each ``(sigma, q)`` comes from ``RdpAccountant.compose(PoissonSampledDpEvent(q,
    GaussianDpEvent(sigma)), 1).rdp``; the accountant's ``compose(event, steps)`` is ``steps *`` that curve, so
    the sum is what composing every entry would give (tests check equality), without recomputing curves.
    """
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant as rdp_mod

    if not hist:
        return 0.0
    if any(s == 0 for s, _, _ in hist):
        return math.inf
    if method == "rdp":
        orders = None
        total = 0.0
        for s, q, n in hist:
            orders, curve = _google_rdp_step(s, q)
            total = total + n * curve
        return float(rdp_mod.compute_epsilon(orders, total, delta)[0])
    acc = dp_accounting.pld.PLDAccountant()
    for s, q, n in hist:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n)
    return float(acc.get_epsilon(delta))


def _hist_of(value: Any) -> tuple[tuple[float, float, int], ...]:
    if not isinstance(value, list):
        raise AccountingError(f"history {value!r} is not a list")
    return canonical_history([tuple(e) if isinstance(e, list) else e for e in value])


def _covers(big: tuple, small: tuple) -> bool:
    """True when every ``(sigma, q)`` of ``small`` is in ``big`` with at least as many steps."""
    steps = {(s, q): n for s, q, n in big}
    return all(steps.get((s, q), 0) >= n for s, q, n in small)


def _hist_minus(hist: tuple, charge: tuple[float, float, int]) -> tuple:
    out = []
    removed = False
    for s, q, n in hist:
        if not removed and (s, q) == (charge[0], charge[1]) and n >= charge[2]:
            n -= charge[2]
            removed = True
        out.append((s, q, n))
    if not removed:
        raise AccountingError(f"the round's charge {list(charge)} is not part of its recorded history")
    return canonical_history(out)


# ------------------------------------------------------------------------------------------------ the audit


class _Auditor:
    def __init__(self, run_dir: Path, keys_dir: Path | None) -> None:
        self.run_dir = run_dir
        self.keys_dir = keys_dir
        self.result = AuditResult(str(run_dir), str(keys_dir) if keys_dir else None)
        self._keys: dict[str, Any] = {}
        self._missing_key_reported: set[str] = set()

    def add(self, level: str, message: str, rec: dict | None = None, **kw: Any) -> None:
        if rec is not None and isinstance(rec, dict):
            kw.setdefault("site", rec.get("site") if isinstance(rec.get("site"), str) else None)
            kw.setdefault("run_id", rec.get("run_id"))
            kw.setdefault("server_round", rec.get("server_round"))
        f = Finding(level, message, **kw)
        self.result.findings.append(f)
        if level == "error" and f.site:
            self.verdict(f.site).ok = False

    def verdict(self, site: str) -> SiteVerdict:
        return self.result.sites.setdefault(site, SiteVerdict(site))

    # ---------------------------------------------------------- signatures

    def check_signature(self, rec: dict, source: str, line: int) -> None:
        from privacy.keys import KeyFileError, load_public_key

        site = rec["site"]
        if self.keys_dir is None:
            return  # reported once, globally
        if site not in self._keys:
            path = self.keys_dir / f"{site}.pub"
            try:
                self._keys[site] = load_public_key(path)
            except KeyFileError as exc:
                self._keys[site] = None
                self.add("error", f"site {site!r} is not enrolled or its key is unusable: {exc}", site=site,
                         source=str(path))
        pub = self._keys[site]
        if pub is None:
            return
        try:
            verify_record(rec, pub)
        except LedgerError as exc:
            msg = str(exc)
            fld = "key_id" if msg.startswith("field 'key_id'") else "sig"
            self.add("error", msg.split(": ", 1)[1] if msg.startswith("field ") else msg, rec, source=source,
                     line=line, field=fld)

    # ---------------------------------------------------------- accounting

    def check_epsilon(self, rec: dict, source: str, line: int, v: SiteVerdict | None = None) -> RoundPoint | None:
        """Recompute epsilon_before/after of a reservation or round record; returns the point for the report."""
        try:
            hist = _hist_of(rec.get("history"))
            delta = float(rec["delta"])
            accountant = str(rec["accountant"])
            charge = tuple(rec["charge"])
            charge = (float(charge[0]), float(charge[1]), int(charge[2]))
            after = epsilon_value(rec["epsilon_after"])
            before = epsilon_value(rec["epsilon_before"])
            max_eps = float(rec["max_epsilon"])
            dp = bool(rec["dp"])
        except (KeyError, TypeError, ValueError, IndexError, AccountingError, LedgerError) as exc:
            self.add("error", f"cannot read the accounting fields: {exc}", rec, source=source, line=line)
            return None
        want_charge = (float(rec.get("noise_multiplier", -1)) if dp else 0.0, float(rec.get("sample_rate", -1)),
                       int(rec.get("steps", -1)))
        if charge != want_charge:
            self.add("error", f"charge {list(charge)} does not match the recorded mechanism {list(want_charge)}", rec,
                     source=source, line=line, field="charge")
        try:
            before_hist = _hist_minus(hist, charge)
        except AccountingError as exc:
            self.add("error", str(exc), rec, source=source, line=line, field="history")
            return None
        opacus = independent = None
        method = "pld" if accountant == "prv" else "rdp"
        try:
            opacus = compute_epsilon(hist, delta, accountant)
            opacus_before = compute_epsilon(before_hist, delta, accountant)
            independent = google_epsilon(hist, delta, method)
        except (AccountingError, ValueError) as exc:
            self.add("error", f"cannot recompute epsilon: {exc}", rec, source=source, line=line, field="history")
            return None
        for name, recorded, recomputed in (("epsilon_after", after, opacus), ("epsilon_before", before, opacus_before)):
            if math.isinf(recomputed) and math.isinf(recorded):
                continue
            if recorded < recomputed * (1 - OPACUS_RTOL) - 1e-12:
                self.add("error", f"recorded ε={recorded:.6g} is LOWER than Opacus {accountant} recomputed from the "
                                  f"recorded history: {recomputed:.6g} (under-count)", rec, source=source, line=line,
                         field=name)
            elif recorded > recomputed * (1 + OPACUS_RTOL) + 1e-12:
                self.add("warning", f"recorded ε={recorded:.6g} is higher than Opacus {accountant} recomputed: "
                                    f"{recomputed:.6g} (over-count, safe)", rec, source=source, line=line, field=name)
        if not (math.isinf(independent) and math.isinf(after)):
            if method == "rdp" and after < independent * (1 - INDEPENDENT_RTOL) - INDEPENDENT_ATOL:
                # dp_accounting 0.6's RDP of the subsampled Gaussian at FRACTIONAL orders is a looser bound than
                # Opacus' (which matches a 40-digit mpmath integration; dp_accounting gives e.g. 0.0163 vs 0.0027 at
                # sigma=5, q=0.3, alpha=1.5, or inf when its series does not converge), so at large q an honest
                # record can sit a few % below it. Confirm with dp_accounting's tight PLD accountant (an upper
                # bound close to the true epsilon, hence below any honest RDP number): an error only if the
                # recorded epsilon is below that too.
                pld = google_epsilon(hist, delta, "pld")
                if after >= pld * (1 - INDEPENDENT_RTOL) - INDEPENDENT_ATOL:
                    independent, method = pld, "pld"
            if after < independent * (1 - INDEPENDENT_RTOL) - INDEPENDENT_ATOL:
                self.add("error", f"recorded ε={after:.6g} is LOWER than dp_accounting {method.upper()} recomputed "
                                  f"independently: {independent:.6g} (beyond tolerance rel {INDEPENDENT_RTOL:g} + "
                                  f"abs {INDEPENDENT_ATOL:g})", rec, source=source, line=line, field="epsilon_after")
        if dp and after > max_eps + BUDGET_ATOL:
            self.add("error", f"ε={after:.4f} is over the site's declared budget max_epsilon={max_eps:g}", rec,
                     source=source, line=line, field="epsilon_after")
        if not dp and rec.get("type") == "round":
            self.add("warning", "non-DP round (allowed by the site's policy allow_non_dp): this update carries no "
                                "privacy guarantee and the site's epsilon is ∞ from here on", rec, source=source,
                     line=line, field="dp")
        if v is None:
            return None
        return RoundPoint(run_id=str(rec.get("run_id")), server_round=int(rec.get("server_round", -1)),
                          seq=int(rec["seq"]), line=line, dp=dp, noise_multiplier=float(rec.get("noise_multiplier", 0)),
                          clip_norm=float(rec.get("clip_norm", 0)), sample_rate=float(rec.get("sample_rate", 0)),
                          steps=int(rec.get("steps", 0)), accountant=accountant, delta=delta, epsilon_before=before,
                          epsilon_after=after, max_epsilon=max_eps, opacus_epsilon=opacus,
                          independent_epsilon=independent, independent_method=f"dp_accounting {method.upper()}",
                          released_metrics=list(rec.get("released_metrics") or []))

    # ---------------------------------------------------------- server copy

    def server_copy(self) -> dict[str, list[tuple[int, dict]]]:
        path = self.run_dir / "ledger.jsonl"
        src = "server copy"
        by_site: dict[str, list[tuple[int, dict]]] = {}
        if not path.exists():
            self.add("error", f"{path} does not exist (no records were collected for this run)", source=src)
            return by_site
        last: dict[str, dict] = {}
        for line, rec, raw in read_jsonl(path):
            self.result.server_records += 1
            if rec is None:
                self.add("error", f"not a JSON record: {raw[:80]!r}", source=src, line=line)
                continue
            problems = envelope_problems(rec)
            if problems:
                self.add("error", problems[0], rec if isinstance(rec.get("site"), str) else None, source=src, line=line)
                continue
            site = rec["site"]
            v = self.verdict(site)
            v.server_records += 1
            by_site.setdefault(site, []).append((line, rec))
            if rec["type"] != "round":
                self.add("error", f"the server copy holds a {rec['type']!r} record; only 'round' records are sent",
                         rec, source=src, line=line, field="type")
            self.check_signature(rec, src, line)
            prev = last.get(site)
            if prev is not None:
                if rec["seq"] <= prev["seq"]:
                    self.add("error", f"seq {rec['seq']} does not follow seq {prev['seq']} of this site's previous "
                                      "record (reordered or replayed)", rec, source=src, line=line, field="seq")
                elif rec["seq"] == prev["seq"] + 1 and rec["prev"] != record_hash(prev):
                    self.add("error", "not the hash of this site's previous record (chain broken)", rec, source=src,
                             line=line, field="prev")
                try:
                    grown = canonical_history([*_hist_of(prev.get("history")), tuple(rec["charge"])])
                    if not _covers(_hist_of(rec.get("history")), grown):
                        self.add("error", "does not contain this site's previous record's history plus this round's "
                                          "charge (a charge was dropped from the lifetime history)", rec, source=src,
                                 line=line, field="history")
                except (AccountingError, KeyError, TypeError, ValueError):
                    pass  # malformed fields are reported by check_epsilon
                try:
                    if epsilon_value(rec.get("epsilon_after")) < epsilon_value(prev.get("epsilon_after")):
                        self.add("error", "epsilon decreased compared with this site's previous record", rec,
                                 source=src, line=line, field="epsilon_after")
                except LedgerError:
                    pass
            last[site] = rec
            if rec["type"] == "round":
                point = self.check_epsilon(rec, src, line, v)
                if point is not None:
                    v.points.append(point)
                    v.epsilon, v.delta, v.accountant = point.epsilon_after, point.delta, point.accountant
                    v.max_epsilon = point.max_epsilon
                    v.non_dp_rounds += (not point.dp)
                    for m in point.released_metrics:
                        if m not in v.released_metrics:
                            v.released_metrics.append(m)
        return by_site

    # ---------------------------------------------------------- site ledger

    def site_ledger(self, path: Path, server: dict[str, list[tuple[int, dict]]], run_ids: set[str]) -> None:
        src = str(path)
        if not path.exists():
            self.add("error", "site ledger file does not exist", source=src)
            return
        rows = read_jsonl(path)
        site = next((r["site"] for _, r, _ in rows if r and isinstance(r.get("site"), str)), None)
        if site is None:
            self.add("warning", "site ledger is empty or has no readable record", source=src)
            return
        v = self.verdict(site)
        v.site_ledger, v.site_ledger_records, v.cross_checked = src, len(rows), True
        prev_hash = GENESIS
        charges: list[tuple[float, float, int]] = []
        reservations: dict[int, dict] = {}
        site_rounds: list[tuple[int, dict]] = []
        for line, rec, raw in rows:
            if rec is None:
                self.add("error", f"not a JSON record: {raw[:80]!r}", site=site, source=src, line=line)
                prev_hash = None  # type: ignore[assignment]
                continue
            problems = envelope_problems(rec)
            if problems:
                self.add("error", problems[0], site=site, source=src, line=line)
                continue
            if rec["site"] != site:
                self.add("error", f"record of site {rec['site']!r} in {site!r}'s ledger", rec, source=src, line=line,
                         field="site")
            if rec["seq"] != line - 1:
                self.add("error", f"seq is {rec['seq']}, expected {line - 1} (a record was dropped, inserted or "
                                  "reordered)", rec, source=src, line=line, field="seq")
            if prev_hash is not None and rec["prev"] != prev_hash:
                self.add("error", f"does not match the hash of line {line - 1} (the previous record was altered, "
                                  "dropped or swapped)", rec, source=src, line=line, field="prev")
            prev_hash = record_hash(rec)
            self.check_signature(rec, src, line)
            kind = rec["type"]
            if kind == "reservation":
                v.reservations += 1
                try:
                    s, q, n = rec["charge"]
                    charges.append((float(s), float(q), int(n)))
                except (KeyError, TypeError, ValueError):
                    self.add("error", "missing or malformed charge", rec, source=src, line=line, field="charge")
                reservations[rec["seq"]] = rec
            elif kind == "refusal":
                v.refusals += 1
                code = str(rec.get("code"))
                v.refusal_codes[code] = v.refusal_codes.get(code, 0) + 1
            try:
                recorded = _hist_of(rec.get("history"))
                expected = canonical_history(charges)
                if recorded != expected:
                    self.add("error", f"history {[list(e) for e in recorded]} is not the sum of the reservations "
                                      f"before it {[list(e) for e in expected]} (a reservation was dropped or altered)",
                             rec, source=src, line=line, field="history")
            except AccountingError as exc:
                self.add("error", str(exc), rec, source=src, line=line, field="history")
            if kind in ("reservation", "round"):
                self.check_epsilon(rec, src, line)
            if kind == "round":
                rs = reservations.get(rec.get("reservation_seq"))
                if rs is None:
                    self.add("error", f"completes reservation seq {rec.get('reservation_seq')!r}, which is not an "
                                      "earlier reservation in this ledger", rec, source=src, line=line,
                             field="reservation_seq")
                else:
                    if record_hash(rs) != rec.get("reservation_sha256"):
                        self.add("error", "is not the hash of the reservation it completes", rec, source=src,
                                 line=line, field="reservation_sha256")
                    for k in ("run_id", "server_round", "dp", "noise_multiplier", "clip_norm", "sample_rate", "steps",
                              "charge", "weights_in_sha256"):
                        if rs.get(k) != rec.get(k):
                            self.add("error", f"{rs.get(k)!r} in the reservation, {rec.get(k)!r} in the round record",
                                     rec, source=src, line=line, field=k)
                if rec.get("run_id") in run_ids:
                    site_rounds.append((line, rec))
        self.cross_check(site, src, site_rounds, server.get(site, []))

    def cross_check(self, site: str, src: str, site_rounds: list[tuple[int, dict]],
                    server_rows: list[tuple[int, dict]]) -> None:
        """The server's records of ``site`` must be exactly the site's round records of this run, in order."""
        s_hashes = [record_hash(r) for _, r in site_rounds]
        c_hashes = [record_hash(r) for _, r in server_rows]
        s_set, c_set = set(s_hashes), set(c_hashes)
        for (line, rec), h in zip(server_rows, c_hashes):
            if h not in s_set:
                self.add("error", "this record is not in the site's own ledger (added, or altered after signing)",
                         rec, source="server copy", line=line)
        for (line, rec), h in zip(site_rounds, s_hashes):
            if h not in c_set:
                self.add("error", "this round record of the run is missing from the server copy (dropped)", rec,
                         source=src, line=line)
        common_s = [h for h in s_hashes if h in c_set]
        common_c = [h for h in c_hashes if h in s_set]
        if common_s != common_c:
            i = next(i for i, (a, b) in enumerate(zip(common_s, common_c)) if a != b)
            line, rec = next((ln, r) for (ln, r), h in zip(server_rows, c_hashes) if h == common_c[i])
            self.add("error", "records of this site are in a different order than in the site's own ledger "
                              "(reordered)", rec, source="server copy", line=line)


def default_keys_dir(run_dir: Path) -> Path | None:
    """``RUN_DIR/../../consortium/keys`` if it exists (demo layout), else ``RUN_DIR/keys`` if it exists."""
    for cand in (run_dir.parent.parent / "consortium" / "keys", run_dir / "keys"):
        if cand.is_dir():
            return cand
    return None


def verify_run(run_dir: str | Path, site_ledgers: Iterable[str | Path] = (), keys_dir: str | Path | None = None
               ) -> AuditResult:
    """Audit one run folder (see module doc); never raises for bad ledgers, returns findings."""
    run_dir = Path(run_dir)
    keys = Path(keys_dir) if keys_dir else default_keys_dir(run_dir)
    aud = _Auditor(run_dir, keys)
    if keys is None:
        aud.add("error", f"no enrolled site keys found (looked in {run_dir.parent.parent / 'consortium' / 'keys'} and "
                         f"{run_dir / 'keys'}); pass --keys DIR: signatures cannot be verified", source="keys")
    elif not keys.is_dir():
        aud.add("error", f"keys folder {keys} does not exist", source="keys")
        aud.keys_dir = None
    if not run_dir.is_dir():
        aud.add("error", f"run folder {run_dir} does not exist", source="run")
        return aud.result
    server = aud.server_copy()
    run_ids = {str(r.get("run_id")) for rows in server.values() for _, r in rows} | {run_dir.name}
    for p in site_ledgers:
        aud.site_ledger(Path(p), server, run_ids)
    return aud.result


def result_json(result: AuditResult) -> str:
    def default(o: Any) -> Any:
        return str(o)

    d = result.to_dict()
    return json.dumps(d, indent=2, default=default, allow_nan=True)
