"""
The specification: a pure-PyTorch twin of every op that iddpm_fast fuses.

Every function here has the signature its fused kernel has (Triton for the
diffusion math, the C++ extension for GroupNorm-SiLU), and the tests hold each
kernel to the function of the same name in this module. `GaussianDiffusion`
computes through these functions (via :mod:`iddpm_fast.ops`) when no fused
implementation is selected, so this module also defines what the drop-in
classes return.

Conventions
-----------
- ``x`` tensors are ``[N x C x ...]``; ``t`` is a 1-D int64 tensor of N
  timestep indices into the (possibly respaced) diffusion.
- ``tables`` is the ``[len(TABLE_ROWS) x T]`` float32 tensor built once per
  diffusion object by :func:`build_tables` (float64 math, stored as float32).
  Ops gather their per-timestep coefficients from it by ``t``, exactly as
  improved-diffusion's ``_extract_into_tensor`` gathered float64 numpy values
  and cast them to float32.
- Math runs in float32 for fp32/bf16/fp16 inputs (float64 for float64
  inputs); tensor outputs come back in the dtype of the main input (x_t or
  x_start), per-sample losses in float32. The drop-in `GaussianDiffusion`
  promotes half-precision states to float32 before calling the ops, as the
  original's float32 coefficients did.
- Mean/variance types are passed as the lower-case names of
  :class:`~iddpm_fast.gaussian_diffusion.ModelMeanType` /
  :class:`~iddpm_fast.gaussian_diffusion.ModelVarType` /
  :class:`~iddpm_fast.gaussian_diffusion.LossType` members (``"epsilon"``,
  ``"learned_range"``, ``"rescaled_mse"``...), so that the fused ops can be
  registered with plain schemas.
- Operation order follows improved-diffusion, so float32 results agree with
  it to the last bit on the same device.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

# Rows of the coefficient table, in order. Kernels index rows by position.
TABLE_ROWS = (
    "betas",
    "log_betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "one_minus_alphas_cumprod",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "recip_posterior_mean_coef1",
    "posterior_mean_coef2_over_coef1",
    "fixed_large_variance",
    "fixed_large_log_variance",
)
ROW = {name: i for i, name in enumerate(TABLE_ROWS)}
# Rows the original computed from its public arrays at each call (see derived_rows).
DERIVED_ROWS = (
    "log_betas",
    "one_minus_alphas_cumprod",
    "recip_posterior_mean_coef1",
    "posterior_mean_coef2_over_coef1",
    "fixed_large_variance",
    "fixed_large_log_variance",
)
# The original's public per-timestep arrays (GaussianDiffusion attributes).
PUBLIC_ARRAYS = tuple(name for name in TABLE_ROWS if name not in DERIVED_ROWS)

MEAN_TYPES = ("previous_x", "start_x", "epsilon")
VAR_TYPES = ("learned", "fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
LEARNED_VAR_TYPES = ("learned", "learned_range")

_LN2 = math.log(2.0)


def diffusion_arrays(betas):
    """
    Every per-timestep coefficient of a diffusion with the given betas.

    :param betas: a 1-D array of T betas (T >= 2), each in (0, 1].
    :return: a dict name -> float64 numpy array [T], one per TABLE_ROWS entry.
    """
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    ac_next = np.append(ac[1:], 0.0)
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    public = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "alphas_cumprod_next": ac_next,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        # The posterior variance is 0 at t=0; its log is clipped to the t=1 value.
        "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    assert tuple(public) == PUBLIC_ARRAYS
    rows = {**public, **derived_rows(public)}
    return {name: rows[name] for name in TABLE_ROWS}


def derived_rows(public):
    """
    The DERIVED_ROWS from the PUBLIC_ARRAYS (a dict of float64 arrays), as the
    original's methods derive them from its attributes at each call.
    """
    # FIXED_LARGE uses the posterior variance at t=0 for a better decoder likelihood.
    fixed_large = np.append(public["posterior_variance"][1], public["betas"][1:])
    return {
        "log_betas": np.log(public["betas"]),
        "one_minus_alphas_cumprod": 1.0 - public["alphas_cumprod"],
        "recip_posterior_mean_coef1": 1.0 / public["posterior_mean_coef1"],
        "posterior_mean_coef2_over_coef1": public["posterior_mean_coef2"] / public["posterior_mean_coef1"],
        "fixed_large_variance": fixed_large,
        "fixed_large_log_variance": np.log(fixed_large),
    }


def build_tables(arrays, device=None):
    """
    Stack the float64 coefficient arrays into one float32 device tensor.

    :param arrays: a dict from :func:`diffusion_arrays`.
    :return: a [len(TABLE_ROWS) x T] float32 tensor on `device`.
    """
    stacked = np.stack([np.asarray(arrays[name], dtype=np.float64) for name in TABLE_ROWS])
    return torch.from_numpy(stacked).to(device=device, dtype=torch.float32).contiguous()


def gather(tables, row, t, ndim):
    """
    Coefficients of one table row at timesteps t, shaped [N, 1, ..., 1].

    :param ndim: the number of dimensions of the tensor it will broadcast to.
    """
    return tables[ROW[row]][t].view(-1, *([1] * (ndim - 1)))


def _nonzero_mask(t, ndim):
    return (t != 0).float().view(-1, *([1] * (ndim - 1)))


def _up(x):
    """x in the dtype the math runs in: float32, or float64 for float64 input."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def mean_flat(tensor):
    """Mean over all non-batch dimensions: [N x ...] -> [N]."""
    return tensor.mean(dim=list(range(1, tensor.dim())))


# --------------------------------------------------------------------------
# Elementwise likelihood helpers (improved-diffusion's losses.py semantics).
# --------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2):
    """
    KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise
    with broadcasting. Scalars are accepted for any argument but one.
    """
    ref = next((v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, torch.Tensor)), None)
    if ref is None:
        raise ValueError("normal_kl needs at least one Tensor argument")
    logvar1, logvar2 = [
        v if isinstance(v, torch.Tensor) else torch.tensor(v).to(ref) for v in (logvar1, logvar2)
    ]
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF used by the original."""
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """
    Log-likelihood (nats) of 8-bit data under a Gaussian discretised into the
    256 bins of width 2/255 that tile [-1, 1]; the two edge bins extend to
    -inf / +inf (decided by x < -0.999 / x > 0.999), probabilities clamped at 1e-12.

    :param x: [N x ...] targets, uint8 values rescaled to [-1, 1].
    :param means: the Gaussian means, x's shape.
    :param log_scales: log standard deviations, broadcastable to x's shape.
    :return: log-probabilities of x's shape, in x's dtype (float32 math).
    """
    out_dtype = x.dtype
    x, means, log_scales = _up(x), _up(means), _up(log_scales)
    log_scales = log_scales.expand_as(x)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = approx_standard_normal_cdf(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = approx_standard_normal_cdf(min_in)
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )
    return log_probs.to(out_dtype)


def discretized_gaussian_nll_bpd(x, means, log_scales):
    """
    Per-sample negative log-likelihood of the discretised Gaussian decoder.

    :return: an [N] float32 tensor in bits per dimension.
    """
    ll = discretized_gaussian_log_likelihood(_up(x), _up(means), _up(log_scales))
    return mean_flat(-ll) / _LN2


# --------------------------------------------------------------------------
# The forward process and its posterior.
# --------------------------------------------------------------------------


def q_sample(x_start, t, noise, tables):
    """
    Sample x_t ~ q(x_t | x_0): sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * noise.

    :param x_start: [N x C x ...] clean data.
    :param t: [N] int64 timesteps.
    :param noise: standard normal noise, x_start's shape.
    :return: x_t, x_start's shape and dtype.
    """
    nd = x_start.dim()
    out = (
        gather(tables, "sqrt_alphas_cumprod", t, nd) * _up(x_start)
        + gather(tables, "sqrt_one_minus_alphas_cumprod", t, nd) * _up(noise)
    )
    return out.to(x_start.dtype)


def q_posterior_mean_variance(x_start, x_t, t, tables):
    """
    The Gaussian posterior q(x_{t-1} | x_t, x_0).

    :return: (mean [x's shape, x_t's dtype], variance [N,1,..] float32,
              clipped log-variance [N,1,..] float32).
    """
    nd = x_t.dim()
    mean = (
        gather(tables, "posterior_mean_coef1", t, nd) * _up(x_start)
        + gather(tables, "posterior_mean_coef2", t, nd) * _up(x_t)
    )
    return (
        mean.to(x_t.dtype),
        gather(tables, "posterior_variance", t, nd),
        gather(tables, "posterior_log_variance_clipped", t, nd),
    )


# --------------------------------------------------------------------------
# The model's distribution p(x_{t-1} | x_t) from a raw model output.
# --------------------------------------------------------------------------


def split_model_output(model_output, x_t, model_var_type):
    """
    Split a raw model output into its mean half and (for learned variances)
    its variance half.

    :return: (mean_part [N x C x ...], var_values or None).
    """
    C = x_t.shape[1]
    if model_var_type in LEARNED_VAR_TYPES:
        return model_output[:, :C], model_output[:, C:]
    return model_output, None


def model_log_variance(var_values, t, tables, model_var_type, ndim):
    """
    The model's (variance, log-variance) at timesteps t.

    For "learned_range", var_values v in [-1, 1] interpolate the log-variance
    between the clipped posterior log-variance (v=-1) and log beta_t (v=+1):
    frac = (v + 1) / 2, log sigma^2 = frac * log beta_t + (1 - frac) * log beta~_t.
    Fixed types return [N,1,..] tensors; learned types return var_values' shape.
    """
    if model_var_type == "learned":
        log_var = _up(var_values)
        return torch.exp(log_var), log_var
    if model_var_type == "learned_range":
        min_log = gather(tables, "posterior_log_variance_clipped", t, ndim)
        max_log = gather(tables, "log_betas", t, ndim)
        frac = (_up(var_values) + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        return torch.exp(log_var), log_var
    if model_var_type == "fixed_large":
        return (
            gather(tables, "fixed_large_variance", t, ndim),
            gather(tables, "fixed_large_log_variance", t, ndim),
        )
    if model_var_type == "fixed_small":
        return (
            gather(tables, "posterior_variance", t, ndim),
            gather(tables, "posterior_log_variance_clipped", t, ndim),
        )
    raise ValueError(f"unknown model_var_type {model_var_type!r}; expected one of {VAR_TYPES}")


def predict_xstart_from_eps(x_t, t, eps, tables):
    """x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps (float32)."""
    nd = x_t.dim()
    return (
        gather(tables, "sqrt_recip_alphas_cumprod", t, nd) * _up(x_t)
        - gather(tables, "sqrt_recipm1_alphas_cumprod", t, nd) * _up(eps)
    )


def predict_xstart_from_xprev(x_t, t, xprev, tables):
    """x_0 = (x_{t-1} - coef2 x_t) / coef1 (float32)."""
    nd = x_t.dim()
    return (
        gather(tables, "recip_posterior_mean_coef1", t, nd) * _up(xprev)
        - gather(tables, "posterior_mean_coef2_over_coef1", t, nd) * _up(x_t)
    )


def predict_eps_from_xstart(x_t, t, pred_xstart, tables):
    """eps = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1) (float32)."""
    nd = x_t.dim()
    return (
        gather(tables, "sqrt_recip_alphas_cumprod", t, nd) * _up(x_t) - _up(pred_xstart)
    ) / gather(tables, "sqrt_recipm1_alphas_cumprod", t, nd)


def p_mean_variance_unfused(
    model_output, x_t, t, tables, *, model_mean_type, model_var_type, clip_denoised, denoised_fn=None
):
    """
    :func:`p_mean_variance` with an optional user `denoised_fn` applied to the
    x_0 prediction before clipping (which no fused kernel can run); all math
    in float32, results float32.
    """
    nd = x_t.dim()
    mean_part, var_values = split_model_output(model_output, x_t, model_var_type)
    variance, log_variance = model_log_variance(var_values, t, tables, model_var_type, nd)

    def process_xstart(x):
        if denoised_fn is not None:
            x = denoised_fn(x)
        return x.clamp(-1, 1) if clip_denoised else x

    if model_mean_type == "previous_x":
        pred_xstart = process_xstart(predict_xstart_from_xprev(x_t, t, mean_part, tables))
        mean = _up(mean_part)
    elif model_mean_type in ("start_x", "epsilon"):
        if model_mean_type == "start_x":
            pred_xstart = process_xstart(_up(mean_part))
        else:
            pred_xstart = process_xstart(predict_xstart_from_eps(x_t, t, mean_part, tables))
        mean = (
            gather(tables, "posterior_mean_coef1", t, nd) * pred_xstart
            + gather(tables, "posterior_mean_coef2", t, nd) * _up(x_t)
        )
    else:
        raise ValueError(f"unknown model_mean_type {model_mean_type!r}; expected one of {MEAN_TYPES}")
    return mean, variance, log_variance, pred_xstart


def p_mean_variance(model_output, x_t, t, tables, *, model_mean_type, model_var_type, clip_denoised):
    """
    The model's Gaussian p(x_{t-1} | x_t) and its x_0 prediction.

    :param model_output: [N x C' x ...] raw model output, C' = 2C for learned
                         variances (mean half first), else C.
    :param x_t: [N x C x ...] the noisy input the model saw.
    :param clip_denoised: clamp the x_0 prediction to [-1, 1] before using it.
    :return: (mean, variance, log_variance, pred_xstart), in x_t's dtype; the
             variances are [N,1,..] for fixed variance types.
    """
    outs = p_mean_variance_unfused(
        model_output,
        x_t,
        t,
        tables,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=clip_denoised,
    )
    return tuple(o.to(x_t.dtype) for o in outs)


# --------------------------------------------------------------------------
# Sampling steps.
# --------------------------------------------------------------------------


def p_sample_step(model_output, x_t, t, noise, tables, *, model_mean_type, model_var_type, clip_denoised):
    """
    One ancestral step: x_{t-1} = mean + exp(0.5 log_var) * noise (no noise at t=0).

    :param noise: standard normal noise, x_t's shape.
    :return: (sample, pred_xstart), x_t's dtype.
    """
    mean, _, log_variance, pred_xstart = p_mean_variance_unfused(
        model_output,
        x_t,
        t,
        tables,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=clip_denoised,
    )
    sample = mean + _nonzero_mask(t, x_t.dim()) * torch.exp(0.5 * log_variance) * _up(noise)
    return sample.to(x_t.dtype), pred_xstart.to(x_t.dtype)


def ddim_step_from_xstart(x_t, t, pred_xstart, noise, tables, eta):
    """DDIM's update (its eq. 12) given the x_0 prediction; float32."""
    eps = predict_eps_from_xstart(x_t, t, pred_xstart, tables)
    return ddim_step_from_eps(x_t, t, pred_xstart, eps, noise, tables, eta)


def ddim_step_from_eps(x_t, t, pred_xstart, eps, noise, tables, eta):
    """DDIM's update given both the x_0 and the implied epsilon predictions."""
    nd = x_t.dim()
    alpha_bar = gather(tables, "alphas_cumprod", t, nd)
    alpha_bar_prev = gather(tables, "alphas_cumprod_prev", t, nd)
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
    mean_pred = _up(pred_xstart) * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    return mean_pred + _nonzero_mask(t, nd) * sigma * _up(noise)


def ddim_step(model_output, x_t, t, noise, tables, *, eta, model_mean_type, model_var_type, clip_denoised):
    """
    One DDIM step with stochasticity eta (eta=0: deterministic).

    :param noise: standard normal noise, x_t's shape (unused when eta == 0,
                  but drawn by the caller to keep the random stream aligned
                  with improved-diffusion).
    :return: (sample, pred_xstart), x_t's dtype.
    """
    _, _, _, pred_xstart = p_mean_variance_unfused(
        model_output,
        x_t,
        t,
        tables,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=clip_denoised,
    )
    sample = ddim_step_from_xstart(x_t, t, pred_xstart, noise, tables, eta)
    return sample.to(x_t.dtype), pred_xstart.to(x_t.dtype)


def ddim_reverse_from_xstart(x_t, t, pred_xstart, tables):
    """The deterministic DDIM step from x_t to x_{t+1}; float32."""
    nd = x_t.dim()
    eps = predict_eps_from_xstart(x_t, t, pred_xstart, tables)
    alpha_bar_next = gather(tables, "alphas_cumprod_next", t, nd)
    return _up(pred_xstart) * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps


# --------------------------------------------------------------------------
# Variational bound and training loss.
# --------------------------------------------------------------------------


def vb_terms_bpd(model_output, x_start, x_t, t, tables, *, model_mean_type, model_var_type, clip_denoised):
    """
    One term of the variational bound per sample, in bits per dimension:
    KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the discretised
    decoder NLL -log p(x_0|x_1) at t = 0.

    :return: (terms [N] float32, pred_xstart in x_t's dtype).
    """
    mean, _, log_variance, pred_xstart = p_mean_variance_unfused(
        model_output,
        x_t,
        t,
        tables,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=clip_denoised,
    )
    nd = x_t.dim()
    true_mean = (
        gather(tables, "posterior_mean_coef1", t, nd) * _up(x_start)
        + gather(tables, "posterior_mean_coef2", t, nd) * _up(x_t)
    )
    true_log_var = gather(tables, "posterior_log_variance_clipped", t, nd)
    terms = vb_terms_from_distribution(x_start, t, true_mean, true_log_var, mean, log_variance)
    return terms, pred_xstart.to(x_t.dtype)


def vb_terms_from_distribution(x_start, t, true_mean, true_log_variance, mean, log_variance):
    """
    The bound terms of :func:`vb_terms_bpd` given the posterior q(x_{t-1}|x_t,x_0)
    and the model's Gaussian p(x_{t-1}|x_t), each as (mean, log-variance):
    [N] tensor in bits/dim (KL for t > 0, decoder NLL at t = 0).
    """
    kl = mean_flat(normal_kl(_up(true_mean), _up(true_log_variance), _up(mean), _up(log_variance))) / _LN2
    decoder_nll = discretized_gaussian_nll_bpd(x_start, mean, 0.5 * _up(log_variance))
    return torch.where(t == 0, decoder_nll, kl)


def training_loss(
    model_output, x_start, noise, t, tables, *, model_mean_type, model_var_type, loss_type, num_timesteps
):
    """
    Per-sample training losses of improved-diffusion's ``training_losses``.

    x_t is recomputed from (x_start, noise, t) with :func:`q_sample`, so the
    caller passes what the model saw without storing x_t.

    - "kl" / "rescaled_kl": loss = vb (times T when rescaled), gradients flow
      through the whole output.
    - "mse" / "rescaled_mse": mse = mean((target - mean_part)^2) with the
      target chosen by the mean type; with a learned variance also
      vb = the bound term computed from the *detached* mean half (it trains
      only the variance), scaled by T/1000 for "rescaled_mse"; loss = mse + vb.

    :param model_output: [N x C' x ...] raw model output (C' = 2C when learned).
    :return: (loss, mse, vb), three [N] float32 tensors; a term the loss type
             does not define (mse for KL losses, vb for fixed variances) is 0.
    """
    x_t = q_sample(x_start, t, noise, tables)
    zeros = torch.zeros(x_start.shape[0], device=x_start.device, dtype=torch.float32)
    if loss_type in ("kl", "rescaled_kl"):
        vb, _ = vb_terms_bpd(
            model_output,
            x_start,
            x_t,
            t,
            tables,
            model_mean_type=model_mean_type,
            model_var_type=model_var_type,
            clip_denoised=False,
        )
        loss = vb * num_timesteps if loss_type == "rescaled_kl" else vb
        return loss, zeros, vb
    if loss_type not in ("mse", "rescaled_mse"):
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    mean_part, var_values = split_model_output(model_output, x_t, model_var_type)
    if var_values is not None:
        frozen = torch.cat([mean_part.detach(), var_values], dim=1)
        vb, _ = vb_terms_bpd(
            frozen,
            x_start,
            x_t,
            t,
            tables,
            model_mean_type=model_mean_type,
            model_var_type=model_var_type,
            clip_denoised=False,
        )
        if loss_type == "rescaled_mse":
            # Keeps the bound term on the scale of the original 1000-step runs.
            vb = vb * (num_timesteps / 1000.0)
    else:
        vb = zeros
    if model_mean_type == "previous_x":
        nd = x_t.dim()
        target = (
            gather(tables, "posterior_mean_coef1", t, nd) * _up(x_start)
            + gather(tables, "posterior_mean_coef2", t, nd) * _up(x_t)
        )
    elif model_mean_type == "start_x":
        target = _up(x_start)
    elif model_mean_type == "epsilon":
        target = _up(noise)
    else:
        raise ValueError(f"unknown model_mean_type {model_mean_type!r}; expected one of {MEAN_TYPES}")
    mse = mean_flat((target - _up(mean_part)) ** 2)
    loss = mse + vb if var_values is not None else mse
    return loss, mse, vb


def prior_bpd(x_start, tables):
    """
    KL(q(x_T | x_0) || N(0, I)) per sample in bits per dimension ([N] float32).
    """
    n = x_start.shape[0]
    t = torch.full((n,), tables.shape[1] - 1, device=x_start.device, dtype=torch.long)
    nd = x_start.dim()
    mean = gather(tables, "sqrt_alphas_cumprod", t, nd) * _up(x_start)
    log_var = gather(tables, "log_one_minus_alphas_cumprod", t, nd)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / _LN2


# --------------------------------------------------------------------------
# UNet normalisation + activation.
# --------------------------------------------------------------------------


def group_norm(x, weight, bias, num_groups, eps=1e-5):
    """
    GroupNorm(x) with float32 statistics (float64 for float64 x), as the
    original's GroupNorm32 computes it (the attention blocks' norm).

    :param x: [N x C x ...], C divisible by num_groups.
    :param weight, bias: [C] affine parameters, or None.
    :return: x's shape and dtype.
    """
    return _group_norm_up(x, weight, bias, num_groups, eps).to(x.dtype)


def _group_norm_up(x, weight, bias, num_groups, eps):
    """F.group_norm in the math dtype (float32, or float64 for float64 x),
    the affine parameters cast to it (float32 parameters with float64 x)."""
    xu = _up(x)
    weight = None if weight is None else weight.to(xu.dtype)
    bias = None if bias is None else bias.to(xu.dtype)
    return F.group_norm(xu, num_groups, weight, bias, eps)


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5):
    """
    SiLU(GroupNorm(x)) with float32 statistics (float64 for float64 x), as
    the original's GroupNorm32 followed by x * sigmoid(x).

    :param x: [N x C x ...], C divisible by num_groups.
    :param weight, bias: [C] affine parameters.
    :return: x's shape and dtype.
    """
    h = _group_norm_up(x, weight, bias, num_groups, eps).to(x.dtype)
    return h * torch.sigmoid(h)


def group_norm_scale_shift_silu(x, weight, bias, scale, shift, num_groups, eps=1e-5):
    """
    SiLU(GroupNorm(x) * (1 + scale) + shift), the ResBlock's out_layers with
    use_scale_shift_norm.

    :param scale, shift: [N x C] per-sample, per-channel modulation.
    :return: x's shape and dtype.
    """
    extra = [1] * (x.dim() - 2)
    h = _group_norm_up(x, weight, bias, num_groups, eps).to(x.dtype)
    h = h * (1 + scale.to(x.dtype).view(*scale.shape, *extra)) + shift.to(x.dtype).view(*shift.shape, *extra)
    return h * torch.sigmoid(h)


# --------------------------------------------------------------------------
# Convolution bias (and the ResBlock's residual add).
# --------------------------------------------------------------------------


def bias_add(x, bias, residual=None):
    """
    ``residual + (x + bias)``: a convolution's bias added to its output x the
    way PyTorch adds it after a cuDNN convolution (bias cast to x's dtype, as
    autocast casts it, the sum rounded to x's dtype), then the residual
    added (rounded again). With x = conv(h) without its bias, this is
    ``skip + conv(h)`` (ResBlock) or plain ``conv(h)``.

    :param x: [N x C x ...] float tensor (contiguous or channels-last).
    :param bias: [C] float tensor.
    :param residual: x's shape and dtype, or None.
    :return: x's shape and dtype.
    """
    y = x + bias.to(x.dtype).reshape((1, -1) + (1,) * (x.dim() - 2))
    return y if residual is None else residual + y


# --------------------------------------------------------------------------
# Dropout (ResBlock out_layers).
# --------------------------------------------------------------------------


def dropout(x, p, training=True):
    """
    Dropout exactly as the original's ``nn.Dropout`` runs it, i.e.
    ``F.dropout``. On a CPU tensor with 0 < p < 1 that is
    ``noise = empty_like(x).bernoulli_(1 - p); noise.div_(1 - p); x * noise``:
    one Bernoulli draw per element from the default CPU generator, in x's
    memory order, each taking two 32-bit words of its Mersenne Twister. The
    fused CPU op reproduces these draws bit for bit (and leaves the generator
    where this leaves it).

    :param x: any shape; float32, float64, float16 or bfloat16.
    :param p: probability of zeroing an element.
    :return: x's shape, dtype and layout.
    """
    return F.dropout(x, p, training)
