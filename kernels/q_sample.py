"""
q_sample: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps in one pass, the two
coefficients gathered by t inside the kernel. Twin: reference.q_sample.
"""

import torch
import triton
import triton.language as tl

from iddpm_fast.reference import ROW

from ._common import Launcher, block_size, cdiv, check_contiguous_like, warps
from ._tl import chunk_offsets


@triton.jit
def _q_sample_kernel(
    x0_ptr,  # [B, D] data, any float dtype
    noise_ptr,  # [B, D] standard normal noise, same dtype
    t_ptr,  # [B] int64 timesteps
    tables_ptr,  # [R, T] float32 coefficient tables
    out_ptr,  # [B, D] x_t, x0's dtype
    D,  # elements per sample
    T,  # timesteps (row stride of tables)
    ROW_SQRT_AC: tl.constexpr,
    ROW_SQRT_1M_AC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t = tl.load(t_ptr + b)
    a = tl.load(tables_ptr + ROW_SQRT_AC * T + t)
    s = tl.load(tables_ptr + ROW_SQRT_1M_AC * T + t)
    offs, mask, base = chunk_offsets(b, chunk, D, BLOCK)
    x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    xt = a * x0 + s * eps
    tl.store(out_ptr + base + offs, xt.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _q_sample_bwd_kernel(
    g_ptr,  # [B, D] d x_t, any float dtype
    t_ptr,  # [B] int64 timesteps
    tables_ptr,  # [R, T] float32 coefficient tables
    gx_ptr,  # [B, D] d x_start (HAS_GX), x_start's dtype
    gn_ptr,  # [B, D] d noise (HAS_GN), noise's dtype
    D,
    T,
    ROW_SQRT_AC: tl.constexpr,
    ROW_SQRT_1M_AC: tl.constexpr,
    HAS_GX: tl.constexpr,
    HAS_GN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t = tl.load(t_ptr + b)
    offs, mask, base = chunk_offsets(b, chunk, D, BLOCK)
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GX:
        a = tl.load(tables_ptr + ROW_SQRT_AC * T + t)
        tl.store(gx_ptr + base + offs, (a * g).to(gx_ptr.dtype.element_ty), mask=mask)
    if HAS_GN:
        s = tl.load(tables_ptr + ROW_SQRT_1M_AC * T + t)
        tl.store(gn_ptr + base + offs, (s * g).to(gn_ptr.dtype.element_ty), mask=mask)


_HALF_BLOCK = 4096


def _grid(x, B, D, block, num_warps):
    """(elements per program, grid, launch options) for an elementwise pass over x [B, D]."""
    if block is None and x.element_size() == 2 and D >= _HALF_BLOCK:
        # bf16/fp16 on an H100 (profile_gpu.py ab_qsample, 64x3x256x256): 4096
        # elements and 8 warps per program reached 2607 GB/s, 94% of copy,
        # where 1024 and 4 warps (the float32 default, 98% there) gave 1742.
        block, num_warps = _HALF_BLOCK, num_warps or 8
    block = block or block_size(D)
    return block, (B, cdiv(D, block)), warps(num_warps)


def q_sample(x_start, t, noise, tables, *, block=None, num_warps=None):
    """Launcher with reference.q_sample's signature. block (elements per
    program, a power of two) and num_warps override the defaults, for A/B
    timing (bench/profile_gpu.py ab_qsample)."""
    x0, eps = check_contiguous_like(x_start, noise)
    B = x0.shape[0]
    D = x0.numel() // max(B, 1)
    out = torch.empty_like(x0)
    if x0.numel() == 0:
        return out
    block, grid, launch = _grid(x0, B, D, block, num_warps)
    _q_sample_launch(grid,
        x0,
        eps,
        t.contiguous(),
        tables.contiguous(),  # the kernel takes the row stride to be T
        out,
        D,
        tables.shape[1],
        ROW_SQRT_AC=ROW["sqrt_alphas_cumprod"],
        ROW_SQRT_1M_AC=ROW["sqrt_one_minus_alphas_cumprod"],
        BLOCK=block,
        **launch,
    )
    return out


def q_sample_backward(grad, t, tables, x_dtype, noise_dtype, need_x=True, need_noise=True):
    """(d x_start, d noise) of q_sample from d x_t: grad * sqrt(alpha_bar_t) in
    x_dtype and grad * sqrt(1 - alpha_bar_t) in noise_dtype, each rounded
    once from float32 (the formula of autograd through reference.q_sample
    with float32 tables); one read of grad. A gradient not needed is None."""
    g = grad.contiguous()
    B = g.shape[0] if g.dim() else 1
    D = g.numel() // max(B, 1)
    gx = torch.empty(g.shape, device=g.device, dtype=x_dtype) if need_x else None
    gn = torch.empty(g.shape, device=g.device, dtype=noise_dtype) if need_noise else None
    if g.numel() and (need_x or need_noise):
        block, grid, launch = _grid(g, B, D, None, None)
        _q_sample_bwd_launch(grid,
            g, t.contiguous(), tables.contiguous(), g if gx is None else gx, g if gn is None else gn, D,
            tables.shape[1],
            ROW_SQRT_AC=ROW["sqrt_alphas_cumprod"],
            ROW_SQRT_1M_AC=ROW["sqrt_one_minus_alphas_cumprod"],
            HAS_GX=need_x, HAS_GN=need_noise, BLOCK=block,
            **launch,
        )
    return gx, gn


# Launches by kernel[grid](...) the first time, directly afterwards (see _common.Launcher).
_q_sample_launch = Launcher(_q_sample_kernel)
_q_sample_bwd_launch = Launcher(_q_sample_bwd_kernel)
