"""Helpers shared by the kernel launchers (no kernels here)."""

import math

from iddpm_fast.reference import ROW

from . import interpreting

LN2 = math.log(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # the constant of the original's tanh CDF approximation

MEAN_CODES = {"previous_x": 0, "start_x": 1, "epsilon": 2}
VAR_CODES = {"learned": 0, "fixed_small": 1, "fixed_large": 2, "learned_range": 3}

# Table rows (constexpr arguments R_*) of the coefficients that _tl's
# model_distribution and bound_term read: the sampling, bound and loss kernels.
MODEL_ROWS = dict(
    R_C1=ROW["posterior_mean_coef1"], R_C2=ROW["posterior_mean_coef2"],
    R_PLV=ROW["posterior_log_variance_clipped"], R_SRA=ROW["sqrt_recip_alphas_cumprod"],
    R_SRM1=ROW["sqrt_recipm1_alphas_cumprod"], R_LOGB=ROW["log_betas"],
    R_FLLV=ROW["fixed_large_log_variance"], R_RC1=ROW["recip_posterior_mean_coef1"],
    R_C2C1=ROW["posterior_mean_coef2_over_coef1"],
)


def cdiv(a, b):
    """ceil(a / b) for ints. Launchers call this, not triton.cdiv: in recent
    Triton that is a ConstexprFunction whose call costs microseconds of host
    time (its arguments are unwrapped as constexprs), paid at every launch."""
    return -(-int(a) // int(b))


def next_power_of_2(n):
    """The smallest power of two >= n (1 for n <= 1); plain int math, see cdiv."""
    return 1 << max(int(n) - 1, 0).bit_length()


# Elements per program at most: larger under the interpreter, which is slow
# per program. Decided once, when the kernel modules are imported, as Triton
# itself decides at @triton.jit whether kernels are interpreted.
_BLOCK_CAP = 4096 if interpreting() else 1024


def block_size(n):
    """Elements per program: a power of two covering n, capped at _BLOCK_CAP."""
    return max(16, min(_BLOCK_CAP, next_power_of_2(max(int(n), 1))))


def check_contiguous_like(*tensors):
    """Contiguous copies where needed (kernels index flat [B, D] buffers); shapes must match."""
    shape = tensors[0].shape
    for x in tensors[1:]:
        if x.shape != shape:
            raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(shape)}")
    return tuple(x.contiguous() for x in tensors)


def check_device(*tensors):
    device = tensors[0].device
    for x in tensors[1:]:
        if x.device != device:
            raise ValueError(f"all inputs must be on {device}, got one on {x.device}")
    return device
