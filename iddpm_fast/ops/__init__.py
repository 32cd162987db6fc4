"""
The op seam: one function per fusable op.

Every call site in the library goes through these functions. Each checks its
inputs (shapes, dtypes, devices; never values, so no device sync), then runs
the implementation chosen by :mod:`iddpm_fast.ops._backend` for the input's
device: a Triton kernel, the C++ extension, or the pure-PyTorch twin in
:mod:`iddpm_fast.reference`, which has the same signature and is the spec.

Select with ``IDDPM_FAST_BACKEND=auto|triton|cpp|reference`` or
``with iddpm_fast.ops.use_backend("reference"): ...``.
"""

import os

import torch
import torch.nn.functional as F

from .. import reference as ref
from . import _checks
from ._backend import (
    BACKENDS,
    BackendUnavailableError,
    _compiling,
    declare,
    declared_ops,
    register,
    registered_kinds,
    requested_backend,
    resolve,
    resolve_name,
    use_backend,
)

_DIFFUSION_KINDS = ("triton", "reference")
_NORM_KINDS = ("cpp", "reference")

_DIFFUSION_OPS = (
    "q_sample",
    "q_posterior_mean_variance",
    "p_mean_variance",
    "p_sample_step",
    "ddim_step",
    "discretized_gaussian_log_likelihood",
    "discretized_gaussian_nll_bpd",
    "vb_terms_bpd",
    "training_loss",
)
_NORM_OPS = ("group_norm", "group_norm_silu", "group_norm_scale_shift_silu")
_MODEL_OPS = _NORM_OPS + ("bias_add", "dropout")

for _name in _DIFFUSION_OPS:
    declare(_name, _DIFFUSION_KINDS)
    register(_name, "reference", getattr(ref, _name))
for _name in _MODEL_OPS:
    declare(_name, _NORM_KINDS)
    register(_name, "reference", getattr(ref, _name))

from . import _triton  # noqa: E402,F401  (registers the Triton kernels; they load on first use)
from . import _cpp  # noqa: E402  (registers the C++ ops; the extension loads on first use)


def _types(model_mean_type=None, model_var_type=None, loss_type=None):
    if model_mean_type is not None:
        _checks.check_choice("model_mean_type", model_mean_type, ref.MEAN_TYPES)
    if model_var_type is not None:
        _checks.check_choice("model_var_type", model_var_type, ref.VAR_TYPES)
    if loss_type is not None:
        _checks.check_choice("loss_type", loss_type, ref.LOSS_TYPES)


def q_sample(x_start, t, noise, tables):
    """x_t ~ q(x_t | x_0); see :func:`iddpm_fast.reference.q_sample`."""
    _checks.check_float("x_start", x_start)
    _checks.check_like("noise", noise, "x_start", x_start)
    _checks.check_t(t, x_start, tables)
    return resolve("q_sample", x_start.device)(x_start, t, noise, tables)


def q_posterior_mean_variance(x_start, x_t, t, tables):
    """q(x_{t-1} | x_t, x_0); see :func:`iddpm_fast.reference.q_posterior_mean_variance`."""
    _checks.check_float("x_t", x_t)
    _checks.check_like("x_start", x_start, "x_t", x_t)
    _checks.check_t(t, x_t, tables)
    return resolve("q_posterior_mean_variance", x_t.device)(x_start, x_t, t, tables)


def p_mean_variance(model_output, x_t, t, tables, *, model_mean_type, model_var_type, clip_denoised):
    """p(x_{t-1} | x_t) from a model output; see :func:`iddpm_fast.reference.p_mean_variance`."""
    _types(model_mean_type, model_var_type)
    _checks.check_float("x_t", x_t)
    _checks.check_model_output(model_output, x_t, model_var_type)
    _checks.check_t(t, x_t, tables)
    return resolve("p_mean_variance", x_t.device)(
        model_output,
        x_t,
        t,
        tables,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=bool(clip_denoised),
    )


def p_sample_step(model_output, x_t, t, noise, tables, *, model_mean_type, model_var_type, clip_denoised):
    """One ancestral step; see :func:`iddpm_fast.reference.p_sample_step`."""
    _types(model_mean_type, model_var_type)
    _checks.check_float("x_t", x_t)
    _checks.check_model_output(model_output, x_t, model_var_type)
    _checks.check_like("noise", noise, "x_t", x_t)
    _checks.check_t(t, x_t, tables)
    return resolve("p_sample_step", x_t.device)(
        model_output,
        x_t,
        t,
        noise,
        tables,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=bool(clip_denoised),
    )


def ddim_step(model_output, x_t, t, noise, tables, *, eta, model_mean_type, model_var_type, clip_denoised):
    """One DDIM step; see :func:`iddpm_fast.reference.ddim_step`."""
    _types(model_mean_type, model_var_type)
    _checks.check_float("x_t", x_t)
    _checks.check_model_output(model_output, x_t, model_var_type)
    _checks.check_like("noise", noise, "x_t", x_t)
    _checks.check_t(t, x_t, tables)
    eta = float(eta)
    if not eta >= 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return resolve("ddim_step", x_t.device)(
        model_output,
        x_t,
        t,
        noise,
        tables,
        eta=eta,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=bool(clip_denoised),
    )


def _check_likelihood_args(x, means, log_scales, min_dim):
    _checks.check_float("x", x, min_dim=min_dim)
    _checks.check_like("means", means, "x", x)
    _checks.check_float("log_scales", log_scales, min_dim=0)
    try:
        ok = log_scales.shape == x.shape or log_scales.expand_as(x) is not None
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"log_scales of shape {tuple(log_scales.shape)} cannot broadcast to x's shape {tuple(x.shape)}")


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Elementwise log p (nats); see :func:`iddpm_fast.reference.discretized_gaussian_log_likelihood`."""
    _check_likelihood_args(x, means, log_scales, min_dim=0)
    return resolve("discretized_gaussian_log_likelihood", x.device)(x, means, log_scales)


def discretized_gaussian_nll_bpd(x, means, log_scales):
    """Per-sample decoder NLL in bits/dim; see :func:`iddpm_fast.reference.discretized_gaussian_nll_bpd`."""
    _check_likelihood_args(x, means, log_scales, min_dim=2)
    return resolve("discretized_gaussian_nll_bpd", x.device)(x, means, log_scales)


def vb_terms_bpd(model_output, x_start, x_t, t, tables, *, model_mean_type, model_var_type, clip_denoised):
    """Per-sample bound terms in bits/dim; see :func:`iddpm_fast.reference.vb_terms_bpd`."""
    _types(model_mean_type, model_var_type)
    _checks.check_float("x_t", x_t)
    _checks.check_like("x_start", x_start, "x_t", x_t)
    _checks.check_model_output(model_output, x_t, model_var_type)
    _checks.check_t(t, x_t, tables)
    return resolve("vb_terms_bpd", x_t.device)(
        model_output,
        x_start,
        x_t,
        t,
        tables,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        clip_denoised=bool(clip_denoised),
    )


def training_loss(
    model_output, x_start, noise, t, tables, *, model_mean_type, model_var_type, loss_type, num_timesteps
):
    """Per-sample (loss, mse, vb); see :func:`iddpm_fast.reference.training_loss`."""
    _types(model_mean_type, model_var_type, loss_type)
    _checks.check_float("x_start", x_start)
    _checks.check_like("noise", noise, "x_start", x_start)
    _checks.check_model_output(model_output, x_start, model_var_type)
    _checks.check_t(t, x_start, tables)
    return resolve("training_loss", x_start.device)(
        model_output,
        x_start,
        noise,
        t,
        tables,
        model_mean_type=model_mean_type,
        model_var_type=model_var_type,
        loss_type=loss_type,
        num_timesteps=int(num_timesteps),
    )


def _check_norm(x, weight, bias, num_groups):
    _checks.check_float("x", x)
    C = x.shape[1]
    if num_groups <= 0 or C % num_groups:
        raise ValueError(f"GroupNorm: {C} channels cannot be split into {num_groups} groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _check_param(f"GroupNorm {name}", p, (C,), x)


def _check_param(name, p, shape, x, shape_text=None):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
    if tuple(p.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_text or shape}, got {tuple(p.shape)}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but x is on {x.device}")


def stored_channels_last(x):
    """True for a 4-D tensor stored channels-last ([N, H, W, C] in memory)
    and not also plain contiguous (for C == 1 or H == W == 1 both hold)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _cuda_wants_stock():
    """
    Whether group_norm_silu on CUDA runs stock F.group_norm + F.silu instead
    of the fused op: only when ``IDDPM_FAST_CUDA_GN=stock`` (an A/B switch,
    used by bench/profile_gpu.py; it also sends the attention blocks' plain
    group_norm to the reference's F.group_norm). ``auto`` (the default) and
    ``fused`` run the fused op, which measured faster than the stock kernels at every UNet
    shape, dtype and layout on an H200 once its kernels were vectorised:
    forward + backward 2.5-4.2x in channels-last and 2.0-3.7x in NCHW (CUDA
    events), a bf16 channels-last training step 10% faster
    (bench/results/h200-20261126-run4-5/README.md). The scale-shift variant
    always runs fused.
    """
    policy = os.environ.get("IDDPM_FAST_CUDA_GN", "auto")
    if policy not in ("auto", "fused", "stock"):
        raise ValueError(f"IDDPM_FAST_CUDA_GN must be auto, fused or stock, got {policy!r}")
    return policy == "stock"


def _stock_group_norm_silu(x, weight, bias, num_groups, eps):
    """The reference's math for float32 x in two stock kernels (F.silu's
    x / (1 + e^-x) may differ from x * sigmoid(x) in the last bit)."""
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def _norm_impl(name, x, stock):
    """The implementation of norm op `name` for x: the resolved one, or
    `stock` where that is the C++ op on CUDA and IDDPM_FAST_CUDA_GN=stock asks
    for the stock kernels instead."""
    fn = resolve(name, x.device)
    if fn is getattr(_cpp, name) and x.device.type == "cuda" and requested_backend() == "auto" and _cuda_wants_stock():
        return stock
    return fn


def group_norm(x, weight, bias, num_groups, eps=1e-5):
    """GroupNorm(x) in float32, x's dtype out; see :func:`iddpm_fast.reference.group_norm`."""
    _check_norm(x, weight, bias, num_groups)
    return _norm_impl("group_norm", x, ref.group_norm)(x, weight, bias, num_groups, eps)


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5):
    """SiLU(GroupNorm(x)); see :func:`iddpm_fast.reference.group_norm_silu`."""
    _check_norm(x, weight, bias, num_groups)
    return _norm_impl("group_norm_silu", x, _stock_group_norm_silu)(x, weight, bias, num_groups, eps)


def group_norm_scale_shift_silu(x, weight, bias, scale, shift, num_groups, eps=1e-5):
    """SiLU(GroupNorm(x) * (1 + scale) + shift); see :func:`iddpm_fast.reference.group_norm_scale_shift_silu`."""
    _check_norm(x, weight, bias, num_groups)
    for name, v in (("scale", scale), ("shift", shift)):
        _check_param(name, v, tuple(x.shape[:2]), x, shape_text=f"[N x C] = {tuple(x.shape[:2])}")
    return resolve("group_norm_scale_shift_silu", x.device)(x, weight, bias, scale, shift, num_groups, eps)


def bias_add(x, bias, residual=None):
    """``residual + (x + bias)`` with x's rounding; see :func:`iddpm_fast.reference.bias_add`."""
    _checks.check_float("x", x, min_dim=2)
    _checks.check_float("bias", bias, min_dim=1)
    if tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"bias must have shape ({x.shape[1]},) (x's channels), got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if residual is not None:
        _checks.check_like("residual", residual, "x", x)
    return resolve("bias_add", x.device)(x, bias, residual)


def fuse_conv_bias(x):
    """
    Whether a convolution of input `x` should leave out its bias and add it
    with :func:`bias_add` (fused with the residual add where one follows).

    ``IDDPM_FAST_CONV_BIAS=auto`` (default): on CUDA while a CUDA graph is
    being captured (``sample(cuda_graphs=True)``). PyTorch adds a cuDNN
    convolution's bias in a separate broadcast kernel, and replayed graphs of
    a bf16 sampling step (32x32 c128, batch 256, H200) took 13.07 ms with the
    fused add against 14.83 ms stock. In eager mode that step is bound by
    launches on the host (21 ms against 12.7 ms of GPU work), and the extra
    Python call per convolution made it slower (42.5 against 35.6 ms in the
    same A/B run), as it did a training step; so eager CUDA keeps the stock
    path. ``fused``: wherever the C++ op is available (A/B runs and tests;
    on CPUs oneDNN adds the bias inside the convolution, so there it only
    costs a pass). ``stock``: never. Never under torch.compile (inductor
    fuses the add itself) nor when the reference backend is asked for.
    """
    policy = os.environ.get("IDDPM_FAST_CONV_BIAS", "auto")
    if policy not in ("auto", "fused", "stock"):
        raise ValueError(f"IDDPM_FAST_CONV_BIAS must be auto, fused or stock, got {policy!r}")
    if policy == "stock":
        return False
    if policy == "auto" and not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return False
    if requested_backend() == "reference" or _compiling():
        return False
    return _cpp.available(x.device) is None


def dropout(x, p, training=True):
    """Dropout with F.dropout's random draws; see :func:`iddpm_fast.reference.dropout`."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x  # F.dropout returns its input here too, and draws nothing
    _checks.check_float("x", x, min_dim=0)
    return resolve("dropout", x.device)(x, p, training)


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "declared_ops",
    "register",
    "registered_kinds",
    "requested_backend",
    "resolve_name",
    "use_backend",
    *_DIFFUSION_OPS,
    *_MODEL_OPS,
    "fuse_conv_bias",
]
