"""
Likelihood helpers with improved-diffusion's public names and signatures.

The math is defined once, in :mod:`iddpm_fast.reference`; the discretised
likelihood goes through the op seam so a fused kernel serves it when one is
selected.
"""

from . import ops
from .reference import approx_standard_normal_cdf, normal_kl

__all__ = ["normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood"]


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """
    Log-likelihood of a Gaussian discretised onto the 256 levels of 8-bit data.

    :param x: the [N x C x ...] targets, uint8 values rescaled to [-1, 1].
    :param means: the Gaussian means, x's shape.
    :param log_scales: the log standard deviations, x's shape (or broadcastable).
    :return: a tensor like x of log-probabilities in nats.
    """
    return ops.discretized_gaussian_log_likelihood(x, means, log_scales)
