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
6. **Mechanism against what the run asked.** Every record of this run (both copies) must carry exactly the run's
   ``dp``, sigma (``noise_multiplier``), C (``clip_norm``), q (``sample_rate``) and ``steps`` from the run's
   ``settings.json`` (whose hash the consortium's signed digests carry and round 1's site records countersign),
   a server round within the run, and (where the settings name one) the accountant; a round record must equal its
   reservation in every mechanism and delta field. A self-consistent record re-signed by its own site with q/10
   passes every signature and recomputation, so only this check catches it. Any mismatch is an error.
7. **Delta against its basis:** ``delta`` equals the site's declared ``policy_delta``, or ``1/(10 x patients)``
   when the policy says auto (0); a declared delta above that needs the record's ``allow_large_delta`` (then a
   warning), and ``delta >= 1/patients`` (which allows releasing one patient outright) is always an error;
   ``patients`` must equal the training patients of the site's dataset card in the consortium registry, where the
   card gives them.
8. **Anchors** (:mod:`privacy.anchor`): the consortium's round digests must verify against its pinned key
   (``consortium_ed25519.pub`` in the keys folder) and chain from round 0; every record they name must be in the
   server copy (and in the site's ledger, where given) and every server record must be named; every round record
   must countersign the previous round's digest (``server_prev_digest``); history.json, the saved weights of each
   round and status.json must tell the same story as the digests. Cutting the newest round from a site's ledger and
   the server copy together therefore fails.

Keys folder default: ``RUN_DIR/../../consortium/keys`` if it exists (the demo's layout: DIR/runs/<run>), else
``RUN_DIR/keys``. Without any keys folder signatures cannot be checked, which is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from contract.mechanism import ADAPTIVE_KEYS, GRADIENT_NOISE_KEY, gradient_noise_multiplier
from privacy.accounting import AccountingError, canonical_history, compute_epsilon
from privacy.anchor import CONSORTIUM_PUB_FILE, DIGESTS_FILE
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
    #: adaptive clipping: clip_norm is the starting C; σ_b of the count and σ_z of the gradient (else None)
    count_noise: float | None = None
    gradient_noise_multiplier: float | None = None


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
    #: run id -> dataset fingerprints its records carry (keyed hashes: equal = same data; they reveal nothing else)
    datasets: dict[str, list[str]] = field(default_factory=dict)

    def note_dataset(self, rec: dict) -> None:
        fp, run = rec.get("dataset_fingerprint"), rec.get("run_id")
        if isinstance(fp, str) and fp and isinstance(run, str):
            seen = self.datasets.setdefault(run, [])
            if fp not in seen:
                seen.append(fp)

    def dataset_changes(self) -> list[str]:
        """Human lines: the runs whose dataset differs from the run before (in ledger order)."""
        out, prev_run, prev = [], None, None
        for run, fps in self.datasets.items():
            if len(fps) > 1:
                out.append(f"the dataset changed within run {run} ({len(fps)} fingerprints)")
            if prev is not None and fps and fps[0] != prev:
                out.append(f"the dataset changed between runs {prev_run} and {run}")
            prev_run, prev = run, (fps[-1] if fps else prev)
        return out

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


def _adaptive_point(rec: dict, dp: bool) -> dict[str, float]:
    """The report's σ_b / σ_z of an adaptive record (a malformed one is flagged by check_split, drawn as fixed)."""
    if rec.get("adaptive_clip") is not True or not dp:
        return {}
    try:
        return {"count_noise": float(rec["count_noise"]), "gradient_noise_multiplier": float(rec[GRADIENT_NOISE_KEY])}
    except (KeyError, TypeError, ValueError):
        return {}


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


MECHANISM_FIELDS = ("dp", "noise_multiplier", "clip_norm", "sample_rate", "steps")
#: adaptive clipping (contract.mechanism.ADAPTIVE_KEYS + the σ_z used); absent from every fixed-clip record
ADAPTIVE_FIELDS = (*ADAPTIVE_KEYS, GRADIENT_NOISE_KEY)
DELTA_FIELDS = ("accountant", "delta", "patients", "policy_delta", "allow_large_delta")
_FLOAT_RTOL = 1e-12


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=_FLOAT_RTOL, abs_tol=0.0)
    return a == b


def asked_mechanism(settings: dict[str, Any]) -> dict[str, Any]:
    """What the run asked of every site, from its settings.json (flat RunSettings, or a nested ``mechanism``).

    Keys: dp, noise_multiplier, clip_norm, sample_rate, steps, and accountant / num_rounds where present.
    """
    mech = settings.get("mechanism") if isinstance(settings.get("mechanism"), dict) else {}

    def pick(*names: str) -> Any:
        for src in (mech, settings):
            for n in names:
                if n in src:
                    return src[n]
        return None

    out = {"dp": pick("dp"), "noise_multiplier": pick("noise_multiplier", "sigma"),
           "clip_norm": pick("clip_norm"), "sample_rate": pick("sample_rate", "q"),
           "steps": pick("steps", "local_steps"), "accountant": pick("accountant"),
           "num_rounds": pick("num_server_rounds", "num_rounds")}
    for k in ADAPTIVE_KEYS:  # contract.Mechanism.to_dict: present only when the run asked adaptive clipping
        out[k] = pick(k)
    if out.get("accountant") == "":  # contract.Mechanism: "" = each site charges with its policy's accountant
        del out["accountant"]
    return {k: v for k, v in out.items() if v is not None}


class _Auditor:
    def __init__(self, run_dir: Path, keys_dir: Path | None) -> None:
        self.run_dir = run_dir
        self.keys_dir = keys_dir
        self.result = AuditResult(str(run_dir), str(keys_dir) if keys_dir else None)
        self._keys: dict[str, Any] = {}
        self._missing_key_reported: set[str] = set()
        self.run_id = run_dir.name
        self.progress: tuple[Callable[[int, int], None], int] | None = None  # (callback, total) for a progress bar
        self._done = 0
        self.asked: dict[str, Any] | None = None      # from settings.json
        self.settings_sha256: str | None = None
        self.registry = None
        self.server_rows: list[tuple[int, dict]] = []
        if keys_dir is not None and keys_dir.is_dir():
            from privacy.registry import RegistryError, SiteRegistry

            try:
                self.registry = SiteRegistry.load(keys_dir)
            except RegistryError as exc:
                self.add("error", str(exc), source="registry")

    # ---------------------------------------------------------- what the run asked

    def load_settings(self) -> None:
        import hashlib

        path = self.run_dir / "settings.json"
        try:
            raw = path.read_bytes()
            settings = json.loads(raw)
        except FileNotFoundError:
            self.add("error", "missing: without the run's settings the mechanism each site applied cannot be checked "
                              "against what the run asked", source="settings.json")
            return
        except (OSError, ValueError) as exc:
            self.add("error", f"not readable JSON ({exc})", source="settings.json")
            return
        if not isinstance(settings, dict):
            self.add("error", "not a JSON object", source="settings.json")
            return
        self.settings_sha256 = hashlib.sha256(raw).hexdigest()
        self.asked = asked_mechanism(settings)

    def check_update_hash(self, rec: dict, source: str, line: int) -> None:
        """``update_hash`` names how ``update_sha256`` was computed; a name no Atoll knows binds nothing checkable."""
        from models.serialization import HASH_SCHEMES

        scheme = rec.get("update_hash", "sha256")
        if scheme not in HASH_SCHEMES:
            self.add("error", f"update_hash {str(scheme)[:40]!r} is not a known update digest construction "
                              f"({', '.join(HASH_SCHEMES)})", rec, source=source, line=line, field="update_hash")

    def check_mechanism(self, rec: dict, source: str, line: int) -> None:
        """A record of this run must carry exactly the mechanism the run asked (settings.json)."""
        if self.asked is None or rec.get("run_id") != self.run_id or rec.get("type") not in ("reservation", "round"):
            return
        asked = self.asked
        fields_ = ["dp", "sample_rate", "steps"] + (["noise_multiplier", "clip_norm"] if asked.get("dp", True) else [])
        for k in fields_:
            if k in asked and not _same(rec.get(k), asked[k]):
                self.add("error", f"{rec.get(k)!r} but the run asked {asked[k]!r} (settings.json): the site's record "
                                  "does not describe the mechanism of this run", rec, source=source, line=line, field=k)
        adaptive = asked.get("adaptive_clip") is True
        if (rec.get("adaptive_clip", False) is True) != adaptive:
            self.add("error", f"{rec.get('adaptive_clip', False)!r} but the run asked "
                              f"{'adaptive' if adaptive else 'fixed'} clipping (settings.json)", rec, source=source,
                     line=line, field="adaptive_clip")
        elif adaptive:
            for k in ADAPTIVE_KEYS[1:]:
                if k in asked and not _same(rec.get(k), asked[k]):
                    self.add("error", f"{rec.get(k)!r} but the run asked {asked[k]!r} (settings.json)", rec,
                             source=source, line=line, field=k)
        if "accountant" in asked and rec.get("accountant") != asked["accountant"]:
            self.add("error", f"{rec.get('accountant')!r} but the run asked {asked['accountant']!r} (settings.json)",
                     rec, source=source, line=line, field="accountant")
        if rec.get("accountant") not in ("rdp", "prv"):
            self.add("error", f"{rec.get('accountant')!r} is not an accountant Atoll knows (rdp, prv)", rec,
                     source=source, line=line, field="accountant")
        rnd = rec.get("server_round")
        n = asked.get("num_rounds")
        if isinstance(n, int) and not (isinstance(rnd, int) and not isinstance(rnd, bool) and 1 <= rnd <= n):
            self.add("error", f"{rnd!r} is not a round of this run (1..{n})", rec, source=source, line=line,
                     field="server_round")

    def check_delta(self, rec: dict, source: str, line: int) -> None:
        """delta against the site's declared policy delta and the 1/(10 x patients) rule (the record carries both)."""
        if rec.get("type") not in ("reservation", "round"):
            return
        patients, declared, large = rec.get("patients"), rec.get("policy_delta"), rec.get("allow_large_delta")
        try:
            delta = float(rec["delta"])
        except (KeyError, TypeError, ValueError):
            return  # reported by check_epsilon
        if isinstance(patients, bool) or not isinstance(patients, int) or patients < 1:
            self.add("error", f"{patients!r}: the record does not say how many patients its delta was derived from, "
                              "so delta cannot be checked", rec, source=source, line=line, field="patients")
            return
        if isinstance(declared, bool) or not isinstance(declared, (int, float)) or not 0 <= declared < 1:
            self.add("error", f"{declared!r}: the record does not carry the site's declared policy delta", rec,
                     source=source, line=line, field="policy_delta")
            return
        auto = 1.0 / (10 * patients)
        if declared == 0:
            if not math.isclose(delta, auto, rel_tol=1e-9):
                self.add("error", f"δ={delta:.6g} but the site's policy says auto: 1/(10 x {patients} patients) = "
                                  f"{auto:.6g}", rec, source=source, line=line, field="delta")
        elif not math.isclose(delta, float(declared), rel_tol=1e-9):
            self.add("error", f"δ={delta:.6g} but the site's declared policy delta is {declared:.6g}", rec,
                     source=source, line=line, field="delta")
        elif declared > auto * (1 + 1e-9):
            if large is True:
                self.add("warning", f"δ={delta:.6g} is above 1/(10 x {patients} patients) = {auto:.6g}, declared by "
                                    "the site's policy (allow_large_delta)", rec, source=source, line=line,
                         field="delta")
            else:
                self.add("error", f"δ={delta:.6g} is above 1/(10 x {patients} patients) = {auto:.6g} and the site's "
                                  "policy does not allow a large delta", rec, source=source, line=line, field="delta")
        if delta >= 1.0 / patients:
            self.add("error", f"δ={delta:.6g} is at least 1/patients = {1.0 / patients:.6g}: that allows releasing one "
                              "patient's data outright; no ε means anything at this δ", rec, source=source, line=line,
                     field="delta")
        entry = self.registry.get(rec.get("site")) if self.registry is not None else None
        if entry is not None and entry.train_patients is not None and patients != entry.train_patients:
            self.add("error", f"{patients} but the site's dataset card in the consortium registry declared "
                              f"{entry.train_patients} training patients (a lower count inflates the auto delta)",
                     rec, source=source, line=line, field="patients")

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
        if self.progress is not None:
            self._done += 1
            self.progress[0](self._done, max(self.progress[1], self._done))
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
        self.check_split(rec, source, line, dp)
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
                          released_metrics=list(rec.get("released_metrics") or []),
                          **_adaptive_point(rec, dp))

    def check_split(self, rec: dict, source: str, line: int, dp: bool) -> None:
        """Adaptive clipping: the record's σ must be what the gradient noise σ_z and the count noise σ_b add up to.

        The accountant composes the recorded σ (the ``charge``); that holds only if the released pair (noised
        gradient sum, noised centred count of unclipped patients, sensitivity 1/2) is a Gaussian mechanism of
        noise multiplier σ: σ_b > σ/2 and σ_z >= (σ⁻² − (2σ_b)⁻²)^(-1/2) (Andrew et al. 2021, Thm 1;
        contract.mechanism.gradient_noise_multiplier). A record that claims adaptive clipping with a split that
        cannot give σ, or a σ_z below what σ and σ_b leave, under-counts its epsilon: an error."""
        present = [k for k in ADAPTIVE_FIELDS if k in rec]
        if not present:
            return  # fixed clipping (every record before adaptive clipping existed reads so)

        def bad(what: str, fld: str) -> None:
            self.add("error", what, rec, source=source, line=line, field=fld)

        if rec.get("adaptive_clip") is not True:
            return bad(f"{rec.get('adaptive_clip')!r}, yet the record carries adaptive-clipping fields "
                       f"{', '.join(present)}: which mechanism ran cannot be told", "adaptive_clip")
        if not dp:
            return bad("adaptive clipping in a non-DP record", "adaptive_clip")
        try:
            sigma, sb = float(rec["noise_multiplier"]), float(rec["count_noise"])
            sz = float(rec[GRADIENT_NOISE_KEY])
            gamma, lr = float(rec["target_unclipped_quantile"]), float(rec["clip_lr"])
        except (KeyError, TypeError, ValueError) as exc:
            return bad(f"an adaptive-clipping record must carry noise_multiplier, count_noise, "
                       f"{GRADIENT_NOISE_KEY}, target_unclipped_quantile and clip_lr as numbers ({exc!r})",
                       "count_noise")
        if not (math.isfinite(sb) and sb > 0):
            return bad(f"σ_b={sb!r}: the count of unclipped patients is released, it needs noise σ_b > 0",
                       "count_noise")
        if not sigma < 2 * sb:
            return bad(f"impossible split: σ={sigma:g} needs σ_b > σ/2 = {sigma / 2:g}, the record says σ_b={sb:g}; "
                       "no gradient noise makes the released pair a Gaussian mechanism of σ", "count_noise")
        derived = gradient_noise_multiplier(sigma, sb)
        if not (math.isfinite(sz) and sz >= derived * (1 - 1e-12)):
            return bad(f"σ_z={sz!r} on the gradient is below the {derived:.6g} that σ={sigma:g} and σ_b={sb:g} "
                       "leave: the update carried less noise than the accountant was charged for (under-count)",
                       GRADIENT_NOISE_KEY)
        if not (0 <= gamma <= 1 and math.isfinite(lr) and lr > 0):
            bad(f"target_unclipped_quantile {gamma!r} / clip_lr {lr!r} out of range ([0, 1] / > 0)",
                "target_unclipped_quantile")

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
            v.note_dataset(rec)
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
            self.server_rows.append((line, rec))
            self.check_mechanism(rec, src, line)
            self.check_delta(rec, src, line)
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
        server_seen, v.datasets = v.datasets, {}
        for _, r, _ in rows:  # the site's own ledger is in time order, across every run of this dataset
            if r:
                v.note_dataset(r)
        for run, fps in server_seen.items():
            for fp in fps:
                v.note_dataset({"run_id": run, "dataset_fingerprint": fp})
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
                self.check_mechanism(rec, src, line)
                self.check_delta(rec, src, line)
            if kind == "round":
                self.check_update_hash(rec, src, line)
                rs = reservations.get(rec.get("reservation_seq"))
                if rs is None:
                    self.add("error", f"completes reservation seq {rec.get('reservation_seq')!r}, which is not an "
                                      "earlier reservation in this ledger", rec, source=src, line=line,
                             field="reservation_seq")
                else:
                    if record_hash(rs) != rec.get("reservation_sha256"):
                        self.add("error", "is not the hash of the reservation it completes", rec, source=src,
                                 line=line, field="reservation_sha256")
                    for k in ("run_id", "server_round", *MECHANISM_FIELDS, *ADAPTIVE_FIELDS, *DELTA_FIELDS, "charge",
                              "max_epsilon",
                              "weights_in_sha256", "policy_sha256"):
                        if not _same(rs.get(k), rec.get(k)):
                            self.add("error", f"{rs.get(k)!r} in the reservation, {rec.get(k)!r} in the round record",
                                     rec, source=src, line=line, field=k)
                if rec.get("run_id") in run_ids:
                    site_rounds.append((line, rec))
        self.cross_check(site, src, site_rounds, server.get(site, []))
        self.site_vs_digests(site, src, site_rounds)

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


    # ---------------------------------------------------------- anchors

    def consortium_key(self, explicit: Path | None):
        """The consortium's pinned digest key: ``--consortium-key``, else ``<keys>/consortium_ed25519.pub``."""
        from privacy.keys import KeyFileError, load_public_key

        cands = [explicit] if explicit else ([self.keys_dir / CONSORTIUM_PUB_FILE] if self.keys_dir else [])
        for c in cands:
            try:
                return load_public_key(c)
            except KeyFileError as exc:
                self.add("error", f"consortium key unusable: {exc}", source="digests")
                return None
        self.add("error", f"no consortium public key ({CONSORTIUM_PUB_FILE} in the keys folder, or "
                          "--consortium-key FILE): the round digests cannot be verified", source="digests")
        return None

    def anchors(self, consortium_pub) -> None:
        """The signed digest chain against the server copy, history.json, the weights and status.json."""
        path = self.run_dir / DIGESTS_FILE
        src = DIGESTS_FILE
        if not path.exists():
            self.add("error", "missing: the consortium's signed round digests are gone (or the run predates them), so "
                              "nothing anchors the end of the ledgers: a round cut from both copies would not show",
                     source=src)
            return
        digests: dict[int, tuple[int, dict]] = {}
        prev = GENESIS
        for line, rec, raw in read_jsonl(path):
            if rec is None or rec.get("type") != "digest":
                self.add("error", f"not a digest record: {raw[:80]!r}", source=src, line=line)
                prev = None  # type: ignore[assignment]
                continue
            rnd = rec.get("server_round")
            if consortium_pub is not None:
                try:
                    verify_record(rec, consortium_pub)
                except LedgerError as exc:
                    self.add("error", f"{exc} (the consortium's key)", source=src, line=line, server_round=rnd,
                             field="sig")
            if prev is not None and rec.get("prev") != prev:
                self.add("error", f"does not match the hash of line {line - 1} (a digest was altered, dropped or "
                                  "inserted)", source=src, line=line, server_round=rnd, field="prev")
            prev = record_hash(rec)
            if rnd != len(digests):
                self.add("error", f"round {rnd!r} where round {len(digests)} was due", source=src, line=line,
                         server_round=rnd, field="server_round")
            if rec.get("run_id") != self.run_id:
                self.add("error", f"names run {rec.get('run_id')!r}, this is run {self.run_id!r}", source=src,
                         line=line, server_round=rnd, field="run_id")
            if self.settings_sha256 is not None and rec.get("settings_sha256") != self.settings_sha256:
                self.add("error", "is not the hash of settings.json (the run's settings were changed after the run)",
                         source=src, line=line, server_round=rnd, field="settings_sha256")
            if isinstance(rnd, int):
                digests[rnd] = (line, rec)
        self.digests = digests
        self._digest_vs_server(digests)
        self._countersignatures(digests)
        self._other_traces(digests)

    def _accepted(self, digests: dict[int, tuple[int, dict]]) -> dict[tuple[str, int], tuple[int, int, str]]:
        out = {}
        for rnd, (line, d) in digests.items():
            for a in d.get("accepted") or []:
                if isinstance(a, dict):
                    out[(str(a.get("site")), a.get("seq"))] = (rnd, line, str(a.get("record_sha256")))
        return out

    def _digest_vs_server(self, digests: dict[int, tuple[int, dict]]) -> None:
        accepted = self._accepted(digests)
        held = {(r["site"], r["seq"]): (line, r) for line, r in self.server_rows}
        for (site, seq), (rnd, dline, sha) in sorted(accepted.items(), key=lambda x: (x[1][0], x[0])):
            got = held.get((site, seq))
            if got is None:
                self.add("error", f"round {rnd}'s signed digest names site {site!r} record seq {seq}, which the server "
                                  "copy lacks (dropped after the round)", site=site, source=DIGESTS_FILE, line=dline,
                         run_id=self.run_id, server_round=rnd, field="accepted")
            elif record_hash(got[1]) != sha:
                self.add("error", f"is not the record (seq {seq}) round {rnd}'s signed digest accepted: it was "
                                  "replaced after the round", got[1], source="server copy", line=got[0])
            elif got[1].get("server_round") != rnd:
                self.add("error", f"round {got[1].get('server_round')!r}, but the digest accepted it in round {rnd}",
                         got[1], source="server copy", line=got[0], field="server_round")
        for (site, seq), (line, rec) in held.items():
            if (site, seq) not in accepted:
                self.add("error", "this record is named in none of the consortium's signed round digests (added "
                                  "after the round)", rec, source="server copy", line=line)

    def _countersignatures(self, digests: dict[int, tuple[int, dict]]) -> None:
        for line, rec in self.server_rows:
            rnd = rec.get("server_round")
            if rec.get("run_id") != self.run_id or not isinstance(rnd, int) or (rnd - 1) not in digests:
                continue
            want = record_hash(digests[rnd - 1][1])
            got = rec.get("server_prev_digest")
            if got != want:
                self.add("error", ("carries no countersignature of" if got is None else "does not countersign")
                         + f" the consortium's digest of round {rnd - 1} ({want[:12]}…): that digest was rewritten "
                           "after the site signed, or the site never vouched for the run's history before this round",
                         rec, source="server copy", line=line,
                         field="server_prev_digest")

    def _other_traces(self, digests: dict[int, tuple[int, dict]]) -> None:
        """history.json, weights/round-NNN.pt and status.json must show exactly the digested rounds."""
        last = max(digests) if digests else -1
        hist_path = self.run_dir / "history.json"
        history: list = []
        try:
            history = json.loads(hist_path.read_text())
            if not isinstance(history, list):
                raise ValueError("not a list")
        except FileNotFoundError:
            if last > 0:
                self.add("error", f"missing, but the digests record {last} round(s)", source="history.json")
        except (OSError, ValueError) as exc:
            self.add("error", f"not readable ({exc})", source="history.json")
            history = []
        seen_rounds = set()
        for i, entry in enumerate(history, start=1):
            if not isinstance(entry, dict):
                continue
            rnd = entry.get("round")
            seen_rounds.add(rnd)
            sites = entry.get("sites") if isinstance(entry.get("sites"), dict) else {}
            if rnd not in digests:
                self.add("error", f"shows round {rnd!r} (sites {', '.join(sorted(sites)) or 'none'}), but the "
                                  f"consortium's signed digest chain ends at round {last}: that round's records were "
                                  "cut", source="history.json", line=i, run_id=self.run_id, server_round=rnd)
                continue
            named = {str(a.get("site")) for a in digests[rnd][1].get("accepted") or [] if isinstance(a, dict)}
            contributed = {n for n, s in sites.items() if isinstance(s, dict) and s.get("status") == "contributed"}
            for n in sorted(contributed - named):
                self.add("error", f"site {n!r} contributed to round {rnd}, but the round's signed digest names no "
                                  "record of it", site=n, source="history.json", line=i, run_id=self.run_id,
                         server_round=rnd)
            for n in sorted(named - set(sites)):
                self.add("error", f"round {rnd}'s signed digest accepted a record of site {n!r}, which history.json "
                                  "does not list", site=n, source="history.json", line=i, run_id=self.run_id,
                         server_round=rnd)
        for rnd in sorted(r for r in digests if r >= 1 and r not in seen_rounds):
            self.add("error", f"round {rnd} is in the signed digests but not in history.json (cut from the history)",
                     source="history.json", run_id=self.run_id, server_round=rnd)
        self._weights(digests, last)
        status_path = self.run_dir / "status.json"
        try:
            status = json.loads(status_path.read_text())
        except FileNotFoundError:
            self.add("warning", "missing: the run is still going or its ServerApp was killed", source="status.json")
            return
        except (OSError, ValueError) as exc:
            self.add("error", f"not readable ({exc})", source="status.json")
            return
        if isinstance(status, dict):
            if status.get("rounds") != len(history):
                self.add("error", f"says {status.get('rounds')!r} round(s), history.json shows {len(history)}",
                         source="status.json", field="rounds")
            n = (self.asked or {}).get("num_rounds")
            if status.get("status") == "completed" and isinstance(n, int) and last != n:
                self.add("error", f"says completed, but the signed digests end at round {last} of {n}",
                         source="status.json", field="status")

    def _weights(self, digests: dict[int, tuple[int, dict]], last: int) -> None:
        folder = self.run_dir / "weights"
        files = {}
        for p in sorted(folder.glob("round-*.pt")) if folder.is_dir() else []:
            try:
                files[int(p.stem.split("-", 1)[1])] = p
            except ValueError:
                continue
        for rnd, p in sorted(files.items()):
            want = digests.get(rnd, (0, {}))[1].get("weights_sha256")
            if rnd not in digests or want is None:
                self.add("error", f"global weights of round {rnd} were saved, but the signed digests "
                                  + ("end at round %d" % last if rnd not in digests else "say it was not aggregated")
                                  + ": that round's records were cut", source=str(p), run_id=self.run_id,
                         server_round=rnd)
                continue
            got = _weights_sha256(p)
            if got != want:
                self.add("error", f"hash {str(got)[:12]}… is not the weights_sha256 {want[:12]}… of round {rnd}'s "
                                  "signed digest (the saved model was replaced)", source=str(p), run_id=self.run_id,
                         server_round=rnd)
        for rnd, (line, d) in sorted(digests.items()):
            if d.get("weights_sha256") is not None and rnd not in files:
                self.add("warning", f"weights of round {rnd} (named in its digest) are not in {folder}",
                         source=DIGESTS_FILE, line=line, server_round=rnd)

    def site_vs_digests(self, site: str, src: str, site_rounds: list[tuple[int, dict]]) -> None:
        """Every record of ``site`` the consortium's digests accepted must be in the site's own ledger."""
        digests = getattr(self, "digests", None)
        if not digests:
            return
        own = {(r["site"], r["seq"]): record_hash(r) for _, r in site_rounds}
        for (s, seq), (rnd, line, sha) in self._accepted(digests).items():
            if s == site and own.get((s, seq)) != sha:
                self.add("error", f"round {rnd}'s signed digest accepted record seq {seq} of this site, which its own "
                                  "ledger does not hold (cut or rewritten at the site)", site=site, source=src,
                         run_id=self.run_id, server_round=rnd)


def _weights_sha256(path: Path) -> str | None:
    import torch

    from models import state_dict_sha256

    try:
        return state_dict_sha256(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # noqa: BLE001 - an unreadable weights file is a mismatch, not a crash
        return None


def default_keys_dir(run_dir: Path) -> Path | None:
    """``RUN_DIR/../../consortium/keys`` if it exists (demo layout), else ``RUN_DIR/keys`` if it exists."""
    for cand in (run_dir.parent.parent / "consortium" / "keys", run_dir / "keys"):
        if cand.is_dir():
            return cand
    return None


def verify_run(run_dir: str | Path, site_ledgers: Iterable[str | Path] = (), keys_dir: str | Path | None = None,
               consortium_key: str | Path | None = None, progress: Callable[[int, int], None] | None = None,
               ) -> AuditResult:
    """Audit one run folder (see module doc); never raises for bad ledgers, returns findings.

    ``consortium_key``: the consortium's digest public key (default ``<keys>/consortium_ed25519.pub``).
    ``progress(done, total)``: called as records are recomputed (the costly step), for a progress bar; ``total``
    counts the lines of the server copy and of the site ledgers given.
    """
    run_dir = Path(run_dir)
    site_ledgers = [Path(p) for p in site_ledgers]
    keys = Path(keys_dir) if keys_dir else default_keys_dir(run_dir)
    aud = _Auditor(run_dir, keys if keys is not None and keys.is_dir() else None)
    if progress is not None:
        aud.progress = (progress, sum(_line_count(p) for p in [run_dir / "ledger.jsonl", *site_ledgers]))
    if keys is None:
        aud.add("error", f"no enrolled site keys found (looked in {run_dir.parent.parent / 'consortium' / 'keys'} and "
                         f"{run_dir / 'keys'}); pass --keys DIR: signatures cannot be verified", source="keys")
    elif not keys.is_dir():
        aud.add("error", f"keys folder {keys} does not exist", source="keys")
        aud.keys_dir = None
    if not run_dir.is_dir():
        aud.add("error", f"run folder {run_dir} does not exist", source="run")
        return aud.result
    aud.load_settings()
    server = aud.server_copy()
    aud.anchors(aud.consortium_key(Path(consortium_key) if consortium_key else None))
    run_ids = {str(r.get("run_id")) for rows in server.values() for _, r in rows} | {run_dir.name}
    for p in site_ledgers:
        aud.site_ledger(Path(p), server, run_ids)
    return aud.result


def _line_count(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


def result_json(result: AuditResult) -> str:
    def default(o: Any) -> Any:
        return str(o)

    d = result.to_dict()
    return json.dumps(d, indent=2, default=default, allow_nan=True)
