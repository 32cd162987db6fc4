"""
The per-sample training loss of improved-diffusion (every LossType,
ModelMeanType and ModelVarType) in one forward pass over (x_0, noise, model
output), and its gradient with respect to the model output in one backward
pass. Twin: reference.training_loss.

Forward: the loss of a sample is two sums over its elements (squared error
of the mean half, and the bound term: KL for t > 0, decoder NLL at t = 0)
with the 1/D, 1/ln 2 and RESCALED factors. Samples of up to ROW_CHUNKS_MAX
blocks are summed by one program each, in one launch; longer ones by one
program per block writing partial sums, then a small kernel adding them per
sample (deterministic either way, no atomics). Backward: elementwise; each
program derives its sample's weights of the two sums from the upstream
gradients of (loss, mse, vb) itself, read in place (an expanded gradient,
as loss.sum().backward() gives, is not copied). So a training step costs
two kernel launches at training shapes and no other device work: there
these ops are bound by launch latency, not bandwidth.
"""

import functools

import torch
import triton
import triton.language as tl

from iddpm_fast.reference import ROW

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
    next_power_of_2,
    warps,
)
from ._tl import bound_term, cdf_and_grad, chunk_offsets, load_model_output, model_distribution



@triton.jit
def _elements(
    x0, nz, eo, v, t, tables_ptr, T,
    MEAN: tl.constexpr, VAR: tl.constexpr,
    R_SA: tl.constexpr, R_S1A: tl.constexpr, R_C1: tl.constexpr, R_C2: tl.constexpr, R_PLV: tl.constexpr,
    R_SRA: tl.constexpr, R_SRM1: tl.constexpr, R_LOGB: tl.constexpr, R_FLLV: tl.constexpr,
    R_RC1: tl.constexpr, R_C2C1: tl.constexpr,
):
    """x_t, the posterior mean, the model's mean / log-variance (unclipped) and the MSE target."""
    xt = tl.load(tables_ptr + R_SA * T + t) * x0 + tl.load(tables_ptr + R_S1A * T + t) * nz
    tm = tl.load(tables_ptr + R_C1 * T + t) * x0 + tl.load(tables_ptr + R_C2 * T + t) * xt
    _, m, lv = model_distribution(
        eo, v, xt, t, tables_ptr, T, MEAN, VAR, False, R_C1, R_C2, R_PLV, R_SRA, R_SRM1, R_LOGB, R_FLLV, R_RC1, R_C2C1
    )
    if MEAN == 2:
        tgt = nz
    elif MEAN == 1:
        tgt = x0
    else:
        tgt = tm
    return xt, tm, m, lv, tgt


@triton.jit
def _load_at(b, offs, mask, base, x0_ptr, noise_ptr, out_ptr, D, LEARNED: tl.constexpr):
    x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    nz = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    eo, v = load_model_output(out_ptr, b, offs, mask, D, LEARNED)
    return x0, nz, eo, v


@triton.jit
def _load_sample(
    b, chunk, x0_ptr, noise_ptr, out_ptr, t_ptr, tables_ptr, D, T,
    LEARNED: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.load(t_ptr + b)
    offs, mask, base = chunk_offsets(b, chunk, D, BLOCK)
    x0, nz, eo, v = _load_at(b, offs, mask, base, x0_ptr, noise_ptr, out_ptr, D, LEARNED)
    return t, offs, mask, x0, nz, eo, v


@triton.jit
def _chunk_terms(
    x0, nz, eo, v, mask, t, tables_ptr, T, MEAN: tl.constexpr, VAR: tl.constexpr, NEED_VB: tl.constexpr,
    R_SA: tl.constexpr, R_S1A: tl.constexpr, R_C1: tl.constexpr, R_C2: tl.constexpr, R_PLV: tl.constexpr,
    R_SRA: tl.constexpr, R_SRM1: tl.constexpr, R_LOGB: tl.constexpr, R_FLLV: tl.constexpr,
    R_RC1: tl.constexpr, R_C2C1: tl.constexpr, K: tl.constexpr,
):
    """Per element of one chunk, 0 outside the sample: the squared error (mean
    half against its target) and the bound term (nats; 0 without NEED_VB)."""
    xt, tm, m, lv, tgt = _elements(
        x0, nz, eo, v, t, tables_ptr, T, MEAN, VAR,
        R_SA, R_S1A, R_C1, R_C2, R_PLV, R_SRA, R_SRM1, R_LOGB, R_FLLV, R_RC1, R_C2C1,
    )
    diff = tgt - eo
    se = tl.where(mask, diff * diff, 0.0)
    vb = se * 0.0
    if NEED_VB:
        plv = tl.load(tables_ptr + R_PLV * T + t)
        vb = tl.where(mask, bound_term(x0, tm, plv, m, lv, t, K), 0.0)
    return se, vb


@triton.jit
def _store_losses(
    b, se_sum, vb_sum, loss_ptr, mse_ptr, vbo_ptr, D_f, LN2_f, KL_SCALE, VB_SCALE,
    IS_KL: tl.constexpr, LEARNED: tl.constexpr,
):
    """A sample's loss, mse and vb from its two sums (the 1/D, 1/ln 2 and
    RESCALED factors of reference.training_loss)."""
    raw_vb = vb_sum / D_f / LN2_f
    mse = se_sum / D_f
    if IS_KL:
        tl.store(loss_ptr + b, raw_vb * KL_SCALE)
        tl.store(mse_ptr + b, 0.0)
        tl.store(vbo_ptr + b, raw_vb)
    elif LEARNED:
        vb = raw_vb * VB_SCALE
        tl.store(loss_ptr + b, mse + vb)
        tl.store(mse_ptr + b, mse)
        tl.store(vbo_ptr + b, vb)
    else:
        tl.store(loss_ptr + b, mse)
        tl.store(mse_ptr + b, mse)
        tl.store(vbo_ptr + b, 0.0)


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
    R_RC1: tl.constexpr, R_C2C1: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t, offs, mask, x0, nz, eo, v = _load_sample(
        b, chunk, x0_ptr, noise_ptr, out_ptr, t_ptr, tables_ptr, D, T, LEARNED, BLOCK
    )
    se, vb = _chunk_terms(
        x0, nz, eo, v, mask, t, tables_ptr, T, MEAN, VAR, NEED_VB,
        R_SA, R_S1A, R_C1, R_C2, R_PLV, R_SRA, R_SRM1, R_LOGB, R_FLLV, R_RC1, R_C2C1, K,
    )
    tl.store(se_ptr + b.to(tl.int64) * n_chunks + chunk, tl.sum(se, axis=0))
    if NEED_VB:
        tl.store(vb_ptr + b.to(tl.int64) * n_chunks + chunk, tl.sum(vb, axis=0))


@triton.jit
def _training_loss_finalize_kernel(
    se_ptr,  # [B, n_chunks] float32 partial sums of squared error
    vb_ptr,  # [B, n_chunks] float32 partial sums of the bound term (nats)
    loss_ptr, mse_ptr, vbo_ptr,  # [B] float32 outputs
    n_chunks, D_f, LN2_f, KL_SCALE, VB_SCALE,
    IS_KL: tl.constexpr, LEARNED: tl.constexpr, NEED_VB: tl.constexpr, CBLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.arange(0, CBLOCK)
    row = b.to(tl.int64) * n_chunks
    acc_se = tl.zeros((CBLOCK,), dtype=tl.float32)
    acc_vb = tl.zeros((CBLOCK,), dtype=tl.float32)
    for start in range(0, n_chunks, CBLOCK):
        m = start + offs < n_chunks
        acc_se += tl.load(se_ptr + row + start + offs, mask=m, other=0.0)
        if NEED_VB:
            acc_vb += tl.load(vb_ptr + row + start + offs, mask=m, other=0.0)
    _store_losses(
        b, tl.sum(acc_se, axis=0), tl.sum(acc_vb, axis=0), loss_ptr, mse_ptr, vbo_ptr, D_f, LN2_f, KL_SCALE,
        VB_SCALE, IS_KL, LEARNED,
    )


@triton.jit
def _training_loss_fwd_rows_kernel(
    out_ptr,  # [B, C' * S] model output (C' = 2C when learned), any float dtype
    x0_ptr,  # [B, D] clean data (D = C * S)
    noise_ptr,  # [B, D] noise
    t_ptr,  # [B] int64 timesteps
    tables_ptr,  # [R, T] float32 coefficient tables
    loss_ptr, mse_ptr, vbo_ptr,  # [B] float32 outputs
    D, T, n_chunks, D_f, LN2_f, KL_SCALE, VB_SCALE,
    MEAN: tl.constexpr, VAR: tl.constexpr, LEARNED: tl.constexpr, NEED_VB: tl.constexpr, IS_KL: tl.constexpr,
    R_SA: tl.constexpr, R_S1A: tl.constexpr, R_C1: tl.constexpr, R_C2: tl.constexpr, R_PLV: tl.constexpr,
    R_SRA: tl.constexpr, R_SRM1: tl.constexpr, R_LOGB: tl.constexpr, R_FLLV: tl.constexpr,
    R_RC1: tl.constexpr, R_C2C1: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
):
    """The forward and the finalize in one launch: one program per sample
    walks its chunks, accumulating the two-kernel path's per-element terms
    elementwise, and reduces them once (another order of the same float32
    additions: the paths agree to rounding); writes loss, mse and vb."""
    b = tl.program_id(0)
    t = tl.load(t_ptr + b)
    base = b.to(tl.int64) * D
    start = base * 0  # int64 offset of the chunk within the sample
    se_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    vb_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, n_chunks):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < D
        start += BLOCK
        x0, nz, eo, v = _load_at(b, offs, mask, base, x0_ptr, noise_ptr, out_ptr, D, LEARNED)
        se, vb = _chunk_terms(
            x0, nz, eo, v, mask, t, tables_ptr, T, MEAN, VAR, NEED_VB,
            R_SA, R_S1A, R_C1, R_C2, R_PLV, R_SRA, R_SRM1, R_LOGB, R_FLLV, R_RC1, R_C2C1, K,
        )
        se_acc += se
        vb_acc += vb
    # One reduction across the program at the end, not one per chunk.
    se_sum = tl.sum(se_acc, axis=0)
    vb_sum = tl.sum(vb_acc, axis=0)
    _store_losses(b, se_sum, vb_sum, loss_ptr, mse_ptr, vbo_ptr, D_f, LN2_f, KL_SCALE, VB_SCALE, IS_KL, LEARNED)


# The upstream gradients' strides are 0 (an expanded scalar's gradient), 1 or
# anything: one compiled kernel for all, not one per stride class.
@triton.jit(do_not_specialize=["gl_stride", "gm_stride", "gv_stride"])
def _training_loss_bwd_kernel(
    out_ptr,  # [B, C' * S] model output
    x0_ptr,  # [B, D]
    noise_ptr,  # [B, D]
    t_ptr,  # [B] int64
    tables_ptr,  # [R, T] float32
    gl_ptr, gm_ptr, gv_ptr,  # [B] upstream gradients of loss, mse, vb (read only when HAS_G*), any stride
    gl_stride, gm_stride, gv_stride,  # their strides (0 for an expanded scalar's gradient)
    grad_ptr,  # [B, C' * S] d(objective)/d(model output), model output's dtype
    D, T, D_f, DLN2_f, KL_SCALE, VB_SCALE,
    MEAN: tl.constexpr, VAR: tl.constexpr, LEARNED: tl.constexpr, HAS_MSE: tl.constexpr,
    NEED_VB: tl.constexpr, VB_TRAINS_MEAN: tl.constexpr,
    HAS_GL: tl.constexpr, HAS_GM: tl.constexpr, HAS_GV: tl.constexpr,
    R_SA: tl.constexpr, R_S1A: tl.constexpr, R_C1: tl.constexpr, R_C2: tl.constexpr, R_PLV: tl.constexpr,
    R_SRA: tl.constexpr, R_SRM1: tl.constexpr, R_LOGB: tl.constexpr, R_FLLV: tl.constexpr,
    R_RC1: tl.constexpr, R_C2C1: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    t, offs, mask, x0, nz, eo, v = _load_sample(
        b, chunk, x0_ptr, noise_ptr, out_ptr, t_ptr, tables_ptr, D, T, LEARNED, BLOCK
    )
    c1 = tl.load(tables_ptr + R_C1 * T + t)
    plv = tl.load(tables_ptr + R_PLV * T + t)
    srm1 = tl.load(tables_ptr + R_SRM1 * T + t)
    logb = tl.load(tables_ptr + R_LOGB * T + t)
    xt, tm, m, lv, tgt = _elements(
        x0, nz, eo, v, t, tables_ptr, T, MEAN, VAR,
        R_SA, R_S1A, R_C1, R_C2, R_PLV, R_SRA, R_SRM1, R_LOGB, R_FLLV, R_RC1, R_C2C1,
    )
    # This sample's weights of the two sums (d objective / d sum), from the
    # upstream gradients of (loss, mse, vb); an absent gradient counts as 0.
    gl = 0.0
    gm = 0.0
    gv = 0.0
    if HAS_GL:
        gl = tl.load(gl_ptr + b.to(tl.int64) * gl_stride).to(tl.float32)
    if HAS_GM:
        gm = tl.load(gm_ptr + b.to(tl.int64) * gm_stride).to(tl.float32)
    if HAS_GV:
        gv = tl.load(gv_ptr + b.to(tl.int64) * gv_stride).to(tl.float32)
    if VB_TRAINS_MEAN:  # the KL losses: loss = vb * KL_SCALE, mse = 0
        wse = 0.0
        wvb = (gl * KL_SCALE + gv) / DLN2_f
    else:
        wse = (gl + gm) / D_f
        if LEARNED:
            wvb = (gl + gv) * VB_SCALE / DLN2_f
        else:
            wvb = 0.0
    g_eo = eo * 0.0
    g_v = eo * 0.0
    if HAS_MSE:
        g_eo += wse * 2.0 * (eo - tgt)
    if NEED_VB:
        # d(term)/d(mean) and d(term)/d(log-variance): decoder NLL at t = 0,
        # KL for t > 0 (t is the program's one timestep: one branch runs).
        if t == 0:
            c = x0 - m
            inv = tl.exp(-0.5 * lv)
            up = inv * (c + 1.0 / 255.0)
            um = inv * (c - 1.0 / 255.0)
            cp, dcp = cdf_and_grad(up, K)
            cm, dcm = cdf_and_grad(um, K)
            delta = cp - cm
            # d ll / d u+ and d ll / d u-, zero where the clamp at 1e-12 is active.
            lo = x0 < -0.999
            hi = x0 > 0.999
            dup_lo = tl.where(cp >= 1e-12, dcp / tl.maximum(cp, 1e-12), 0.0)
            dum_hi = tl.where(1.0 - cm >= 1e-12, -dcm / tl.maximum(1.0 - cm, 1e-12), 0.0)
            ok = delta >= 1e-12
            dup_mid = tl.where(ok, dcp / tl.maximum(delta, 1e-12), 0.0)
            dum_mid = tl.where(ok, -dcm / tl.maximum(delta, 1e-12), 0.0)
            dup = tl.where(lo, dup_lo, tl.where(hi, 0.0, dup_mid))
            dum = tl.where(lo, 0.0, tl.where(hi, dum_hi, dum_mid))
            # u = exp(-ls) (x0 - m +- 1/255): du/dm = -inv, du/dls = -u, ls = lv / 2.
            dterm_m = (dup + dum) * inv
            dterm_lv = 0.5 * (dup * up + dum * um)
        else:
            dm = m - tm
            e_neg = tl.exp(-lv)
            dterm_m = dm * e_neg
            dterm_lv = 0.5 * (1.0 - tl.exp(plv - lv) - dm * dm * e_neg)
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
        obase = b.to(tl.int64) * 2 * D
        tl.store(grad_ptr + obase + offs, g_eo.to(grad_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_ptr + obase + D + offs, g_v.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(grad_ptr + b.to(tl.int64) * D + offs, g_eo.to(grad_ptr.dtype.element_ty), mask=mask)


# Table rows (constexpr arguments): the model distribution's, and q_sample's two.
_ROWS = dict(MODEL_ROWS, R_SA=ROW["sqrt_alphas_cumprod"], R_S1A=ROW["sqrt_one_minus_alphas_cumprod"])


@functools.lru_cache(maxsize=None)
def _kinds(model_mean_type, model_var_type, loss_type):
    """What the launches need of the three kind strings, built once per
    combination (launch overhead bounds this op at training sizes): (is_kl,
    the forward-rows, partial-sums and backward constexprs without BLOCK)."""
    learned = model_var_type in ("learned", "learned_range")
    codes = dict(MEAN=MEAN_CODES[model_mean_type], VAR=VAR_CODES[model_var_type], LEARNED=learned)
    is_kl = loss_type in ("kl", "rescaled_kl")
    need_vb = is_kl or learned
    rows = dict(NEED_VB=need_vb, IS_KL=is_kl, K=_K, **codes, **_ROWS)
    partial = dict(NEED_VB=need_vb, K=_K, **codes, **_ROWS)
    bwd = dict(HAS_MSE=not is_kl, NEED_VB=need_vb, VB_TRAINS_MEAN=is_kl, K=_K, **codes, **_ROWS)
    return is_kl, rows, partial, bwd


def _prepare(model_output, x_start, noise, t, tables, model_mean_type, model_var_type, loss_type):
    """(out, x0, noise, t, tables) as the kernels read them (contiguous, one
    device), then B, D and _kinds(...)."""
    check_device(model_output, x_start, noise, t, tables)
    x0, nz = check_contiguous_like(x_start, noise)
    B = x0.shape[0]
    D = x0.numel() // max(B, 1)
    return (model_output.contiguous(), x0, nz, t.contiguous(), tables.contiguous(), B, D,
            _kinds(model_mean_type, model_var_type, loss_type))


def _scales(loss_type, num_timesteps):
    """(factor of vb in the KL losses' loss, factor of vb in the hybrid loss)."""
    kl = float(num_timesteps) if loss_type == "rescaled_kl" else 1.0
    vb = num_timesteps / 1000.0 if loss_type == "rescaled_mse" else 1.0
    return kl, vb


# Samples of at most this many chunks take the one-launch forward (one
# program per sample); longer ones the two-kernel path, whose grid keeps the
# GPU busy when there are few samples (64x3x256x256: 192 chunks each).
ROW_CHUNKS_MAX = 16


def training_loss_fwd(model_output, x_start, noise, t, tables, model_mean_type, model_var_type, loss_type,
                      num_timesteps, *, block=None, one_launch=None, num_warps=None):
    """(loss, mse, vb): three [B] float32 tensors, as reference.training_loss.
    block (elements per program) and one_launch (True: one program per
    sample; False: partial sums, then a finalize kernel; None: by
    ROW_CHUNKS_MAX) and num_warps (of the two-kernel path's partial sums)
    override the defaults, for tests and A/B timing."""
    prepared = _prepare(model_output, x_start, noise, t, tables, model_mean_type, model_var_type, loss_type)
    return forward_prepared(prepared, loss_type, num_timesteps, block=block, one_launch=one_launch,
                            num_warps=num_warps)


def forward_prepared(prepared, loss_type, num_timesteps, *, block=None, one_launch=None, num_warps=None):
    """training_loss_fwd on _prepare's result (the eager autograd Function
    prepares once for the forward and the backward)."""
    out, x0, nz, t, tables, B, D, (is_kl, rows, partial_kw, _) = prepared
    device = x0.device
    loss, mse, vb = (torch.empty(B, device=device, dtype=torch.float32) for _ in range(3))
    if not B:
        return loss, mse, vb
    if not D:  # a mean over no elements, as the reference: NaN
        nan = torch.full((B,), float("nan"), device=device, dtype=torch.float32)
        return nan, nan.clone(), nan.clone()
    block = block or block_size(D)
    n_chunks = cdiv(D, block)
    kl_scale, vb_scale = _scales(loss_type, num_timesteps)
    if one_launch if one_launch is not None else n_chunks <= ROW_CHUNKS_MAX:
        _training_loss_fwd_rows_launch((B,),
            out, x0, nz, t, tables, loss, mse, vb, D, tables.shape[1], n_chunks, float(D), _LN2, kl_scale, vb_scale,
            BLOCK=block, **rows,
        )
        return loss, mse, vb
    partial = torch.empty((2, B, n_chunks), device=device, dtype=torch.float32)
    _training_loss_fwd_launch((B, n_chunks),
        out, x0, nz, t, tables, partial[0], partial[1], D, tables.shape[1], n_chunks,
        BLOCK=block, **partial_kw, **warps(num_warps),
    )
    _training_loss_finalize_launch((B,),
        partial[0], partial[1], loss, mse, vb, n_chunks, float(D), _LN2, kl_scale, vb_scale,
        IS_KL=is_kl, LEARNED=rows["LEARNED"], NEED_VB=rows["NEED_VB"],
        CBLOCK=max(16, min(1024, next_power_of_2(n_chunks))),
    )
    return loss, mse, vb


def training_loss_bwd(model_output, x_start, noise, t, tables, grad_loss, grad_mse, grad_vb, model_mean_type,
                      model_var_type, loss_type, num_timesteps):
    """d(sum of grad_* times outputs)/d(model_output), model_output's shape and dtype.
    A grad_* may be None (that output's gradient is zero)."""
    prepared = _prepare(model_output, x_start, noise, t, tables, model_mean_type, model_var_type, loss_type)
    B, device = prepared[5], prepared[1].device
    for g in (grad_loss, grad_mse, grad_vb):
        if g is not None and (g.shape != (B,) or g.device != device):
            raise ValueError(f"upstream gradients must have shape [{B}] on {device}, "
                             f"got {tuple(g.shape)} on {g.device}")
    return backward_prepared(prepared, grad_loss, grad_mse, grad_vb, loss_type, num_timesteps)


def backward_prepared(prepared, grad_loss, grad_mse, grad_vb, loss_type, num_timesteps):
    """training_loss_bwd on _prepare's result, the upstream gradients already
    known to be [B] on the data's device (autograd checks them)."""
    out, x0, nz, t, tables, B, D, (_, _, _, bwd) = prepared
    grad = torch.empty_like(out)
    if B and D:
        block = block_size(D)
        kl_scale, vb_scale = _scales(loss_type, num_timesteps)
        dummy = grad_loss if grad_loss is not None else grad_mse if grad_mse is not None else grad_vb
        dummy = t if dummy is None else dummy
        _training_loss_bwd_launch((B, cdiv(D, block)),
            out, x0, nz, t, tables,
            dummy if grad_loss is None else grad_loss, dummy if grad_mse is None else grad_mse,
            dummy if grad_vb is None else grad_vb,
            0 if grad_loss is None else grad_loss.stride(0), 0 if grad_mse is None else grad_mse.stride(0),
            0 if grad_vb is None else grad_vb.stride(0), grad, D, tables.shape[1],
            float(D), D * _LN2, kl_scale, vb_scale,
            HAS_GL=grad_loss is not None, HAS_GM=grad_mse is not None, HAS_GV=grad_vb is not None,
            BLOCK=block, **bwd,
        )
    elif B:
        grad.zero_()
    return grad


# Launches by kernel[grid](...) the first time, directly afterwards (see _common.Launcher).
_training_loss_fwd_rows_launch = Launcher(_training_loss_fwd_rows_kernel)
_training_loss_fwd_launch = Launcher(_training_loss_fwd_kernel)
_training_loss_finalize_launch = Launcher(_training_loss_finalize_kernel)
_training_loss_bwd_launch = Launcher(_training_loss_bwd_kernel)
