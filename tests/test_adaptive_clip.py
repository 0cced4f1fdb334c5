"""Adaptive clipping (privacy.adaptive_clip): the noise split, the count's sensitivity, the charge, the audit.

An under-counted epsilon is the worst bug Atoll can have, so each claim is checked on the real parts: the split
against Opacus' optimizer (its attributes and the noise it actually adds), the count's sensitivity on the real
step, the charge through the real guard, and the recomputation through the real audit (Opacus + dp_accounting).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from anchored_run import make_sites, run_anchored
from contract import Mechanism, MechanismError
from contract.mechanism import GRADIENT_NOISE_KEY, gradient_noise_multiplier
from privacy.accounting import compute_epsilon
from privacy.adaptive_clip import CentredAdaClipOptimizer, resolve_mode
from privacy.audit import google_epsilon, verify_run
from privacy.dpsgd import PrivateStep
from privacy.guard import BudgetRefused, RoundRequest
from privacy.keys import load_private_key
from privacy.ledger import canonical_json, sign_record

ADA = Mechanism(noise_multiplier=1.2, clip_norm=1.0, sample_rate=0.04, steps=30, adaptive_clip=True,
                target_unclipped_quantile=0.5, clip_lr=0.2, count_noise=2.0)


def _step(mech: Mechanism, model: nn.Module, seed: int = 0, batch: int = 8) -> PrivateStep:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return PrivateStep(model, opt, mech, expected_batch_size=batch, grad_sample_mode="auto", generator=g)


# ---------------------------------------------------------------------------- the split
def test_split_formula_is_opacus_and_its_noise_is_what_is_added() -> None:
    m = dataclasses.replace(ADA, noise_multiplier=2.0, count_noise=1.2)
    want = (2.0 ** -2 - (2 * 1.2) ** -2) ** -0.5
    assert m.gradient_noise() == pytest.approx(want, rel=1e-12) and m.charge() == (2.0, 0.04, 30)
    assert Mechanism(noise_multiplier=2.0).gradient_noise() == 2.0  # fixed clipping: σ_z = σ
    model = nn.Linear(1000, 100, bias=False)  # 100k noise draws: the std is measured to ~0.3 %
    private = _step(m, model, batch=4)
    opt = private.optimizer
    assert isinstance(opt, CentredAdaClipOptimizer) and private.mode == "hooks"
    # Opacus keeps σ for the accountant and σ_b as its own attributes; σ_z is derived from exactly those
    assert (opt.noise_multiplier, opt.unclipped_num_std) == (2.0, 1.2)
    assert opt.gradient_noise_multiplier == pytest.approx(m.gradient_noise(), rel=1e-12)
    private.step(torch.zeros(0, 1000), torch.zeros(0, dtype=torch.int64))  # empty batch: pure noise
    measured = float(model.weight.grad.std()) * 4 / 1.0  # grad = noise σ_z C / expected batch size, C0 = 1
    assert measured == pytest.approx(want, rel=0.015) and abs(measured - 2.0) > 0.5
    private.close()


def test_impossible_splits_are_refused_by_name() -> None:
    with pytest.raises(MechanismError, match="count-noise"):
        dataclasses.replace(ADA, count_noise=0.6).check()  # σ/2 = 0.6: σ_z would be infinite
    assert math.isinf(gradient_noise_multiplier(1.2, 0.6))
    for bad, key in [(dict(count_noise=float("nan")), "count-noise"), (dict(clip_lr=0.0), "clip-lr"),
                     (dict(target_unclipped_quantile=1.5), "target-unclipped-quantile"), (dict(dp=False), "adaptive-clip")]:
        with pytest.raises(MechanismError, match=key):
            dataclasses.replace(ADA, **bad).check()
    with pytest.raises(ValueError, match="per-sample gradients"):
        resolve_mode("bk")


# ---------------------------------------------------------------------------- the count and the clip norm
def _data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g) * torch.linspace(0.1, 3, n).unsqueeze(1), torch.randint(0, 2, (n,), generator=g)


def test_count_sensitivity_is_one_half_per_patient() -> None:
    """One image per sampled patient -> one indicator b_i per patient: removing any one patient moves the raw count
    by at most 1 and the RELEASED centred count sum(b_i - 1/2) + noise by exactly 1/2 (same noise draw)."""
    x, y = _data(9)
    torch.manual_seed(0)
    init = nn.Linear(6, 2).state_dict()
    m = dataclasses.replace(ADA, clip_norm=1.5)

    def released(keep: list[int]) -> tuple[float, float]:
        model = nn.Linear(6, 2)
        model.load_state_dict(init)
        private = _step(m, model, seed=7)
        private.step(x[keep], y[keep])
        opt = private.optimizer
        raw = opt.released_counts[0] + len(keep) / 2  # sum_i b_i + noise
        private.close()
        return opt.released_counts[0], raw

    full, raw_full = released(list(range(9)))
    raw_moves = []
    for drop in range(9):
        less, raw_less = released([i for i in range(9) if i != drop])
        assert abs(full - less) == pytest.approx(0.5, abs=1e-9)
        raw_moves.append(abs(raw_full - raw_less))
    # the raw count Opacus noises moves by 1 for an unclipped patient: twice what its sigma split assumes
    assert max(raw_moves) == pytest.approx(1.0, abs=1e-9) and min(raw_moves) == pytest.approx(0.0, abs=1e-9)


def test_clip_norm_follows_released_counts_only_and_empty_batches_still_step() -> None:
    x, y = _data(64)
    model = nn.Linear(6, 2)
    private = _step(dataclasses.replace(ADA, clip_norm=50.0), model, seed=3, batch=16)
    for i in range(40):
        idx = torch.arange(16) + (i % 4) * 16
        private.step(x[idx] if i % 10 else x[:0], y[idx] if i % 10 else y[:0])  # every 10th batch is empty
    opt = private.optimizer
    assert len(opt.released_counts) == 40 and all(math.isfinite(c) for c in opt.clip_norms)
    # C from the released counts and public constants alone (q P = 16): post-processing of released values
    c = 50.0
    for k, (count, used) in enumerate(zip(opt.released_counts, opt.clip_norms)):
        assert used == pytest.approx(c, rel=1e-12), k
        frac = min(1.0, max(0.0, count / 16 + 0.5))
        c *= math.exp(-0.2 * (frac - 0.5))
    assert float(opt.max_grad_norm) == pytest.approx(c, rel=1e-12)
    assert float(opt.max_grad_norm) < 50.0 / 3  # C=50 clips nobody: the median target pulls it down
    private.close()


# ---------------------------------------------------------------------------- charge, ledger, audit
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = {}
    for name, mech in (("fixed", dataclasses.replace(ADA, adaptive_clip=False, count_noise=0.0)), ("adaptive", ADA)):
        root = tmp_path_factory.mktemp(name)
        keys = root / "consortium" / "keys"
        sites = make_sites(root, keys, {"hospital-a": 10.0}, patients=400)
        out[name] = run_anchored(root, sites, keys, run_name="run-1", rounds=2, min_sites=1, mechanism=mech)
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_adaptive_run_is_charged_and_recomputed_like_fixed_clipping(runs: dict) -> None:
    fixed, ada = (_records(runs[k].site_ledgers[0]) for k in ("fixed", "adaptive"))
    assert [r["type"] for r in ada] == [r["type"] for r in fixed] == ["reservation", "round"] * 2
    for f, a in zip(fixed, ada):
        assert a["charge"] == f["charge"] == [1.2, 0.04, 30]  # the accountant composes σ, not σ_z
        assert a["epsilon_after"] == f["epsilon_after"] and a["history"] == f["history"]
        assert "adaptive_clip" not in f and GRADIENT_NOISE_KEY not in f  # fixed records read as before
        assert a["adaptive_clip"] is True and a["count_noise"] == 2.0
        assert a[GRADIENT_NOISE_KEY] == pytest.approx(ADA.gradient_noise()) and a[GRADIENT_NOISE_KEY] > 1.2
        assert Mechanism.from_record(a) == dataclasses.replace(ADA, accountant="rdp") and Mechanism.from_record(f).adaptive_clip is False
    hist = [tuple(e) for e in ada[-1]["history"]]
    delta = ada[-1]["delta"]
    assert ada[-1]["epsilon_after"] == pytest.approx(compute_epsilon(hist, delta, "rdp"), rel=1e-9)
    assert ada[-1]["epsilon_after"] == pytest.approx(google_epsilon(tuple(hist), delta, "rdp"), rel=0.01)
    res = verify_run(runs["adaptive"].run_dir, runs["adaptive"].site_ledgers)
    assert res.ok, res.text()
    point = res.sites["hospital-a"].points[-1]
    assert point.epsilon_after == pytest.approx(point.opacus_epsilon, rel=1e-9)
    assert point.independent_epsilon == pytest.approx(point.epsilon_after, rel=0.01)


def _resign(run_dir: Path, change) -> None:
    p = run_dir / "ledger.jsonl"
    lines = p.read_text().splitlines()
    rec = json.loads(lines[-1])
    change(rec)
    key = load_private_key(run_dir.parent.parent / rec["site"] / "keys" / "site_ed25519.pem")
    lines[-1] = canonical_json(sign_record(rec, key)).decode()
    p.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(("change", "fragments"), [
    # σ_b lowered: the recorded σ_z is now below what σ and σ_b leave, and not what the run asked
    (lambda r: r.update(count_noise=0.7), ["field 'gradient_noise_multiplier'", "under-count", "field 'count_noise'"]),
    (lambda r: r.update(count_noise=0.6), ["impossible split"]),
    (lambda r: r.update(count_noise=0.0), ["σ_b=0.0"]),
    (lambda r: r.update({GRADIENT_NOISE_KEY: 1.2}), ["field 'gradient_noise_multiplier'"]),
    (lambda r: r.update(adaptive_clip=False), ["field 'adaptive_clip'"]),
    (lambda r: [r.pop(k) for k in ("adaptive_clip", "count_noise", "clip_lr", "target_unclipped_quantile",
                                   GRADIENT_NOISE_KEY)], ["but the run asked adaptive clipping"]),
], ids=["sigma-b-lowered", "impossible", "no-count-noise", "sigma-z-lowered", "flag-off", "claims-fixed"])
def test_resigned_adaptive_record_with_a_bad_split_is_flagged(runs: dict, tmp_path: Path, change,
                                                             fragments: list[str]) -> None:
    import shutil

    src = runs["adaptive"].run_dir
    shutil.copytree(src.parent.parent, tmp_path / "c")
    run_dir = tmp_path / "c" / "runs" / "run-1"
    _resign(run_dir, change)
    errors = [str(f) for f in verify_run(run_dir, []).errors]
    for frag in fragments:
        assert any(frag in e for e in errors), f"{frag!r} not in:\n" + "\n".join(errors)


def test_guard_refuses_an_impossible_split_without_charging(runs: dict) -> None:
    guard = runs["adaptive"].sites["hospital-a"].guard
    spent = guard.spent()
    with pytest.raises(BudgetRefused) as err:
        guard.reserve(RoundRequest("run-2", 1, dataclasses.replace(ADA, count_noise=0.5)), weights_in_sha256="0" * 64)
    assert err.value.code == "BAD_REQUEST" and "count-noise" in err.value.message
    assert guard.spent() == spent


def test_mechanism_round_trips_and_old_forms_read_as_fixed() -> None:
    assert Mechanism.from_config(ADA.to_config()) == ADA and Mechanism.from_dict(ADA.to_dict()) == ADA
    fixed = Mechanism(noise_multiplier=1.5)
    assert set(fixed.to_dict()) == {"dp", "noise_multiplier", "clip_norm", "sample_rate", "steps", "accountant"}
    assert Mechanism.from_dict(fixed.to_dict()) == fixed and Mechanism.from_config(fixed.to_config()) == fixed
    same_but_fixed = dataclasses.replace(ADA, adaptive_clip=False)
    assert ADA.matches_record(ADA.to_record()) and not same_but_fixed.matches_record(ADA.to_record())
    assert not ADA.matches_record(same_but_fixed.to_record())  # a replay never mixes the two mechanisms
    with pytest.raises(ValueError, match="'adaptive-clip' must be bool"):
        Mechanism.from_config({"adaptive-clip": "yes"})


def test_audit_report_shows_the_split(runs: dict) -> None:
    from privacy.report import render_report

    html = render_report(verify_run(runs["adaptive"].run_dir, runs["adaptive"].site_ledgers))
    assert "adaptive start; σ_b=2, σ_z=" in html
