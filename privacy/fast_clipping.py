"""Fast per-sample clipping for DP-SGD: one backward pass, no redundant weight gradients, ghost norms
for the convolutions where they are cheaper.

Why: with Opacus' ``hooks`` mode a DP step does the ordinary backward (input *and* weight gradients), then
recomputes every weight gradient once per sample, so the weight-gradient work is paid twice; its ``ghost``
mode pays a second full backward instead, and its ghost norms cover Linear/Embedding only. The
"book-keeping" scheme (Bu et al. 2023, *Differentially private optimization on large model at small cost*)
pays for the weight-gradient work once:

1. forward: a forward hook on every trainable layer (Conv1d/2d/3d, Linear, GroupNorm) records the layer's
   input activation ``a`` (and a GroupNorm's per-group mean and 1/std, read from its autograd node) and
   registers a gradient hook on the layer's output, on the node that produced it, so that the output itself
   is not held to the backward;
2. backward: ``torch.autograd.grad(loss, <outputs of the layers that read the input>)``; the hook on every
   layer output receives that layer's output gradient ``g`` (per sample, because the loss is the SUM
   of per-sample losses and nothing mixes samples — no BatchNorm) and takes its norms at once, so ``g`` is
   freed as in a plain backward. Autograd computes only activation gradients: no parameter gradient, no
   gradient of the input image;
3. per-sample norms, per layer, by the cheaper of two exact methods (mixed ghost clipping, Bu et al. 2022):
   *instantiate* the per-sample weight gradients (a pointwise or few-position convolution's by one batched
   matmul, any other's by one grouped-convolution backward with the batch folded into the groups; a
   GroupNorm's by ATen's own GroupNorm-backward reduction with the batch folded into the channels) or the
   *ghost* norm ``||G_i||^2 = sum_{p,q} <a_ip, a_iq> <g_ip, g_iq>`` over output positions p, q (no per-sample
   gradient, cost ~ T^2 instead of T * in * out, for layers with few positions T and many channels; the
   patch products ``<a_ip, a_iq>`` of a stride-1 conv on a small map come from the Gram matrix of its input
   positions, one batched matmul and a strided add per kernel offset, not from im2col, which was most of
   the ghost norm's time on CPU);
4. clip factor ``c_i = min(1, C / (||grad_i|| + 1e-6))`` (Opacus' formula), then the clipped sum
   ``sum_i c_i grad_i`` per layer: a weighted sum of the kept per-sample gradients, or one ordinary
   weight-gradient kernel on ``c_i * g_i`` for ghost layers and for the convolutions whose input and output
   gradient are smaller than their per-sample gradients (``recompute_clipped_sum``: the memory rule that
   keeps deep networks such as DenseNet121 from holding n copies of most of their weights). It is written to
   ``p.grad``.

Noise and scaling stay Opacus': ``make_private_bk`` pairs the module with
``privacy.inplace_noise.InPlaceNoiseOptimizer``, Opacus' ``DPOptimizerFastGradientClipping`` with the noise
added in place (bit-identical), which adds N(0, (sigma C)^2) to ``p.grad`` and divides by the expected batch
size — the mechanism (and what the accountant charges) is exactly the ``hooks`` one.

Privacy-critical invariants, enforced rather than assumed: every trainable parameter belongs to a supported
layer (else ``NotImplementedError`` at wrap time, never a silently unclipped parameter); a parameter shared by
two layers, a layer called twice in one forward (weight tying) or an in-place edit of the output of a layer
that reads the model input (autograd.grad would then stop above that layer's hook) is refused; an in-place
edit of any other output is exact (the hook, registered before it, receives the gradient of the value
before the edit: the layer's own output gradient); a step whose
``p.grad`` was not cleared is refused (it would add two batches under one clip bound). The per-sample norms
are tested against Opacus ``hooks`` mode in tests/test_dp_overhead_modes.py.

This is the ``bk`` mode of ``privacy.dpsgd.PrivateStep`` (Atoll's default for Conv/Linear/GroupNorm networks)
and the only book-keeping implementation in Atoll. An earlier second one ran the same arithmetic inside
Opacus' module backward hooks (``GradSampleModuleFastGradientClipping`` with norm samplers that stashed
per-layer quantities); it was removed because this one, with only a forward hook per layer and a tensor hook
per layer output, was faster and used less memory on AtollNet (bench/dp_overhead.py) and enforces the
invariants above itself.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from opacus.utils.tensor_utils import unfold3d
from torch import nn

from .inplace_noise import InPlaceNoiseOptimizer

GhostPolicy = Literal["auto", "always", "never"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (*_CONVS, nn.Linear, nn.GroupNorm)

#: Opacus' clip factor is ``C / (norm + CLIP_EPS)`` capped at 1; the same constant keeps both modes identical.
CLIP_EPS = 1e-6


# --------------------------------------------------------------------------------------------------- layers
def _conv_padding(layer: nn.Module) -> tuple[int, ...]:
    """Explicit symmetric zero padding of a conv (``"valid"``, ``"same"`` when symmetric, or numbers)."""
    dims = len(layer.kernel_size)
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return (0,) * dims
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        if any(t % 2 for t in total):
            raise NotImplementedError(f"{type(layer).__name__} with asymmetric padding='same' is not supported")
        return tuple(t // 2 for t in total)
    return tuple(layer.padding)


def _check_layer(name: str, layer: nn.Module) -> None:
    if type(layer) in _CONVS and layer.padding_mode != "zeros":
        raise NotImplementedError(
            f"layer {name!r}: {type(layer).__name__}(padding_mode={layer.padding_mode!r}) is not supported "
            "by fast clipping; use padding_mode='zeros' or grad_sample_mode='hooks'"
        )
    if type(layer) in _CONVS:
        _conv_padding(layer)


def conv_positions(layer: nn.Module, grad_out: torch.Tensor) -> tuple[int, int, int]:
    """(T output positions, P = in/groups * kernel, O out channels) of a conv, the sizes the costs depend on."""
    t = math.prod(grad_out.shape[2:])
    p = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
    return t, p, layer.out_channels


def use_ghost(
    layer: nn.Module, grad_out: torch.Tensor, policy: GhostPolicy = "auto", *,
    in_shape: tuple[int, ...], recomputed: bool = False,
) -> bool:
    """Whether a conv's per-sample norm is computed as a ghost norm rather than by instantiation.

    Instantiation costs ~ n T P O multiply-adds and writes n P O floats; the ghost norm costs its patch
    products ``<a_p, a_q>`` plus ``<g_p, g_q>`` (``conv_ghost_sq_norm``) and then one ordinary
    weight-gradient kernel for the clipped sum, which a layer whose clipped sum is recomputed anyway
    (``recomputed``, ``recompute_clipped_sum``) pays either way. ``auto`` compares multiply-adds per sample,
    with factors measured on CPU/oneDNN:

    * patch products from the input-position Gram matrix (stride-1 convs on small maps): ``Cin L^2 +
      T^2 (O + K)`` for L input positions and K kernel offsets; ghost when 4x (2x when recomputed) that is at
      most ``T P O`` (DenseNet121 at 64 px: its 3x3 convs on 8x8 maps, recomputed, 4.8 ms as ghost vs 10.9
      ms instantiated, at batch 64; on 16x16, not recomputed, 64 ms vs 23 ms);
    * otherwise (pointwise convs, im2col): ``T^2 (P + O)``; ghost when 2x (1x when recomputed) that is at
      most ``T P O`` (AtollNet: T=16, P=576, O=64 ~1.4x faster as ghost; T=49, P=288, O=64 ~2x slower).

    ``in_shape``: the input's spatial shape. Grouped convolutions are always instantiated.
    """
    if type(layer) not in _CONVS or layer.groups != 1 or policy == "never":
        return False
    if policy == "always":
        return True
    t, p, o = conv_positions(layer, grad_out)
    if _input_gram_route(layer, tuple(in_shape), tuple(grad_out.shape[2:])):
        positions = math.prod(in_shape)
        ghost = layer.in_channels * positions * positions + t * t * (o + math.prod(layer.kernel_size))
        factor = 2 if recomputed else 4
    else:
        ghost, factor = t * t * (p + o), 1 if recomputed else 2
    return factor * ghost <= t * p * o


def _conv_weight_grad(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, *, per_sample: bool) -> torch.Tensor:
    """Weight gradient of a conv from its input ``a`` and output gradient ``g`` with oneDNN's kernel.

    ``per_sample=True`` folds the batch into the groups (input [1, n*Cin, ...], output [1, n*Cout, ...],
    n*groups groups), so the same kernel returns the n per-sample gradients [n, Cout, Cin/groups, *k].
    """
    n = a.shape[0]
    dims = a.dim() - 2
    w_shape = tuple(layer.weight.shape)
    groups = layer.groups
    if per_sample:
        a = a.reshape(1, n * a.shape[1], *a.shape[2:])
        g = g.reshape(1, n * g.shape[1], *g.shape[2:])
        w_shape = (n * w_shape[0], *w_shape[1:])
        groups = n * groups
    dummy = g.new_empty(1).expand(w_shape)  # shape only, as torch.nn.grad.conv2d_weight does
    gw = torch.ops.aten.convolution_backward(
        g, a, dummy, None, layer.stride, _conv_padding(layer), layer.dilation, False, [0] * dims, groups,
        (False, True, False),
    )[1]
    return gw.view(n, *layer.weight.shape) if per_sample else gw


#: Below this many output positions per sample a batch-grouped convolution is slow on CPU (oneDNN): the
#: per-sample gradients come from im2col + one batched matmul instead (the same rule as privacy.ghost_conv).
UNFOLD_MAX_POSITIONS = 32


def _is_pointwise(layer: nn.Module) -> bool:
    """A 1x1 (x1) convolution with stride 1, no padding, one group: a per-position Linear layer."""
    return (layer.groups == 1 and all(k == 1 for k in layer.kernel_size) and all(s == 1 for s in layer.stride)
            and not any(_conv_padding(layer)))


def conv_per_sample_weight_grads(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients [n, *weight.shape] of a conv, ``sum_t g_it a_it^T`` over output positions.

    Three exact routes to the same sum, picked by speed on CPU (bench/dp_overhead.py, DenseNet121 at 64 px:
    a 512->128 1x1 conv on 8x8 takes 34 ms grouped, 8.5 ms as one bmm; a 3x3 conv on 4x4 15 ms grouped, 7 ms
    unfolded): a pointwise conv is one batched matmul of the output gradient with the input; a conv with few
    output positions is im2col + one batched matmul; otherwise one batch-grouped convolution weight-gradient.
    """
    n = a.shape[0]
    o = layer.out_channels
    if _is_pointwise(layer) or (layer.groups == 1 and math.prod(g.shape[2:]) <= UNFOLD_MAX_POSITIONS):
        gs = torch.bmm(g.reshape(n, o, -1), conv_patches(layer, a).transpose(1, 2))
        return gs.view(n, *layer.weight.shape)
    return _conv_weight_grad(layer, a, g, per_sample=True)


def conv_patches(layer: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Input patches (im2col) of a groups=1 conv of any spatial rank: [n, P, T] with P = Cin * prod(kernel),
    in the weight's (Cin, *kernel) order. Also serves privacy.ghost_conv's Opacus samplers."""
    if _is_pointwise(layer):  # im2col of a 1x1 conv is the input itself: a view, not a copy
        return a.reshape(a.shape[0], a.shape[1], -1)
    pad = _conv_padding(layer)
    dims = a.dim() - 2
    if dims == 2:
        return F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=pad, stride=layer.stride)
    if dims == 1:
        return F.unfold(
            a.unsqueeze(2), (1, layer.kernel_size[0]), dilation=(1, layer.dilation[0]), padding=(0, pad[0]),
            stride=(1, layer.stride[0]),
        )
    return unfold3d(a, kernel_size=layer.kernel_size, padding=pad, stride=layer.stride, dilation=layer.dilation)


def conv_output_shape(layer: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial output shape of a conv on an input of spatial shape ``in_shape``."""
    return tuple((i + 2 * p - d * (k - 1) - 1) // s + 1 for i, p, d, k, s in zip(
        in_shape, _conv_padding(layer), layer.dilation, layer.kernel_size, layer.stride))


def _input_gram_route(layer: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
    """Whether a groups=1 conv's patch products ``<a_p, a_q>`` come from the Gram matrix of its input
    positions (``input_gram_patch_products``) rather than from im2col: when that Gram matrix is no larger than
    the patches (small maps; never a strided stem on a large image), and never for a pointwise conv, whose
    patches are the input itself (a view, no copy); ``use_ghost`` prices the route this picks. im2col's copy,
    not its multiply-adds, is what it costs on CPU: a 128 -> 256 3x3 stride-2 conv on 8x8 maps at batch 64
    takes 7.5 ms through im2col, 2.7 ms through the Gram matrix, though the latter does 1.8x the
    multiply-adds."""
    if _is_pointwise(layer):
        return False
    t, positions = math.prod(out_shape), math.prod(in_shape)
    return positions * positions <= layer.in_channels * math.prod(layer.kernel_size) * t


def input_gram_patch_products(layer: nn.Module, a: torch.Tensor, out_shape: tuple[int, ...]) -> torch.Tensor:
    """``<a_p, a_q>`` [n, T, T] for every pair of output positions p, q of a groups=1 conv, without im2col.

    A patch is the input at positions ``s p + d k - pad`` for the kernel offsets k (zero outside the input),
    so ``<a_p, a_q> = sum_k Gram[s p + d k - pad, s q + d k - pad]`` with ``Gram = a^T a`` over the input
    positions (Cin multiply-adds per pair, once for all offsets): one batched matmul, then one strided
    slice-add per kernel offset, the zero padding being the slices' clipped edges.
    """
    n, c = a.shape[:2]
    in_shape = tuple(a.shape[2:])
    flat = a.reshape(n, c, -1)
    gram = torch.bmm(flat.transpose(1, 2), flat)  # [n, L, L], contiguous
    t = math.prod(out_shape)
    aat = a.new_zeros(n, t, t)
    for (size, out_stride, out_offset), (in_stride, in_offset) in _gram_slices(
            in_shape, tuple(out_shape), _conv_padding(layer), tuple(layer.dilation), tuple(layer.stride),
            tuple(layer.kernel_size)):
        aat.as_strided((n, *size), (t * t, *out_stride), out_offset).add_(
            gram.as_strided((n, *size), (gram.shape[1] ** 2, *in_stride), in_offset))
    return aat


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))


@functools.lru_cache(maxsize=256)
def _gram_slices(in_shape: tuple[int, ...], out_shape: tuple[int, ...], padding: tuple[int, ...],
                 dilation: tuple[int, ...], stride: tuple[int, ...], kernel: tuple[int, ...]) -> tuple:
    """Per kernel offset that reads some input, the strided window of one sample's ``aat`` [*out, *out]
    (sizes, strides, offset) and of its Gram matrix [*in, *in] (strides, offset) to add to it: a function of
    the geometry alone, computed once per layer shape rather than in every backward."""
    out_strides, in_strides = _strides(out_shape * 2), _strides(in_shape * 2)
    dims = len(in_shape)
    windows = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        size, out_start, in_start, in_step = [], [], [], []
        for o, size_in, size_out, pad, dil, st in zip(offset, in_shape, out_shape, padding, dilation, stride):
            shift = o * dil - pad  # output position u reads input position st * u + shift
            lo, hi = max(0, -(shift // st)), min(size_out - 1, (size_in - 1 - shift) // st)
            if hi < lo:  # this offset reads only padding
                break
            size.append(hi - lo + 1)
            out_start.append(lo)
            in_start.append(st * lo + shift)
            in_step.append(st)
        else:
            out_offset = sum(v * s for v, s in zip(out_start * 2, out_strides))
            in_offset = sum(v * s for v, s in zip(in_start * 2, in_strides))
            in_stride = tuple(in_strides[d] * in_step[d % dims] for d in range(2 * dims))
            windows.append(((tuple(size * 2), out_strides, out_offset), (in_stride, in_offset)))
    return tuple(windows)


def conv_ghost_sq_norm(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample squared Frobenius norm of a conv's weight gradient without forming it:
    ``sum_{p,q} <a_p, a_q> <g_p, g_q>`` over output positions (Bu et al. 2022). ``g``: [n, O, *out] or
    [n, O, T]. The patch products come from the input itself (pointwise), from the Gram matrix of the input
    positions (``input_gram_patch_products``: small maps) or from im2col."""
    n = a.shape[0]
    gg = g.reshape(n, g.shape[1], -1)  # [n, O, T]
    out_shape = conv_output_shape(layer, tuple(a.shape[2:]))
    if _input_gram_route(layer, tuple(a.shape[2:]), out_shape):
        aat = input_gram_patch_products(layer, a, out_shape)
    else:
        patches = conv_patches(layer, a)  # [n, P, T]
        aat = torch.bmm(patches.transpose(1, 2), patches)  # [n, T, T]
    ggt = torch.bmm(gg.transpose(1, 2), gg)
    return aat.mul_(ggt).sum(dim=(1, 2)).clamp_(min=0)


#: Below this many positions per channel, ATen's GroupNorm backward kernel (4x slower than two matrix-vector
#: products on 2x2 maps, 4x faster from 4x4 up: DenseNet121 at 64 px) is not used for the per-sample gradients.
GROUP_NORM_KERNEL_MIN_POSITIONS = 16

GroupNormStats = tuple[torch.Tensor, torch.Tensor]  # (mean, rstd), each [n, groups], as aten.native_group_norm


def group_norm_stats(layer: nn.Module, output: torch.Tensor) -> GroupNormStats | None:
    """The per-sample, per-group mean and 1/std a GroupNorm's forward computed, read from the autograd node
    of its output (``NativeGroupNormBackward0`` saves them for its own backward): no second pass over the
    input. ``None`` when the output did not come from that kernel."""
    fn = output.grad_fn
    if type(layer) is not nn.GroupNorm or fn is None or type(fn).__name__ != "NativeGroupNormBackward0":
        return None
    try:
        return fn._saved_result1, fn._saved_result2
    except (AttributeError, RuntimeError):  # saved tensors released or renamed: recompute in the backward
        return None


def group_norm_per_sample_grads(
    layer: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor, stats: GroupNormStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients [n, C] of a GroupNorm's weight (``sum_t g * xhat``) and bias (``sum_t g``) in one
    fused ATen reduction over ``g`` and ``a``, with no normalised copy of the input.

    ATen's GroupNorm backward sums the weight and bias gradients over the batch; folding the batch into the
    channels (one sample of n*C channels in n*groups groups, whose statistics are exactly the per-sample,
    per-group ones) turns that sum into the per-sample values. ``stats`` are the forward's (mean, rstd)
    (``group_norm_stats``); without them they are recomputed from ``a``.
    """
    n, c = a.shape[:2]
    hxw = a[0, 0].numel()
    groups = n * layer.num_groups
    a = a.contiguous()
    if stats is None:
        stats = torch.ops.aten.native_group_norm(a, None, None, n, c, hxw, layer.num_groups, layer.eps)[1:]
    mean, rstd = stats
    if hxw < GROUP_NORM_KERNEL_MIN_POSITIONS:
        # ATen's kernel is slow on a handful of positions: the same arithmetic, dgamma = rstd (ds - mean db)
        # with ds = sum_t g a and db = sum_t g, as two matrix-vector products
        gv, ones = g.reshape(n * c, hxw), a.new_ones(hxw)
        gb = gv @ ones
        ds = (gv * a.view(n * c, hxw)) @ ones
        gw = (ds.view(n, layer.num_groups, -1) - mean.view(n, -1, 1) * gb.view(n, layer.num_groups, -1))
        return gw.mul_(rstd.view(n, -1, 1)).view(n, c), gb.view(n, c)
    # the kernel needs a weight, which only scales the input gradient (not requested)
    ones = a.new_ones(n * c)
    _, gw, gb = torch.ops.aten.native_group_norm_backward(
        g.contiguous().view(1, n * c, hxw), a.view(1, n * c, hxw), mean.reshape(1, groups),
        rstd.reshape(1, groups), ones, 1, n * c, hxw, groups, [False, True, True],
    )
    return gw.view(n, c), gb.view(n, c)


def per_sample_grads(
    layer: nn.Module, a: torch.Tensor, g: torch.Tensor, stats: GroupNormStats | None = None,
) -> dict[nn.Parameter, torch.Tensor]:
    """Instantiated per-sample gradients [n, *param.shape] of a supported layer's trainable parameters
    (``stats``: a GroupNorm's forward statistics, ``group_norm_stats``)."""
    out: dict[nn.Parameter, torch.Tensor] = {}
    weight, bias = layer.weight, getattr(layer, "bias", None)
    if type(layer) in _CONVS:
        if weight.requires_grad:
            out[weight] = conv_per_sample_weight_grads(layer, a, g)
        if bias is not None and bias.requires_grad:
            out[bias] = g.flatten(2).sum(-1)
    elif type(layer) is nn.Linear:
        if weight.requires_grad:
            out[weight] = torch.einsum("n...o,n...i->noi", g, a)
        if bias is not None and bias.requires_grad:
            out[bias] = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
    elif type(layer) is nn.GroupNorm:
        gw, gb = group_norm_per_sample_grads(layer, a, g, stats)
        if weight is not None and weight.requires_grad:
            out[weight] = gw
        if bias is not None and bias.requires_grad:
            out[bias] = gb
    else:  # pragma: no cover - guarded at wrap time
        raise NotImplementedError(type(layer).__name__)
    return out


def _sq_norms(grads: dict[nn.Parameter, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
    return {p: torch.linalg.vector_norm(gs.reshape(gs.shape[0], -1), dim=1).square() for p, gs in grads.items()}


def recompute_clipped_sum(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, policy: GhostPolicy = "auto") -> bool:
    """Whether a conv's clipped sum is recomputed from its input and output gradient (one ordinary
    weight-gradient kernel on ``c_i g_i`` once the clip factors are known, as for a ghost layer) instead of
    kept as instantiated per-sample gradients until the end of the backward.

    The per-sample gradients of every instantiated layer are otherwise all alive at once at the end of the
    backward: n x (its parameters) floats each, which for DenseNet121 at batch 64 was most of fast clipping's
    extra memory. ``auto`` recomputes when the layer's per-sample gradients would hold more floats than its
    input and output gradient (``KEEP_FACTOR`` times more for a pointwise conv; deep layers: few positions, many
    weights), at the price of one weight-gradient kernel; ``always`` / ``never`` force one route (tests).
    Only speed and memory change, never the result.
    """
    if type(layer) not in _CONVS or policy == "never":
        return False
    if policy == "always":
        return True
    per_sample = a.shape[0] * sum(p.numel() for p in (layer.weight, layer.bias) if p is not None and p.requires_grad)
    factor = KEEP_FACTOR if _is_pointwise(layer) else 1
    return factor * (a.numel() + g.numel()) < per_sample


#: ``recompute_clipped_sum`` keeps a pointwise conv's per-sample gradients while they hold at most this many
#: times the floats of its input and output gradient (any other conv: at most as many). At 1 the rule only
#: traded memory; at 2 DenseNet121's 1x1 convs on 8x8 maps (11 layers, 160-480 -> 128 channels) keep theirs
#: (one batched matmul each) instead of a ghost norm + recomputed sum: the 13 1x1 convs on 8x8 maps took 117 ms
#: before, 85 ms after (batch 64, 1 thread), for 110 MB more at the end of the backward (bench/dp_overhead.py:
#: its memory ratio stays under the 1.5x target). A 3x3 conv in that band (AtollNet's stride-2 32 -> 64) gains
#: little (its ghost norm comes from the Gram route) and would add a third to AtollNet's small step memory, so it
#: keeps the factor 1.
KEEP_FACTOR = 2


def _ghost_norms(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    norms: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        norms[layer.weight] = conv_ghost_sq_norm(layer, a, g)
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = g.flatten(2).sum(-1).pow(2).sum(1)
    return norms


def layer_sq_norms(
    layer: nn.Module, a: torch.Tensor, g: torch.Tensor, policy: GhostPolicy = "auto",
    recompute: GhostPolicy = "auto", stats: GroupNormStats | None = None,
) -> tuple[dict[nn.Parameter, torch.Tensor], dict[nn.Parameter, torch.Tensor] | None]:
    """Per-sample squared gradient norms of each trainable parameter of ``layer``, and the instantiated
    per-sample gradients to keep for the clipped sum (``None`` when the weight's norm was a ghost norm, or
    when the clipped sum is recomputed from ``a`` and ``g``: ``recompute_clipped_sum``). ``stats``: a
    GroupNorm's forward statistics (``group_norm_stats``).

    When the clipped sum is recomputed anyway, the per-sample gradients serve only their norm, so ``auto``
    takes the ghost norm at a lower saving (``use_ghost(..., recomputed=True)``).
    """
    if type(layer) in _CONVS:
        recomputed = recompute_clipped_sum(layer, a, g, recompute)
        if use_ghost(layer, g, policy, in_shape=tuple(a.shape[2:]), recomputed=recomputed):
            return _ghost_norms(layer, a, g), None
    else:
        recomputed = False
    grads = per_sample_grads(layer, a, g, stats)
    return _sq_norms(grads), None if recomputed else grads


def unsupported_layers(module: nn.Module) -> list[str]:
    """What keeps ``FastClipModule`` from wrapping ``module`` (empty when it can): trainable parameters outside
    a supported layer, convolutions with a non-zero padding mode or asymmetric ``"same"`` padding, and
    parameters shared by two layers. ``privacy.dpsgd``'s ``auto`` mode falls back to Opacus' hooks on these."""
    bad: list[str] = []
    owners: dict[int, str] = {}
    for name, m in module.named_modules():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        label = f"{name or '<root>'} ({type(m).__name__})"
        if type(m) not in SUPPORTED_LAYERS:
            bad.append(label)
            continue
        try:
            _check_layer(name, m)
        except NotImplementedError as exc:
            bad.append(f"{label}: {exc}")
        for p in own:
            if id(p) in owners:
                bad.append(f"{label}: parameter shared with {owners[id(p)]} (weight tying)")
            owners[id(p)] = label
    return bad


# --------------------------------------------------------------------------------------------- book-keeping
@dataclass
class _Backward:
    """What the gradient hooks collect during one ``clip_backward``."""

    sq_total: list[torch.Tensor] = field(default_factory=list)  # per-sample squared norms, per parameter
    done_layers: list = field(default_factory=list)  # (record, output gradient if needed later, kept grads)


@dataclass
class _Record:
    layer: nn.Module
    activation: torch.Tensor | None  # dropped once the layer's norms are taken, unless its ghost sum needs it
    output: torch.Tensor | None  # kept for the roots only (the tensors autograd.grad is asked for)
    version: int
    root: bool  # the layer's input depends on no trainable parameter (it is the image or a constant)
    stats: GroupNormStats | None = None  # a GroupNorm's forward (mean, rstd): no recomputation in the backward
    handle: torch.utils.hooks.RemovableHandle | None = None  # the gradient hook on the output


def _remove_hooks(records: list[_Record]) -> None:
    """Remove the gradient hooks the forward registered on these records' outputs."""
    for r in records:
        if r.handle is not None:
            r.handle.remove()
            r.handle = None


class FastClipModule(nn.Module):
    """Wraps a model for single-backward per-sample clipping (module docstring).

    Use::

        fc = FastClipModule(model, max_grad_norm=C)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion_with_reduction_sum(fc(x), y)
        norms = fc.clip_backward(loss)   # p.grad = sum_i min(1, C/||grad_i||) grad_i
        optimizer.step()                  # an InPlaceNoiseOptimizer adds the noise

    Parameters
    ----------
    module: the network; every parameter that requires grad must sit directly in a Conv1d/2d/3d (zero
        padding), Linear or GroupNorm, and nothing may mix samples (no BatchNorm).
    max_grad_norm: C, the per-sample clip norm.
    ghost: per-conv norm method: ``auto`` (cost rule of ``use_ghost``), ``always`` (ghost for every
        ungrouped conv) or ``never`` (always instantiate).
    recompute: for an instantiated conv, whether its clipped sum is recomputed from its input and output
        gradient rather than kept as per-sample gradients: ``auto`` (memory rule of
        ``recompute_clipped_sum``), ``always`` or ``never``.
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float, ghost: GhostPolicy = "auto",
                 recompute: GhostPolicy = "auto") -> None:
        super().__init__()
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")
        for what, value in (("ghost", ghost), ("recompute", recompute)):
            if value not in ("auto", "always", "never"):
                raise ValueError(f"{what} must be 'auto', 'always' or 'never', got {value!r}")
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self.ghost: GhostPolicy = ghost
        self.recompute: GhostPolicy = recompute
        self._layers: list[nn.Module] = []
        unsupported = []
        for name, m in module.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if type(m) not in SUPPORTED_LAYERS:
                unsupported.append(f"{name or '<root>'} ({type(m).__name__})")
                continue
            _check_layer(name, m)
            self._layers.append(m)
        if unsupported:
            raise NotImplementedError(
                "fast clipping cannot bound the per-sample gradient of trainable parameters in "
                f"{', '.join(unsupported)}; supported layers: {', '.join(c.__name__ for c in SUPPORTED_LAYERS)}. "
                "Use grad_sample_mode='hooks' for this model."
            )
        self._params = [p for m in self._layers for p in m.parameters(recurse=False) if p.requires_grad]
        if len({id(p) for p in self._params}) != len(self._params):
            # two layers sharing a parameter: their per-sample gradients add up before the norm is taken,
            # so per-layer norms would under-estimate it
            raise NotImplementedError(
                "a parameter is shared by two layers (weight tying); fast clipping would under-estimate its "
                "per-sample norm. Use grad_sample_mode='hooks'"
            )
        self._records: list[_Record] = []
        self._capturing = False  # only forwards through this wrapper are recorded
        self._generation = 0  # forwards so far: a hook acts only for the records of the latest one
        self._seen: set[int] = set()  # ids of the layers recorded in the current forward
        self._backward: _Backward | None = None  # set while clip_backward runs the backward
        self._handles = [m.register_forward_hook(self._capture) for m in self._layers]
        self.per_sample_norms: torch.Tensor | None = None

    def _capture(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self._capturing or not torch.is_grad_enabled():
            return
        if id(layer) in self._seen:
            raise NotImplementedError(
                f"{type(layer).__name__} was called twice in one forward (weight tying / reuse): its per-sample "
                "gradient would be split over two records; use grad_sample_mode='hooks'"
            )
        self._seen.add(id(layer))
        root = inputs[0].grad_fn is None
        r = _Record(layer, inputs[0].detach(), output if root else None, output._version, root,
                    group_norm_stats(layer, output))
        if output.requires_grad:
            # Registered now, on the node that produced the output, so that the output itself need not be held
            # to the backward (plain autograd frees e.g. a GroupNorm output its ReLU does not save); a later
            # in-place edit of it cannot redirect the hook: a hook registered before an in-place op receives
            # the gradient of the value before it, the layer's own output gradient.
            r.handle = output.register_hook(self._on_grad(r, self._generation))
        self._records.append(r)

    def _on_grad(self, r: _Record, generation: int) -> Callable[[torch.Tensor], None]:
        def hook(g: torch.Tensor) -> None:
            if self._backward is None or self._generation != generation:
                return  # a backward outside clip_backward, or through an older forward's graph: not ours
            sq, inst = layer_sq_norms(r.layer, r.activation.to(g.dtype), g, self.ghost, self.recompute, r.stats)
            self._backward.sq_total.extend(sq.values())
            self._backward.done_layers.append((r, g if inst is None else None, inst))
            r.output = None  # let autograd free what this layer no longer needs, as a plain backward would
            if inst is not None:
                r.activation = r.stats = None

        return hook

    def forward(self, *args, **kwargs):  # noqa: D102 - plain delegation
        self._drop_records()
        self._generation += 1
        self._seen = set()
        self._capturing = True
        try:
            return self._module(*args, **kwargs)
        finally:
            self._capturing = False

    def _drop_records(self) -> None:
        _remove_hooks(self._records)
        self._records = []

    def clip_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward of ``loss`` (the SUM of per-sample losses) that writes the clipped per-sample gradient sum
        ``sum_i min(1, C / (||grad_i|| + 1e-6)) grad_i`` to every trainable ``p.grad``.

        Returns the per-sample gradient norms [n] (also kept in ``self.per_sample_norms``; they are not
        private — debugging/tests only).
        """
        records, self._records = self._records, []
        if not records:
            raise RuntimeError("clip_backward() needs a forward through the FastClipModule first")
        for p in self._params:
            if p.grad is not None:
                raise RuntimeError(
                    "p.grad is already set: call optimizer.zero_grad(set_to_none=True) before each step "
                    "(two batches must not be summed under one clip bound)"
                )
        for r in records:
            if r.root and r.output is not None and r.output._version != r.version:
                # autograd.grad would return the gradient of the edited value, and the layer's own hook,
                # upstream of the edit, would never fire: its norm would be missing
                raise RuntimeError(
                    f"the output of a {type(r.layer).__name__} was modified in place after the layer; its "
                    "gradient would not be the layer's own. Make the following operation out-of-place."
                )
        n, device = records[0].activation.shape[0], records[0].activation.device
        # Each layer's norms are computed in a hook on its output, while autograd walks back: an output
        # gradient that is not needed later (instantiated layers) is freed right away instead of being held
        # to the end. Autograd is asked only for the outputs of the "root" layers (whose input depends on no
        # trainable parameter); every other hooked output that reaches the loss lies between the loss and a
        # root, so its hook fires; one whose hook does not fire has no path to the loss (zero gradient).
        state = _Backward()
        roots = [r.output for r in records if r.root and r.output is not None and r.output.requires_grad]
        try:
            if not roots:
                raise RuntimeError(
                    "no trainable layer takes the model input directly (the input carries an autograd history): "
                    "fast clipping cannot walk the backward; detach the input or use grad_sample_mode='hooks'"
                )
            self._backward = state
            torch.autograd.grad(loss, roots, allow_unused=True)
        finally:
            self._backward = None
            _remove_hooks(records)
        sq_total, kept = state.sq_total, state.done_layers
        total = torch.stack(sq_total).sum(0) if sq_total else None
        norms = total.sqrt() if total is not None else torch.zeros(n, device=device)
        coef = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
        done: set[int] = set()
        for r, g, inst in kept:
            if inst is None:  # ghost or recomputed conv: one weight-gradient kernel on the rescaled output gradient
                gc = g * coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)
                layer = r.layer
                if layer.weight.requires_grad:
                    layer.weight.grad = _conv_weight_grad(layer, r.activation.to(g.dtype), gc, per_sample=False)
                    done.add(id(layer.weight))
                if layer.bias is not None and layer.bias.requires_grad:
                    layer.bias.grad = gc.flatten(2).sum((0, 2))
                    done.add(id(layer.bias))
            else:
                for p, gs in inst.items():
                    p.grad = (coef.to(gs.dtype) @ gs.reshape(n, -1)).view_as(p)
                    done.add(id(p))
        for p in self._params:
            if id(p) not in done:
                p.grad = torch.zeros_like(p)
        self.per_sample_norms = norms.detach()
        return self.per_sample_norms

    def zero_clipped_grads(self) -> None:
        """An empty (Poisson) batch: the clipped sum is zero, so the optimizer step adds pure noise."""
        self._drop_records()
        for p in self._params:
            p.grad = torch.zeros_like(p)

    def to_standard_module(self) -> nn.Module:
        """Remove the hooks and return the wrapped model (as Opacus' ``GradSampleModule`` does)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._drop_records()
        return self._module


def make_private_bk(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator | None = None,
    ghost: GhostPolicy = "auto",
    recompute: GhostPolicy = "auto",
) -> tuple[FastClipModule, InPlaceNoiseOptimizer]:
    """Fast-clipping module + Opacus' noise-adding optimizer (noise std ``noise_multiplier * max_grad_norm``,
    the noisy sum divided by ``expected_batch_size``): the same mechanism as ``hooks`` + ``DPOptimizer``."""
    fc = FastClipModule(model, max_grad_norm=max_grad_norm, ghost=ghost, recompute=recompute)
    dp_opt = InPlaceNoiseOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )
    return fc, dp_opt
