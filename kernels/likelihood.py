"""
The discretised Gaussian log-likelihood of 8-bit data (the original's tanh
CDF approximation, bins of 2/255, edge bins open at +-0.999, probabilities
clamped at 1e-12), elementwise and reduced per sample to bits/dim; and the
posterior q(x_{t-1} | x_t, x_0). Twins: reference.discretized_gaussian_log_likelihood,
discretized_gaussian_nll_bpd, q_posterior_mean_variance.
"""

import torch
import triton
import triton.language as tl

from iddpm_fast.reference import ROW, gather

from ._common import (
    SQRT_2_OVER_PI as _K,
    Launcher,
    block_size,
    cdiv,
    check_contiguous_like,
    check_device,
    per_sample_total,
    warps,
)
from ._tl import bin_probability, chunk_offsets



@triton.jit
def _dgll_kernel(
    x_ptr,  # [B, D] targets in [-1, 1]
    m_ptr,  # [B, D] means
    ls_ptr,  # [B, D] log standard deviations
    out_ptr,  # [B, D] log-likelihoods (REDUCE=False), x's dtype
    part_ptr,  # [B, n_chunks] float32 partial sums of -log2-likelihood / D (REDUCE=True)
    D, n_chunks, inv_d,
    REDUCE: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    offs, mask, base = chunk_offsets(b, chunk, D, BLOCK)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    ls = tl.load(ls_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    p = bin_probability(x, m, ls, K)
    if REDUCE:
        # Bits directly (log2: no nats-to-bits multiply per element), and the
        # sample's share of its mean, so that one sum over the chunks is the
        # whole host-side finish.
        bits = tl.sum(tl.where(mask, -tl.log2(p), 0.0), axis=0)
        tl.store(part_ptr + b.to(tl.int64) * n_chunks + chunk, bits * inv_d)
    else:
        tl.store(out_ptr + base + offs, tl.log(p).to(out_ptr.dtype.element_ty), mask=mask)


def _launch_dgll(x, means, log_scales, reduce, block=None, num_warps=None):
    check_device(x, means, log_scales)
    xc, mc, lc = check_contiguous_like(x, means, log_scales.expand_as(x))
    B = xc.shape[0] if xc.dim() else 1
    D = xc.numel() // max(B, 1)
    block = block or block_size(D)
    n_chunks = cdiv(D, block) if D else 1
    # Only what the variant writes: every (sample, chunk) program stores its
    # partial sum, so it needs no zero fill (a memset launch) when there is data.
    if reduce:
        out = xc.new_empty(0)
        part = (torch.empty if xc.numel() else torch.zeros)((B, n_chunks), device=xc.device, dtype=torch.float32)
    else:
        out, part = torch.empty_like(xc), xc.new_empty(0, dtype=torch.float32)
    if xc.numel():
        _dgll_launch((B, n_chunks), xc, mc, lc, out, part, D, n_chunks, 1.0 / D, REDUCE=reduce, K=_K,
                     BLOCK=block, **warps(num_warps))
    return out, part, D


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Elementwise log-probabilities (nats), x's shape and dtype."""
    out, _, _ = _launch_dgll(x, means, log_scales, False)
    return out


def discretized_gaussian_nll_bpd(x, means, log_scales, *, block=None, num_warps=None):
    """[B] float32 negative log-likelihood in bits per dimension. block
    (elements per program, a power of two) and num_warps override the
    defaults, for A/B timing (bench/profile_gpu.py ab_reduce)."""
    _, part, D = _launch_dgll(x, means, log_scales, True, block, num_warps)
    return per_sample_total(part, D)


@triton.jit
def _posterior_kernel(
    x0_ptr,  # [B, D] x_0
    xt_ptr,  # [B, D] x_t
    t_ptr,  # [B] int64 timesteps
    tables_ptr,  # [R, T] float32 coefficient tables
    out_ptr,  # [B, D] posterior mean, x_t's dtype
    D, T,
    R_C1: tl.constexpr, R_C2: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t = tl.load(t_ptr + b)
    offs, mask, base = chunk_offsets(b, chunk, D, BLOCK)
    x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    xt = tl.load(xt_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(tables_ptr + R_C1 * T + t) * x0 + tl.load(tables_ptr + R_C2 * T + t) * xt
    tl.store(out_ptr + base + offs, mean.to(out_ptr.dtype.element_ty), mask=mask)


def q_posterior_mean_variance(x_start, x_t, t, tables):
    """(mean [x_t's shape and dtype], variance [N,1,..], clipped log-variance [N,1,..])."""
    check_device(x_start, x_t, t, tables)
    x0, xt = check_contiguous_like(x_start, x_t)
    B = xt.shape[0]
    D = xt.numel() // max(B, 1)
    mean = torch.empty_like(xt)
    if xt.numel():
        block = block_size(D)
        _posterior_launch((B, cdiv(D, block)),
            x0, xt, t.contiguous(), tables.contiguous(), mean, D, tables.shape[1],
            R_C1=ROW["posterior_mean_coef1"], R_C2=ROW["posterior_mean_coef2"], BLOCK=block,
        )
    nd = xt.dim()
    return mean, gather(tables, "posterior_variance", t, nd), gather(tables, "posterior_log_variance_clipped", t, nd)


# Launches by kernel[grid](...) the first time, directly afterwards (see _common.Launcher).
_dgll_launch = Launcher(_dgll_kernel)
_posterior_launch = Launcher(_posterior_kernel)
