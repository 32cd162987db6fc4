"""Helpers shared by the kernel launchers (no kernels here)."""

import math

import triton

from . import interpreting

LN2 = math.log(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # the constant of the original's tanh CDF approximation

MEAN_CODES = {"previous_x": 0, "start_x": 1, "epsilon": 2}
VAR_CODES = {"learned": 0, "fixed_small": 1, "fixed_large": 2, "learned_range": 3}


def block_size(n):
    """Elements per program: a power of two covering n, capped (larger under the interpreter, which is per-program slow)."""
    cap = 4096 if interpreting() else 1024
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


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
