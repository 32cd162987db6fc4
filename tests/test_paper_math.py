"""
The paper's formulas, checked independently of the implementation (float64
numpy / closed forms), against the diffusion attributes and reference ops.
"""

import math

import numpy as np
import pytest
import torch

from iddpm_fast import gaussian_diffusion as gd
from iddpm_fast import reference as ref
from iddpm_fast.losses import discretized_gaussian_log_likelihood, normal_kl


def _diffusion(schedule="cosine", T=1000, var=gd.ModelVarType.LEARNED_RANGE, mean=gd.ModelMeanType.EPSILON,
               loss=gd.LossType.RESCALED_MSE):
    return gd.GaussianDiffusion(betas=gd.get_named_beta_schedule(schedule, T), model_mean_type=mean,
                                model_var_type=var, loss_type=loss)


@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_cosine_alpha_bar_follows_the_paper(T):
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = gd.get_named_beta_schedule("cosine", T)
    abar = np.cumprod(1 - betas)
    expected = np.array([f((i + 1) / T) / f(0) for i in range(T)])
    clipped = betas >= 0.999
    # Only the clipped final step(s) deviate from alpha_bar(t) = f(t)/f(0).
    np.testing.assert_allclose(abar[~clipped], expected[~clipped], rtol=1e-9)
    assert betas.max() <= 0.999 and clipped[-1], "the last cosine beta is clipped at 0.999"
    assert clipped.sum() <= 2


@pytest.mark.parametrize("T", [1000, 4000])
def test_linear_schedule_scales_with_T(T):
    betas = gd.get_named_beta_schedule("linear", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    np.testing.assert_allclose([betas[0], betas[-1]], [1e-4 * 1000 / T, 0.02 * 1000 / T], rtol=1e-12)
    np.testing.assert_allclose(np.diff(betas), np.diff(betas)[0], rtol=1e-6)


def test_betas_for_alpha_bar_clips_at_max_beta():
    betas = gd.betas_for_alpha_bar(10, lambda u: 1 - u, max_beta=0.5)
    assert betas.max() == 0.5
    np.testing.assert_allclose(betas[0], 1 - 0.9 / 1.0)


def test_unknown_schedule_is_rejected():
    with pytest.raises(NotImplementedError, match="unknown beta schedule"):
        gd.get_named_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="needs more than 20 steps"):
        gd.get_named_beta_schedule("linear", 20)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(schedule):
    d = _diffusion(schedule, T=100)
    b, abar = d.betas, np.cumprod(1 - d.betas)
    abar_prev = np.append(1.0, abar[:-1])
    # q(x_{t-1}|x_t,x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1})
    with np.errstate(divide="ignore", invalid="ignore"):  # t = 0 has abar_prev = 1
        precision = (1 - b) / b + 1 / (1 - abar_prev)
        var = 1 / precision
        coef1 = var * np.sqrt(abar_prev) / (1 - abar_prev)
    np.testing.assert_allclose(d.posterior_variance[1:], var[1:], rtol=1e-9)
    np.testing.assert_allclose(d.posterior_mean_coef2, var * np.sqrt(1 - b) / b, rtol=1e-9)
    np.testing.assert_allclose(d.posterior_mean_coef1[1:], coef1[1:], rtol=1e-9)
    assert d.posterior_variance[0] == 0
    np.testing.assert_allclose(d.posterior_log_variance_clipped[0], np.log(d.posterior_variance[1]))
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]))
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
        assert getattr(d, name).dtype == np.float64


def test_tables_are_float32_copies_of_the_float64_arrays():
    d = _diffusion(T=200)
    tables = d.tables("cpu")
    assert tables.dtype == torch.float32 and tables.shape == (len(ref.TABLE_ROWS), 200)
    assert d.tables("cpu") is tables, "tables are built once per device"
    np.testing.assert_array_equal(tables[ref.ROW["sqrt_alphas_cumprod"]].numpy(), d.sqrt_alphas_cumprod.astype(np.float32))
    np.testing.assert_array_equal(tables[ref.ROW["log_betas"]].numpy(), np.log(d.betas).astype(np.float32))


@pytest.mark.parametrize("t_val", [0, 1, 500, 999])  # edge timesteps 0 and T-1
def test_learned_range_endpoints_are_the_fixed_variances(t_val):
    d = _diffusion(T=1000)
    tables = d.tables("cpu")
    t = torch.full((2,), t_val)
    x_t = torch.randn(2, 3, 4, 4)
    for v, fixed in ((-1.0, gd.ModelVarType.FIXED_SMALL), (1.0, None)):
        out = torch.cat([torch.randn(2, 3, 4, 4), torch.full((2, 3, 4, 4), v)], 1)
        _, _, log_var, _ = ref.p_mean_variance(out, x_t, t, tables, model_mean_type="epsilon",
                                               model_var_type="learned_range", clip_denoised=False)
        if fixed is not None:
            want = d.posterior_log_variance_clipped[t_val]
        else:
            want = np.log(d.betas[t_val])
            if t_val > 0:  # FIXED_LARGE is log beta_t except at t = 0
                want_large = np.log(np.append(d.posterior_variance[1], d.betas[1:]))[t_val]
                np.testing.assert_allclose(want, want_large)
        np.testing.assert_allclose(log_var.numpy(), want, rtol=1e-6)


def test_normal_kl_is_nonnegative_and_zero_for_equal_gaussians():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    l1, l2 = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert (normal_kl(m1, l1, m2, l2) >= -1e-6).all()
    assert normal_kl(m1, l1, m1, l1).abs().max() < 1e-6
    # closed form for a scalar case: KL(N(1, 1) || N(0, e^2)) = 0.5(-1 + 2 - 0 + e^-2 + e^-2)
    np.testing.assert_allclose(normal_kl(torch.tensor(1.0), 0.0, 0.0, 2.0).item(),
                               0.5 * (-1 + 2 + 2 * math.exp(-2)), rtol=1e-6)


def test_normal_kl_needs_a_tensor():
    with pytest.raises(ValueError, match="at least one Tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -2.0), (0.3, -4.0), (-0.95, -1.0), (0.999, -6.0)])
def test_discretized_likelihood_sums_to_one_over_256_bins(mean, log_scale):
    x = torch.arange(256, dtype=torch.float64).float() / 127.5 - 1  # every 8-bit level
    means = torch.full_like(x, mean)
    log_scales = torch.full_like(x, log_scale)
    p = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales).double().exp()
    assert abs(p.sum().item() - 1.0) < 1e-3


def test_discretized_likelihood_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        discretized_gaussian_log_likelihood(torch.zeros(2, 3), means=torch.zeros(2, 4), log_scales=torch.zeros(2, 3))


def test_q_sample_is_the_closed_form():
    d = _diffusion("linear", T=1000, var=gd.ModelVarType.FIXED_LARGE)
    x0, noise = torch.randn(4, 3, 5, 7), torch.randn(4, 3, 5, 7)
    t = torch.tensor([0, 1, 500, 999])
    abar = np.cumprod(1 - d.betas)[t.numpy()].reshape(-1, 1, 1, 1)
    want = np.sqrt(abar) * x0.double().numpy() + np.sqrt(1 - abar) * noise.double().numpy()
    np.testing.assert_allclose(d.q_sample(x0, t, noise=noise).numpy(), want, rtol=1e-5, atol=1e-6)


def test_eps_and_xstart_predictions_invert_each_other():
    d = _diffusion(T=100)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 50, 99])
    x_t = d.q_sample(x0, t, noise=noise)
    torch.testing.assert_close(d._predict_xstart_from_eps(x_t, t, noise), x0, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(d._predict_eps_from_xstart(x_t, t, x0), noise, rtol=1e-3, atol=2e-3)


def test_prior_bpd_matches_closed_form():
    d = _diffusion("linear", T=1000, var=gd.ModelVarType.FIXED_LARGE)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    abar = np.cumprod(1 - d.betas)[-1]
    m, v = math.sqrt(abar) * x0.double().numpy(), 1 - abar
    kl = 0.5 * (-1 - math.log(v) + v + m**2)
    np.testing.assert_allclose(d._prior_bpd(x0).numpy(), kl.reshape(2, -1).mean(1) / math.log(2), rtol=1e-4)
