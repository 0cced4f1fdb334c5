"""Adaptive clipping (Andrew et al., NeurIPS 2021) as one DP-SGD mechanism: Opacus' AdaClipDPOptimizer, made exact.

What one step releases, and why the accountant still charges ``(σ, q, steps)`` (contract.mechanism):

* the clipped-gradient sum at the current C_t plus N(0, (σ_z C_t)^2 I): sensitivity C_t for adding or removing one
  patient (at most one image per sampled patient, privacy.dpsgd);
* the CENTRED count of sampled patients whose gradient was not clipped, sum_i (b_i - 1/2) + N(0, σ_b^2) with
  b_i = 1 if ||g_i|| <= C_t: one indicator per sampled patient, so adding or removing a patient moves it by 1/2.

Together that is one Gaussian mechanism of noise multiplier σ with 1/σ^2 = 1/σ_z^2 + (1/2 / σ_b)^2 (Thm 1), so
``σ_z = (σ^-2 - (2σ_b)^-2)^(-1/2)`` — Opacus' ``add_noise`` uses exactly this formula. Poisson sampling of
patients at rate q then makes it the sampled Gaussian mechanism the RDP/PRV accountants compose, ``steps`` times.
C_{t+1} = C_t exp(-η (b̂_t - γ)), with b̂_t = clamp(released count / (q P) + 1/2, 0, 1): a function of the
released count and public constants only, so the whole sequence of clip norms (and the final one) is
post-processing of released values and costs nothing more.

Why a subclass instead of Opacus' optimizer as it ships (opacus 1.5's ``AdaClipDPOptimizer``), three fixes:

1. Opacus adds the noise to the RAW count sum_i b_i, whose add/remove sensitivity is 1, yet splits σ with the
   sensitivity-1/2 formula above: the released pair is then a Gaussian mechanism of a SMALLER noise multiplier
   than the σ it tells the accountant (1/σ_eff^2 = 1/σ^2 + 3/(4σ_b^2)) — an under-counted epsilon. The
   authors' own implementation (TensorFlow Privacy's QuantileEstimatorQuery) centres the indicator at -1/2; so
   does this class: only ``count + noise - |B|/2`` (= sum_i (b_i - 1/2) + noise) is ever used.
2. Opacus divides by the batch's TRUE size (``sample_size``): an un-noised function of which patients were
   sampled steers every later C_t and with it the noise scale. Here the divisor is the expected batch size q P,
   a public constant (as in Andrew et al. and TF Privacy).
3. An empty Poisson batch made Opacus divide 0 by 0 (C became NaN). Here it is an ordinary step: pure noise on
   the gradient, the count is pure noise too, and C moves by what that noise says.

Only the per-sample-gradient route (Opacus hooks / functorch, or privacy.ghost_conv's ``fast`` conv gradients)
exists: the optimizer needs the per-sample norms at C_t, which the book-keeping and ghost routes never expose
as a count.
"""

from __future__ import annotations

import math

import torch
from opacus.optimizers import AdaClipDPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from contract.mechanism import Mechanism

#: the grad-sample modes privacy.dpsgd.PrivateStep can run adaptive clipping with ("auto" picks "hooks")
ADAPTIVE_MODES: tuple[str, ...] = ("hooks", "functorch", "fast")


class CentredAdaClipOptimizer(AdaClipDPOptimizer):
    """Opacus' adaptive-clipping optimizer with a sensitivity-1/2 count over a constant denominator.

    Opacus' ``clip_and_accumulate`` (per-sample clipping at the current C, and the raw counts) and ``add_noise``
    (σ_z = (σ^-2 - (2σ_b)^-2)^(-1/2) on the gradient, σ_b on the count) are used as they are; only the clip-norm
    update reads the count differently (module docstring). ``released_counts`` and ``clip_norms`` keep the
    centred noised counts and the C each step used: released values, for tests and the trainer's report.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, mechanism: Mechanism, expected_batch_size: int,
                 generator: torch.Generator | None = None) -> None:
        if not mechanism.adaptive_clip:
            raise ValueError("CentredAdaClipOptimizer needs a mechanism with adaptive_clip = true")
        mechanism.check("DP mechanism")
        super().__init__(
            optimizer, noise_multiplier=float(mechanism.noise_multiplier),
            target_unclipped_quantile=float(mechanism.target_unclipped_quantile),
            clipbound_learning_rate=float(mechanism.clip_lr),
            # no bounds, as in Andrew et al.: the geometric update keeps C > 0 and moves it by at most exp(η)
            max_clipbound=math.inf, min_clipbound=0.0,
            unclipped_num_std=float(mechanism.count_noise), max_grad_norm=float(mechanism.clip_norm),
            expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator,
        )
        self.mechanism = mechanism
        self.released_counts: list[float] = []
        self.clip_norms: list[float] = []

    def clip_and_accumulate(self) -> None:
        """Opacus' per-sample clipping and counting; an empty batch (Opacus' own code cannot reshape it) adds a zero
        sum and a zero count, so the step still releases noise on both (fix 3)."""
        if self.grad_samples and len(self.grad_samples[0]) == 0:
            for p in self.params:
                _check_processed_flag(p.grad_sample)
                if p.summed_grad is None:
                    p.summed_grad = torch.zeros_like(p)
                _mark_as_processed(p.grad_sample)
            self.unclipped_num = torch.zeros((), device=self.params[0].device) + self.unclipped_num
            return
        super().clip_and_accumulate()

    @property
    def gradient_noise_multiplier(self) -> float:
        """σ_z as Opacus' ``add_noise`` computes it from its own attributes (must equal the mechanism's)."""
        return (self.noise_multiplier ** (-2) - (2 * self.unclipped_num_std) ** (-2)) ** (-1 / 2)

    def update_max_grad_norm(self) -> None:
        """C <- C exp(-η (b̂ - γ)) with b̂ from the released centred count only (module docstring)."""
        # after Opacus' add_noise: unclipped_num = sum_i b_i + N(0, σ_b^2); sample_size = |B| stays inside the
        # released value: count + noise - |B|/2 = sum_i (b_i - 1/2) + noise
        released = float(self.unclipped_num) - self.sample_size / 2.0
        self.released_counts.append(released)
        self.clip_norms.append(float(self.max_grad_norm))
        fraction = min(1.0, max(0.0, released / self.expected_batch_size + 0.5))
        c = float(self.max_grad_norm) * math.exp(-self.clipbound_learning_rate
                                                 * (fraction - self.target_unclipped_quantile))
        self.max_grad_norm = min(self.max_clipbound, max(self.min_clipbound, c))


def resolve_mode(grad_sample_mode: str) -> str:
    """The per-sample-gradient mode adaptive clipping runs with: ``auto`` -> ``hooks``; a mode without per-sample
    gradients (``bk``, ``ghost``, ``ghost-conv``) is a ValueError naming the ones that work."""
    if grad_sample_mode == "auto":
        return "hooks"
    if grad_sample_mode not in ADAPTIVE_MODES:
        raise ValueError(f"adaptive clipping needs per-sample gradients: grad_sample_mode must be 'auto' or one of "
                         f"{', '.join(ADAPTIVE_MODES)}, got {grad_sample_mode!r}")
    return grad_sample_mode


def make_optimizer(optimizer: torch.optim.Optimizer, mechanism: Mechanism, *, expected_batch_size: int,
                   generator: torch.Generator | None = None) -> CentredAdaClipOptimizer:
    """The DP optimizer of an adaptive-clipping round (wraps the local ``optimizer``, like Opacus' DPOptimizer)."""
    opt = CentredAdaClipOptimizer(optimizer, mechanism=mechanism, expected_batch_size=expected_batch_size,
                                  generator=generator)
    if not math.isclose(opt.gradient_noise_multiplier, mechanism.gradient_noise(), rel_tol=1e-12):
        # the ledger records mechanism.gradient_noise() as the σ_z used; Opacus must add exactly that
        raise RuntimeError(f"Opacus would add σ_z={opt.gradient_noise_multiplier!r}, the mechanism records "
                           f"{mechanism.gradient_noise()!r}")
    return opt
