"""Triton device functions shared by the kernel families."""

import triton
import triton.language as tl


@triton.jit
def chunk_offsets(b, chunk, D, BLOCK: tl.constexpr):
    """Element offsets (int64) of chunk `chunk` of sample `b` in a [B, D]
    tensor, the mask of those inside the sample, and the sample's base offset
    (grids are (B, chunks of BLOCK) throughout)."""
    offs = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < D, b.to(tl.int64) * D


@triton.jit
def load_model_output(out_ptr, b, offs, mask, D, LEARNED: tl.constexpr):
    """
    The mean half and (when LEARNED) the variance half of one sample's model
    output, laid out [B, C' * S] with C' = 2C when learned; fp32.
    """
    if LEARNED:
        obase = b.to(tl.int64) * 2 * D
        eo = tl.load(out_ptr + obase + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(out_ptr + obase + D + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        eo = tl.load(out_ptr + b.to(tl.int64) * D + offs, mask=mask, other=0.0).to(tl.float32)
        v = eo * 0.0
    return eo, v


@triton.jit
def _twice_cdf(u, K: tl.constexpr):
    """
    2 cdf(u) and tanh(K (u + 0.044715 u^3)) for the original's approximation
    cdf(u) = 0.5 (1 + tanh(K (u + 0.044715 u^3))), K = sqrt(2/pi).

    tanh(z) = 2 sigmoid(2z) - 1 (no libdevice under the interpreter), with
    sigmoid(2z) = 1 / (1 + 2^(-2z log2(e))) and the constants folded into one
    polynomial in u: -2z log2(e) = u (a + b u^2). 1 + tanh rounds as the
    original's does (small probabilities cancel to multiples of 2^-24, not
    to their true values), and cdf is half of it exactly, so callers keep
    2 cdf and halve once at the end.
    """
    a = -2.8853900817779268 * K  # -2 log2(e) K
    b = (-2.8853900817779268 * 0.044715) * K
    s = 1.0 / (1.0 + tl.exp2(u * (a + b * (u * u))))
    th = 2.0 * s - 1.0
    return 1.0 + th, th


@triton.jit
def cdf_and_grad(u, K: tl.constexpr):
    """cdf(u) and d cdf / du, from one tanh."""
    c2, th = _twice_cdf(u, K)
    return 0.5 * c2, 0.5 * (1.0 - th * th) * K * (1.0 + 3.0 * 0.044715 * u * u)


@triton.jit
def bin_probability(x, m, ls, K: tl.constexpr):
    """
    The probability the discretised Gaussian (mean m, log std ls) gives the
    8-bit bin of x in [-1, 1], clamped at 1e-12 as the original clamps it.
    """
    c = x - m
    inv = tl.exp(-ls)
    cp2, _ = _twice_cdf(inv * (c + 1.0 / 255.0), K)
    cm2, _ = _twice_cdf(inv * (c - 1.0 / 255.0), K)
    # The reference takes log(clamp(p, 1e-12)) of all three probabilities
    # (lowest bin, highest bin, the bin between) and keeps one per element;
    # choosing p first gives the same number with one log instead of three.
    # In doubled cdfs: 1 - cm = (2 - 2 cm) / 2 and cp - cm = (2 cp - 2 cm) / 2
    # round exactly as the halves do.
    p = 0.5 * tl.where(x < -0.999, cp2, tl.where(x > 0.999, 2.0 - cm2, cp2 - cm2))
    # NaN-propagating clamp, as the reference's clamp(min=1e-12): a NaN model
    # output must give a NaN loss (TrainLoop stops on it), not log(1e-12).
    return tl.maximum(p, 1e-12, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def log_likelihood(x, m, ls, K: tl.constexpr):
    """Discretised Gaussian log-likelihood (nats) of x in [-1, 1], mean m, log std ls."""
    return tl.log(bin_probability(x, m, ls, K))


@triton.jit
def bound_term(x0, tm, plv, m, lv, t, K: tl.constexpr):
    """
    One element of the variational bound (nats): KL(N(tm, e^plv) || N(m, e^lv)) for
    t > 0, the decoder NLL -log p(x0 | m, e^lv) at t = 0. t is the program's
    one timestep (a scalar), so a program computes only the term it keeps.
    """
    if t == 0:
        term = -log_likelihood(x0, m, 0.5 * lv, K)
    else:
        dm = tm - m
        term = 0.5 * (-1.0 + lv - plv + tl.exp(plv - lv) + dm * dm * tl.exp(-lv))
    return term


@triton.jit
def model_distribution(
    eo, v, xt, t, tables_ptr, T,
    MEAN: tl.constexpr, VAR: tl.constexpr, CLIP: tl.constexpr,
    R_C1: tl.constexpr, R_C2: tl.constexpr, R_PLV: tl.constexpr, R_SRA: tl.constexpr, R_SRM1: tl.constexpr,
    R_LOGB: tl.constexpr, R_FLLV: tl.constexpr, R_RC1: tl.constexpr, R_C2C1: tl.constexpr,
):
    """The model's x_0 prediction (clipped when CLIP), mean and log-variance, fp32."""
    c1 = tl.load(tables_ptr + R_C1 * T + t)
    c2 = tl.load(tables_ptr + R_C2 * T + t)
    if MEAN == 2:
        pred = tl.load(tables_ptr + R_SRA * T + t) * xt - tl.load(tables_ptr + R_SRM1 * T + t) * eo
    elif MEAN == 1:
        pred = eo
    else:
        pred = tl.load(tables_ptr + R_RC1 * T + t) * eo - tl.load(tables_ptr + R_C2C1 * T + t) * xt
    if CLIP:
        # clamp(-1, 1) keeps NaN, as the reference's does
        pred = tl.minimum(tl.maximum(pred, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                          propagate_nan=tl.PropagateNan.ALL)
    if MEAN == 0:
        mean = eo
    else:
        mean = c1 * pred + c2 * xt
    plv = tl.load(tables_ptr + R_PLV * T + t)
    if VAR == 3:
        frac = (v + 1.0) / 2.0
        lv = frac * tl.load(tables_ptr + R_LOGB * T + t) + (1.0 - frac) * plv
    elif VAR == 0:
        lv = v
    elif VAR == 1:
        lv = plv + tl.zeros_like(xt)  # broadcast; 0.0 * xt would turn an inf/NaN x_t into a NaN variance
    else:
        lv = tl.load(tables_ptr + R_FLLV * T + t) + tl.zeros_like(xt)
    return pred, mean, lv
