"""
Training step of the 32x32 UNet (improved-diffusion's CIFAR-10 shape: T=4000,
cosine, learned sigmas, hybrid loss), batch 16, on this machine.

Providers, all TrainLoop.run_step (sampler, EMA, loss quartiles, grad norm
included): "reference" is the unfused path (IDDPM_FAST_BACKEND=reference:
the original's arithmetic, fp32, NCHW); "fused" is fp32 with the fused ops
(channels-last on CPUs, as train() does by default); "fast" is bf16 autocast
+ channels-last. The loop's own overhead is measured by interleaving the bare
step (training_losses + backward + AdamW) and TrainLoop.run_step in one
process and reported as extra_info["loop_overhead_pct"] (target: under 3%).
"""

import statistics
import time

import pytest
import torch

from iddpm_fast import logger, ops
from iddpm_fast.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from iddpm_fast.train_util import TrainLoop

B = 16


def _cfg(channels):
    return dict(model_and_diffusion_defaults(), image_size=32, num_channels=channels, num_res_blocks=2,
                learn_sigma=True, noise_schedule="cosine", diffusion_steps=4000, attention_resolutions="16,8",
                dropout=0.1)


def _data(device):
    g = torch.Generator().manual_seed(0)
    while True:
        yield (torch.rand(B, 3, 32, 32, generator=g) * 2 - 1).to(device), {}


def _loop(channels, tmp_path, device, **kw):
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**_cfg(channels))
    model.to(device)
    logger.configure(dir=str(tmp_path), format_strs=[])
    return TrainLoop(model=model, diffusion=diffusion, data=_data(device), batch_size=B, microbatch=-1, lr=1e-4,
                     ema_rate="0.9999", log_interval=10**9, save_interval=10**9, resume_checkpoint="",
                     checkpoint_dir=str(tmp_path), **kw)


def _bare_step(loop, batch):
    t = torch.randint(0, loop.diffusion.num_timesteps, (batch.shape[0],), device=batch.device)
    loop.opt.zero_grad(set_to_none=True)
    loop.diffusion.training_losses(loop.model, batch, t)["loss"].mean().backward()
    loop.opt.step()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@pytest.mark.parametrize("channels", [64, 128])
@pytest.mark.parametrize("provider", ["reference", "fused", "fast"])
def test_train_step(benchmark, tmp_path, provider, channels):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if provider == "fast":
        loop = _loop(channels, tmp_path, device, amp="bf16", channels_last=True)
    elif provider == "fused":
        loop = _loop(channels, tmp_path, device, channels_last=device.type == "cpu")
    else:
        loop = _loop(channels, tmp_path, device)
    batch, cond = next(loop.data)
    backend = "reference" if provider == "reference" else "auto"

    def step():
        with ops.use_backend(backend):
            loop.run_step(batch, cond)
        _sync()

    benchmark.group = "train step 32x32"
    benchmark.extra_info["batch"] = B
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)


def test_train_loop_overhead(benchmark, tmp_path):
    """TrainLoop.run_step vs the bare step, interleaved; the difference is the loop's own cost."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loop = _loop(64, tmp_path, device)
    batch, cond = next(loop.data)
    bare, full = [], []
    rounds = 1 if benchmark.disabled else 8
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        _bare_step(loop, batch)
        _sync()
        t1 = time.perf_counter()
        loop.run_step(batch, cond)
        _sync()
        t2 = time.perf_counter()
        if r:
            bare.append(t1 - t0)
            full.append(t2 - t1)
    overhead = 100 * (statistics.median(full) - statistics.median(bare)) / statistics.median(full)
    benchmark.extra_info["loop_overhead_pct"] = overhead
    benchmark.extra_info["bare_median_s"] = statistics.median(bare)
    benchmark.extra_info["trainloop_median_s"] = statistics.median(full)
    print(f"\nTrainLoop overhead at 32x32 c64 b{B}: {overhead:.1f}% of a step "
          f"(bare {statistics.median(bare) * 1e3:.0f} ms, loop {statistics.median(full) * 1e3:.0f} ms)")
    benchmark.group = "train loop overhead"
    benchmark.pedantic(lambda: loop.run_step(batch, cond), rounds=1, iterations=1)
