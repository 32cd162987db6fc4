"""
The C++ extension's ops (csrc/) behind the seam: fake (meta) kernels for
torch.compile, autograd through the C++ backward, and the seam's callables
for ``group_norm_silu`` and ``group_norm_scale_shift_silu``.

The library itself is loaded lazily by :mod:`iddpm_fast._ext` the first time
the seam asks whether the "cpp" kind is available.
"""

import torch

from .. import _ext
from ._backend import register

_registered = False


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_forward(x, weight, bias, scale, shift, num_groups, eps):
    n = x.shape[0]
    st = _stat_dtype(x)
    return torch.empty_like(x), x.new_empty((n, num_groups), dtype=st), x.new_empty((n, num_groups), dtype=st)


def _fake_backward(grad_y, x, weight, bias, scale, shift, mean, rstd, num_groups):
    c = x.shape[1]
    dw = x.new_empty((c,), dtype=weight.dtype if weight is not None else torch.float32)
    db = x.new_empty((c,), dtype=bias.dtype if bias is not None else torch.float32)
    if scale is not None:
        ds, dsh = torch.empty_like(scale, memory_format=torch.contiguous_format), torch.empty_like(
            shift, memory_format=torch.contiguous_format
        )
    else:
        ds, dsh = x.new_empty((0,)), x.new_empty((0,))
    return torch.empty_like(x), dw, db, ds, dsh


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups = num_groups


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    dx, dw, db, dsc, dsh = torch.ops.iddpm_fast.gn_silu_backward(
        grad_y, x, weight, bias, scale, shift, mean, rstd, ctx.num_groups
    )
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        dw if weight is not None and need[1] else None,
        db if bias is not None and need[2] else None,
        dsc if scale is not None and need[3] else None,
        dsh if shift is not None and need[4] else None,
        None,
        None,
    )


def register_python_parts():
    """Fake kernels and autograd for the loaded C++ ops (once)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("iddpm_fast::gn_silu_forward")(_fake_forward)
    torch.library.register_fake("iddpm_fast::gn_silu_backward")(_fake_backward)
    torch.library.register_autograd("iddpm_fast::gn_silu_forward", _backward, setup_context=_setup_context)
    _registered = True


def _dense(x):
    """x, or a contiguous copy when it is neither contiguous nor channels-last
    (the C++ op takes those two layouts)."""
    if x.is_contiguous() or x.dim() < 3 or x.movedim(1, -1).is_contiguous():
        return x
    return x.contiguous()


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5):
    return torch.ops.iddpm_fast.gn_silu_forward(_dense(x), weight, bias, None, None, num_groups, eps)[0]


def group_norm_scale_shift_silu(x, weight, bias, scale, shift, num_groups, eps=1e-5):
    n, c = x.shape[:2]
    return torch.ops.iddpm_fast.gn_silu_forward(
        _dense(x), weight, bias, scale.reshape(n, c), shift.reshape(n, c), num_groups, eps
    )[0]


def available(device):
    """None when the C++ ops can run on `device`, else why not."""
    reason = _ext.load()
    if reason is not None:
        return reason
    device_type = getattr(device, "type", str(device))
    if device_type == "cuda" and not _ext.has_cuda_kernels():
        return "the extension was built without CUDA kernels"
    if device_type not in ("cpu", "cuda"):
        return f"the extension has no {device_type} kernels"
    return None


register("group_norm_silu", "cpp", group_norm_silu, available)
register("group_norm_scale_shift_silu", "cpp", group_norm_scale_shift_silu, available)
