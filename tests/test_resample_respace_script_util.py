"""Timestep samplers, respacing specs and the script_util factories."""

import argparse
import inspect

import numpy as np
import pytest
import torch

from iddpm_fast import gaussian_diffusion as gd
from iddpm_fast import script_util as su
from iddpm_fast.resample import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)
from iddpm_fast.respace import space_timesteps


def _diffusion(T=20):
    return su.create_gaussian_diffusion(steps=T, noise_schedule="cosine", learn_sigma=True)


# ---------------------------------------------------------------- samplers


def test_uniform_sampler_weights_are_one():
    d = _diffusion()
    ts, w = UniformSampler(d).sample(1000, "cpu")
    assert ts.dtype == torch.long and w.dtype == torch.float32
    assert ts.min() >= 0 and ts.max() < 20 and torch.allclose(w, torch.ones(1000))


def test_second_moment_sampler_after_warm_up():
    d = _diffusion(T=5)
    s = LossSecondMomentResampler(d)
    np.testing.assert_array_equal(s.weights(), np.ones(5))  # uniform until warm
    rng = np.random.default_rng(0)
    history = {t: [] for t in range(5)}
    for _ in range(13):  # more than 10 per term: the oldest drop out
        for t in range(5):
            loss = float(rng.uniform(0.5, 2.0) * (t + 1))
            history[t].append(loss)
            s.update_with_all_losses([t], [loss])
    assert s._warmed_up()
    rms = np.array([np.sqrt(np.mean(np.square(history[t][-10:]))) for t in range(5)])
    expected = rms / rms.sum() * (1 - 0.001) + 0.001 / 5
    np.testing.assert_allclose(s.weights(), expected, rtol=1e-12)
    np.random.seed(0)
    ts, w = s.sample(4000, "cpu")
    p = expected / expected.sum()
    np.testing.assert_allclose(w.numpy(), 1 / (5 * p[ts.numpy()]), rtol=1e-6)
    freq = np.bincount(ts.numpy(), minlength=5) / 4000
    np.testing.assert_allclose(freq, p, atol=0.03)


def test_update_with_local_losses_without_distributed():
    s = LossSecondMomentResampler(_diffusion(T=3), history_per_term=2)
    s.update_with_local_losses(torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0]))
    assert s._warmed_up()
    np.testing.assert_allclose(s.weights()[0] / s.weights()[2], (1 * 0.999 / 6 + 0.001 / 3) / (3 * 0.999 / 6 + 0.001 / 3))
    before = s.weights().copy()
    with pytest.warns(RuntimeWarning, match="ignoring non-finite loss"):
        s.update_with_local_losses(torch.tensor([0]), torch.tensor([float("nan")]))
    np.testing.assert_array_equal(s.weights(), before)
    with pytest.raises(ValueError, match="matching 1-D"):
        s.update_with_local_losses(torch.tensor([0, 1]), torch.tensor([1.0]))


def test_sampler_state_round_trips():
    s = LossSecondMomentResampler(_diffusion(T=3), history_per_term=2)
    s.update_with_all_losses([0, 1, 2, 0, 1, 2, 2], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    t = LossSecondMomentResampler(_diffusion(T=3), history_per_term=2)
    t.load_state_dict(s.state_dict())
    np.testing.assert_array_equal(t.weights(), s.weights())
    with pytest.raises(ValueError, match="expected"):
        LossSecondMomentResampler(_diffusion(T=4)).load_state_dict(s.state_dict())


def test_named_samplers():
    d = _diffusion()
    assert isinstance(create_named_schedule_sampler("uniform", d), UniformSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", d), LossSecondMomentResampler)
    with pytest.raises(NotImplementedError, match="unknown schedule sampler"):
        create_named_schedule_sampler("bogus", d)


# ---------------------------------------------------------------- respacing


@pytest.mark.parametrize(
    "T,spec,count",
    [
        (1000, "250", 250),
        (4000, "250", 250),
        (1000, "ddim50", 50),
        (300, "10,15,20", 45),
        (300, [10, 15, 20], 45),
        (1000, "1000", 1000),
        (10, "1", 1),  # a single step keeps t=0
        (100, "0,10", 10),  # a section counted 0 is skipped, as in the original
    ],
)
def test_space_timesteps_counts(T, spec, count):
    steps = space_timesteps(T, spec)
    first = T // 2 if spec == "0,10" else 0
    assert len(steps) == count
    assert min(steps) == first and max(steps) < T


def test_space_timesteps_sections_and_ddim_stride():
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert sum(s < 100 for s in steps) == 10 and sum(100 <= s < 200 for s in steps) == 15
    assert steps[:2] == [0, 11] and steps[9] == 99 and steps[-1] == 299
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))


@pytest.mark.parametrize("spec,match", [("ddimx", "ddimN"), ("ddim3000", "exactly 3000"), ("abc", "comma-separated"),
                                        ("2000", "cannot divide section of 1000 steps into 2000"),
                                        ("0", "keep at least one step"), ("-1,5", "must be >= 0")])
def test_space_timesteps_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        space_timesteps(1000, spec)


# ---------------------------------------------------------------- script_util


ORIGINAL_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False, class_cond=False,
    diffusion_steps=1000, noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False,
    rescale_timesteps=True, rescale_learned_sigmas=True, use_checkpoint=False, use_scale_shift_norm=True,
)


def test_defaults_and_signatures_match_improved_diffusion():
    assert su.model_and_diffusion_defaults() == ORIGINAL_DEFAULTS
    params = list(inspect.signature(su.create_model_and_diffusion).parameters)
    assert params[: len(ORIGINAL_DEFAULTS)] == [
        "image_size", "class_cond", "learn_sigma", "sigma_small", "num_channels", "num_res_blocks", "num_heads",
        "num_heads_upsample", "attention_resolutions", "dropout", "diffusion_steps", "noise_schedule",
        "timestep_respacing", "use_kl", "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas",
        "use_checkpoint", "use_scale_shift_norm",
    ]
    sr = su.sr_model_and_diffusion_defaults()
    assert sr["large_size"] == 256 and sr["small_size"] == 64 and "sigma_small" not in sr


def test_argparser_round_trip():
    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, su.model_and_diffusion_defaults())
    args = parser.parse_args(["--learn_sigma", "True", "--image_size", "32", "--noise_schedule", "cosine",
                              "--use_kl", "no"])
    cfg = su.args_to_dict(args, su.model_and_diffusion_defaults().keys())
    assert cfg["learn_sigma"] is True and cfg["image_size"] == 32 and cfg["use_kl"] is False
    assert su.str2bool("1") and not su.str2bool("f")
    with pytest.raises(argparse.ArgumentTypeError, match="boolean value expected"):
        su.str2bool("maybe")


def test_create_gaussian_diffusion_picks_types_like_the_original():
    d = su.create_gaussian_diffusion(steps=100, learn_sigma=True, rescale_learned_sigmas=True)
    assert (d.model_var_type, d.loss_type, d.model_mean_type) == (
        gd.ModelVarType.LEARNED_RANGE, gd.LossType.RESCALED_MSE, gd.ModelMeanType.EPSILON)
    d = su.create_gaussian_diffusion(steps=100, sigma_small=True, use_kl=True, predict_xstart=True)
    assert (d.model_var_type, d.loss_type, d.model_mean_type) == (
        gd.ModelVarType.FIXED_SMALL, gd.LossType.RESCALED_KL, gd.ModelMeanType.START_X)
    assert su.create_gaussian_diffusion(steps=100).model_var_type == gd.ModelVarType.FIXED_LARGE
    assert su.create_gaussian_diffusion(steps=100, timestep_respacing="ddim10").num_timesteps == 10


def test_create_model_any_size_and_grayscale():
    m = su.create_model(8, 32, 1, learn_sigma=True, class_cond=False, use_checkpoint=False,
                        attention_resolutions="4", num_heads=1, num_heads_upsample=-1, use_scale_shift_norm=True,
                        dropout=0.0, channel_mult="1,2", in_channels=1)
    out = m(torch.randn(2, 1, 8, 8), torch.tensor([0, 5]))
    assert out.shape == (2, 2, 8, 8)  # grayscale, learned sigma: 2 channels
    with pytest.raises(ValueError, match="pass channel_mult"):
        su.create_model(48, 32, 1, False, False, False, "16", 1, -1, True, 0.0)
    with pytest.raises(ValueError, match="not divisible"):
        su.create_model(12, 32, 1, False, False, False, "3", 1, -1, True, 0.0, channel_mult=(1, 2, 2, 2))
    # The original's default "16,8" at 8x8 attends at 8x8 only, as there.
    m8 = su.create_model(8, 32, 1, False, False, False, "16,8", 1, -1, True, 0.0, channel_mult="1,2")
    assert m8.attention_resolutions == (0, 1)
    with pytest.raises(ValueError, match="comma-separated integers"):
        su.create_model(32, 32, 1, False, False, False, "16x", 1, -1, True, 0.0)


def test_class_conditional_model_uses_1000_classes_by_default():
    m = su.create_model(32, 32, 1, False, True, False, "16", 1, -1, True, 0.0)
    assert m.label_emb.num_embeddings == 1000


def test_channels_last_auto_follows_the_device_and_amp():
    from iddpm_fast.script_util import channels_last_option

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert channels_last_option("auto", cpu) and channels_last_option("auto", cpu, "bf16")
    assert not channels_last_option("auto", cuda) and channels_last_option("auto", cuda, "bf16")
    assert not channels_last_option("false", cpu) and channels_last_option("True", cuda)
    assert channels_last_option(True, cuda, "none")
