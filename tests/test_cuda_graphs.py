"""CUDA-graph sampling (iddpm_fast.cuda_graphs, sample(cuda_graphs=True)).

On a machine without CUDA only the error paths run; the equality tests need
a GPU (bench/gpu.sh runs them there)."""

import pytest
import torch

from iddpm_fast import cuda_graphs
from iddpm_fast.script_util import create_model_and_diffusion, model_and_diffusion_defaults

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


def _model(respacing, class_cond=False, device="cuda"):
    cfg = dict(model_and_diffusion_defaults(), image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
               attention_resolutions="8", num_heads=2, learn_sigma=True, noise_schedule="cosine",
               diffusion_steps=100, timestep_respacing=respacing, class_cond=class_cond)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**cfg)
    with torch.no_grad():  # a freshly built UNet outputs zeros (zeroed last conv): perturb it
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.to(device).eval(), diffusion


def test_cpu_device_is_a_clear_error():
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        cuda_graphs.check_available("cpu")
    model, diffusion = _model("5", device="cpu")
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        cuda_graphs.GraphedSampler(diffusion, model, (2, 3, 16, 16))


def test_sample_with_cuda_graphs_on_cpu_names_the_problem(tmp_path):
    import iddpm_fast

    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        iddpm_fast.sample(model_path=str(tmp_path / "missing.pt"), device="cpu", cuda_graphs=True, progress=False)


@needs_cuda
@pytest.mark.parametrize("use_ddim", [False, True], ids=["ancestral", "ddim"])
def test_graphed_loop_draws_the_eager_loops_samples(use_ddim):
    model, diffusion = _model("ddim10" if use_ddim else "10")
    shape = (4, 3, 16, 16)
    torch.manual_seed(1)
    graphed = cuda_graphs.GraphedSampler(diffusion, model, shape, use_ddim=use_ddim, eta=0.5)
    got = [graphed.loop() for _ in range(2)]  # two batches through one capture
    torch.manual_seed(1)
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    kw = dict(eta=0.5) if use_ddim else {}
    want = [loop(model, shape, device="cuda", **kw) for _ in range(2)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1])  # the noise moved on between batches


@needs_cuda
def test_graphed_loop_class_conditional_labels_are_replaced_per_batch():
    model, diffusion = _model("5", class_cond=True)
    shape = (4, 3, 16, 16)
    y0 = torch.tensor([0, 1, 2, 3], device="cuda")
    y1 = torch.tensor([5, 5, 9, 9], device="cuda")
    torch.manual_seed(2)
    graphed = cuda_graphs.GraphedSampler(diffusion, model, shape, model_kwargs={"y": y0})
    noise = torch.randn(shape, device="cuda")
    a = graphed.loop(noise, {"y": y1})
    torch.manual_seed(2)
    torch.randn(shape, device="cuda")
    b = diffusion.p_sample_loop(model, shape, noise=noise, model_kwargs={"y": y1})
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="noise has shape"):
        next(graphed.loop_progressive(torch.randn(2, 3, 16, 16, device="cuda")))


@needs_cuda
def test_sample_cuda_graphs_writes_the_same_npz(tmp_path):
    import numpy as np

    import iddpm_fast

    out = str(tmp_path / "run")
    iddpm_fast.train(data_dir="digits", image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                     attention_resolutions="4", num_heads=1, diffusion_steps=20, learn_sigma=True, batch_size=8,
                     max_steps=2, log_interval=100, save_interval=100, num_samples=4, sample_respacing="5", nll_samples=0,
                     progress=False,
                     out_dir=out, device="cuda")
    kw = dict(model_path=f"{out}/model000002.pt", num_samples=6, batch_size=4, timestep_respacing="5",
              progress=False, grid=False, device="cuda")
    a = np.load(iddpm_fast.sample(**kw, out_dir=str(tmp_path / "a"))["npz"])["arr_0"]
    b = np.load(iddpm_fast.sample(**kw, cuda_graphs=True, out_dir=str(tmp_path / "b"))["npz"])["arr_0"]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    c = np.load(iddpm_fast.sample(**kw, cuda_graphs=True, amp="bf16", out_dir=str(tmp_path / "c"))["npz"])["arr_0"]
    assert c.shape == a.shape


def test_autocast_with_its_cache_on_is_detected():
    """GraphedSampler refuses to capture under an autocast whose cast cache is on
    (the graph would read freed casts); cuda_graphs.autocast turns the cache off."""
    assert not cuda_graphs._autocast_caches("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cuda_graphs._autocast_caches("cpu")
    with cuda_graphs.autocast("cpu", True):
        assert not cuda_graphs._autocast_caches("cpu")
