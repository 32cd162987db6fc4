"""Behaviour of GaussianDiffusion / SpacedDiffusion beyond the golden numbers."""

import numpy as np
import pytest
import torch

from iddpm_fast import gaussian_diffusion as gd
from iddpm_fast.respace import SpacedDiffusion, space_timesteps
from iddpm_fast.script_util import create_gaussian_diffusion


class TinyNet(torch.nn.Module):
    """A 1-conv 'model' whose output depends on x and t; out_ch = C or 2C."""

    def __init__(self, channels=3, learned=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels * (2 if learned else 1), 3, padding=1)
        self.seen_t = []

    def forward(self, x, t):
        self.seen_t.append(t.detach().clone())
        return torch.tanh(self.conv(x) + 0.001 * t.float().view(-1, 1, 1, 1))


def _diffusion(learn_sigma=True, steps=50, **kw):
    return create_gaussian_diffusion(steps=steps, learn_sigma=learn_sigma, noise_schedule="cosine",
                                     rescale_learned_sigmas=True, **kw)


def test_same_seed_same_samples_and_nll():
    d, net = _diffusion(timestep_respacing="10"), TinyNet()
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append((d.p_sample_loop(net, (2, 3, 8, 8)), d.calc_bpd_loop(net, x0)["total_bpd"]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    torch.manual_seed(124)
    assert not torch.equal(d.p_sample_loop(net, (2, 3, 8, 8)), runs[0][0])


def test_training_losses_keys_follow_the_loss_type():
    x0, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([0, 49])
    assert set(_diffusion().training_losses(TinyNet(), x0, t)) == {"loss", "mse", "vb"}
    assert set(_diffusion(learn_sigma=False).training_losses(TinyNet(learned=False), x0, t)) == {"loss", "mse"}
    assert set(_diffusion(use_kl=True).training_losses(TinyNet(), x0, t)) == {"loss"}


def test_hybrid_loss_stops_the_mean_gradient_in_the_vb_term():
    d = _diffusion(steps=50)
    x0, t = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 25, 49])
    out = torch.randn(4, 6, 8, 8, requires_grad=True)
    terms = d.training_losses(lambda x, ts: out, x0, t)
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert g_vb[:, :3].abs().max() == 0, "vb must not train the mean"
    assert g_vb[:, 3:].abs().max() > 0, "vb trains the variance"
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert g_mse[:, 3:].abs().max() == 0 and g_mse[:, :3].abs().max() > 0
    # With L_vlb alone, the bound trains the mean as well.
    d_kl = _diffusion(steps=50, use_kl=True)
    loss = d_kl.training_losses(lambda x, ts: out, x0, t)["loss"]
    (g,) = torch.autograd.grad(loss.sum(), out)
    assert g[:, :3].abs().max() > 0


def test_rescaled_losses_scale_as_documented():
    x0, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([3, 30])
    out = torch.randn(2, 6, 8, 8)
    model = lambda x, ts: out  # noqa: E731
    d_mse = create_gaussian_diffusion(steps=400, learn_sigma=True, rescale_learned_sigmas=False)
    d_rmse = create_gaussian_diffusion(steps=400, learn_sigma=True, rescale_learned_sigmas=True)
    torch.testing.assert_close(d_rmse.training_losses(model, x0, t, noise=torch.zeros_like(x0))["vb"],
                               d_mse.training_losses(model, x0, t, noise=torch.zeros_like(x0))["vb"] * 0.4)
    d_kl = create_gaussian_diffusion(steps=400, learn_sigma=True, use_kl=True)
    noise = torch.randn_like(x0)
    vb = d_mse.training_losses(model, x0, t, noise=noise)["vb"]
    torch.testing.assert_close(d_kl.training_losses(model, x0, t, noise=noise)["loss"], vb * 400)


def test_p_sample_adds_no_noise_at_t0():
    d, net = _diffusion(), TinyNet()
    x = torch.randn(2, 3, 8, 8)
    t = torch.zeros(2, dtype=torch.long)
    a = d.p_sample(net, x, t)["sample"]
    b = d.p_sample(net, x, t)["sample"]  # fresh noise, same result
    assert torch.equal(a, b)
    mean = d.p_mean_variance(net, x, t)["mean"]
    torch.testing.assert_close(a, mean)


def test_spaced_diffusion_keeps_alpha_bar_and_maps_timesteps():
    base = _diffusion(steps=100)
    spaced = _diffusion(steps=100, timestep_respacing="10")
    assert spaced.num_timesteps == 10 and len(spaced.timestep_map) == 10
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-10)
    net = TinyNet()
    spaced.p_sample_loop(net, (1, 3, 8, 8))
    seen = [int(t[0]) for t in net.seen_t]
    # rescale_timesteps=False: the model sees original indices, from the last down to 0
    assert seen == sorted(spaced.timestep_map, reverse=True)
    rescaled = create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="10", rescale_timesteps=True)
    net.seen_t.clear()
    rescaled.p_sample(net, torch.randn(1, 3, 8, 8), torch.tensor([9]))
    assert net.seen_t[0].dtype == torch.float32
    np.testing.assert_allclose(net.seen_t[0].item(), rescaled.timestep_map[9] * 1000.0 / 100)


def test_ddim_with_eta0_is_deterministic_and_reverse_inverts_it():
    d = _diffusion(steps=1000, timestep_respacing="ddim50")
    net = TinyNet()
    noise = torch.randn(1, 3, 8, 8)
    a = d.ddim_sample_loop(net, (1, 3, 8, 8), noise=noise)
    b = d.ddim_sample_loop(net, (1, 3, 8, 8), noise=noise)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="eta must be 0"):
        d.ddim_reverse_sample(net, noise, torch.tensor([3]), eta=0.5)


def test_denoised_fn_is_applied():
    d, net = _diffusion(timestep_respacing="5"), TinyNet()
    calls = []

    def denoise(x):
        calls.append(1)
        return torch.zeros_like(x)

    out = d.p_sample(net, torch.randn(2, 3, 8, 8), torch.tensor([2, 2]), denoised_fn=denoise)
    assert calls and torch.equal(out["pred_xstart"], torch.zeros(2, 3, 8, 8))
    out = d.ddim_sample(net, torch.randn(2, 3, 8, 8), torch.tensor([2, 2]), denoised_fn=denoise)
    assert len(calls) == 2 and torch.equal(out["pred_xstart"], torch.zeros(2, 3, 8, 8))


def _guidance(seen, scale=0.3):
    """A guided-diffusion-style cond_fn: the gradient of a log-probability
    (here -scale/2 |x - 0.5|^2, so -scale (x - 0.5)), recording its timesteps."""

    def cond_fn(x, t, y=None):
        seen.append((t.detach().clone(), y))
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logp = -0.5 * scale * ((x_in - 0.5) ** 2).sum()
            return torch.autograd.grad(logp, x_in)[0]

    return cond_fn


@pytest.mark.parametrize("respacing", ["", "5"])
def test_cond_fn_guides_ancestral_and_ddim_steps_as_guided_diffusion(respacing):
    # guided-diffusion's formulas, written out here: ancestral steps move the
    # mean by variance * gradient (noise drawn before cond_fn runs); DDIM
    # steps shift eps by -sqrt(1 - alphabar) * gradient and take x_0 and the
    # step from that eps (noise drawn after).
    d, net = _diffusion(timestep_respacing=respacing), TinyNet()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 0])
    kwargs = {"y": torch.tensor([1, 2])}
    model = lambda x, ts, y=None: net(x, ts)  # noqa: E731
    seen = []
    torch.manual_seed(5)
    got = d.p_sample(model, x, t, model_kwargs=kwargs, cond_fn=_guidance(seen))
    torch.manual_seed(5)
    out = d.p_mean_variance(model, x, t, model_kwargs=kwargs)
    noise = torch.randn_like(x)
    grad = -0.3 * (x - 0.5)
    mean = out["mean"] + out["variance"] * grad
    want = mean + (t != 0).float().view(-1, 1, 1, 1) * torch.exp(0.5 * out["log_variance"]) * noise
    torch.testing.assert_close(got["sample"], want, rtol=1e-6, atol=1e-6)
    # The guidance sees the original process's timesteps, as the model does, and model_kwargs.
    want_t = torch.tensor([d.timestep_map[3], d.timestep_map[0]]) if respacing else t
    assert torch.equal(seen[0][0], want_t) and torch.equal(seen[0][1], kwargs["y"])

    torch.manual_seed(6)
    got = d.ddim_sample(model, x, t, model_kwargs=kwargs, cond_fn=_guidance(seen), eta=0.5)
    torch.manual_seed(6)
    out = d.p_mean_variance(model, x, t, model_kwargs=kwargs)
    ac = torch.tensor(d.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    ac_prev = torch.tensor(d.alphas_cumprod_prev, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    eps = (torch.sqrt(1 / ac) * x - out["pred_xstart"]) / torch.sqrt(1 / ac - 1)
    eps = eps - (1 - ac).sqrt() * grad
    x0 = torch.sqrt(1 / ac) * x - torch.sqrt(1 / ac - 1) * eps
    sigma = 0.5 * torch.sqrt((1 - ac_prev) / (1 - ac)) * torch.sqrt(1 - ac / ac_prev)
    noise = torch.randn_like(x)
    mean_pred = x0 * torch.sqrt(ac_prev) + torch.sqrt(1 - ac_prev - sigma**2) * eps
    want = mean_pred + (t != 0).float().view(-1, 1, 1, 1) * sigma * noise
    torch.testing.assert_close(got["sample"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["pred_xstart"], x0, rtol=1e-5, atol=1e-5)


def test_cond_fn_reaches_every_step_of_the_loops():
    d, net = _diffusion(timestep_respacing="4"), TinyNet()
    for loop in (d.p_sample_loop, d.ddim_sample_loop):
        seen = []
        torch.manual_seed(0)
        guided = loop(net, (1, 3, 8, 8), cond_fn=_guidance(seen, scale=5.0))
        torch.manual_seed(0)
        plain = loop(net, (1, 3, 8, 8))
        assert len(seen) == 4
        assert sorted(int(s[0]) for s, _ in seen) == sorted(d.timestep_map)
        assert not torch.allclose(guided, plain)
    # Without cond_fn nothing changes (the fused path where one runs).
    torch.manual_seed(0)
    again = d.ddim_sample_loop(net, (1, 3, 8, 8))
    assert torch.equal(again, plain)


def test_overrides_with_the_originals_signatures_still_work_without_cond_fn():
    # cond_fn is passed on only when given: a subclass written against
    # improved-diffusion (no cond_fn parameter) keeps working.
    calls = []

    class Old(SpacedDiffusion):
        def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                      model_kwargs=None, device=None, progress=False):
            calls.append("p_loop")
            yield from super().p_sample_loop_progressive(model, shape, noise=noise, device=device)

        def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                         model_kwargs=None, device=None, progress=False, eta=0.0):
            calls.append("ddim_loop")
            yield from super().ddim_sample_loop_progressive(model, shape, noise=noise, device=device, eta=eta)

        def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
            calls.append("p_sample")
            return super().p_sample(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)

        def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
            calls.append("ddim_sample")
            return super().ddim_sample(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs, eta=eta)

    d = Old(space_timesteps(50, "3"), betas=gd.get_named_beta_schedule("cosine", 50),
            model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
            loss_type=gd.LossType.MSE)
    net = TinyNet()
    d.p_sample_loop(net, (1, 3, 4, 4), device="cpu")
    d.ddim_sample_loop(net, (1, 3, 4, 4), device="cpu")
    assert calls == ["p_loop"] + ["p_sample"] * 3 + ["ddim_loop"] + ["ddim_sample"] * 3


def test_a_subclass_overriding_p_mean_variance_is_honoured():
    class Guided(SpacedDiffusion):
        def p_mean_variance(self, model, x, t, **kw):
            out = super().p_mean_variance(model, x, t, **kw)
            out["mean"] = out["mean"] * 0 + 7.0
            return out

    d = Guided(space_timesteps(100, "20"), betas=gd.get_named_beta_schedule("linear", 100),
               model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_SMALL,
               loss_type=gd.LossType.MSE)
    out = d.p_sample(TinyNet(learned=False), torch.randn(2, 3, 8, 8), torch.tensor([0, 0]))
    assert torch.equal(out["sample"], torch.full((2, 3, 8, 8), 7.0))
    out = d.ddim_sample(TinyNet(learned=False), torch.randn(2, 3, 8, 8), torch.tensor([5, 5]))
    assert out["sample"].shape == (2, 3, 8, 8)


def test_progress_bar(capsys):
    d = _diffusion(timestep_respacing="4")
    d.p_sample_loop(TinyNet(), (1, 3, 8, 8), progress=True)
    assert "4/4" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input


def test_bad_timesteps_are_rejected_with_a_message():
    d, net, x0 = _diffusion(steps=50), TinyNet(), torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 49\].*\[0, 50\]"):
        d.training_losses(net, x0, torch.tensor([0, 50]))
    with pytest.raises(ValueError, match=r"timesteps must lie"):
        d.q_sample(x0, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="integer tensor"):
        d.training_losses(net, x0, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="one timestep per sample"):
        d.training_losses(net, x0, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="timesteps must lie"):
        d.p_sample(net, x0, torch.tensor([0, 99]))


def test_non_finite_data_is_rejected():
    d, net = _diffusion(), TinyNet()
    x0 = torch.rand(2, 3, 8, 8)
    x0[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        d.training_losses(net, x0, torch.tensor([1, 2]))
    x0[1, 2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        d.calc_bpd_loop(net, x0)


def test_model_output_channel_mismatch_explains_learn_sigma():
    d = _diffusion(learn_sigma=True)
    x0 = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"learned variance .* needs 2\*C = 6 output channels.*learn_sigma=True"):
        d.training_losses(TinyNet(learned=False), x0, torch.tensor([1, 2]))
    d_fixed = _diffusion(learn_sigma=False)
    with pytest.raises(ValueError, match="variance is fixed"):
        d_fixed.p_sample(TinyNet(learned=True), x0, torch.tensor([1, 2]))


def test_wrong_shapes_are_rejected():
    d = _diffusion()
    with pytest.raises(ValueError, match="noise has shape"):
        d.p_sample_loop(TinyNet(), (2, 3, 8, 8), noise=torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="noise has shape .* but x_start"):
        d.q_sample(torch.rand(2, 3, 8, 8), torch.tensor([1, 2]), noise=torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[N x C x \.\.\.\]"):
        d.training_losses(TinyNet(), torch.rand(8), torch.tensor([1]))
    with pytest.raises(TypeError, match="shape must be a tuple"):
        d.p_sample_loop(TinyNet(), 4)


def test_bad_construction_is_rejected():
    kw = dict(model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_SMALL,
              loss_type=gd.LossType.MSE)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        gd.GaussianDiffusion(betas=np.array([0.1, 1.5]), **kw)
    with pytest.raises(ValueError, match="at least 2"):
        gd.GaussianDiffusion(betas=np.array([0.1]), **kw)
    with pytest.raises(ValueError, match="ModelVarType"):
        gd.GaussianDiffusion(betas=np.array([0.1, 0.2]), model_mean_type=gd.ModelMeanType.EPSILON,
                             model_var_type="learned", loss_type=gd.LossType.MSE)


def test_is_vb():
    assert gd.LossType.KL.is_vb() and gd.LossType.RESCALED_KL.is_vb()
    assert not gd.LossType.MSE.is_vb() and not gd.LossType.RESCALED_MSE.is_vb()


def test_extract_into_tensor_compat_helper():
    arr = np.arange(10, dtype=np.float64) / 3
    out = gd._extract_into_tensor(arr, torch.tensor([1, 9]), (2, 3, 4))
    assert out.shape == (2, 3, 4) and out.dtype == torch.float32
    np.testing.assert_allclose(out[:, 0, 0].numpy(), [1 / 3, 3.0], rtol=1e-6)


def test_overridden_helpers_are_called_where_the_original_calls_them():
    calls = {}

    class Custom(SpacedDiffusion):
        def q_posterior_mean_variance(self, x_start, x_t, t):
            calls["qpost"] = calls.get("qpost", 0) + 1
            return super().q_posterior_mean_variance(x_start, x_t, t)

        def _predict_xstart_from_eps(self, x_t, t, eps):
            calls["eps"] = calls.get("eps", 0) + 1
            return super()._predict_xstart_from_eps(x_t, t, eps)

    kw = dict(betas=gd.get_named_beta_schedule("cosine", 50), model_mean_type=gd.ModelMeanType.EPSILON,
              model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.RESCALED_MSE)
    custom, plain = Custom(range(50), **kw), SpacedDiffusion(range(50), **kw)
    net = TinyNet()
    x0, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([0, 30])
    noise = torch.randn_like(x0)
    got = custom.training_losses(net, x0, t, noise=noise)
    # improved-diffusion calls them 3 and 1 times here (vb: posterior + model mean; eps -> x0 once)
    assert calls == {"qpost": 3, "eps": 1}
    want = plain.training_losses(net, x0, t, noise=noise)
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    calls.clear()
    custom.p_sample(net, x0, t)
    assert calls == {"qpost": 1, "eps": 1}


def test_methods_replaced_on_an_instance_are_called_where_the_original_calls_them():
    # Monkeypatching one diffusion object (not its class) must work as with a
    # subclass: the fused paths step aside and the replacement is called.
    kw = dict(betas=gd.get_named_beta_schedule("cosine", 50), model_mean_type=gd.ModelMeanType.EPSILON,
              model_var_type=gd.ModelVarType.LEARNED_RANGE, loss_type=gd.LossType.RESCALED_MSE)

    class Shifted(gd.GaussianDiffusion):
        def q_sample(self, x_start, t, noise=None):
            return super().q_sample(x_start, t, noise=noise) * 1.1

    patched, subclassed = gd.GaussianDiffusion(**kw), Shifted(**kw)
    calls = {"q_sample": 0, "p_mean_variance": 0}
    q_sample, p_mean_variance = patched.q_sample, patched.p_mean_variance

    def shifted_q_sample(x_start, t, noise=None):
        calls["q_sample"] += 1
        return q_sample(x_start, t, noise=noise) * 1.1

    def counted_p_mean_variance(*args, **kwargs):
        calls["p_mean_variance"] += 1
        return p_mean_variance(*args, **kwargs)

    patched.q_sample, patched.p_mean_variance = shifted_q_sample, counted_p_mean_variance
    net = TinyNet()
    x0, t = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([0, 30])
    noise = torch.randn_like(x0)
    got = patched.training_losses(net, x0, t, noise=noise)
    want = subclassed.training_losses(net, x0, t, noise=noise)
    assert calls["q_sample"] == 1
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    plain = gd.GaussianDiffusion(**kw).training_losses(net, x0, t, noise=noise)
    assert not torch.allclose(got["mse"], plain["mse"])
    calls["p_mean_variance"] = 0
    torch.manual_seed(1)
    patched.p_sample_loop(net, (2, 3, 8, 8))
    assert calls["p_mean_variance"] == 50


def test_reassigned_coefficient_arrays_are_used_like_the_original():
    # The original reads its numpy arrays at every call; the tables built from
    # them must follow an assignment of a new array.
    d = _diffusion(learn_sigma=False, steps=50, sigma_small=True)
    assert d.model_var_type == gd.ModelVarType.FIXED_SMALL
    x0, t = torch.rand(2, 3, 4, 4) * 2 - 1, torch.tensor([3, 40])
    noise = torch.randn_like(x0)
    d.q_sample(x0, t, noise)  # builds the tables
    d.sqrt_alphas_cumprod = d.sqrt_alphas_cumprod * 1.1
    d.posterior_variance = d.posterior_variance * 2
    d.betas = d.betas * 0.5
    a, s = (torch.tensor(v[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
            for v in (d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod))
    torch.testing.assert_close(d.q_sample(x0, t, noise), a * x0 + s * noise)
    out = d.p_mean_variance(TinyNet(learned=False), x0, t)
    torch.testing.assert_close(out["variance"].flatten(1)[:, 0],
                               torch.tensor(d.posterior_variance[t.numpy()], dtype=torch.float32))
    d.model_var_type = gd.ModelVarType.FIXED_LARGE
    out = d.p_mean_variance(TinyNet(learned=False), x0, t)
    torch.testing.assert_close(out["variance"].flatten(1)[:, 0],
                               torch.tensor(np.append(d.posterior_variance[1], d.betas[1:])[t.numpy()],
                                            dtype=torch.float32))


def test_channels_last_data_draws_the_random_numbers_of_contiguous_data():
    # improved-diffusion draws with randn_like on contiguous tensors. On a
    # channels-last tensor randn_like fills memory order: other numbers, and
    # the generator ends elsewhere. The draws must not depend on the layout.
    d = _diffusion(steps=20)
    net = TinyNet()
    shape = (2, 3, 8, 8)
    x0, t = torch.rand(shape) * 2 - 1, torch.tensor([3, 15])
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        noise = torch.randn(shape).contiguous(memory_format=fmt)
        with torch.no_grad():
            ancestral = d.p_sample_loop(net, shape, noise=noise)
            ddim = d.ddim_sample_loop(net, shape, noise=noise, eta=0.5)
            bpd = d.calc_bpd_loop(net, x0.contiguous(memory_format=fmt))["total_bpd"]
        loss = d.training_losses(net, x0.contiguous(memory_format=fmt), t)["loss"]
        results.append((ancestral, ddim, bpd, loss, torch.rand(4)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(results[0][-1], results[1][-1])  # the generator ends in the same state


def test_half_precision_states_are_promoted_like_the_original():
    d, net = _diffusion(timestep_respacing="5"), TinyNet()
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 3])
    assert d.q_sample(x.half(), t).dtype == torch.float32
    out = d.p_mean_variance(lambda z, ts: net(z.float(), ts), x.bfloat16(), t)
    assert {v.dtype for v in out.values()} == {torch.float32}
    sample = d.p_sample_loop(lambda z, ts: net(z.float(), ts), (2, 3, 8, 8), noise=x.half(), device="cpu")
    assert sample.dtype == torch.float32
    assert d.q_sample(x.double(), t).dtype == torch.float64
