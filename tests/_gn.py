"""GroupNorm(-SiLU) test inputs and reference runs shared by
test_group_norm_silu.py and test_group_norm_silu_onepass.py (imported as a
plain module: the tests folder is on sys.path while pytest imports them)."""

import torch

from iddpm_fast import reference as ref


def inputs(shape, dtype, scale_shift, layout, seed=0, device="cpu", offset=-2.3, spread=0.5):
    """x (offset + spread * randn: a non-zero mean breaks one-pass variance
    formulas) in `layout` ("contiguous", "channels_last" or "strided"),
    weight, bias, scale and shift (None without scale_shift) in float64, and
    an upstream gradient gy; drawn in that order from one generator."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = offset + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(c, generator=g, dtype=torch.float64)
    b = 0.2 * torch.randn(c, generator=g, dtype=torch.float64)
    sc = 0.5 * torch.randn(n, c, generator=g, dtype=torch.float64) if scale_shift else None
    sh = 0.5 * torch.randn(n, c, generator=g, dtype=torch.float64) if scale_shift else None
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    x, w, b, gy = x.to(device), w.to(device), b.to(device), gy.to(device)
    sc = sc.to(device) if sc is not None else None
    sh = sh.to(device) if sh is not None else None
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    elif layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., : shape[-1]]  # a view with a padded last dim
    return x, w, b, sc, sh, gy


# scale_shift: True (GroupNorm-scale-shift-SiLU), False (GroupNorm-SiLU) or
# None (plain GroupNorm, no SiLU: the attention blocks' norm).
def reference(scale_shift):
    if scale_shift is None:
        return ref.group_norm
    return ref.group_norm_scale_shift_silu if scale_shift else ref.group_norm_silu


def call(fn, x, w, b, sc, sh, groups):
    """fn(x, w, b[, sc, sh], groups): the scale/shift arguments where given."""
    return fn(x, w, b, sc, sh, groups) if sc is not None else fn(x, w, b, groups)


def run(fn, x, w, b, sc, sh, gy, groups, param_dtype):
    """Output and gradients (x, w, b[, scale, shift]) of fn at these inputs."""
    # A leaf with x's exact strides (clone() would compact a strided view).
    leaf = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x.detach())
    leaves = [leaf.requires_grad_()]
    leaves += [p.detach().to(param_dtype).clone().requires_grad_() for p in (w, b)]
    if sc is not None:
        leaves += [p.detach().to(x.dtype).clone().requires_grad_() for p in (sc, sh)]
    y = call(fn, *leaves[:3], *(leaves[3:] or (None, None)), groups)
    grads = torch.autograd.grad(y, leaves, gy.to(y.dtype))
    return [y.detach()] + [gr.detach() for gr in grads]
