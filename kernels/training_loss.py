"""
The per-sample training loss of improved-diffusion (every LossType,
ModelMeanType and ModelVarType) in one forward pass over (x_0, noise, model
output), and its gradient with respect to the model output in one backward
pass. Twin: reference.training_loss.

Forward: each program reduces one BLOCK of one sample to two partial sums
(squared error of the mean half, and the bound term: KL for t > 0, decoder
NLL at t = 0); the launcher adds the partials per sample (deterministic, no
atomics) and applies the 1/D, 1/ln 2 and RESCALED factors on [B] values.
Backward: elementwise, given per-sample weights of the two sums derived from
the upstream gradients of (loss, mse, vb).
"""

import math

import torch
import triton
import triton.language as tl

from iddpm_fast.reference import ROW

from ._common import MEAN_CODES, VAR_CODES, block_size, check_contiguous_like, check_device
from ._tl import load_model_output

_LN2 = math.log(2.0)
_K = math.sqrt(2.0 / math.pi)


@triton.jit
def _tanh(z):
    # No libdevice under the interpreter: tanh(z) = 2 sigmoid(2z) - 1.
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _cdf(u, K: tl.constexpr):
    # The original's approximation 0.5 (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))).
    return 0.5 * (1.0 + _tanh(K * (u + 0.044715 * u * u * u)))


@triton.jit
def _cdf_grad(u, K: tl.constexpr):
    th = _tanh(K * (u + 0.044715 * u * u * u))
    return 0.5 * (1.0 - th * th) * K * (1.0 + 3.0 * 0.044715 * u * u)


@triton.jit
def _elements(
    x0, nz, eo, v, t,
    sa, s1a, c1, c2, plv, sra, srm1, logb, fllv,
    MEAN: tl.constexpr, VAR: tl.constexpr,
):
    """x_t, the posterior mean, the model's mean / log-variance and the MSE target."""
    xt = sa * x0 + s1a * nz
    tm = c1 * x0 + c2 * xt
    if MEAN == 2:
        m = c1 * (sra * xt - srm1 * eo) + c2 * xt
        tgt = nz
    elif MEAN == 1:
        m = c1 * eo + c2 * xt
        tgt = x0
    else:
        m = eo
        tgt = tm
    if VAR == 3:
        frac = (v + 1.0) / 2.0
        lv = frac * logb + (1.0 - frac) * plv
    elif VAR == 0:
        lv = v
    elif VAR == 1:
        lv = plv + 0.0 * x0
    else:
        lv = fllv + 0.0 * x0
    return xt, tm, m, lv, tgt


@triton.jit
def _load_sample(
    b, chunk, x0_ptr, noise_ptr, out_ptr, t_ptr, tables_ptr, D, T,
    LEARNED: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.load(t_ptr + b)
    offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    base = b.to(tl.int64) * D
    x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    nz = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    eo, v = load_model_output(out_ptr, b, offs, mask, D, LEARNED)
    return t, offs, mask, x0, nz, eo, v


@triton.jit
def _coefs(tables_ptr, t, T, R: tl.constexpr):
    return tl.load(tables_ptr + R * T + t)


@triton.jit
def _training_loss_fwd_kernel(
    out_ptr,  # [B, C' * S] model output (C' = 2C when learned), any float dtype
    x0_ptr,  # [B, D] clean data (D = C * S)
    noise_ptr,  # [B, D] noise
    t_ptr,  # [B] int64 timesteps
    tables_ptr,  # [R, T] float32 coefficient tables
    se_ptr,  # [B, n_chunks] float32 partial sums of squared error
    vb_ptr,  # [B, n_chunks] float32 partial sums of the bound term (nats)
    D, T, n_chunks,
    MEAN: tl.constexpr, VAR: tl.constexpr, LEARNED: tl.constexpr, NEED_VB: tl.constexpr,
    R_SA: tl.constexpr, R_S1A: tl.constexpr, R_C1: tl.constexpr, R_C2: tl.constexpr, R_PLV: tl.constexpr,
    R_SRA: tl.constexpr, R_SRM1: tl.constexpr, R_LOGB: tl.constexpr, R_FLLV: tl.constexpr,
    K: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t, offs, mask, x0, nz, eo, v = _load_sample(
        b, chunk, x0_ptr, noise_ptr, out_ptr, t_ptr, tables_ptr, D, T, LEARNED, BLOCK
    )
    plv = _coefs(tables_ptr, t, T, R_PLV)
    xt, tm, m, lv, tgt = _elements(
        x0, nz, eo, v, t,
        _coefs(tables_ptr, t, T, R_SA), _coefs(tables_ptr, t, T, R_S1A),
        _coefs(tables_ptr, t, T, R_C1), _coefs(tables_ptr, t, T, R_C2), plv,
        _coefs(tables_ptr, t, T, R_SRA), _coefs(tables_ptr, t, T, R_SRM1),
        _coefs(tables_ptr, t, T, R_LOGB), _coefs(tables_ptr, t, T, R_FLLV),
        MEAN, VAR,
    )
    diff = tgt - eo
    se = tl.where(mask, diff * diff, 0.0)
    tl.store(se_ptr + b.to(tl.int64) * n_chunks + chunk, tl.sum(se, axis=0))
    if NEED_VB:
        dm = tm - m
        kl = 0.5 * (-1.0 + lv - plv + tl.exp(plv - lv) + dm * dm * tl.exp(-lv))
        # Decoder NLL of the discretised Gaussian (bins of 2/255, edges at +-0.999).
        c = x0 - m
        inv = tl.exp(-0.5 * lv)
        cp = _cdf(inv * (c + 1.0 / 255.0), K)
        cm = _cdf(inv * (c - 1.0 / 255.0), K)
        ll_lo = tl.log(tl.maximum(cp, 1e-12))
        ll_hi = tl.log(tl.maximum(1.0 - cm, 1e-12))
        ll_mid = tl.log(tl.maximum(cp - cm, 1e-12))
        ll = tl.where(x0 < -0.999, ll_lo, tl.where(x0 > 0.999, ll_hi, ll_mid))
        term = tl.where(t == 0, -ll, kl)
        term = tl.where(mask, term, 0.0)
        tl.store(vb_ptr + b.to(tl.int64) * n_chunks + chunk, tl.sum(term, axis=0))


@triton.jit
def _training_loss_bwd_kernel(
    out_ptr,  # [B, C' * S] model output
    x0_ptr,  # [B, D]
    noise_ptr,  # [B, D]
    t_ptr,  # [B] int64
    tables_ptr,  # [R, T] float32
    wse_ptr,  # [B] float32 d(objective)/d(sum of squared error)
    wvb_ptr,  # [B] float32 d(objective)/d(sum of bound terms, nats)
    grad_ptr,  # [B, C' * S] d(objective)/d(model output), model output's dtype
    D, T,
    MEAN: tl.constexpr, VAR: tl.constexpr, LEARNED: tl.constexpr, HAS_MSE: tl.constexpr,
    NEED_VB: tl.constexpr, VB_TRAINS_MEAN: tl.constexpr,
    R_SA: tl.constexpr, R_S1A: tl.constexpr, R_C1: tl.constexpr, R_C2: tl.constexpr, R_PLV: tl.constexpr,
    R_SRA: tl.constexpr, R_SRM1: tl.constexpr, R_LOGB: tl.constexpr, R_FLLV: tl.constexpr,
    K: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t, offs, mask, x0, nz, eo, v = _load_sample(
        b, chunk, x0_ptr, noise_ptr, out_ptr, t_ptr, tables_ptr, D, T, LEARNED, BLOCK
    )
    c1 = _coefs(tables_ptr, t, T, R_C1)
    plv = _coefs(tables_ptr, t, T, R_PLV)
    srm1 = _coefs(tables_ptr, t, T, R_SRM1)
    logb = _coefs(tables_ptr, t, T, R_LOGB)
    xt, tm, m, lv, tgt = _elements(
        x0, nz, eo, v, t,
        _coefs(tables_ptr, t, T, R_SA), _coefs(tables_ptr, t, T, R_S1A),
        c1, _coefs(tables_ptr, t, T, R_C2), plv,
        _coefs(tables_ptr, t, T, R_SRA), srm1,
        logb, _coefs(tables_ptr, t, T, R_FLLV),
        MEAN, VAR,
    )
    wse = tl.load(wse_ptr + b)
    wvb = tl.load(wvb_ptr + b)
    g_eo = eo * 0.0
    g_v = eo * 0.0
    if HAS_MSE:
        g_eo += wse * 2.0 * (eo - tgt)
    if NEED_VB:
        # d(term)/d(mean) and d(term)/d(log-variance), KL for t > 0, decoder NLL at t = 0.
        dm = m - tm
        e_neg = tl.exp(-lv)
        dkl_m = dm * e_neg
        dkl_lv = 0.5 * (1.0 - tl.exp(plv - lv) - dm * dm * e_neg)
        c = x0 - m
        inv = tl.exp(-0.5 * lv)
        up = inv * (c + 1.0 / 255.0)
        um = inv * (c - 1.0 / 255.0)
        cp = _cdf(up, K)
        cm = _cdf(um, K)
        gp = _cdf_grad(up, K)
        gm = _cdf_grad(um, K)
        delta = cp - cm
        # d ll / d u+ and d ll / d u-, zero where the clamp at 1e-12 is active.
        lo = x0 < -0.999
        hi = x0 > 0.999
        dup_lo = tl.where(cp >= 1e-12, gp / tl.maximum(cp, 1e-12), 0.0)
        dum_hi = tl.where(1.0 - cm >= 1e-12, -gm / tl.maximum(1.0 - cm, 1e-12), 0.0)
        ok = delta >= 1e-12
        dup_mid = tl.where(ok, gp / tl.maximum(delta, 1e-12), 0.0)
        dum_mid = tl.where(ok, -gm / tl.maximum(delta, 1e-12), 0.0)
        dup = tl.where(lo, dup_lo, tl.where(hi, 0.0, dup_mid))
        dum = tl.where(lo, 0.0, tl.where(hi, dum_hi, dum_mid))
        # u = exp(-ls) (x0 - m +- 1/255): du/dm = -inv, du/dls = -u, ls = lv / 2.
        dnll_m = (dup + dum) * inv
        dnll_lv = 0.5 * (dup * up + dum * um)
        is0 = t == 0
        dterm_m = tl.where(is0, dnll_m, dkl_m)
        dterm_lv = tl.where(is0, dnll_lv, dkl_lv)
        if VB_TRAINS_MEAN:
            if MEAN == 2:
                dm_deo = -c1 * srm1
            elif MEAN == 1:
                dm_deo = c1
            else:
                dm_deo = 1.0
            g_eo += wvb * dterm_m * dm_deo
        if VAR == 3:
            g_v += wvb * dterm_lv * 0.5 * (logb - plv)
        elif VAR == 0:
            g_v += wvb * dterm_lv
    if LEARNED:
        obase = b.to(tl.int64) * (2 * D)
        tl.store(grad_ptr + obase + offs, g_eo.to(grad_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_ptr + obase + D + offs, g_v.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(grad_ptr + b.to(tl.int64) * D + offs, g_eo.to(grad_ptr.dtype.element_ty), mask=mask)


def _rows():
    return dict(
        R_SA=ROW["sqrt_alphas_cumprod"], R_S1A=ROW["sqrt_one_minus_alphas_cumprod"],
        R_C1=ROW["posterior_mean_coef1"], R_C2=ROW["posterior_mean_coef2"],
        R_PLV=ROW["posterior_log_variance_clipped"], R_SRA=ROW["sqrt_recip_alphas_cumprod"],
        R_SRM1=ROW["sqrt_recipm1_alphas_cumprod"], R_LOGB=ROW["log_betas"],
        R_FLLV=ROW["fixed_large_log_variance"],
    )


def _prepare(model_output, x_start, noise, t, tables, model_mean_type, model_var_type, loss_type):
    check_device(model_output, x_start, noise, t, tables)
    x0, nz = check_contiguous_like(x_start, noise)
    out = model_output.contiguous()
    B = x0.shape[0]
    D = x0.numel() // max(B, 1)
    learned = model_var_type in ("learned", "learned_range")
    codes = dict(MEAN=MEAN_CODES[model_mean_type], VAR=VAR_CODES[model_var_type], LEARNED=learned)
    is_kl = loss_type in ("kl", "rescaled_kl")
    need_vb = is_kl or learned
    return out, x0, nz, t.contiguous(), tables.contiguous(), B, D, codes, is_kl, need_vb


def training_loss_fwd(model_output, x_start, noise, t, tables, model_mean_type, model_var_type, loss_type,
                      num_timesteps):
    """(loss, mse, vb): three [B] float32 tensors, as reference.training_loss."""
    out, x0, nz, t, tables, B, D, codes, is_kl, need_vb = _prepare(
        model_output, x_start, noise, t, tables, model_mean_type, model_var_type, loss_type
    )
    block = block_size(D)
    n_chunks = triton.cdiv(D, block)
    se = torch.zeros((B, n_chunks), device=x0.device, dtype=torch.float32)
    vbp = torch.zeros((B, n_chunks), device=x0.device, dtype=torch.float32)
    if B and D:
        _training_loss_fwd_kernel[(B, n_chunks)](
            out, x0, nz, t, tables, se, vbp, D, tables.shape[1], n_chunks,
            NEED_VB=need_vb, K=_K, BLOCK=block, **codes, **_rows(),
        )
    raw_vb = vbp.sum(dim=1) / D / _LN2
    zeros = torch.zeros(B, device=x0.device, dtype=torch.float32)
    # Custom ops may not return aliases of one another: every output is its own tensor.
    if is_kl:
        loss = raw_vb * (num_timesteps if loss_type == "rescaled_kl" else 1.0)
        return loss, zeros, raw_vb
    mse = se.sum(dim=1) / D
    if codes["LEARNED"]:
        vb = raw_vb * (num_timesteps / 1000.0 if loss_type == "rescaled_mse" else 1.0)
        return mse + vb, mse, vb
    return mse.clone(), mse, zeros


def training_loss_bwd(model_output, x_start, noise, t, tables, grad_loss, grad_mse, grad_vb, model_mean_type,
                      model_var_type, loss_type, num_timesteps):
    """d(sum of grad_* times outputs)/d(model_output), model_output's shape and dtype."""
    out, x0, nz, t, tables, B, D, codes, is_kl, need_vb = _prepare(
        model_output, x_start, noise, t, tables, model_mean_type, model_var_type, loss_type
    )
    g_loss, g_mse, g_vb = (g.to(torch.float32) for g in (grad_loss, grad_mse, grad_vb))
    if is_kl:
        scale = float(num_timesteps) if loss_type == "rescaled_kl" else 1.0
        wse = torch.zeros_like(g_loss)
        wvb = (g_loss * scale + g_vb) / (D * _LN2)
    else:
        wse = (g_loss + g_mse) / D
        scale = num_timesteps / 1000.0 if loss_type == "rescaled_mse" else 1.0
        wvb = (g_loss + g_vb) * scale / (D * _LN2) if codes["LEARNED"] else torch.zeros_like(g_loss)
    grad = torch.empty_like(out)
    if B and D:
        block = block_size(D)
        _training_loss_bwd_kernel[(B, triton.cdiv(D, block))](
            out, x0, nz, t, tables, wse.contiguous(), wvb.contiguous(), grad, D, tables.shape[1],
            HAS_MSE=not is_kl, NEED_VB=need_vb, VB_TRAINS_MEAN=is_kl, K=_K, BLOCK=block, **codes, **_rows(),
        )
    return grad
