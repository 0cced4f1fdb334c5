"""Build a finished, anchored run folder the way the ServerApp writes it, without Flower processes.

Sites are real :class:`~privacy.guard.BudgetGuard` s over signed :class:`~privacy.ledger.SiteLedger` s; the server
side is the real :class:`server.outputs.RunOutputs` (settings.json, the consortium ledger, the signed round digests,
weights per round, history.json, status.json) fed in the order ``server.app._one_round`` uses. Only the training
and the transport are left out, so audit tests can tamper with every file an auditor reads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from models import state_dict_sha256
from contract import Mechanism
from privacy.guard import BudgetGuard, RoundRequest
from privacy.keys import ensure_site_key, load_private_key
from privacy.ledger import SiteLedger
from privacy.policy import SitePolicy
from privacy.registry import SiteEntry, SiteRegistry
from server.outputs import RunOutputs
from server.settings import RunSettings
from server.sitebook import RoundBook, SiteRound


@dataclass
class Site:
    name: str
    key_path: Path
    ledger_path: Path
    guard: BudgetGuard
    patients: int

    @property
    def key(self):
        return load_private_key(self.key_path)


@dataclass
class AnchoredRun:
    root: Path
    keys_dir: Path
    settings: RunSettings
    sites: dict[str, Site] = field(default_factory=dict)
    out: RunOutputs | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.settings.run_dir) / self.settings.run_name

    @property
    def site_ledgers(self) -> list[Path]:
        return [s.ledger_path for s in self.sites.values()]

    @property
    def consortium_key(self):
        return load_private_key(self.keys_dir / "consortium_ed25519.pem")


def make_sites(root: Path, keys_dir: Path, budgets: dict[str, float], *, patients: int = 1500,
               accountant: str = "rdp", policy_extra: dict | None = None, register: bool = True) -> dict[str, Site]:
    """Site identities (key, ledger, guard) under ``root/<site>/``, their public keys enrolled in ``keys_dir``."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    sites = {}
    registry = SiteRegistry(keys_dir / "registry.json")
    for name, budget in budgets.items():
        pem = root / name / "keys" / "site_ed25519.pem"
        (keys_dir / f"{name}.pub").write_bytes(ensure_site_key(pem))
        ledger = SiteLedger(root / name / "state" / "ledger.jsonl", site=name, signing_key=load_private_key(pem))
        table = {"max_epsilon": budget, "accountant": accountant, **(policy_extra or {})}
        guard = BudgetGuard(ledger, SitePolicy.from_table(table, "test [privacy]"), num_patients=patients)
        sites[name] = Site(name, pem, ledger.path, guard, patients)
        registry.entries[name] = SiteEntry(name, train_examples=2 * patients, train_patients=patients)
    if register:
        registry.save()
    return sites


def _weights(tag: int) -> ArrayRecord:
    return ArrayRecord({"w": torch.full((2, 3), float(tag)), "b": torch.arange(3, dtype=torch.float32) + tag})


def run_anchored(root: Path, sites: dict[str, Site], keys_dir: Path, *, run_name: str = "run-1", rounds: int = 3,
                 **settings_kw) -> AnchoredRun:
    """Run ``rounds`` rounds of ``run_name`` over ``sites`` (every site contributes every round) and finish it."""
    kw = dict(num_server_rounds=rounds, run_dir=str(root / "runs"), run_name=run_name, keys_dir=str(keys_dir),
              noise_multiplier=1.2, clip_norm=1.0, sample_rate=0.04, local_steps=30)
    kw.update(settings_kw)
    # the mechanism's fields by their run-config names (local_steps = Mechanism.steps), into the one type
    names = {"noise_multiplier": "noise_multiplier", "clip_norm": "clip_norm", "sample_rate": "sample_rate",
             "local_steps": "steps", "dp": "dp"}
    fields_ = {names[k]: kw.pop(k) for k in list(kw) if k in names}
    mechanism = kw.pop("mechanism", None) or Mechanism(**fields_)  # or a whole Mechanism (adaptive clipping)
    settings = RunSettings(**kw, mechanism=mechanism)
    out = RunOutputs.create(Path(settings.run_dir), run_name, settings)
    arrays = _weights(0)
    prev = out.digest(0, arrays, [])
    out.save_weights(0, arrays)
    for rnd in range(1, rounds + 1):
        book = RoundBook(rnd, out.ledger)
        w_in = state_dict_sha256(arrays.to_torch_state_dict())
        for name, site in sites.items():
            req = RoundRequest(run_name, rnd, settings.mechanism)
            res = site.guard.reserve(req, weights_in_sha256=w_in)
            rec = site.guard.complete(res, update_sha256=hashlib.sha256(f"{name}|{rnd}".encode()).hexdigest(),
                                      num_examples=2 * site.patients, server_prev_digest=prev)
            wired = json.loads(json.dumps(rec))  # as it arrives over the wire
            out.ledger.accept(wired, site=name)
            book.accepted_records.append(wired)
            book.sites[name] = SiteRound(status="contributed", train={"num-examples": 2.0 * site.patients},
                                         epsilon=float(rec["epsilon_after"]), delta=float(rec["delta"]))
        arrays = _weights(rnd)
        prev = out.digest(rnd, arrays, book.accepted_records)
        out.save_weights(rnd, arrays)
        out.record_round(book, 0.0)
    out.finish("completed")
    return AnchoredRun(root, keys_dir, settings, sites, out)
