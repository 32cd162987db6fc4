"""
Small neural-network building blocks shared by the UNet and the diffusion code.

The numerics deliberately follow openai/improved-diffusion exactly (same ops in
the same order, same dtypes) so that models and losses produce the same
numbers as the reference implementation.
"""

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint as _torch_checkpoint

from . import ops
from .ops import _cpp as _cpp_ops
from .reference import mean_flat  # noqa: F401  (public here, as in the original)


class _BiasAddConv:
    """A convolution whose bias may be added by the fused ``ops.bias_add``
    (where :func:`iddpm_fast.ops.fuse_conv_bias` says so: on CUDA), which
    also takes the residual add that follows a ResBlock's last convolution.
    Same parameters and state-dict keys as the ``nn.ConvNd`` it extends, and
    the same numbers: PyTorch adds a cuDNN convolution's bias after it, just
    as this does.

    :param residual: optional tensor of the output's shape added last, as
        ``residual + conv(x)``.
    """

    def forward(self, input, residual=None):  # nn.ConvNd's own argument name: conv(input=x) works
        if self.bias is not None and ops.fuse_conv_bias(input):
            # The C++ op directly: fuse_conv_bias found it available, and the
            # shapes hold by construction (the op checks them again). An eager
            # sampling step is launch-bound, so ops.bias_add's Python checks
            # (~5 us per convolution) would cost more than they guard.
            return _cpp_ops.bias_add(self._conv_forward(input, self.weight, None), self.bias, residual)
        y = super().forward(input)
        return y if residual is None else residual + y


class Conv1d(_BiasAddConv, nn.Conv1d):
    pass


class Conv2d(_BiasAddConv, nn.Conv2d):
    pass


class Conv3d(_BiasAddConv, nn.Conv3d):
    pass


_CONV_CLASSES = {1: Conv1d, 2: Conv2d, 3: Conv3d}
_AVG_POOL_CLASSES = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _pick_by_dims(table, dims, what):
    try:
        return table[dims]
    except (KeyError, TypeError):
        raise ValueError(
            f"{what}: unsupported number of spatial dimensions {dims!r} "
            f"(expected one of {sorted(table)})"
        ) from None


class SiLU(nn.Module):
    """Sigmoid-weighted linear unit, computed as ``x * sigmoid(x)``.

    Kept as an explicit product (rather than ``F.silu``) so the rounding is
    the same as the reference implementation.
    """

    def forward(self, x):
        return x * torch.sigmoid(x)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that normalises in float32 (float64 for float64 input, where
    the original rounded through float32) and casts back: one fused op (the
    C++ GroupNorm kernels without their SiLU, x's dtype and layout out) where
    the extension runs, else the original's
    ``F.group_norm(x.float()).type(x.dtype)``."""

    def forward(self, x):
        return ops.group_norm(x, self.weight, self.bias, self.num_groups, self.eps)


class GroupNormSiLU(GroupNorm32):
    """``SiLU(GroupNorm32(x))`` as one op: the fused C++ kernel when the
    extension is available (see :mod:`iddpm_fast.ops`), else exactly the
    original's GroupNorm32 followed by ``x * sigmoid(x)``.

    A GroupNorm subclass with the same parameters, so state dicts are those
    of the original's ``normalization(ch)``; the SiLU that followed it in the
    original's ``nn.Sequential`` becomes an ``nn.Identity`` placeholder that
    keeps the later layers' indices (and checkpoint keys) unchanged. Works in
    both memory layouts (channels-last stays channels-last) and under bf16
    autocast (x keeps its dtype, statistics in float32).
    """

    def forward(self, x):
        return ops.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps)


class GroupNormScaleShiftSiLU(GroupNorm32):
    """``SiLU(GroupNorm32(x) * (1 + scale) + shift)``, the ResBlock's
    ``out_layers`` with ``use_scale_shift_norm``, as one op.

    :param scale, shift: ``[N x C]`` or ``[N x C x 1 ...]`` modulation.
    """

    def forward(self, x, scale, shift):
        n, c = x.shape[:2]
        return ops.group_norm_scale_shift_silu(
            x, self.weight, self.bias, scale.reshape(n, c), shift.reshape(n, c), self.num_groups, self.eps
        )


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the same random draws, faster on CPUs.

    On a CPU, stock dropout draws its mask one element at a time (~5 ns per
    element, 9% of a bf16 training step of the 32x32 UNet); the C++ op draws
    the identical mask from the same generator about 4x faster, fused with
    the scaling, and leaves the generator in the same state, so training is
    bit for bit what ``nn.Dropout`` gives. Elsewhere (CUDA, ``inplace=True``,
    torch.compile, no extension) this is ``nn.Dropout``.
    """

    def forward(self, x):
        if self.inplace:
            return super().forward(x)
        return ops.dropout(x, self.p, self.training)


def normalization_silu(channels, scale_shift=False):
    """The fused ``normalization(channels)`` + SiLU (optionally with the
    scale-shift modulation in between)."""
    return (GroupNormScaleShiftSiLU if scale_shift else GroupNormSiLU)(32, channels)


def conv_nd(dims, *args, **kwargs):
    """Build an ``nn.ConvNd`` for ``dims`` in {1, 2, 3}."""
    return _pick_by_dims(_CONV_CLASSES, dims, "conv_nd")(*args, **kwargs)


def linear(*args, **kwargs):
    """Build an ``nn.Linear``."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """Build an ``nn.AvgPoolNd`` for ``dims`` in {1, 2, 3}."""
    return _pick_by_dims(_AVG_POOL_CLASSES, dims, "avg_pool_nd")(*args, **kwargs)


def update_ema(target_params, source_params, rate=0.99):
    """In place: ``target = rate * target + (1 - rate) * source`` per pair.

    ``rate`` close to 1 means the target moves slowly.
    """
    targets = [t.detach() for t in target_params]
    sources = [s.detach() for s in source_params]
    if len(targets) != len(sources):
        raise ValueError(f"update_ema: {len(targets)} targets but {len(sources)} sources")
    if not targets:
        return
    with torch.no_grad():
        if all(t.dtype in (torch.float32, torch.float64) for t in targets):
            # One fused multi-tensor update; per element the same mul-then-add as the original loop.
            torch._foreach_mul_(targets, rate)
            torch._foreach_add_(targets, sources, alpha=1 - rate)
        else:
            # The foreach kernels round `rate` to a half-precision target's dtype
            # (0.99 -> 0.98828125 in bf16); the per-tensor ops, as the original, do not.
            for targ, src in zip(targets, sources):
                targ.mul_(rate).add_(src, alpha=1 - rate)


def zero_module(module):
    """Set every parameter of ``module`` to zero; returns ``module``."""
    for param in module.parameters():
        param.detach().zero_()
    return module


def scale_module(module, scale):
    """Multiply every parameter of ``module`` by ``scale``; returns ``module``."""
    for param in module.parameters():
        param.detach().mul_(scale)
    return module


def normalization(channels):
    """The standard normalisation layer: 32-group GroupNorm in float32."""
    return GroupNorm32(32, channels)


_FREQS = {}


def _frequencies(half, max_period, device):
    """The embedding's frequencies, built on the CPU exactly as the reference
    does (so the exp() rounding does not depend on the device), then kept per
    device: no host-to-device copy (and sync) per call, and safe to capture
    in a CUDA graph."""
    key = (half, float(max_period), torch.device(device))
    freqs = _FREQS.get(key)
    if freqs is None:
        exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32)
        freqs = _FREQS[key] = torch.exp(exponent / half).to(device=device)
    return freqs


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of a 1-D tensor of (possibly fractional) timesteps.

    Returns an ``[N, dim]`` float32 tensor whose first half holds cosines and
    second half sines of ``t * f_i`` with geometrically spaced frequencies
    ``f_i = max_period ** (-i / half)``.  An odd ``dim`` gets a trailing zero
    column.
    """
    half = dim // 2
    freqs = _frequencies(half, max_period, timesteps.device)
    phases = timesteps[:, None].float() * freqs[None]
    parts = [torch.cos(phases), torch.sin(phases)]
    embedding = torch.cat(parts, dim=-1)
    if dim % 2 == 1:
        # Built from the batch size, so dim=1 gives [N, 1] (the reference's
        # zeros_like(embedding[:, :1]) yielded an [N, 0] tensor there).
        pad = embedding.new_zeros(embedding.shape[0], 1)
        embedding = torch.cat([embedding, pad], dim=-1)
    return embedding


def checkpoint(func, inputs, params, flag):
    """Call ``func(*inputs)``, optionally with gradient checkpointing.

    When ``flag`` is true and autograd is recording, activations inside
    ``func`` are not stored; they are recomputed during the backward pass.
    ``params`` (the parameters ``func`` closes over) is accepted for
    compatibility; PyTorch's non-reentrant checkpoint finds them on its own.
    The RNG state is restored for the recomputation, so dropout masks in the
    recomputed pass match the forward pass.
    """
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint.checkpoint(
            func, *inputs, use_reentrant=False, preserve_rng_state=True
        )
    return func(*inputs)


class CheckpointFunction(torch.autograd.Function):
    """Legacy autograd function for manual activation checkpointing.

    Usage: ``CheckpointFunction.apply(func, n_inputs, *inputs, *params)``.
    Kept for code that imports it directly; :func:`checkpoint` itself relies
    on ``torch.utils.checkpoint``.
    """

    @staticmethod
    def forward(ctx, run_function, length, *args):
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        with torch.no_grad():
            outputs = run_function(*ctx.input_tensors)
        return outputs

    @staticmethod
    def backward(ctx, *output_grads):
        detached = [t.detach().requires_grad_(True) for t in ctx.input_tensors]
        with torch.enable_grad():
            # view_as gives fresh tensors, so an in-place first op in
            # run_function does not touch the detached leaves' storage.
            outputs = ctx.run_function(*[t.view_as(t) for t in detached])
        grads = torch.autograd.grad(
            outputs,
            detached + ctx.input_params,
            output_grads,
            allow_unused=True,
        )
        ctx.input_tensors = None
        ctx.input_params = None
        return (None, None) + tuple(grads)
