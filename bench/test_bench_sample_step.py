"""
One ancestral sampling step of the 32x32 UNet (improved-diffusion's CIFAR-10
shape: T=4000 respaced to 250, cosine, learned sigmas), batch 16 on CPU and
256 on a GPU: the model call plus the diffusion update. "reference" runs
everything through the pure-PyTorch ops (the original's arithmetic, NCHW);
"fused" through the kernels that run here (the fused GroupNorm-SiLU and SDPA
attention in the model; the Triton sampling step on CUDA), channels-last on
CPUs as sample() does by default. extra_info["outside_model_pct"] is the share of the step
spent outside the model.
"""

import copy
import statistics
import time

import pytest
import torch

from iddpm_fast import ops
from iddpm_fast.script_util import create_model_and_diffusion, model_and_diffusion_defaults


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@pytest.mark.parametrize("channels", [64, 128])
@pytest.mark.parametrize("provider", ["reference", "fused"])
def test_sample_step(benchmark, provider, channels):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = 256 if device.type == "cuda" else 16
    cfg = dict(model_and_diffusion_defaults(), image_size=32, num_channels=channels, num_res_blocks=2,
               learn_sigma=True, noise_schedule="cosine", diffusion_steps=4000, attention_resolutions="16,8",
               timestep_respacing="250")
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**cfg)
    model.to(device).eval()
    backend = "reference" if provider == "reference" else "auto"
    fused_kinds = {ops.resolve_name(op, device) for op in ("p_sample_step", "group_norm_silu")}
    if provider == "fused" and fused_kinds == {"reference"}:
        pytest.skip(f"no fused op runs on {device.type} here")
    x = torch.randn(batch, 3, 32, 32, device=device)
    if provider == "fused" and device.type == "cpu":
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.full((batch,), 125, device=device, dtype=torch.long)

    def step():
        with torch.no_grad(), ops.use_backend(backend):
            out = diffusion.p_sample(model, x, t)
        _sync()
        return out

    step()
    model_times, step_times = [], []
    rounds = 1 if benchmark.disabled else 5
    for _ in range(rounds):
        t0 = time.perf_counter()
        with torch.no_grad(), ops.use_backend(backend):
            model(x, t)  # the model alone (timestep values do not change its cost)
        _sync()
        t1 = time.perf_counter()
        step()
        t2 = time.perf_counter()
        model_times.append(t1 - t0)
        step_times.append(t2 - t1)
    outside = 100 * (statistics.median(step_times) - statistics.median(model_times)) / statistics.median(step_times)
    benchmark.extra_info["outside_model_pct"] = outside
    benchmark.extra_info["batch"] = batch
    benchmark.group = "sample step 32x32"
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
