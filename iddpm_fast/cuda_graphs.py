"""
CUDA-graph sampling: one sampling step (the model call and the fused update)
captured once as a CUDA graph and replayed for every timestep, so a step costs
one graph launch instead of a few hundred kernel launches from Python.

Used by ``sample(cuda_graphs=True)`` / ``python -m iddpm_fast sample
--cuda_graphs True``. The numbers are those of the eager loop with the same
seed: the step draws its noise from the default CUDA generator, whose state a
replay reads and advances exactly as the eager call would (the warm-up's draws
are undone before sampling starts).

Requirements, checked with clear errors: a CUDA device, and a model and step
with static shapes (the batch and image size are fixed when the graph is
captured; one :class:`GraphedSampler` serves any number of batches of that
shape). ``denoised_fn``/``cond_fn``-style callbacks are not supported here.
Under bf16 autocast the weight casts are recaptured inside the graph (the
autocast cache must be off, see :func:`autocast`).
"""

import torch

__all__ = ["GraphedSampler", "autocast", "check_available"]


def check_available(device):
    """Raise a ValueError saying why CUDA graphs cannot run on `device`."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, but sampling runs on {device}")
    if not torch.cuda.is_available():
        raise ValueError("cuda_graphs needs a CUDA device, and torch sees none")


def autocast(device, enabled):
    """bf16 autocast that is safe to capture (no cast cache kept across replays)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


def _autocast_caches(device):
    """True inside an autocast region for `device` whose cast cache is on."""
    try:
        enabled = torch.is_autocast_enabled(torch.device(device).type)
    except TypeError:  # older torch: no device argument (CUDA)
        enabled = torch.is_autocast_enabled()
    return bool(enabled) and torch.is_autocast_cache_enabled()


class GraphedSampler:
    """
    A sampling loop (``diffusion.p_sample`` or ``diffusion.ddim_sample``) for
    batches of one fixed shape, with each step replayed from a CUDA graph.

    :param diffusion: a GaussianDiffusion (or SpacedDiffusion).
    :param model: the model, in eval mode, on a CUDA device.
    :param shape: (N, C, H, W) of every batch.
    :param use_ddim: DDIM steps (with `eta`) instead of ancestral ones.
    :param model_kwargs: example model kwargs (e.g. ``{"y": labels}``); later
        batches must pass tensors of the same shapes and dtypes.
    :param memory_format: layout of the sample buffer (channels-last models).
    """

    def __init__(self, diffusion, model, shape, use_ddim=False, eta=0.0, clip_denoised=True, model_kwargs=None,
                 memory_format=torch.contiguous_format, warmup=2):
        device = next(model.parameters()).device
        check_available(device)
        if _autocast_caches(device):
            raise ValueError(
                "GraphedSampler was built inside torch.autocast with its weight-cast cache on: the graph would "
                "read cached casts that are freed when the autocast block ends; use iddpm_fast.cuda_graphs."
                "autocast(device, enabled) (cache off) around both the construction and the loop"
            )
        if not isinstance(shape, (tuple, list)) or len(shape) < 2:
            raise TypeError(f"shape must be a tuple like (N, C, H, W), got {shape!r}")
        self.diffusion, self.device, self.shape = diffusion, device, tuple(int(s) for s in shape)
        step = diffusion.ddim_sample if use_ddim else diffusion.p_sample
        extra = dict(eta=float(eta)) if use_ddim else {}
        model_kwargs = dict(model_kwargs or {})
        for k, v in model_kwargs.items():
            if not torch.is_tensor(v):
                raise TypeError(f"model_kwargs[{k!r}] must be a tensor to be captured, got {type(v).__name__}")
        self._x = torch.zeros(self.shape, device=device).contiguous(memory_format=memory_format)
        self._t = torch.full((self.shape[0],), diffusion.num_timesteps - 1, device=device, dtype=torch.long)
        self._kwargs = {k: v.detach().to(device).clone() for k, v in model_kwargs.items()}

        def run():
            return step(model, self._x, self._t, clip_denoised=clip_denoised, model_kwargs=self._kwargs, **extra)

        rng = torch.cuda.get_rng_state(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(max(1, int(warmup))):  # lazy inits (kernel compiles, tables, cuDNN plans) off the graph
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self._out = run()
        torch.cuda.set_rng_state(rng, device)  # undo the warm-up's draws: same numbers as the eager loop

    def loop_progressive(self, noise=None, model_kwargs=None):
        """
        Yield each step's ``{"sample", "pred_xstart"}`` (copies), from t = T-1
        down to 0, starting at `noise` (drawn like the eager loop when None).
        """
        if noise is None:
            noise = torch.randn(*self.shape, device=self.device)
        if tuple(noise.shape) != self.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but this sampler was captured for {self.shape}")
        model_kwargs = dict(model_kwargs or {})
        if model_kwargs and set(model_kwargs) != set(self._kwargs):
            raise ValueError(f"model_kwargs has keys {sorted(model_kwargs)}, but the graph was captured with "
                             f"{sorted(self._kwargs)}: give all of them (or none, to reuse the captured values)")
        for k, v in model_kwargs.items():
            if self._kwargs[k].shape != v.shape:
                raise ValueError(f"model_kwargs[{k!r}] has shape {tuple(v.shape)}, but the graph was captured "
                                 f"with {tuple(self._kwargs[k].shape)}")
            self._kwargs[k].copy_(v)
        self._x.copy_(noise)
        for i in reversed(range(self.diffusion.num_timesteps)):
            self._t.fill_(i)
            self.graph.replay()
            out = {k: v.clone() for k, v in self._out.items()}
            yield out
            self._x.copy_(self._out["sample"])

    def loop(self, noise=None, model_kwargs=None):
        """The final sample of :meth:`loop_progressive`."""
        final = None
        for final in self.loop_progressive(noise, model_kwargs):
            pass
        return final["sample"]
