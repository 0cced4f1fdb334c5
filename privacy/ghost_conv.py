"""Cheaper per-sample gradients and ghost norms for convolutions, registered into Opacus.

Why: on a CPU, Opacus' stock conv grad sampler (unfold the input, then a batched einsum) costs several times
the non-private step, and in hook mode autograd *also* computes the ordinary summed weight gradient, which
DP-SGD throws away. This module plugs into Opacus' own extension points (``register_grad_sampler``,
``register_norm_sampler``) for private subclasses of the layers Atoll's networks use, so Opacus' hooks still
collect activations and backprops and Opacus still computes the clipping factors and adds the noise:

* ``conv_grad_sample`` (grad sampler): per-sample conv weight gradients as ONE batch-grouped convolution
  weight-gradient (batch folded into the channels, ``groups = B * groups``; Rochette et al. 2019), i.e. the
  same oneDNN/cuDNN kernel as the ordinary weight gradient; for outputs with few positions, where grouped
  kernels are slow, unfold + batched matmul.
* ``conv_norm_sample`` (norm sampler, "mixed ghost clipping", Bu et al. 2022): with the unfolded input
  A_i [K, L] and backprops G_i [C_out, L], ||G_i A_i^T||_F^2 = <A_i^T A_i, G_i^T G_i> costs L^2 (K + C_out)
  per sample and never materialises the B x K x C_out per-sample gradients; it is chosen per layer when
  cheaper than instantiating (``use_ghost``), otherwise the gradient is instantiated and its norm taken.
  Linear (ghost norm ||g|| ||a||) and GroupNorm (instantiated, tiny) get matching samplers.
* ``fast_layers(model)`` re-classes every plain Conv/Linear/GroupNorm to these subclasses for the duration
  of private training (parameters, buffers and state-dict keys untouched; classes restored on exit). With
  ``skip_weight_grad=True`` a convolution's backward computes only its input gradient, since the summed
  weight gradient is produced from the per-sample quantities anyway.

Used by ``privacy.dpsgd``'s ``fast`` mode (the grad sampler) and ``ghost-conv`` mode (the norm samplers, in
Opacus' two-backward ghost clipping). Atoll's default single-backward "book-keeping" clipping (mode ``bk``) is
``privacy.fast_clipping``, which needs none of Opacus' hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from opacus.grad_sample.linear import compute_linear_grad_sample
from torch import nn

from .fast_clipping import conv_ghost_sq_norm, conv_patches

# Below this many output positions per sample, unfold + bmm beats a batch-grouped convolution (CPU, oneDNN).
UNFOLD_MAX_POSITIONS = 32
# Cost of touching one float of a materialised per-sample gradient, in multiply-adds (write, norm are
# memory-bound). Calibrated on CPU with bench/dp_overhead.py; only affects speed, never the result.
MATERIALISE_COST = 8.0


class _ConvInputGradOnly(torch.autograd.Function):
    """Convolution whose backward returns only the input gradient (weights get theirs per sample)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups)
        zeros = [0] * (x.dim() - 2)
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, zeros, groups)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        zeros = [0] * (x.dim() - 2)
        grad_in = torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, stride, padding, dilation, False, zeros, groups, [True, False, False]
        )[0]
        return (grad_in,) + (None,) * 6


class _FastConvMixin:
    """Forward of a registered conv: plain, or input-gradient-only when ``_atoll_skip_weight_grad``."""

    _atoll_skip_weight_grad: bool = False

    def _conv_forward(self, input, weight, bias):  # noqa: A002 - torch's signature
        if self._atoll_skip_weight_grad and torch.is_grad_enabled():
            return _ConvInputGradOnly.apply(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return super()._conv_forward(input, weight, bias)  # type: ignore[misc]


class FastConv1d(_FastConvMixin, nn.Conv1d):
    pass


class FastConv2d(_FastConvMixin, nn.Conv2d):
    pass


class FastConv3d(_FastConvMixin, nn.Conv3d):
    pass


class FastLinear(nn.Linear):
    pass


class FastGroupNorm(nn.GroupNorm):
    pass


_FAST: dict[type, type] = {
    nn.Conv1d: FastConv1d,
    nn.Conv2d: FastConv2d,
    nn.Conv3d: FastConv3d,
    nn.Linear: FastLinear,
    nn.GroupNorm: FastGroupNorm,
}
FAST_CONV_TYPES: tuple[type, ...] = (FastConv1d, FastConv2d, FastConv3d)
FAST_TYPES: tuple[type, ...] = tuple(_FAST.values())


def _geometry(layer: nn.Module) -> tuple | None:
    """(stride, padding, dilation) as tuples, or None for string padding / non-zero padding modes."""
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return None
    return tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation)


def _per_sample_weight_grad(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[B, *weight.shape] per-sample weight gradients (sum over positions of g_i x_i^T)."""
    n = x.shape[0]
    w_shape = layer.weight.shape
    positions = g[0].numel() // g.shape[1]
    if layer.groups == 1 and positions <= UNFOLD_MAX_POSITIONS:
        a = conv_patches(layer, x)  # [B, K, L]
        return torch.einsum("bol,bkl->bok", g.reshape(n, g.shape[1], -1), a).reshape(n, *w_shape)
    stride, padding, dilation = _geometry(layer)  # type: ignore[misc]
    d = x.dim() - 2
    xg = x.reshape(1, n * x.shape[1], *x.shape[2:])
    gg = g.reshape(1, n * g.shape[1], *g.shape[2:])
    w_like = layer.weight.new_empty((n * w_shape[0], *w_shape[1:]))
    gs = torch.ops.aten.convolution_backward(
        gg, xg, w_like, None, stride, padding, dilation, False, [0] * d, layer.groups * n, [False, True, False]
    )[1]
    return gs.view(n, *w_shape)


@register_grad_sampler(list(FAST_CONV_TYPES))
def conv_grad_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus grad sampler: per-sample gradients of a FastConv layer's weight and bias."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = (
            _per_sample_weight_grad(layer, x, backprops) if n else layer.weight.new_zeros((0, *layer.weight.shape))
        )
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.reshape(n, layer.out_channels, -1).sum(-1)
    return out


def use_ghost(layer: nn.Module, positions: int) -> bool:
    """Ghost norm when L^2 (K + C_out) < MATERIALISE_COST * K * C_out (per sample), else instantiate.

    Instantiation does the same multiply-adds as the weight gradient it replaces, plus memory-bound passes
    over the B x K x C_out per-sample tensor; the ghost norm costs L^2 (K + C_out) and then one ordinary
    weight gradient — so it wins on layers with few positions and many parameters.
    """
    k = layer.weight[0].numel()
    c = layer.weight.shape[0]
    return layer.groups == 1 and positions * positions * (k + c) < MATERIALISE_COST * k * c


@register_norm_sampler(list(FAST_CONV_TYPES))
def conv_norm_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus norm sampler: per-sample gradient norms of a FastConv layer, ghost or instantiated by cost."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    g = backprops.reshape(n, layer.out_channels, -1)
    if n and layer.weight.requires_grad and use_ghost(layer, g.shape[-1]):
        out = {layer.weight: conv_ghost_sq_norm(layer, x, g).sqrt()}
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = g.sum(-1).norm(2, dim=-1)
        return out
    grads = conv_grad_sample(layer, activations, backprops)
    return {p: gs.reshape(n, -1).norm(2, dim=-1) for p, gs in grads.items()}


@register_norm_sampler(FastLinear)
def linear_norm_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus norm sampler for FastLinear on [B, in] inputs: ||g_i a_i^T|| = ||g_i|| ||a_i|| (ghost)."""
    a = activations[0].to(backprops.dtype)
    if a.dim() != 2:
        raise ValueError("privacy.ghost_conv: FastLinear supports [batch, features] inputs only")
    gnorm = backprops.norm(2, dim=-1)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = gnorm * a.norm(2, dim=-1)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = gnorm
    return out


@register_norm_sampler(FastGroupNorm)
def group_norm_norm_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus norm sampler for FastGroupNorm: Opacus' own per-sample gradients (2 x C floats), their norms."""
    grads = compute_group_norm_grad_sample(layer, activations, backprops)
    return {p: gs.reshape(gs.shape[0], -1).norm(2, dim=-1) for p, gs in grads.items()}


# Per-sample-gradient (hooks) mode: the stock Opacus samplers serve the re-classed Linear/GroupNorm layers.
register_grad_sampler(FastGroupNorm)(compute_group_norm_grad_sample)
register_grad_sampler(FastLinear)(compute_linear_grad_sample)


@contextmanager
def fast_layers(model: nn.Module, *, skip_weight_grad: bool) -> Iterator[nn.Module]:
    """Within the block, plain Conv/Linear/GroupNorm layers of ``model`` use this module's samplers.

    skip_weight_grad: convolutions compute no summed weight gradient in backward (per-sample-gradient
        training only — Opacus' two-pass ghost clipping needs it, pass False there).
    Layers with string padding or non-zero padding modes keep their class (and Opacus' stock sampler).
    """
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for m in model.modules():
            new = _FAST.get(type(m))
            if new is None or (new in FAST_CONV_TYPES and _geometry(m) is None):
                continue
            swapped.append((m, type(m)))
            m.__class__ = new
            if new in FAST_CONV_TYPES:
                m._atoll_skip_weight_grad = skip_weight_grad
        yield model
    finally:
        for m, cls in swapped:
            m.__class__ = cls
            m.__dict__.pop("_atoll_skip_weight_grad", None)
