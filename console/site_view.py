"""The site's page: what the site holds, what it has spent, and the runs waiting for its decision.

Everything comes from the files the CLI and the ClientApp use, read with their own code:

* dataset card and quarantine counts: :func:`client.ingest.build_site_dataset` (as ``atoll site check``), once at
  start; the card is identifier-free by construction (counts, small counts suppressed);
* the privacy budget: the site's signed ledger through :func:`client.runtime.open_site_ledger` and a
  :class:`privacy.guard.BudgetGuard` built exactly as the ClientApp builds it (same policy, same delta from the
  training split's patients), so "spent" and the projection use the accountant of ``privacy/accounting.py``;
* approvals: :class:`client.approval.ApprovalStore` — Approve calls :meth:`ApprovalStore.approve`, the very
  call ``atoll site approve`` makes, so the record is the same.

**Inbox.** Pending run manifests are the files ``<state_dir>/inbox/*.json``: the lead's ``atoll run manifest
--out run-manifest.json`` output, copied there by the site admin (mail, a shared folder, a USB stick). A manifest
whose hash the approval log already names is shown as decided. Reject moves the file to ``inbox/rejected/`` and
appends one line (who, when, why, which manifest hash) to ``inbox/rejected/rejections.jsonl``; a rejected run
needs nothing else, because the ClientApp refuses every run that is not approved.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from console import manifests as mf
from console import svg

INBOX = "inbox"
REJECTED = "rejected"
REJECTIONS_FILE = "rejections.jsonl"
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,120}\.json$")


class DecisionRefused(Exception):
    """Approve/Reject cannot be done; the message is shown to the operator (numbers, never paths)."""


@dataclass
class Pending:
    file: str                      # name inside the inbox (no folder)
    digest: str | None
    manifest: Any | None           # client.approval.RunManifest
    data: dict | None
    error: str | None
    state: str                     # pending | approved | revoked | invalid


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _eps(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return "∞" if math.isinf(x) else f"{x:.3f}"


class SiteConsole:
    """The site role. Build with :meth:`load` (indexes the data once, like ``atoll site check``)."""

    def __init__(self, config: Any, card: dict, guard: Any, quarantine_exact: dict[str, int] | None = None) -> None:
        self.config = config
        self.card = card
        # Exact counts by reason code (no file names): this page is served on the site, to its operator only.
        self.quarantine_exact = dict(sorted((quarantine_exact or {}).items()))
        self.guard = guard
        self.state_dir = Path(config.state_dir)
        self.inbox = self.state_dir / INBOX

    @classmethod
    def load(cls, site_toml: str | Path) -> "SiteConsole":
        from client.ingest import NoUsableImagesError, build_site_dataset
        from client.runtime import open_site_ledger
        from client.site_config import load_site_config
        from privacy.guard import BudgetGuard

        cfg = load_site_config(site_toml)
        try:
            data = build_site_dataset(cfg)
        except NoUsableImagesError as exc:
            raise ValueError(f"{site_toml}: {exc}") from None
        guard = BudgetGuard(open_site_ledger(cfg), cfg.privacy, num_patients=data.train.num_patients)
        exact = Counter(str(q.get("reason")) for q in data.report.get("quarantined", []))
        return cls(cfg, data.card, guard, dict(exact))

    # ------------------------------------------------------------------ reading
    def store(self):
        from client.approval import ApprovalStore

        return ApprovalStore(self.state_dir)

    def pending(self) -> list[Pending]:
        from client.approval import ManifestError, load_manifest, manifest_hash

        status = self.store().status()
        out = []
        for path in sorted(self.inbox.glob("*.json")) if self.inbox.is_dir() else []:
            try:
                m = load_manifest(path)
            except ManifestError as exc:
                out.append(Pending(path.name, None, None, None, str(exc).replace(str(path), path.name), "invalid"))
                continue
            digest = manifest_hash(m)
            rec = status.get(digest)
            state = "pending" if rec is None else ("approved" if rec["action"] == "approve" else "revoked")
            out.append(Pending(path.name, digest, m, m.to_dict(), None, state))
        return out

    def last_approved(self) -> dict | None:
        recs = [r for r in self.store().records() if r.get("action") == "approve"]
        return recs[-1] if recs else None

    def projection(self, manifest: Any) -> dict[str, Any]:
        """Spent now, and epsilon after the whole run if every round is accepted (the guard's accountant).

        ``manifest`` is the parsed :class:`client.approval.RunManifest`: its one ``Mechanism`` (contract) is what
        every round charges, ``num_rounds`` times.
        """
        from privacy.policy import mechanism_problem

        spent = self.guard.spent()
        budget = float(self.guard.policy.max_epsilon)
        out: dict[str, Any] = {"mechanism": None, "rounds": None, "spent": spent, "budget": budget,
                               "projected": None, "over": False, "problem": None, "policy_problem": None}
        if manifest is None:
            out["problem"] = "the manifest is not valid; its privacy cost cannot be projected"
            return out
        mech = manifest.mechanism
        out.update(mechanism=mech, rounds=manifest.num_rounds)
        projected = self.guard.epsilon_of(self.guard.history() + [mech.charge()] * manifest.num_rounds)
        out["projected"] = projected
        out["over"] = projected > budget
        problem = mechanism_problem(self.guard.policy, mech)  # the guard's own rule, not a copy of it
        out["policy_problem"] = f"[{problem[0]}] {problem[1]}" if problem else None
        return out

    def refusal_text(self, proj: dict[str, Any]) -> str | None:
        """Why Approve is refused (with the numbers), or None when it may be approved."""
        if proj["problem"]:
            return proj["problem"]
        m = proj["mechanism"]
        if proj["over"]:
            n = proj["rounds"]
            what = (f"{n} round(s) × {m.steps} steps at σ={m.noise_multiplier:g}, q={m.sample_rate:g}"
                    if m.dp else f"{n} NON-DP round(s) (ε becomes ∞)")
            return (f"over budget: this site has spent ε={_eps(proj['spent'])} of its lifetime budget "
                    f"{proj['budget']:g}; {what} would reach ε={_eps(proj['projected'])}")
        return None

    def budget(self) -> dict[str, Any]:
        """Ledger-derived views: epsilon over time, per run, per round, refusals, releases."""
        records = self.guard.ledger.records()
        completed = {r.get("reservation_seq"): r for r in records if r.get("type") == "round"}
        rounds, runs, points = [], {}, []
        for r in records:
            if r.get("type") == "reservation":
                done = completed.get(r["seq"])
                eps_after = _num(r.get("epsilon_after"))
                points.append((len(points) + 1, eps_after))
                rounds.append({"time": r.get("time"), "run": r.get("run_id"), "round": r.get("server_round"),
                               "dp": r.get("dp"), "sigma": r.get("noise_multiplier"), "clip": r.get("clip_norm"),
                               "q": r.get("sample_rate"), "steps": r.get("steps"),
                               "before": _eps(_num(r.get("epsilon_before"))), "after": _eps(eps_after),
                               "state": "completed" if done else "reserved (no update released)",
                               "released": (["model update (DP-SGD)" if r.get("dp") else "model update (NO DP)"]
                                            + list(done.get("released_metrics") or [])) if done else []})
                run = runs.setdefault(r.get("run_id"), {"run": r.get("run_id"), "rounds": 0, "steps": 0,
                                                        "first": r.get("time"), "before": _num(r.get("epsilon_before")),
                                                        "refusals": 0})
                run["rounds"] += 1
                run["steps"] += int(r.get("steps") or 0)
                run["after"], run["last"] = eps_after, r.get("time")
            elif r.get("type") == "refusal":
                rounds.append({"time": r.get("time"), "run": r.get("run_id"), "round": r.get("server_round"),
                               "dp": r.get("dp"), "sigma": r.get("noise_multiplier"), "clip": r.get("clip_norm"),
                               "q": r.get("sample_rate"), "steps": r.get("steps"),
                               "before": _eps(_num(r.get("epsilon_spent"))), "after": "—",
                               "state": f"refused [{r.get('code')}] {r.get('message')}", "released": []})
                run = runs.setdefault(r.get("run_id"), {"run": r.get("run_id"), "rounds": 0, "steps": 0,
                                                        "first": r.get("time"), "before": None, "refusals": 0,
                                                        "after": None, "last": r.get("time")})
                run["refusals"] += 1
        spent = self.guard.spent()
        budget = float(self.guard.policy.max_epsilon)
        chart = svg.line_chart(
            "Lifetime ε of this dataset after each charged round", "charged round (ledger order)", "ε",
            [svg.Series("ε spent", points)], hlines=[("budget", budget)], chart_id="budget-chart", width=720)
        for run in runs.values():
            run["before"], run["after"] = _eps(run.get("before")), _eps(run.get("after"))
        return {"spent": _eps(spent), "budget": f"{budget:g}", "remaining": _eps(max(0.0, budget - spent)),
                "fraction": 0.0 if math.isinf(spent) else min(1.0, spent / budget) if budget else 1.0,
                "exhausted": spent >= budget, "delta": f"{self.guard.delta:.2e}",
                "accountant": self.guard.policy.accountant, "chart": chart, "rounds": list(reversed(rounds)),
                "runs": list(runs.values()), "released_metrics": list(self.guard.policy.released_metrics)}

    def decisions(self) -> list[dict[str, Any]]:
        status = self.store().status()
        out = []
        for digest, rec in status.items():
            out.append({"digest": digest, "state": "approved" if rec["action"] == "approve" else "revoked",
                        "at": rec.get("at"), "by": rec.get("by"), "reason": rec.get("reason", "")})
        rej = self.inbox / REJECTED / REJECTIONS_FILE
        if rej.is_file():
            for line in rej.read_text(encoding="utf-8").splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                out.append({"digest": r.get("manifest_sha256"), "state": "rejected", "at": r.get("at"),
                            "by": r.get("by"), "reason": r.get("reason")})
        return sorted(out, key=lambda d: str(d.get("at")), reverse=True)

    def context(self) -> dict[str, Any]:
        last = self.last_approved()
        items = []
        for p in self.pending():
            item: dict[str, Any] = {"p": p, "short": (p.digest or "")[:12]}
            if p.data is not None:
                proj = self.projection(p.manifest)
                item.update(rows=mf.rows(p.data), proj=proj, projected=_eps(proj["projected"]),
                            refusal=self.refusal_text(proj),
                            changes=mf.changes(last["manifest"], p.data) if last else None,
                            task=p.data.get("task"))
            items.append(item)
        card = self.card
        return {"site": self.config.name, "card": card, "quarantine": card.get("quarantined", {}),
                "quarantine_exact": self.quarantine_exact,
                "budget": self.budget(), "items": items, "decisions": self.decisions(),
                "last_approved": (last or {}).get("manifest_sha256", "")[:12], "user": _login_name()}

    # ------------------------------------------------------------------ deciding
    def _find(self, digest: str) -> Pending:
        for p in self.pending():
            if p.digest == digest:
                return p
        raise DecisionRefused("no manifest with this hash is in the inbox any more (reload the page)")

    def approve(self, digest: str, by: str | None) -> dict:
        """Approve a pending manifest with ``ApprovalStore.approve`` (what ``atoll site approve --yes`` does)."""
        p = self._find(digest)
        if p.state != "pending":
            raise DecisionRefused(f"run {digest[:12]} is already {p.state} at this site")
        refusal = self.refusal_text(self.projection(p.manifest))
        if refusal:
            raise DecisionRefused(f"not approved: {refusal}")
        return self.store().approve(p.manifest, by=_by(by))

    def reject(self, digest: str, by: str | None, reason: str) -> dict:
        p = self._find(digest)
        if p.state != "pending":
            raise DecisionRefused(f"run {digest[:12]} is already {p.state} at this site; revoke it instead")
        dest = self.inbox / REJECTED
        dest.mkdir(parents=True, exist_ok=True)
        record = {"action": "reject", "manifest_sha256": digest, "file": p.file, "at": _now(), "by": _by(by),
                  "reason": reason[:500]}
        line = json.dumps(record, sort_keys=True) + "\n"
        fd = os.open(dest / REJECTIONS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.inbox / p.file, dest / f"{digest[:12]}-{p.file}")
        return record

    def revoke(self, digest: str, by: str | None, reason: str) -> dict:
        from client.approval import ApprovalStoreError

        try:
            return self.store().revoke(digest, by=_by(by), reason=reason[:500])
        except ApprovalStoreError as exc:
            raise DecisionRefused(str(exc)) from None  # names the manifest hash only


def _num(v: Any) -> float | None:
    from privacy.ledger import LedgerError, epsilon_value

    try:
        return epsilon_value(v)
    except LedgerError:
        return None


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return ""


def _by(by: str | None) -> str | None:
    """Who decides: the form's name (trimmed, printable, <= 100 chars) or, as the CLI does, the login name."""
    if by is None:
        return None
    by = " ".join(by.split())[:100]
    return by or None
