"""
The C++ extension's ops (csrc/) behind the seam: fake (meta) kernels for
torch.compile (autograd is registered in C++, csrc/autograd.cpp), and the
seam's callables
for ``group_norm``, ``group_norm_silu``, ``group_norm_scale_shift_silu``, ``bias_add`` and ``dropout``.

The library itself is loaded lazily by :mod:`iddpm_fast._ext` the first time
the seam asks whether the "cpp" kind is available.
"""

import functools
import threading

import torch
import torch.nn.functional as F

from .. import _ext
from ._backend import _compiling, register

_registered = False


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like_dense(x):
    """An empty tensor laid out as the C++ ops lay out their outputs: x's
    layout when it is contiguous or channels-last, else contiguous."""
    return torch.empty_like(x) if _dense(x) else torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_forward(x, weight, bias, scale, shift, num_groups, eps, silu=True):
    n = x.shape[0]
    st = _stat_dtype(x)
    return _like_dense(x), x.new_empty((n, num_groups), dtype=st), x.new_empty((n, num_groups), dtype=st)


def _fake_backward(grad_y, x, weight, bias, scale, shift, mean, rstd, num_groups, silu=True):
    c = x.shape[1]
    dw = x.new_empty((c,), dtype=weight.dtype if weight is not None else torch.float32)
    db = x.new_empty((c,), dtype=bias.dtype if bias is not None else torch.float32)
    if scale is not None:
        ds, dsh = torch.empty_like(scale, memory_format=torch.contiguous_format), torch.empty_like(
            shift, memory_format=torch.contiguous_format
        )
    else:
        ds, dsh = x.new_empty((0,)), x.new_empty((0,))
    return _like_dense(x), dw, db, ds, dsh


def _fake_bias_add(x, bias, residual=None):
    return _like_dense(x)


def _fake_dropout_forward(x, p, scale, generator=None):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def _fake_dropout_backward(grad_y, mask, scale):
    return torch.empty_like(mask, dtype=grad_y.dtype)


def register_python_parts():
    """Fake kernels for the loaded C++ ops (once)."""
    global _registered
    if _registered:
        return
    # Their autograd is registered in C++ (csrc/autograd.cpp).
    torch.library.register_fake("iddpm_fast::gn_silu_forward")(_fake_forward)
    torch.library.register_fake("iddpm_fast::gn_silu_backward")(_fake_backward)
    torch.library.register_fake("iddpm_fast::bias_add")(_fake_bias_add)
    torch.library.register_fake("iddpm_fast::dropout_forward")(_fake_dropout_forward)
    torch.library.register_fake("iddpm_fast::dropout_backward")(_fake_dropout_backward)
    _registered = True


def _dense(x):
    """Contiguous or channels-last (any number of spatial dims)."""
    return x.is_contiguous() or (x.dim() >= 3 and x.movedim(1, -1).is_contiguous())


def _dense_copy(x):
    """x, or a contiguous copy when it is neither contiguous nor channels-last
    (the C++ ops take those two layouts; copying here, not in C++, keeps the
    fake kernels' output strides those of the real ones)."""
    return x if _dense(x) else x.contiguous()


def group_norm(x, weight, bias, num_groups, eps=1e-5):
    return torch.ops.iddpm_fast.gn_silu_forward(_dense_copy(x), weight, bias, None, None, num_groups, eps, False)[0]


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5):
    return torch.ops.iddpm_fast.gn_silu_forward(_dense_copy(x), weight, bias, None, None, num_groups, eps)[0]


def group_norm_scale_shift_silu(x, weight, bias, scale, shift, num_groups, eps=1e-5):
    n, c = x.shape[:2]
    return torch.ops.iddpm_fast.gn_silu_forward(
        _dense_copy(x), weight, bias, scale.reshape(n, c), shift.reshape(n, c), num_groups, eps
    )[0]


def bias_add(x, bias, residual=None):
    if residual is not None and residual.dtype != x.dtype:  # type promotion, as residual + y does
        return residual + torch.ops.iddpm_fast.bias_add(_dense_copy(x), bias, None)
    return torch.ops.iddpm_fast.bias_add(_dense_copy(x), bias, residual)


@functools.lru_cache(maxsize=256)
def dropout_scale(dtype, p):
    """1 / (1 - p) rounded to `dtype` as F.dropout's noise.div_(1 - p) rounds
    it (computed by that very op, once per dtype and p)."""
    return torch.ones((), dtype=dtype).div_(1 - p).item()


def dropout(x, p, training=True):
    # F.dropout off the CPU (CUDA's is one fused kernel with its own random
    # numbers) and where the C++ op would not draw what it draws: p == 1 (no
    # draws), strided views (noise is then laid out differently), and under
    # torch.compile (whose dropout uses its own random numbers anyway, and
    # whose common-subexpression elimination would merge two identical calls
    # of a custom random op).
    if x.device.type != "cpu" or p >= 1.0 or x.numel() == 0 or not _dense(x) or _compiling():
        return F.dropout(x, p, training)
    return torch.ops.iddpm_fast.dropout_forward(x, p, dropout_scale(x.dtype, p))[0]


_dropout_check = {"done": False, "reason": None}
_dropout_lock = threading.Lock()


@_ext._assume_constant
def _dropout_self_check():
    """None when the C++ dropout draws what bernoulli_ draws on this torch,
    else why not (checked once: an odd number of words already used, both
    layouts, a size spanning several Twister blocks). Constant for
    torch.compile, which cannot trace the lock."""
    if _dropout_check["done"]:
        return _dropout_check["reason"]
    with _dropout_lock:
        if not _dropout_check["done"]:
            reason = None
            for layout, shape in ((torch.contiguous_format, (3, 5, 7, 11)), (torch.channels_last, (2, 6, 9, 13))):
                x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=layout)
                g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
                for g in (g1, g2):
                    torch.randint(0, 2, (1,), generator=g, dtype=torch.int32)
                noise = torch.empty_like(x).bernoulli_(0.7, generator=g1).div_(0.7)
                y, _ = torch.ops.iddpm_fast.dropout_forward(x, 0.3, dropout_scale(x.dtype, 0.3), g2)
                if not (torch.equal(y, x * noise) and torch.equal(g1.get_state(), g2.get_state())):
                    reason = (
                        f"torch {torch.__version__}'s CPU bernoulli_ draws differently from the extension's "
                        "Mersenne-Twister emulation (an MKL-backed bernoulli_?), so F.dropout keeps its own draws"
                    )
                    break
            _dropout_check["reason"] = reason
            _dropout_check["done"] = True
    return _dropout_check["reason"]


def dropout_available(device):
    """None when the C++ dropout can run on `device` with F.dropout's draws."""
    if getattr(device, "type", str(device)) != "cpu":
        return None  # dropout() runs F.dropout there
    reason = _ext.load()
    if reason is not None:
        return reason
    return _dropout_self_check()


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


register("group_norm", "cpp", group_norm, available)
register("group_norm_silu", "cpp", group_norm_silu, available)
register("group_norm_scale_shift_silu", "cpp", group_norm_scale_shift_silu, available)
register("bias_add", "cpp", bias_add, available)
register("dropout", "cpp", dropout, dropout_available)
