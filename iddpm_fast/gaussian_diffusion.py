"""
Gaussian diffusion processes for training and sampling: improved-diffusion's
`gaussian_diffusion` module with the same public names, signatures, numbers
and random-number calls, computing through the fused-op seam
(:mod:`iddpm_fast.ops`).

Beyond the original: coefficient tables live on the device once per diffusion
object (``tables(device)``), bad input raises ``ValueError`` saying what is
wrong, and the loops can show a progress bar.
"""

import enum
import math

import numpy as np
import torch as th

from . import ops
from . import reference as ref
from .ops import _checks

__all__ = [
    "get_named_beta_schedule",
    "betas_for_alpha_bar",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "GaussianDiffusion",
]


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """
    A named beta schedule of length `num_diffusion_timesteps`.

    - "linear": Ho et al.'s 1e-4 .. 2e-2 over 1000 steps, rescaled by 1000/T so
      that it stays similar for any T.
    - "cosine": Nichol & Dhariwal's alpha_bar(t) = cos^2((t + s)/(1 + s) * pi/2)
      with s = 0.008, betas clipped at 0.999.
    """
    T = int(num_diffusion_timesteps)
    if T < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        if T <= 20:
            raise ValueError(
                f"the linear schedule needs more than 20 steps (its last beta is 0.02 * 1000 / T = {20 / T:g}); "
                "use more steps or the cosine schedule"
            )
        scale = 1000 / T
        return np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(T, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise NotImplementedError(f"unknown beta schedule: {schedule_name} (expected 'linear' or 'cosine')")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """
    Discretise a continuous alpha_bar(t), t in [0, 1], into betas:
    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta).

    :param alpha_bar: a callable from t in [0, 1] to the cumulative product
                      of (1 - beta) up to t.
    :param max_beta: the cap on each beta (< 1 avoids a singular last step).
    :return: a float64 numpy array of T betas.
    """
    T = int(num_diffusion_timesteps)
    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)])


class ModelMeanType(enum.Enum):
    """What the model's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """
    The variance of p(x_{t-1} | x_t). LEARNED_RANGE (the paper's choice) lets
    the model interpolate, in the log domain, between FIXED_SMALL (the
    posterior variance) and FIXED_LARGE (beta_t).
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # raw MSE (plus the bound term when learning variances)
    RESCALED_MSE = enum.auto()  # raw MSE, the bound term scaled by T/1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the bound times T, estimating the full VLB

    def is_vb(self):
        return self == LossType.KL or self == LossType.RESCALED_KL


def _builtin(fn):
    # Marks this library's own implementations of the methods a subclass may
    # override (see _OVERRIDABLE): when a user subclass overrides one, the fused
    # paths step aside and the original's call structure runs, so the override
    # is called everywhere improved-diffusion would call it.
    fn._iddpm_fast_builtin = True
    return fn


# Methods whose override by a subclass disables the fused paths.
_OVERRIDABLE = (
    "p_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "_predict_xstart_from_eps",
    "_predict_xstart_from_xprev",
    "_predict_eps_from_xstart",
    "_vb_terms_bpd",
)


# The original's public per-timestep arrays (float64 numpy, [T]).
_ARRAY_ATTRS = ref.PUBLIC_ARRAYS


def _given(**kwargs):
    """The keyword arguments that are not None: an argument this library added
    (cond_fn) is passed on only when given, so that a method overridden with
    improved-diffusion's signature keeps working."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _randn_like(x):
    """
    th.randn_like(x), with the random numbers of a contiguous draw of x's
    shape whatever x's memory layout. randn_like fills a channels-last
    tensor in memory order, which gives other numbers than improved-diffusion's
    draws (on contiguous tensors) and leaves the generator elsewhere; drawing
    contiguous and copying into x's layout keeps every later draw the same.
    """
    if x.is_contiguous():
        return th.randn_like(x)
    return th.empty_like(x).copy_(th.randn(x.shape, dtype=x.dtype, device=x.device))


def _expand(v, shape):
    return v.expand(shape) if v.shape != shape else v


def _promote(x):
    # The original's float32 coefficient tensors promoted half-precision
    # states to float32; keep that (the model still sees x unchanged).
    return x.float() if x.dtype in (th.float16, th.bfloat16) else x


class GaussianDiffusion:
    """
    Utilities for training and sampling diffusion models.

    :param betas: a 1-D array of betas, one per diffusion step (T >= 2), each
                  in (0, 1].
    :param model_mean_type: a ModelMeanType: what the model outputs.
    :param model_var_type: a ModelVarType: how the variance is obtained.
    :param loss_type: a LossType: the training objective.
    :param rescale_timesteps: if True, pass float timesteps scaled to [0, 1000)
                              to the model, as in the original paper.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False):
        for name, value, cls in (
            ("model_mean_type", model_mean_type, ModelMeanType),
            ("model_var_type", model_var_type, ModelVarType),
            ("loss_type", loss_type, LossType),
        ):
            if not isinstance(value, cls):
                raise ValueError(f"{name} must be a {cls.__name__} member, got {value!r}")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1:
            raise ValueError(f"betas must be 1-D, got shape {betas.shape}")
        if betas.shape[0] < 2:
            raise ValueError(f"a diffusion needs at least 2 timesteps, got {betas.shape[0]}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("every beta must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        arrays = ref.diffusion_arrays(betas)
        self._arrays = arrays
        for name in _ARRAY_ATTRS:
            setattr(self, name, arrays[name])
        self._tables = {}

    def __setattr__(self, name, value):
        # The original reads its coefficient arrays at every call, so assigning
        # a new array to one of them changes what later calls compute. Here the
        # tables are built once per device: an assignment drops them, and the
        # next call rebuilds them from the attributes (see _current_arrays).
        if name in _ARRAY_ATTRS and "_tables" in self.__dict__:
            self.__dict__["_tables"] = {}
        super().__setattr__(name, value)

    # ------------------------------------------------------------------
    # Plumbing
    # ------------------------------------------------------------------

    def tables(self, device):
        """
        The [len(reference.TABLE_ROWS) x T] float32 coefficient tensor on
        `device`, built once per device (float64 math, stored as float32).
        """
        device = th.device(device)
        if device.type == "cuda" and device.index is None:
            device = th.device("cuda", th.cuda.current_device())
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = ref.build_tables(self._current_arrays(), device)
        return table

    def _current_arrays(self):
        """
        The table rows from the public coefficient arrays as they are now:
        the arrays computed at construction while none has been reassigned,
        else each row derived from the attributes the way the original's
        methods derive it (log(betas), 1 - alphas_cumprod, ...).
        """
        if all(getattr(self, name) is self._arrays[name] for name in _ARRAY_ATTRS):
            return self._arrays
        a = {name: np.asarray(getattr(self, name), dtype=np.float64) for name in _ARRAY_ATTRS}
        return {**a, **ref.derived_rows(a)}

    @property
    def _kinds(self):
        return dict(
            model_mean_type=self.model_mean_type.name.lower(),
            model_var_type=self.model_var_type.name.lower(),
        )

    def _fusable(self, denoised_fn=None):
        if denoised_fn is not None:
            return False
        # A method replaced on the class (a subclass) or on this instance
        # (monkeypatching) must be called where the original calls it.
        cls, own = type(self), self.__dict__
        return all(
            name not in own and getattr(getattr(cls, name), "_iddpm_fast_builtin", False) for name in _OVERRIDABLE
        )

    def _call_model(self, model, x, t, model_kwargs):
        return model(x, self._scale_timesteps(t), **(model_kwargs or {}))

    def _check_t(self, t, x):
        """Shape/dtype/device of t; its range too where that costs no device sync."""
        _checks.check_t(t, x, self.tables(x.device))
        if t.device.type == "cpu":
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
                raise ValueError(
                    f"timesteps must lie in [0, {self.num_timesteps - 1}], got values in "
                    f"[{int(t.min())}, {int(t.max())}]"
                )
        elif t.numel():
            th._assert_async(((t >= 0) & (t < self.num_timesteps)).all(), "timestep index out of range")

    def _check_data(self, name, x, t=None):
        """Full value checks of user data (and timesteps), with one device sync."""
        _checks.check_float(name, x)
        checks = [th.isfinite(x).all()]
        if t is not None:
            _checks.check_t(t, x, self.tables(x.device))
            checks += [(t >= 0).all(), (t < self.num_timesteps).all()]
        flags = th.stack(checks).tolist()
        if not flags[0]:
            raise ValueError(f"{name} contains NaN or Inf values")
        if not all(flags[1:]):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_timesteps - 1}], got values in "
                f"[{int(t.min())}, {int(t.max())}]"
            )

    def _scale_timesteps(self, t):
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    # ------------------------------------------------------------------
    # The forward process
    # ------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """
        The distribution q(x_t | x_0).

        :param x_start: the [N x C x ...] noiseless inputs.
        :param t: [N] timestep indices (0 means one step of noise).
        :return: (mean, variance, log_variance), all of x_start's shape.
        """
        _checks.check_float("x_start", x_start)
        self._check_t(t, x_start)
        tables, nd = self.tables(x_start.device), x_start.dim()
        mean = ref.gather(tables, "sqrt_alphas_cumprod", t, nd) * x_start
        variance = ref.gather(tables, "one_minus_alphas_cumprod", t, nd)
        log_variance = ref.gather(tables, "log_one_minus_alphas_cumprod", t, nd)
        return mean, _expand(variance, x_start.shape), _expand(log_variance, x_start.shape)

    @_builtin
    def q_sample(self, x_start, t, noise=None):
        """
        Diffuse the data: sample x_t ~ q(x_t | x_0).

        :param x_start: the [N x C x ...] initial data batch.
        :param t: [N] timestep indices (0 means one step of noise).
        :param noise: optional standard normal noise of x_start's shape.
        :return: x_t, x_start's shape.
        """
        if noise is None:
            noise = _randn_like(x_start)
        self._check_t(t, x_start)
        return ops.q_sample(_promote(x_start), t, noise, self.tables(x_start.device))

    @_builtin
    def q_posterior_mean_variance(self, x_start, x_t, t):
        """
        The diffusion posterior q(x_{t-1} | x_t, x_0).

        :return: (mean, variance, log_variance_clipped), all of x_t's shape.
        """
        self._check_t(t, x_t)
        mean, variance, log_variance = ops.q_posterior_mean_variance(x_start, _promote(x_t), t, self.tables(x_t.device))
        return mean, _expand(variance, x_t.shape), _expand(log_variance, x_t.shape)

    # ------------------------------------------------------------------
    # The reverse process
    # ------------------------------------------------------------------

    @_builtin
    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """
        Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param model: the model, called as model(x, scaled_t, **model_kwargs).
        :param x: the [N x C x ...] tensor at time t.
        :param t: [N] timestep indices.
        :param clip_denoised: if True, clip the x_0 prediction into [-1, 1].
        :param denoised_fn: optional function applied to the x_0 prediction
                            before clipping.
        :param model_kwargs: extra keyword arguments for the model (conditioning).
        :return: dict with 'mean', 'variance', 'log_variance', 'pred_xstart',
                 each of x's shape.
        """
        _checks.check_float("x", x)
        self._check_t(t, x)
        model_output = self._call_model(model, x, t, model_kwargs)
        tables = self.tables(x.device)
        x = _promote(x)
        if self._fusable(denoised_fn):
            mean, variance, log_variance, pred_xstart = ops.p_mean_variance(
                model_output, x, t, tables, clip_denoised=clip_denoised, **self._kinds
            )
        else:
            mean, variance, log_variance, pred_xstart = self._p_mean_variance_unfused(
                model_output, x, t, clip_denoised, denoised_fn
            )
        return {
            "mean": mean,
            "variance": _expand(variance, x.shape),
            "log_variance": _expand(log_variance, x.shape),
            "pred_xstart": pred_xstart,
        }

    def _p_mean_variance_unfused(self, model_output, x, t, clip_denoised, denoised_fn):
        """The original's call structure, through the (possibly overridden) helper methods."""
        _checks.check_model_output(model_output, x, self._kinds["model_var_type"])
        tables = self.tables(x.device)
        mean_part, var_values = ref.split_model_output(model_output, x, self._kinds["model_var_type"])
        variance, log_variance = ref.model_log_variance(var_values, t, tables, self._kinds["model_var_type"], x.dim())

        def process_xstart(z):
            if denoised_fn is not None:
                z = denoised_fn(z)
            return z.clamp(-1, 1) if clip_denoised else z

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=mean_part))
            mean = mean_part
        elif self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(mean_part)
            mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=mean_part))
            mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        dtype = th.promote_types(x.dtype, mean_part.dtype)
        return mean.to(dtype), variance, log_variance.to(dtype), pred_xstart.to(dtype)

    @_builtin
    def _predict_xstart_from_eps(self, x_t, t, eps):
        if x_t.shape != eps.shape:
            raise ValueError(f"x_t {tuple(x_t.shape)} and eps {tuple(eps.shape)} must have the same shape")
        return ref.predict_xstart_from_eps(x_t, t, eps, self.tables(x_t.device)).to(_promote(x_t).dtype)

    @_builtin
    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        if x_t.shape != xprev.shape:
            raise ValueError(f"x_t {tuple(x_t.shape)} and xprev {tuple(xprev.shape)} must have the same shape")
        return ref.predict_xstart_from_xprev(x_t, t, xprev, self.tables(x_t.device)).to(_promote(x_t).dtype)

    @_builtin
    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ref.predict_eps_from_xstart(x_t, t, pred_xstart, self.tables(x_t.device)).to(_promote(x_t).dtype)

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        guided-diffusion's classifier guidance for ancestral sampling: the
        mean moved by the variance times ``cond_fn(x, t, **model_kwargs)``
        (the gradient of a log-probability with respect to x).
        """
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """
        guided-diffusion's classifier guidance for DDIM (score conditioning):
        eps minus sqrt(1 - alphabar_t) times ``cond_fn``'s gradient, and the
        x_0 prediction and posterior mean that follow from it.
        """
        alpha_bar = ref.gather(self.tables(x.device), "alphas_cumprod", t, x.dim())
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, cond_fn=None):
        """
        Sample x_{t-1} from the model at timestep t.

        :param cond_fn: optional guidance as in guided-diffusion: a function of
            (x, t, **model_kwargs) returning the gradient that moves the mean
            (see :meth:`condition_mean`); it runs the unfused path.
        :return: dict with 'sample' (x_{t-1}) and 'pred_xstart' (x_0 prediction).
        """
        if cond_fn is None and self._fusable(denoised_fn):
            _checks.check_float("x", x)
            self._check_t(t, x)
            model_output = self._call_model(model, x, t, model_kwargs)
            noise = _randn_like(x)
            sample, pred_xstart = ops.p_sample_step(
                model_output, _promote(x), t, noise, self.tables(x.device), clip_denoised=clip_denoised, **self._kinds
            )
            return {"sample": sample, "pred_xstart": pred_xstart}
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = _randn_like(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        sample = out["mean"] + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        cond_fn=None,
    ):
        """
        Generate samples from the model by ancestral sampling.

        :param shape: the sample shape (N, C, H, W).
        :param noise: optional starting noise x_T of that shape.
        :param device: where to create the samples (default: the model's).
        :param progress: show a tqdm progress bar.
        :return: a non-differentiable batch of samples.
        """
        final = None
        for final in self.p_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            **_given(cond_fn=cond_fn),
        ):
            pass
        return final["sample"]

    def _progressive(self, step, model, shape, noise, device, progress, **step_kwargs):
        """Run `step` (p_sample or ddim_sample) from t = T-1 down to 0, yielding each output."""
        img, indices = self._loop_start(model, shape, noise, device, progress)
        for i in indices:
            t = th.full((shape[0],), i, device=img.device, dtype=th.long)
            with th.no_grad():
                out = step(model, img, t, **step_kwargs)
                yield out
                img = out["sample"]

    def _loop_start(self, model, shape, noise, device, progress):
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list like (N, C, H, W), got {type(shape).__name__}")
        if device is None:
            device = next(model.parameters()).device
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={tuple(shape)}")
            img = noise
        else:
            img = th.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        return img, indices

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        cond_fn=None,
    ):
        """
        Like :meth:`p_sample_loop`, but yield the :meth:`p_sample` dict of
        every timestep, from T-1 down to 0.
        """
        yield from self._progressive(
            self.p_sample,
            model,
            shape,
            noise,
            device,
            progress,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            **_given(cond_fn=cond_fn),
        )

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0,
                    cond_fn=None):
        """
        Sample x_{t-1} from the model with DDIM (eta=0: deterministic).

        Same usage as :meth:`p_sample`; ``cond_fn`` guides by
        :meth:`condition_score`.
        """
        if cond_fn is None and self._fusable(denoised_fn):
            _checks.check_float("x", x)
            self._check_t(t, x)
            model_output = self._call_model(model, x, t, model_kwargs)
            noise = _randn_like(x)
            sample, pred_xstart = ops.ddim_step(
                model_output, _promote(x), t, noise, self.tables(x.device), eta=eta, clip_denoised=clip_denoised,
                **self._kinds,
            )
            return {"sample": sample, "pred_xstart": pred_xstart}
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        noise = _randn_like(x)
        eps = self._predict_eps_from_xstart(_promote(x), t, out["pred_xstart"])
        sample = ref.ddim_step_from_eps(_promote(x), t, out["pred_xstart"], eps, noise, self.tables(x.device), eta)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """Sample x_{t+1} from the model with the deterministic reverse DDIM ODE."""
        if eta != 0.0:
            raise ValueError("the reverse DDIM ODE is deterministic: eta must be 0")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        sample = ref.ddim_reverse_from_xstart(_promote(x), t, out["pred_xstart"], self.tables(x.device))
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        cond_fn=None,
    ):
        """Generate samples with DDIM. Same usage as :meth:`p_sample_loop`."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise=noise,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            device=device,
            progress=progress,
            eta=eta,
            **_given(cond_fn=cond_fn),
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        cond_fn=None,
    ):
        """Like :meth:`ddim_sample_loop`, yielding every step's :meth:`ddim_sample` dict."""
        yield from self._progressive(
            self.ddim_sample,
            model,
            shape,
            noise,
            device,
            progress,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            eta=eta,
            **_given(cond_fn=cond_fn),
        )

    # ------------------------------------------------------------------
    # Losses and likelihood
    # ------------------------------------------------------------------

    @_builtin
    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """
        One term of the variational bound, in bits per dimension.

        :return: dict with 'output' ([N] KL terms, or decoder NLLs where t == 0)
                 and 'pred_xstart'.
        """
        tables = self.tables(x_t.device)
        if self._fusable():
            _checks.check_float("x_t", x_t)
            self._check_t(t, x_t)
            model_output = self._call_model(model, x_t, t, model_kwargs)
            output, pred_xstart = ops.vb_terms_bpd(
                model_output, x_start, _promote(x_t), t, tables, clip_denoised=clip_denoised, **self._kinds
            )
            return {"output": output, "pred_xstart": pred_xstart}
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        output = ref.vb_terms_from_distribution(x_start, t, true_mean, true_log_variance, out["mean"], out["log_variance"])
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """
        Training losses for one timestep per sample.

        :param model: the model to evaluate the loss on.
        :param x_start: the [N x C x ...] clean inputs in [-1, 1].
        :param t: [N] timestep indices.
        :param model_kwargs: extra keyword arguments for the model.
        :param noise: optional Gaussian noise to diffuse x_start with.
        :return: dict of [N] tensors: "loss" always; "mse" for MSE losses; "vb"
                 (bits/dim, scaled for RESCALED_MSE) when the variance is learned
                 with an MSE loss.
        """
        self._check_data("x_start", x_start, t)
        if noise is None:
            noise = _randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        if not self._fusable():
            return self._training_losses_unfused(model, x_start, x_t, t, noise, model_kwargs)
        model_output = self._call_model(model, x_t, t, model_kwargs)
        loss, mse, vb = ops.training_loss(
            model_output,
            x_start,
            noise,
            t,
            self.tables(x_start.device),
            loss_type=self.loss_type.name.lower(),
            num_timesteps=self.num_timesteps,
            **self._kinds,
        )
        if self.loss_type.is_vb():
            return {"loss": loss}
        terms = {}
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            terms["vb"] = vb
        terms["mse"] = mse
        terms["loss"] = loss
        return terms

    def _training_losses_unfused(self, model, x_start, x_t, t, noise, model_kwargs):
        """The original's call structure, through the (possibly overridden) helper methods."""
        if self.loss_type.is_vb():
            out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)
            loss = out["output"] * self.num_timesteps if self.loss_type == LossType.RESCALED_KL else out["output"]
            return {"loss": loss}
        model_output = self._call_model(model, x_t, t, model_kwargs)
        _checks.check_model_output(model_output, x_t, self._kinds["model_var_type"])
        terms = {}
        mean_part, var_values = ref.split_model_output(model_output, x_t, self._kinds["model_var_type"])
        if var_values is not None:
            # The bound term trains only the variance: the mean enters it detached.
            frozen_out = th.cat([mean_part.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(
                model=lambda *args, r=frozen_out: r, x_start=x_start, x_t=x_t, t=t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        # The original evaluated the posterior mean whatever the mean type; an
        # override sees the same calls.
        posterior_mean = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        target = {
            ModelMeanType.PREVIOUS_X: posterior_mean,
            ModelMeanType.START_X: x_start,
            ModelMeanType.EPSILON: noise,
        }[self.model_mean_type]
        terms["mse"] = ref.mean_flat((target - mean_part) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """
        The prior term KL(q(x_T | x_0) || N(0, I)) of the bound: [N], bits/dim.
        It depends only on the forward process and cannot be optimised.
        """
        return ref.prior_bpd(x_start, self.tables(x_start.device))

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, progress=False):
        """
        The full variational bound in bits per dimension, and related terms.

        :param x_start: the [N x C x ...] inputs in [-1, 1].
        :param progress: show a tqdm progress bar over the T timesteps.
        :return: dict with
                 - total_bpd: [N] the bound per sample (bits/dim);
                 - prior_bpd: [N] its prior term;
                 - vb: [N x T] its per-timestep terms;
                 - xstart_mse: [N x T] MSE of the x_0 prediction per timestep;
                 - mse: [N x T] MSE of the implied epsilon per timestep.
        """
        self._check_data("x_start", x_start)
        device, n = x_start.device, x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        steps = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="bpd")
        for i in steps:
            t_batch = th.full((n,), i, device=device, dtype=th.long)
            noise = _randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t_batch, clip_denoised=clip_denoised, model_kwargs=model_kwargs
                )
            vb.append(out["output"])
            xstart_mse.append(ref.mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(ref.mean_flat((eps - noise) ** 2))
        vb = th.stack(vb, dim=1)
        xstart_mse = th.stack(xstart_mse, dim=1)
        mse = th.stack(mse, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {"total_bpd": total_bpd, "prior_bpd": prior_bpd, "vb": vb, "xstart_mse": xstart_mse, "mse": mse}


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """
    Gather values of a 1-D numpy array (or tensor) at a batch of indices, as
    float32, broadcast to `broadcast_shape` ([N, ...] with N = len(timesteps)).
    Kept for code written against improved-diffusion; the library itself uses
    the device tables.
    """
    table = arr if isinstance(arr, th.Tensor) else th.from_numpy(np.asarray(arr))
    res = table.to(device=timesteps.device)[timesteps].float()
    while res.dim() < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)
