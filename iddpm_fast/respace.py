"""
Respaced (strided) diffusion: sample or evaluate with a subset of the
original timesteps, as in improved-diffusion's `respace` module.
"""

import numpy as np
import torch as th

from .gaussian_diffusion import GaussianDiffusion, _builtin

__all__ = ["space_timesteps", "SpacedDiffusion"]


def space_timesteps(num_timesteps, section_counts):
    """
    Choose which timesteps of a `num_timesteps`-step process to keep.

    The process is cut into len(section_counts) equal portions (the first
    T % len portions one step longer) and portion i is strided, rounding, to
    section_counts[i] steps. E.g. T=300 with [10, 15, 20] keeps 10 of the first
    100 steps, 15 of the next 100 and 20 of the last 100.

    :param section_counts: a list of ints, a comma-separated string ("250",
        "10,15,20"), or "ddimN": DDIM's fixed integer stride giving exactly N
        steps (range(0, T, stride)).
    :return: the set of kept timesteps of the original process.
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired_count = int(spec[len("ddim") :])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'ddimN' with N an integer") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired_count} steps out of {num_timesteps} with an integer stride")
        try:
            section_counts = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {section_counts!r}: expected comma-separated step counts like '250' or '10,15,20', or 'ddimN'"
            ) from None
    section_counts = [int(c) for c in section_counts]
    if not section_counts:
        raise ValueError("section_counts is empty")
    if any(c < 0 for c in section_counts) or sum(section_counts) < 1:
        raise ValueError(f"section counts must be >= 0 and keep at least one step, got {section_counts}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        # A section counted 0 keeps none of its steps.
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """
    A diffusion that keeps only some timesteps of a base process.

    The betas are rebuilt so that alpha_bar at each kept step equals the base
    process's; the model still sees original timestep indices (through
    `timestep_map`), rescaled to [0, 1000) when `rescale_timesteps` is set.

    :param use_timesteps: the base timesteps to keep (any collection).
    :param kwargs: the GaussianDiffusion arguments of the base process.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map = []
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)
        bad = [t for t in self.use_timesteps if not 0 <= t < self.original_num_steps]
        if bad:
            raise ValueError(f"use_timesteps {sorted(bad)[:5]} lie outside [0, {self.original_num_steps - 1}]")
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._map_tensors = {}  # (device, dtype) -> timestep_map tensor, shared by wrappers

    @_builtin
    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def _call_model(self, model, x, t, model_kwargs):
        return super()._call_model(self._wrap_model(model), x, t, model_kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        # cond_fn sees the original process's timesteps, as the model does.
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        wrapped = _WrappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps)
        wrapped._maps = self._map_tensors
        return wrapped

    def _scale_timesteps(self, t):
        # The wrapped model maps and scales timesteps itself.
        return t


class _WrappedModel:
    """Calls the model with original-process timesteps (mapped, maybe rescaled)."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps
        self._maps = {}

    def __call__(self, x, ts, **kwargs):
        key = (ts.device, ts.dtype)
        map_tensor = self._maps.get(key)
        if map_tensor is None:
            map_tensor = self._maps[key] = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        new_ts = map_tensor[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
