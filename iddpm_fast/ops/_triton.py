"""
Registration of the Triton kernels (kernels/) as torch.library custom ops,
with fake (meta) implementations for torch.compile and autograd formulas, and
their entry in the op seam. Kernel modules are imported on first use, so
TRITON_INTERPRET=1 (CPU tests) only has to be set before the first call.

Under torch.compile the seam calls the custom ops (what dynamo traces). In
eager mode it launches the kernels straight from Python, through a
torch.autograd.Function where a gradient is defined: a custom op's Python
dispatch round trip costs more host time than these kernels take on a GPU at
training batch sizes (measured on an H200: the ops are launch-bound there).
Both paths run the same launchers, so they give the same numbers.
"""

from typing import Tuple

import torch

from .. import kernels
from ._backend import register

_Tensor = torch.Tensor


@torch.library.custom_op("iddpm_fast::q_sample_triton", mutates_args=())
def q_sample_triton(x_start: _Tensor, t: _Tensor, noise: _Tensor, tables: _Tensor) -> _Tensor:
    from ..kernels import q_sample as k

    return k.q_sample(x_start, t, noise, tables)


@q_sample_triton.register_fake
def _(x_start, t, noise, tables):
    return torch.empty_like(x_start, memory_format=torch.contiguous_format)


@torch.library.custom_op("iddpm_fast::q_sample_backward_triton", mutates_args=())
def q_sample_backward_triton(
    grad: _Tensor, t: _Tensor, tables: _Tensor, x_dtype: torch.dtype, noise_dtype: torch.dtype, need_x: bool,
    need_noise: bool,
) -> Tuple[_Tensor, _Tensor]:
    """(d x_start, d noise); one not needed is an empty tensor (of its dtype)."""
    from ..kernels import q_sample as k

    gx, gn = k.q_sample_backward(grad, t, tables, x_dtype, noise_dtype, need_x, need_noise)
    gx = grad.new_empty(0, dtype=x_dtype) if gx is None else gx
    return gx, (grad.new_empty(0, dtype=noise_dtype) if gn is None else gn)


@q_sample_backward_triton.register_fake
def _(grad, t, tables, x_dtype, noise_dtype, need_x, need_noise):
    shape = grad.shape
    return (grad.new_empty(shape if need_x else (0,), dtype=x_dtype),
            grad.new_empty(shape if need_noise else (0,), dtype=noise_dtype))


def _q_sample_backward_setup(ctx, inputs, output):
    grad, t, tables, x_dtype, noise_dtype, need_x, need_noise = inputs
    ctx.save_for_backward(t, tables)
    ctx.grad_dtype, ctx.nd, ctx.need = grad.dtype, grad.dim(), (need_x, need_noise)


def _q_sample_double_backward(ctx, grad_gx, grad_gn):
    """d(d x_t) of the backward (create_graph=True: gradient penalties): it is
    linear in d x_t, so this is q_sample's own formula applied to the
    upstream gradients of d x_start and d noise, in PyTorch ops (differentiable again)."""
    from ..reference import gather

    t, tables = ctx.saved_tensors
    terms = []
    for g, needed, row in zip((grad_gx, grad_gn), ctx.need, ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")):
        if needed and g is not None:
            terms.append(g.float() * gather(tables, row, t, ctx.nd))
    dgrad = None if not terms else (terms[0] if len(terms) == 1 else terms[0] + terms[1]).to(ctx.grad_dtype)
    return dgrad, None, None, None, None, None, None


q_sample_backward_triton.register_autograd(_q_sample_double_backward, setup_context=_q_sample_backward_setup)


def _q_sample_setup(ctx, inputs, output):
    x_start, t, noise, tables = inputs
    ctx.save_for_backward(t, tables)
    ctx.dtypes = (x_start.dtype, noise.dtype)


def _q_sample_backward(ctx, grad):
    """One kernel reads d x_t and writes the gradients asked for (autograd's
    formula through reference.q_sample: d x_t times the gathered sqrt(alpha_bar),
    sqrt(1 - alpha_bar), in float32, rounded once to each input's dtype).
    Through the custom op: AOT autograd traces this formula with fake tensors."""
    t, tables = ctx.saved_tensors
    need_x, need_noise = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    gx, gn = q_sample_backward_triton(grad, t, tables, *ctx.dtypes, need_x, need_noise)
    return (gx if need_x else None), None, (gn if need_noise else None), None


q_sample_triton.register_autograd(_q_sample_backward, setup_context=_q_sample_setup)


@torch.library.custom_op("iddpm_fast::training_loss_triton", mutates_args=())
def training_loss_triton(
    model_output: _Tensor,
    x_start: _Tensor,
    noise: _Tensor,
    t: _Tensor,
    tables: _Tensor,
    model_mean_type: str,
    model_var_type: str,
    loss_type: str,
    num_timesteps: int,
) -> Tuple[_Tensor, _Tensor, _Tensor]:
    from ..kernels import training_loss as k

    return k.training_loss_fwd(
        model_output, x_start, noise, t, tables, model_mean_type, model_var_type, loss_type, num_timesteps
    )


@training_loss_triton.register_fake
def _(model_output, x_start, noise, t, tables, model_mean_type, model_var_type, loss_type, num_timesteps):
    n = x_start.shape[0]
    return tuple(x_start.new_empty((n,), dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("iddpm_fast::training_loss_backward_triton", mutates_args=())
def training_loss_backward_triton(
    model_output: _Tensor,
    x_start: _Tensor,
    noise: _Tensor,
    t: _Tensor,
    tables: _Tensor,
    grad_loss: _Tensor,
    grad_mse: _Tensor,
    grad_vb: _Tensor,
    model_mean_type: str,
    model_var_type: str,
    loss_type: str,
    num_timesteps: int,
) -> _Tensor:
    from ..kernels import training_loss as k

    return k.training_loss_bwd(
        model_output, x_start, noise, t, tables, grad_loss, grad_mse, grad_vb,
        model_mean_type, model_var_type, loss_type, num_timesteps,
    )


@training_loss_backward_triton.register_fake
def _(model_output, x_start, noise, t, tables, grad_loss, grad_mse, grad_vb, *args):
    return torch.empty_like(model_output, memory_format=torch.contiguous_format)


def _loss_setup(ctx, inputs, output):
    model_output, x_start, noise, t, tables = inputs[:5]
    ctx.save_for_backward(model_output, x_start, noise, t, tables)
    ctx.kinds = inputs[5:]


def _loss_backward(ctx, grad_loss, grad_mse, grad_vb):
    model_output, x_start, noise, t, tables = ctx.saved_tensors
    n = x_start.shape[0]
    grads = [
        g if g is not None else torch.zeros(n, device=x_start.device, dtype=torch.float32)
        for g in (grad_loss, grad_mse, grad_vb)
    ]
    grad = training_loss_backward_triton(model_output, x_start, noise, t, tables, *grads, *ctx.kinds)
    # x_start, noise and the tables are data, not parameters: no gradient flows to them.
    return grad, None, None, None, None, None, None, None, None


training_loss_triton.register_autograd(_loss_backward, setup_context=_loss_setup)


def _eager():
    """True unless torch.compile is tracing (then the custom ops must be called)."""
    return not torch.compiler.is_compiling()


class _QSample(torch.autograd.Function):
    """Eager q_sample: the launchers, forward and backward (_q_sample_backward's formula)."""

    @staticmethod
    def forward(ctx, x_start, t, noise, tables):
        from ..kernels import q_sample as k

        _q_sample_setup(ctx, (x_start, t, noise, tables), None)
        return k.q_sample(x_start, t, noise, tables)

    @staticmethod
    def backward(ctx, grad):
        from ..kernels import q_sample as k

        if torch.is_grad_enabled():  # create_graph=True: the custom op, whose own backward is registered
            return _q_sample_backward(ctx, grad)
        t, tables = ctx.saved_tensors
        gx, gn = k.q_sample_backward(grad, t, tables, *ctx.dtypes, ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return gx, None, gn, None


class _TrainingLoss(torch.autograd.Function):
    """Eager training loss: the launchers, absent upstream gradients passed as
    None (no zero tensors). The kinds come as one tuple and the backward reuses
    the forward's checks and launch arguments: at training sizes this op's
    time is host time (an H100 spent 0.04 of 0.68 ms in its kernels)."""

    @staticmethod
    def forward(ctx, model_output, x_start, noise, t, tables, kinds):
        from ..kernels import training_loss as k

        ctx.set_materialize_grads(False)
        prepared = k._prepare(model_output, x_start, noise, t, tables, *kinds[:3])
        ctx.save_for_backward(model_output, x_start, noise, t, tables)
        ctx.kinds, ctx.meta = kinds, prepared[5:]
        return k.forward_prepared(prepared, kinds[2], kinds[3])

    @staticmethod
    def backward(ctx, grad_loss, grad_mse, grad_vb):
        from ..kernels import training_loss as k

        nones = (None,) * 5
        if not ctx.needs_input_grad[0] or (grad_loss is None and grad_mse is None and grad_vb is None):
            return (None,) + nones
        model_output, x_start, noise, t, tables = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the kernel's gradient has no derivative of its
            # own, so autograd differentiates the reference instead (gradient
            # penalties, double backward).
            from .. import reference

            names = ("model_mean_type", "model_var_type", "loss_type", "num_timesteps")
            values = reference.training_loss(model_output, x_start, noise, t, tables, **dict(zip(names, ctx.kinds)))
            used = [(v, g) for v, g in zip(values, (grad_loss, grad_mse, grad_vb)) if g is not None]
            (grad,) = torch.autograd.grad([v for v, _ in used], model_output, [g for _, g in used],
                                          create_graph=True, allow_unused=True)
            return (grad,) + nones
        # (contiguous() is the tensor itself where the forward found it contiguous)
        prepared = (model_output.contiguous(), x_start.contiguous(), noise.contiguous(), t.contiguous(),
                    tables.contiguous(), *ctx.meta)
        grad = k.backward_prepared(prepared, grad_loss, grad_mse, grad_vb, ctx.kinds[2], ctx.kinds[3])
        return (grad,) + nones


def _float64(*tensors):
    """True when a float64 tensor is among the arguments: the kernels compute
    in float32, the reference in float64 for float64 inputs (its spec)."""
    return any(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in tensors)


def _q_sample(x_start, t, noise, tables):
    if _float64(x_start, noise) or _wants_grad(tables):  # (the kernels give no gradient to the tables)
        from .. import reference

        return reference.q_sample(x_start, t, noise, tables)
    if _eager():
        return _QSample.apply(x_start, t, noise, tables)
    return q_sample_triton(x_start, t, noise, tables)


def _training_loss(model_output, x_start, noise, t, tables, *, model_mean_type, model_var_type, loss_type,
                   num_timesteps):
    args = (model_output, x_start, noise, t, tables, model_mean_type, model_var_type, loss_type, num_timesteps)
    if _wants_grad(x_start, noise, tables) or _float64(model_output, x_start, noise):
        # The kernels differentiate with respect to the model output only; a
        # gradient into the data or the noise (say, from an encoder trained
        # with the model) or into the tables (a learned schedule) needs the
        # reference, where autograd sees every term.
        # float64 inputs get the reference's float64 math.
        from .. import reference

        return reference.training_loss(*args[:5], model_mean_type=model_mean_type, model_var_type=model_var_type,
                                       loss_type=loss_type, num_timesteps=num_timesteps)
    if _eager():
        return _TrainingLoss.apply(*args[:5], args[5:])
    return training_loss_triton(*args)


register("q_sample", "triton", _q_sample, available=kernels.unavailable_reason)
register("training_loss", "triton", _training_loss, available=kernels.unavailable_reason)


# ---------------------------------------------------------------- sampling
# Forward-only ops: sampling runs under no_grad. When gradients are wanted the
# seam's wrappers below run the reference instead.


@torch.library.custom_op("iddpm_fast::p_mean_variance_triton", mutates_args=())
def p_mean_variance_triton(
    model_output: _Tensor, x_t: _Tensor, t: _Tensor, tables: _Tensor, model_mean_type: str, model_var_type: str,
    clip_denoised: bool,
) -> Tuple[_Tensor, _Tensor, _Tensor, _Tensor]:
    from ..kernels import sampling as k

    mean, var, logvar, pred = k.p_mean_variance(
        model_output, x_t, t, tables, model_mean_type, model_var_type, clip_denoised
    )
    return mean, var, logvar, pred


@p_mean_variance_triton.register_fake
def _(model_output, x_t, t, tables, model_mean_type, model_var_type, clip_denoised):
    full = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    if model_var_type in ("learned", "learned_range"):
        return full, torch.empty_like(full), torch.empty_like(full), torch.empty_like(full)
    small = x_t.new_empty((x_t.shape[0],) + (1,) * (x_t.dim() - 1))
    return full, small, torch.empty_like(small), torch.empty_like(full)


@torch.library.custom_op("iddpm_fast::p_sample_step_triton", mutates_args=())
def p_sample_step_triton(
    model_output: _Tensor, x_t: _Tensor, t: _Tensor, noise: _Tensor, tables: _Tensor, model_mean_type: str,
    model_var_type: str, clip_denoised: bool,
) -> Tuple[_Tensor, _Tensor]:
    from ..kernels import sampling as k

    return k.p_sample_step(model_output, x_t, t, noise, tables, model_mean_type, model_var_type, clip_denoised)


@p_sample_step_triton.register_fake
def _(model_output, x_t, t, noise, tables, model_mean_type, model_var_type, clip_denoised):
    return (torch.empty_like(x_t, memory_format=torch.contiguous_format),
            torch.empty_like(x_t, memory_format=torch.contiguous_format))


@torch.library.custom_op("iddpm_fast::ddim_step_triton", mutates_args=())
def ddim_step_triton(
    model_output: _Tensor, x_t: _Tensor, t: _Tensor, noise: _Tensor, tables: _Tensor, eta: float,
    model_mean_type: str, model_var_type: str, clip_denoised: bool,
) -> Tuple[_Tensor, _Tensor]:
    from ..kernels import sampling as k

    return k.ddim_step(model_output, x_t, t, noise, tables, eta, model_mean_type, model_var_type, clip_denoised)


@ddim_step_triton.register_fake
def _(model_output, x_t, t, noise, tables, eta, model_mean_type, model_var_type, clip_denoised):
    return (torch.empty_like(x_t, memory_format=torch.contiguous_format),
            torch.empty_like(x_t, memory_format=torch.contiguous_format))


def _wants_grad(*tensors):
    return torch.is_grad_enabled() and any(x.requires_grad for x in tensors)


def _with_reference_for_grad(name, triton_fn):
    """The seam entry of a forward-only op: the reference runs when gradients
    are wanted; in eager mode the launcher is called directly (no dispatcher
    round trip), under torch.compile the custom op."""
    module, launcher_name = _LAUNCHERS[name]
    launcher = None  # imported on first eager use (TRITON_INTERPRET must be set before the kernels import)

    def run(*args, **kwargs):
        nonlocal launcher
        # (any tensor argument: the coefficient tables of a learned schedule too)
        if _wants_grad(*(a for a in args if isinstance(a, torch.Tensor))) or _float64(*args):
            from .. import reference

            return getattr(reference, name)(*args, **kwargs)
        if _eager():
            if launcher is None:
                import importlib

                launcher = getattr(importlib.import_module(f"iddpm_fast.kernels.{module}"), launcher_name)
            return launcher(*args, **kwargs)
        return triton_fn(*args, **kwargs)

    return run


# seam name -> (kernel module, launcher): the launchers take the seam's arguments in the seam's order.
_LAUNCHERS = {
    "p_mean_variance": ("sampling", "p_mean_variance"),
    "p_sample_step": ("sampling", "p_sample_step"),
    "ddim_step": ("sampling", "ddim_step"),
    "q_posterior_mean_variance": ("likelihood", "q_posterior_mean_variance"),
    "discretized_gaussian_log_likelihood": ("likelihood", "discretized_gaussian_log_likelihood"),
    "discretized_gaussian_nll_bpd": ("likelihood", "discretized_gaussian_nll_bpd"),
    "vb_terms_bpd": ("sampling", "vb_terms_bpd"),
}


register("p_mean_variance", "triton", _with_reference_for_grad("p_mean_variance", p_mean_variance_triton),
         available=kernels.unavailable_reason)
register("p_sample_step", "triton", _with_reference_for_grad("p_sample_step", p_sample_step_triton),
         available=kernels.unavailable_reason)
register("ddim_step", "triton", _with_reference_for_grad("ddim_step", ddim_step_triton),
         available=kernels.unavailable_reason)


# ----------------------------------------------- posterior, likelihood, bound


@torch.library.custom_op("iddpm_fast::q_posterior_mean_variance_triton", mutates_args=())
def q_posterior_mean_variance_triton(
    x_start: _Tensor, x_t: _Tensor, t: _Tensor, tables: _Tensor
) -> Tuple[_Tensor, _Tensor, _Tensor]:
    from ..kernels import likelihood as k

    return k.q_posterior_mean_variance(x_start, x_t, t, tables)


@q_posterior_mean_variance_triton.register_fake
def _(x_start, x_t, t, tables):
    small = x_t.new_empty((x_t.shape[0],) + (1,) * (x_t.dim() - 1), dtype=torch.float32)
    return torch.empty_like(x_t, memory_format=torch.contiguous_format), small, torch.empty_like(small)


@torch.library.custom_op("iddpm_fast::discretized_gaussian_log_likelihood_triton", mutates_args=())
def discretized_gaussian_log_likelihood_triton(x: _Tensor, means: _Tensor, log_scales: _Tensor) -> _Tensor:
    from ..kernels import likelihood as k

    return k.discretized_gaussian_log_likelihood(x, means, log_scales)


@discretized_gaussian_log_likelihood_triton.register_fake
def _(x, means, log_scales):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("iddpm_fast::discretized_gaussian_nll_bpd_triton", mutates_args=())
def discretized_gaussian_nll_bpd_triton(x: _Tensor, means: _Tensor, log_scales: _Tensor) -> _Tensor:
    from ..kernels import likelihood as k

    return k.discretized_gaussian_nll_bpd(x, means, log_scales)


@discretized_gaussian_nll_bpd_triton.register_fake
def _(x, means, log_scales):
    return x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("iddpm_fast::vb_terms_bpd_triton", mutates_args=())
def vb_terms_bpd_triton(
    model_output: _Tensor, x_start: _Tensor, x_t: _Tensor, t: _Tensor, tables: _Tensor, model_mean_type: str,
    model_var_type: str, clip_denoised: bool,
) -> Tuple[_Tensor, _Tensor]:
    from ..kernels import sampling as k

    return k.vb_terms_bpd(model_output, x_start, x_t, t, tables, model_mean_type, model_var_type, clip_denoised)


@vb_terms_bpd_triton.register_fake
def _(model_output, x_start, x_t, t, tables, model_mean_type, model_var_type, clip_denoised):
    return (x_t.new_empty((x_t.shape[0],), dtype=torch.float32),
            torch.empty_like(x_t, memory_format=torch.contiguous_format))


register("q_posterior_mean_variance", "triton",
         _with_reference_for_grad("q_posterior_mean_variance", q_posterior_mean_variance_triton),
         available=kernels.unavailable_reason)
register("discretized_gaussian_log_likelihood", "triton",
         _with_reference_for_grad("discretized_gaussian_log_likelihood", discretized_gaussian_log_likelihood_triton),
         available=kernels.unavailable_reason)
register("discretized_gaussian_nll_bpd", "triton",
         _with_reference_for_grad("discretized_gaussian_nll_bpd", discretized_gaussian_nll_bpd_triton),
         available=kernels.unavailable_reason)
register("vb_terms_bpd", "triton",
         _with_reference_for_grad("vb_terms_bpd", vb_terms_bpd_triton),
         available=kernels.unavailable_reason)
