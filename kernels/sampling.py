"""
The model's distribution and one sampling step, reading x_t and the model
output once: p_mean_variance (mean, log-variance, x_0 prediction), the
ancestral step (mean + exp(log_var / 2) noise, no noise at t = 0) and the DDIM
step (eta). Twins: reference.p_mean_variance, p_sample_step, ddim_step.
Forward only (sampling runs without gradients).
"""

import torch
import triton
import triton.language as tl

from iddpm_fast.reference import ROW, gather

from ._common import (
    LN2 as _LN2,
    SQRT_2_OVER_PI as _K,
    MEAN_CODES,
    MODEL_ROWS,
    VAR_CODES,
    Launcher,
    block_size,
    cdiv,
    check_contiguous_like,
    check_device,
    per_sample_total,
)
from ._tl import bound_term, chunk_offsets, load_model_output, model_distribution


@triton.jit
def _sampling_kernel(
    out_ptr,  # [B, C' * S] model output (C' = 2C when learned)
    xt_ptr,  # [B, D] x_t (D = C * S)
    noise_ptr,  # [B, D] noise (read for the sampling steps only)
    t_ptr,  # [B] int64 timesteps
    tables_ptr,  # [R, T] float32 coefficient tables
    mean_ptr,  # [B, D] model mean (MODE 0), x_t's dtype
    var_ptr,  # [B, D] variance (MODE 0, learned variances only)
    logvar_ptr,  # [B, D] log-variance (MODE 0, learned variances only)
    pred_ptr,  # [B, D] x_0 prediction, x_t's dtype
    sample_ptr,  # [B, D] x_{t-1} (MODE 1 and 2), x_t's dtype
    D, T, eta,
    MEAN: tl.constexpr, VAR: tl.constexpr, LEARNED: tl.constexpr, CLIP: tl.constexpr, MODE: tl.constexpr,
    R_C1: tl.constexpr, R_C2: tl.constexpr, R_PLV: tl.constexpr, R_SRA: tl.constexpr, R_SRM1: tl.constexpr,
    R_LOGB: tl.constexpr, R_FLLV: tl.constexpr, R_RC1: tl.constexpr, R_C2C1: tl.constexpr,
    R_AC: tl.constexpr, R_ACP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t = tl.load(t_ptr + b)
    offs, mask, base = chunk_offsets(b, chunk, D, BLOCK)
    xt = tl.load(xt_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    eo, v = load_model_output(out_ptr, b, offs, mask, D, LEARNED)
    sra = tl.load(tables_ptr + R_SRA * T + t)
    srm1 = tl.load(tables_ptr + R_SRM1 * T + t)
    pred, mean, lv = model_distribution(
        eo, v, xt, t, tables_ptr, T, MEAN, VAR, CLIP, R_C1, R_C2, R_PLV, R_SRA, R_SRM1, R_LOGB, R_FLLV, R_RC1, R_C2C1
    )
    tl.store(pred_ptr + base + offs, pred.to(pred_ptr.dtype.element_ty), mask=mask)
    nonzero = tl.where(t != 0, 1.0, 0.0)
    if MODE == 0:
        tl.store(mean_ptr + base + offs, mean.to(mean_ptr.dtype.element_ty), mask=mask)
        if LEARNED:
            tl.store(logvar_ptr + base + offs, lv.to(logvar_ptr.dtype.element_ty), mask=mask)
            tl.store(var_ptr + base + offs, tl.exp(lv).to(var_ptr.dtype.element_ty), mask=mask)
    elif MODE == 1:
        nz = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        sample = mean + nonzero * tl.exp(0.5 * lv) * nz
        tl.store(sample_ptr + base + offs, sample.to(sample_ptr.dtype.element_ty), mask=mask)
    else:
        nz = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        eps = (sra * xt - pred) / srm1
        ab = tl.load(tables_ptr + R_AC * T + t)
        abp = tl.load(tables_ptr + R_ACP * T + t)
        sigma = eta * tl.sqrt((1.0 - abp) / (1.0 - ab)) * tl.sqrt(1.0 - ab / abp)
        mean_pred = pred * tl.sqrt(abp) + tl.sqrt(1.0 - abp - sigma * sigma) * eps
        sample = mean_pred + nonzero * sigma * nz
        tl.store(sample_ptr + base + offs, sample.to(sample_ptr.dtype.element_ty), mask=mask)


def _launch(mode, model_output, x_t, noise, t, tables, model_mean_type, model_var_type, clip_denoised, eta=0.0):
    check_device(model_output, x_t, t, tables)
    (xt,) = check_contiguous_like(x_t)
    out = model_output.contiguous()
    nz = noise.contiguous() if noise is not None else xt
    B = xt.shape[0]
    D = xt.numel() // max(B, 1)
    learned = model_var_type in ("learned", "learned_range")
    pred = torch.empty_like(xt)
    mean = torch.empty_like(xt) if mode == 0 else pred
    var = torch.empty_like(xt) if (mode == 0 and learned) else pred
    logvar = torch.empty_like(xt) if (mode == 0 and learned) else pred
    sample = torch.empty_like(xt) if mode else pred
    if B and D:
        block = block_size(D)
        _sampling_launch((B, cdiv(D, block)),
            out, xt, nz, t.contiguous(), tables.contiguous(), mean, var, logvar, pred, sample, D, tables.shape[1],
            float(eta),
            MEAN=MEAN_CODES[model_mean_type], VAR=VAR_CODES[model_var_type], LEARNED=learned,
            CLIP=bool(clip_denoised), MODE=mode,
            R_AC=ROW["alphas_cumprod"], R_ACP=ROW["alphas_cumprod_prev"], BLOCK=block, **MODEL_ROWS,
        )
    return pred, mean, var, logvar, sample, learned


def p_mean_variance(model_output, x_t, t, tables, model_mean_type, model_var_type, clip_denoised):
    """(mean, variance, log_variance, pred_xstart) as reference.p_mean_variance."""
    pred, mean, var, logvar, _, learned = _launch(
        0, model_output, x_t, None, t, tables, model_mean_type, model_var_type, clip_denoised
    )
    if not learned:
        # Fixed variances are per-sample constants: [N, 1, ...] as the reference returns them.
        row_var, row_lv = {
            "fixed_small": ("posterior_variance", "posterior_log_variance_clipped"),
            "fixed_large": ("fixed_large_variance", "fixed_large_log_variance"),
        }[model_var_type]
        var = gather(tables, row_var, t, x_t.dim()).to(x_t.dtype)
        logvar = gather(tables, row_lv, t, x_t.dim()).to(x_t.dtype)
    return mean, var, logvar, pred


def p_sample_step(model_output, x_t, t, noise, tables, model_mean_type, model_var_type, clip_denoised):
    """(sample, pred_xstart) as reference.p_sample_step."""
    pred, _, _, _, sample, _ = _launch(
        1, model_output, x_t, noise, t, tables, model_mean_type, model_var_type, clip_denoised
    )
    return sample, pred


def ddim_step(model_output, x_t, t, noise, tables, eta, model_mean_type, model_var_type, clip_denoised):
    """(sample, pred_xstart) as reference.ddim_step."""
    pred, _, _, _, sample, _ = _launch(
        2, model_output, x_t, noise, t, tables, model_mean_type, model_var_type, clip_denoised, eta
    )
    return sample, pred


@triton.jit
def _vb_terms_kernel(
    out_ptr,  # [B, C' * S] model output
    x0_ptr,  # [B, D] x_0
    xt_ptr,  # [B, D] x_t
    t_ptr,  # [B] int64 timesteps
    tables_ptr,  # [R, T] float32 coefficient tables
    pred_ptr,  # [B, D] x_0 prediction, x_t's dtype
    part_ptr,  # [B, n_chunks] float32 partial sums of the bound term, in bits/dim (nats / (D ln 2))
    D, T, n_chunks, inv_dln2,
    MEAN: tl.constexpr, VAR: tl.constexpr, LEARNED: tl.constexpr, CLIP: tl.constexpr,
    R_C1: tl.constexpr, R_C2: tl.constexpr, R_PLV: tl.constexpr, R_SRA: tl.constexpr, R_SRM1: tl.constexpr,
    R_LOGB: tl.constexpr, R_FLLV: tl.constexpr, R_RC1: tl.constexpr, R_C2C1: tl.constexpr,
    K: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t = tl.load(t_ptr + b)
    offs, mask, base = chunk_offsets(b, chunk, D, BLOCK)
    x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    xt = tl.load(xt_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    eo, v = load_model_output(out_ptr, b, offs, mask, D, LEARNED)
    pred, m, lv = model_distribution(
        eo, v, xt, t, tables_ptr, T, MEAN, VAR, CLIP, R_C1, R_C2, R_PLV, R_SRA, R_SRM1, R_LOGB, R_FLLV, R_RC1, R_C2C1
    )
    tl.store(pred_ptr + base + offs, pred.to(pred_ptr.dtype.element_ty), mask=mask)
    plv = tl.load(tables_ptr + R_PLV * T + t)
    tm = tl.load(tables_ptr + R_C1 * T + t) * x0 + tl.load(tables_ptr + R_C2 * T + t) * xt
    term = bound_term(x0, tm, plv, m, lv, t, K)
    tl.store(part_ptr + b.to(tl.int64) * n_chunks + chunk, tl.sum(tl.where(mask, term, 0.0), axis=0) * inv_dln2)


def vb_terms_bpd(model_output, x_start, x_t, t, tables, model_mean_type, model_var_type, clip_denoised):
    """(terms [B] float32 bits/dim, pred_xstart) as reference.vb_terms_bpd."""
    check_device(model_output, x_start, x_t, t, tables)
    x0, xt = check_contiguous_like(x_start, x_t)
    out = model_output.contiguous()
    B = xt.shape[0]
    D = xt.numel() // max(B, 1)
    block = block_size(D)
    n_chunks = cdiv(D, block) if D else 1
    pred = torch.empty_like(xt)
    # Every (sample, chunk) program writes its partial: no zero fill (a memset
    # launch) unless there is nothing to launch.
    part = (torch.empty if B and D else torch.zeros)((B, n_chunks), device=xt.device, dtype=torch.float32)
    if B and D:
        _vb_terms_launch((B, n_chunks),
            out, x0, xt, t.contiguous(), tables.contiguous(), pred, part, D, tables.shape[1], n_chunks,
            1.0 / (D * _LN2),
            MEAN=MEAN_CODES[model_mean_type], VAR=VAR_CODES[model_var_type],
            LEARNED=model_var_type in ("learned", "learned_range"), CLIP=bool(clip_denoised),
            K=_K, BLOCK=block, **MODEL_ROWS,
        )
    return per_sample_total(part, D), pred


# Launches by kernel[grid](...) the first time, directly afterwards (see _common.Launcher).
_sampling_launch = Launcher(_sampling_kernel)
_vb_terms_launch = Launcher(_vb_terms_kernel)
