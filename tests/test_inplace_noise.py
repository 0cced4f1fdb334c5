"""privacy.inplace_noise: the bk optimizer's noise step is Opacus' to the bit, done without copies.

Privacy-critical: the noisy gradient is the only thing the mechanism releases. These tests compare it with
stock ``DPOptimizerFastGradientClipping`` bit for bit (same generator, several steps, secure mode, sigma 0,
momentum and weight decay in the wrapped optimizer), through ``PrivateStep`` end to end, and check that the
guards against noising twice or summing two batches under one clip bound hold.
"""

from __future__ import annotations

import pytest
import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn

from contract import Mechanism
from privacy import fast_clipping
from privacy.dpsgd import PrivateStep
from privacy.inplace_noise import InPlaceNoiseOptimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _pair(cls_b, *, sigma: float, secure: bool, seed: int = 11):
    """Two copies of one model, each with a DP optimizer (stock Opacus, and cls_b) on equally seeded generators."""
    out = []
    for cls in (DPOptimizerFastGradientClipping, cls_b):
        m = _model()
        sgd = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        gen = None if secure else torch.Generator().manual_seed(seed)
        if secure:
            torch.manual_seed(seed)  # secure mode draws from the global generator
        out.append((m, cls(sgd, noise_multiplier=sigma, max_grad_norm=0.7, expected_batch_size=8,
                           loss_reduction="mean", generator=gen, secure_mode=secure)))
    return out


def _optimizer(m: nn.Module, generator: torch.Generator | None = None) -> InPlaceNoiseOptimizer:
    return InPlaceNoiseOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                                 expected_batch_size=4, loss_reduction="mean", generator=generator)


def _clipped(m: nn.Module, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in m.parameters()]


@pytest.mark.parametrize("sigma,secure", [(1.3, False), (0.0, False), (2.0, True)])
def test_noisy_gradients_and_updates_are_bit_identical_to_opacus(sigma: float, secure: bool) -> None:
    (m_ref, opt_ref), (m_new, opt_new) = _pair(InPlaceNoiseOptimizer, sigma=sigma, secure=secure)
    for step in range(3):
        for m, opt in ((m_ref, opt_ref), (m_new, opt_new)):
            opt.zero_grad(set_to_none=True)
            for p, g in zip(m.parameters(), _clipped(m, step), strict=True):
                p.grad = g.clone()
            if secure:
                torch.manual_seed(1000 + step)  # both draw the same secure-mode stream
            opt.step()
        for p_ref, p_new in zip(m_ref.parameters(), m_new.parameters(), strict=True):
            assert torch.equal(p_ref.grad, p_new.grad), f"step {step}: noisy gradient differs from Opacus'"
            assert torch.equal(p_ref, p_new), f"step {step}: update differs from Opacus'"
    if not secure:
        assert torch.equal(opt_ref.generator.get_state(), opt_new.generator.get_state())
    if sigma:  # noise was really added (a zero-noise optimizer would also be "identical" at sigma 0)
        clean = _clipped(m_new, 2)
        assert all(not torch.equal(p.grad * 8, c) for p, c in zip(m_new.parameters(), clean, strict=True))


def test_noise_is_added_over_the_clipped_gradient_without_a_copy() -> None:
    m = _model()
    opt = _optimizer(m, torch.Generator().manual_seed(0))
    opt.zero_grad(set_to_none=True)
    grads = [torch.ones_like(p) for p in m.parameters()]
    for p, g in zip(m.parameters(), grads, strict=True):
        p.grad = g
    opt.pre_step()
    for p, g in zip(m.parameters(), grads, strict=True):
        assert p.grad.data_ptr() == g.data_ptr()  # Opacus' optimizer allocates a new tensor here
        assert not torch.equal(p.grad, torch.full_like(p, 0.25))  # 1 / 4 plus noise


def test_private_step_trains_exactly_as_with_opacus_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """bk training end to end: the same seeds give the same weights with the stock Opacus optimizer."""
    torch.manual_seed(5)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))

    def train() -> list[torch.Tensor]:
        m = _model()
        step = PrivateStep(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5),
                           Mechanism(noise_multiplier=1.1, clip_norm=0.5, sample_rate=0.5), expected_batch_size=6,
                           grad_sample_mode="bk", generator=torch.Generator().manual_seed(9))
        for i in range(3):
            step.step(x[: 6 - i], y[: 6 - i])
        step.step(x[:0], y[:0])  # an empty Poisson batch: pure noise
        return [p.detach().clone() for p in step.close().parameters()]

    ours = train()
    m = _model()
    _, bk_optimizer = fast_clipping.make_private_bk(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0,
                                                    max_grad_norm=1.0, expected_batch_size=1)
    assert isinstance(bk_optimizer, InPlaceNoiseOptimizer)
    monkeypatch.setattr(fast_clipping, "InPlaceNoiseOptimizer", DPOptimizerFastGradientClipping)
    stock = train()
    assert all(torch.equal(a, b) for a, b in zip(ours, stock, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(ours, [p.detach() for p in _model().parameters()], strict=True))


def test_a_gradient_that_was_not_cleared_is_refused_before_any_noise() -> None:
    m = _model()
    gen = torch.Generator().manual_seed(0)
    opt = _optimizer(m, gen)
    opt.zero_grad(set_to_none=True)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = gen.get_state()
    before = [p.grad.clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.step()  # no zero_grad: Opacus would add this p.grad into the last one
    assert torch.equal(gen.get_state(), state)
    assert all(torch.equal(p.grad, b) for p, b in zip(m.parameters(), before, strict=True))


def test_a_parameter_without_a_clipped_gradient_is_refused() -> None:
    m = _model()
    opt = _optimizer(m)
    opt.zero_grad(set_to_none=True)
    next(m.parameters()).grad = torch.zeros_like(next(m.parameters()))
    with pytest.raises(RuntimeError, match="no clipped gradient"):
        opt.step()


def test_zero_grad_without_set_to_none_still_starts_a_fresh_clip_sum() -> None:
    """zero_grad(set_to_none=False) zeroes p.grad in place; the next step's sum must not carry the old flag
    (Opacus' processed-flag check would raise ValueError on the second step if it did)."""
    m = _model()
    opt = _optimizer(m, torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        for p in m.parameters():
            p.grad = torch.ones_like(p) if p.grad is None else p.grad.add_(1.0)
        opt.step()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
