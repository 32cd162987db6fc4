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
def tanh(z):
    # No libdevice under the interpreter: tanh(z) = 2 sigmoid(2z) - 1.
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def cdf(u, K: tl.constexpr):
    """The original's approximation 0.5 (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))); K = sqrt(2/pi)."""
    return 0.5 * (1.0 + tanh(K * (u + 0.044715 * u * u * u)))


@triton.jit
def cdf_grad(u, K: tl.constexpr):
    """d cdf / du."""
    th = tanh(K * (u + 0.044715 * u * u * u))
    return 0.5 * (1.0 - th * th) * K * (1.0 + 3.0 * 0.044715 * u * u)


@triton.jit
def log_likelihood(x, m, ls, K: tl.constexpr):
    """Discretised Gaussian log-likelihood (nats) of x in [-1, 1], mean m, log std ls."""
    c = x - m
    inv = tl.exp(-ls)
    cp = cdf(inv * (c + 1.0 / 255.0), K)
    cm = cdf(inv * (c - 1.0 / 255.0), K)
    # The reference takes log(clamp(p, 1e-12)) of all three probabilities
    # (lowest bin, highest bin, the bin between) and keeps one per element;
    # choosing p first gives the same number with one log instead of three.
    # NaN-propagating clamp, as the reference's clamp(min=1e-12): a NaN model
    # output must give a NaN loss (TrainLoop stops on it), not log(1e-12).
    p = tl.where(x < -0.999, cp, tl.where(x > 0.999, 1.0 - cm, cp - cm))
    return tl.log(tl.maximum(p, 1e-12, propagate_nan=tl.PropagateNan.ALL))


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
