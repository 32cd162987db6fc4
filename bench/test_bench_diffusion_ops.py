"""
The diffusion ops that get fused: the hybrid training loss (forward +
backward) and q_sample, per provider, at the shapes of issue #3.

Bytes a perfect fused kernel must move (for GB/s): the loss forward reads x0,
noise and the model output (2C channels) and writes B floats; q_sample reads
x0 and noise and writes x_t.
"""

import pytest
import torch

from iddpm_fast import ops
from iddpm_fast import reference as ref
from iddpm_fast.script_util import create_gaussian_diffusion

SHAPES = [
    (16, 3, 32, 32),  # CIFAR-10 training batch
    (128, 3, 64, 64),  # ImageNet-64 batch
    pytest.param((64, 3, 256, 256), marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-sized")),
]
PROVIDERS = ["reference", "torch_compile", "fused"]
KINDS = dict(model_mean_type="epsilon", model_var_type="learned_range", loss_type="rescaled_mse")


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _fused_or_skip(op, device):
    kind = ops.resolve_name(op, device)
    if kind == "reference":
        pytest.skip(f"no fused {op} runs on {device.type} here")


def _inputs(shape, device):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = shape
    diffusion = create_gaussian_diffusion(steps=4000, learn_sigma=True, noise_schedule="cosine")
    tables = diffusion.tables(device)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(device)
    noise = torch.randn(shape, generator=g).to(device)
    out = torch.randn((B, 2 * C, H, W), generator=g).to(device)
    t = torch.randint(0, 4000, (B,), generator=g).to(device)
    t[0], t[-1] = 0, 3999  # edge timesteps
    return tables, x0, noise, out, t


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_training_loss_fwd_bwd(benchmark, compiled, device_timer, provider, shape):
    device = _device()
    tables, x0, noise, out, t = _inputs(shape, device)
    if provider == "fused":
        _fused_or_skip("training_loss", device)
        fn = ops.training_loss
    elif provider == "torch_compile":
        fn = compiled(ref.training_loss)
    else:
        fn = ref.training_loss
    out.requires_grad_(True)

    def run():
        out.grad = None
        loss, _, _ = fn(out, x0, noise, t, tables, num_timesteps=4000, **KINDS)
        loss.sum().backward()

    def step():
        run()
        _sync(device)

    step()  # warm-up (compilation)
    benchmark.group = "training_loss fwd+bwd"
    benchmark.extra_info["min_bytes_fwd"] = (x0.numel() * 2 + out.numel()) * 4 + shape[0] * 4
    benchmark(step)
    device_timer(benchmark, run)
    assert out.grad is not None and torch.isfinite(out.grad).all()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_q_sample(benchmark, compiled, device_timer, provider, shape):
    device = _device()
    tables, x0, noise, _, t = _inputs(shape, device)
    if provider == "fused":
        _fused_or_skip("q_sample", device)
        fn = ops.q_sample
    elif provider == "torch_compile":
        fn = compiled(ref.q_sample)
    else:
        fn = ref.q_sample

    def step():
        y = fn(x0, t, noise, tables)
        _sync(device)
        return y

    step()
    benchmark.group = "q_sample fwd"
    benchmark.extra_info["min_bytes"] = x0.numel() * 3 * 4
    y = benchmark(step)
    device_timer(benchmark, lambda: fn(x0, t, noise, tables))
    torch.testing.assert_close(y, ref.q_sample(x0, t, noise, tables))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_p_sample_step(benchmark, compiled, device_timer, provider, shape):
    device = _device()
    tables, x0, noise, out, t = _inputs(shape, device)
    kinds = dict(model_mean_type="epsilon", model_var_type="learned_range", clip_denoised=True)
    if provider == "fused":
        _fused_or_skip("p_sample_step", device)
        fn = ops.p_sample_step
    elif provider == "torch_compile":
        fn = compiled(ref.p_sample_step)
    else:
        fn = ref.p_sample_step

    def run():
        with torch.no_grad():
            return fn(out, x0, t, noise, tables, **kinds)

    def step():
        y = run()
        _sync(device)
        return y

    step()
    benchmark.group = "p_sample_step fwd"
    # reads x_t, noise and the model output (2C channels); writes the sample and pred_xstart
    benchmark.extra_info["min_bytes"] = (x0.numel() * 4 + out.numel()) * 4
    sample, _ = benchmark(step)
    device_timer(benchmark, run)
    want, _ = ref.p_sample_step(out, x0, t, noise, tables, **kinds)
    torch.testing.assert_close(sample, want, rtol=1e-4, atol=1e-5)
