"""Faster per-sample gradients (and ghost norms) for convolutions, registered into Opacus.

Why: on a CPU, Opacus' stock conv grad sampler (unfold the input, then a batched einsum) costs several
times the non-private step, and in hook mode autograd *also* computes the ordinary summed weight gradient,
which DP-SGD throws away (``DPOptimizer`` overwrites ``p.grad`` with the clipped, noised sum). This module
keeps Opacus' mechanism (its hooks collect activations and backprops; its ``DPOptimizer`` clips at C and
adds the Gaussian noise) and changes only how a convolution's per-sample gradient is computed:

* ``conv_grad_sample`` — per-sample weight gradients as ONE grouped convolution weight-gradient
  (the batch folded into the channel axis, ``groups = B * groups``; Rochette et al. 2019), which uses the
  same oneDNN/cuDNN kernel as the ordinary weight gradient; for small outputs (few spatial positions,
  where grouped kernels are inefficient) unfold + batched matmul is used instead.
* ``conv_norm_sample`` — per-sample gradient NORMS for Opacus' ghost clipping ("mixed ghost clipping",
  Bu et al. 2022): with the unfolded input A_i [K, L] and backprops G_i [C_out, L],
  ||G_i A_i^T||_F^2 = <A_i^T A_i, G_i^T G_i> costs L^2 (K + C_out) instead of L K C_out, so it is used
  per layer only when cheaper; otherwise the gradient is instantiated and its norm taken.
* ``fast_convs(model)`` — temporarily re-classes every ``nn.ConvNd`` to a subclass registered with the
  two functions above; with ``skip_weight_grad=True`` (instantiating mode) the convolution's backward
  computes only the input gradient, so the discarded summed weight gradient is never computed.

Parameters, buffers and state-dict keys are untouched, and the original classes are restored on exit.
tests/test_dpsgd.py checks per-sample gradients and norms against Opacus' own hook mode to 1e-5.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.utils.tensor_utils import unfold3d
from torch import nn

# Below this many output positions per sample, unfold + bmm beats a batch-grouped convolution (CPU, oneDNN).
UNFOLD_MAX_POSITIONS = 64


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


_FAST: dict[type, type] = {nn.Conv1d: FastConv1d, nn.Conv2d: FastConv2d, nn.Conv3d: FastConv3d}
FAST_CONV_TYPES: tuple[type, ...] = tuple(_FAST.values())


def _geometry(layer: nn.Module) -> tuple | None:
    """(stride, padding, dilation) as tuples, or None for string padding / non-zero padding modes."""
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return None
    return tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation)


def _unfold(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """im2col: [B, C_in * prod(kernel), L] in the weight's (C_in, *kernel) order."""
    stride, padding, dilation = _geometry(layer)  # type: ignore[misc]
    d = x.dim() - 2
    if d == 2:
        return F.unfold(x, layer.kernel_size, dilation=dilation, padding=padding, stride=stride)
    if d == 1:
        return F.unfold(
            x.unsqueeze(-2), (1, layer.kernel_size[0]), dilation=(1, dilation[0]), padding=(0, padding[0]),
            stride=(1, stride[0]),
        )
    return unfold3d(x, kernel_size=layer.kernel_size, padding=padding, stride=stride, dilation=dilation)


def _per_sample_weight_grad(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[B, *weight.shape] per-sample weight gradients (sum over positions of g_i x_i^T)."""
    n = x.shape[0]
    w_shape = layer.weight.shape
    positions = g[0].numel() // g.shape[1]
    if layer.groups == 1 and positions <= UNFOLD_MAX_POSITIONS:
        a = _unfold(layer, x)  # [B, K, L]
        gs = torch.bmm(g.reshape(n, g.shape[1], -1), a.transpose(1, 2))  # [B, C_out, K]
        return gs.view(n, *w_shape)
    stride, padding, dilation = _geometry(layer)  # type: ignore[misc]
    d = x.dim() - 2
    groups = layer.groups * n
    xg = x.reshape(1, n * x.shape[1], *x.shape[2:])
    gg = g.reshape(1, n * g.shape[1], *g.shape[2:])
    w_like = layer.weight.new_empty((n * w_shape[0], *w_shape[1:]))
    gs = torch.ops.aten.convolution_backward(
        gg, xg, w_like, None, stride, padding, dilation, False, [0] * d, groups, [False, True, False]
    )[1]
    return gs.view(n, *w_shape)


def _empty(layer: nn.Module, x: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    out = {layer.weight: layer.weight.new_zeros((0, *layer.weight.shape))}
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = layer.bias.new_zeros((0, *layer.bias.shape))
    return out


@register_grad_sampler(list(FAST_CONV_TYPES))
def conv_grad_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus grad sampler: per-sample gradients of a (Fast)Conv layer's weight and bias."""
    x = activations[0].to(backprops.dtype)
    if x.shape[0] == 0:
        return _empty(layer, x)
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = _per_sample_weight_grad(layer, x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.reshape(backprops.shape[0], backprops.shape[1], -1).sum(-1)
    return out


def ghost_is_cheaper(layer: nn.Module, positions: int) -> bool:
    """Ghost norm cost L^2 (K + C_out) vs instantiation L K C_out (per sample)."""
    k = layer.weight[0].numel()
    return layer.groups == 1 and positions * (k + layer.out_channels) < k * layer.out_channels


@register_norm_sampler(list(FAST_CONV_TYPES))
def conv_norm_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus norm sampler (ghost clipping): per-sample gradient norms, ghost or instantiated by cost."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if n == 0:
        return {p: x.new_zeros((0,)) for p in (layer.weight, layer.bias) if p is not None and p.requires_grad}
    g = backprops.reshape(n, backprops.shape[1], -1)
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        if ghost_is_cheaper(layer, g.shape[-1]):
            a = _unfold(layer, x)  # [B, K, L]
            aa = torch.bmm(a.transpose(1, 2), a)  # [B, L, L]
            gg = torch.bmm(g.transpose(1, 2), g)
            out[layer.weight] = (aa * gg).sum((1, 2)).clamp_min(0).sqrt()
        else:
            gs = conv_grad_sample(layer, activations, backprops)[layer.weight]
            out[layer.weight] = gs.reshape(n, -1).norm(2, dim=-1)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(-1).norm(2, dim=-1)
    return out


@contextmanager
def fast_convs(model: nn.Module, *, skip_weight_grad: bool) -> Iterator[nn.Module]:
    """Within the block, every plain ``nn.ConvNd`` of ``model`` uses this module's samplers.

    ``skip_weight_grad=True`` only for per-sample-gradient training (Opacus hook mode + DPOptimizer): the
    summed weight gradient is then never computed. Ghost clipping needs it (its second backward) — pass False.
    """
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for m in model.modules():
            new = _FAST.get(type(m))
            if new is not None and _geometry(m) is not None:  # others keep Opacus' stock sampler
                swapped.append((m, type(m)))
                m.__class__ = new
                m._atoll_skip_weight_grad = skip_weight_grad
        yield model
    finally:
        for m, cls in swapped:
            m.__class__ = cls
            m.__dict__.pop("_atoll_skip_weight_grad", None)
