"""Opacus' noise step for an already clipped ``p.grad``, without its three gradient-sized allocations.

``bk`` mode (``privacy.fast_clipping``) hands the optimizer ``p.grad = sum_i min(1, C/||g_i||) g_i``; Opacus'
``DPOptimizerFastGradientClipping`` then, per parameter, deep-copies ``p.grad`` into ``p.summed_grad``, allocates
a zero tensor that it discards (``_generate_noise`` builds it before drawing), draws the Gaussian and allocates
``summed_grad + noise`` as the new ``p.grad``, which ``scale_grad`` divides in place. On DenseNet121 (7.0 M
parameters in 364 tensors, one thread) that bookkeeping made the step 80-97 ms instead of 54-61 ms, most of
which is the draw itself.

``InPlaceNoiseOptimizer`` keeps every step of Opacus' mechanism and control flow (its ``pre_step``, skip logic,
``step_hook``, ``scale_grad``, ``secure_mode`` noise, the processed-flag guard against noising twice) and changes
only where the numbers live: ``summed_grad`` is ``p.grad`` itself and the noise is added in place. Each
parameter's noise is drawn by the same ``torch.normal`` call, in the same order, from the same generator, and
``a + n`` is the same float whether it is written to a new tensor or over ``a``; so the noisy gradient is
bit-for-bit Opacus' (tests/test_inplace_noise.py compares them step by step). Why not upstream: this trades
away Opacus' option to keep accumulating into ``p.grad`` across ``step`` calls without ``zero_grad``, which
``bk`` refuses anyway (two batches must not share one clip bound).
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed


class InPlaceNoiseOptimizer(DPOptimizerFastGradientClipping):
    """``DPOptimizerFastGradientClipping`` whose clipped sum is ``p.grad`` and whose noise is added in place."""

    def accumulate(self) -> None:
        """``p.summed_grad`` is a view of this step's ``p.grad`` (Opacus deep-copies it)."""
        for p in self.params:
            if p.grad is None:
                raise RuntimeError("a trainable parameter has no clipped gradient: the step would add noise to "
                                   "nothing and skip the clip bound; run clip_backward (or zero_clipped_grads)")
            if p.summed_grad is not None:
                # Opacus would add this step's p.grad to the previous one's: two batches under one clip bound
                raise RuntimeError("the previous step's gradient was not cleared: call "
                                   "optimizer.zero_grad(set_to_none=True) before each step")
            # detach(): a fresh tensor object over the same storage, without the processed flag of an old one
            p.summed_grad = p.grad.detach()

    def add_noise(self) -> None:
        """``summed_grad += N(0, (sigma C)^2)`` per parameter; ``p.grad`` is that tensor."""
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        for p in self.params:
            s = p.summed_grad
            _check_processed_flag(s)
            if self.secure_mode:
                s.add_(_generate_noise(std=std, reference=s, generator=self.generator, secure_mode=True))
            elif std != 0:  # Opacus draws nothing for std 0 (it returns zeros): the generator must not advance
                # the very call Opacus' _generate_noise makes (same size, device, dtype, generator)
                s.add_(torch.normal(mean=0, std=std, size=s.shape, device=s.device, generator=self.generator,
                                    dtype=s.dtype))
            p.grad = s.view_as(p)
            _mark_as_processed(s)
