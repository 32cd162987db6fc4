"""
Fused GroupNorm-SiLU (the C++ extension, csrc/) at the UNet's activation
shapes, per provider:

- "eager": F.group_norm + F.silu, what a plain PyTorch user writes;
- "reference": the original's GroupNorm32 (float32 round trip) followed by
  x * sigmoid(x), i.e. iddpm_fast.reference.group_norm_silu;
- "torch_compile": torch.compile of the reference;
- "fused": the C++ op (skipped where the extension cannot run).

Modes: forward, and forward + backward (d x, d weight, d bias). Bytes a
perfect fused kernel must move (for GB/s): forward reads x and writes y;
backward reads x and dy and writes dx. `test_copy_bandwidth` measures what
this machine's memory system does for a plain copy, in the same run.
"""

import pytest
import torch
import torch.nn.functional as F

from iddpm_fast import _ext, ops
from iddpm_fast import reference as ref
from iddpm_fast.ops import _cpp

CPU_SHAPES = [(16, 64, 32, 32), (16, 128, 16, 16), (16, 256, 8, 8), (16, 256, 4, 4)]
GPU_SHAPES = [(128, 128, 32, 32), (128, 256, 16, 16), (128, 512, 8, 8)]
PROVIDERS = ["eager", "reference", "torch_compile", "fused"]
FORMATS = {
    "fp32": (torch.float32, torch.contiguous_format),
    "fp32_channels_last": (torch.float32, torch.channels_last),
    "bf16_channels_last": (torch.bfloat16, torch.channels_last),
}


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _eager(x, w, b, groups):
    return F.silu(F.group_norm(x, groups, w.to(x.dtype), b.to(x.dtype)))


def _shapes():
    return GPU_SHAPES if torch.cuda.is_available() else CPU_SHAPES


def _provider(op, provider, eager, compiled):
    """The callable (x, w, b, groups) of `provider` for `op` ("group_norm_silu" or "group_norm")."""
    if provider == "fused":
        if ops.resolve_name(op, _device()) != "cpp":
            pytest.skip(f"the C++ extension does not run on {_device().type} here: {_ext.load()}")
        return getattr(_cpp, op)
    if provider == "eager":
        return eager
    if provider == "torch_compile":
        return compiled(getattr(ref, op))
    return getattr(ref, op)


def _bench_norm(benchmark, device_timer, op, fn, shape, fmt, mode, provider, scale_shift=False):
    """Times fn (forward, or forward + d x, d weight, d bias, and d scale,
    d shift with scale_shift: per-(sample, channel) [N, C] inputs after the
    bias) and checks its output against the reference `op` in float32."""
    device = _device()
    dtype, memory_format = FORMATS[fmt]
    g = torch.Generator().manual_seed(0)
    x = (-2.3 + 0.5 * torch.randn(shape, generator=g)).to(device, dtype).contiguous(memory_format=memory_format)
    w = torch.randn(shape[1], generator=g).to(device)
    b = torch.randn(shape[1], generator=g).to(device)
    modulation = [(0.1 * torch.randn(shape[:2], generator=g)).to(device, dtype) for _ in range(2 if scale_shift else 0)]
    dy = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=memory_format)
    backward = mode != "forward"
    inputs = (x, w, b, *modulation)
    for t in inputs:
        t.requires_grad_(backward)

    def run():
        if backward:
            y = fn(*inputs, 32)
            return y, torch.autograd.grad(y, inputs, dy)
        with torch.no_grad():
            return fn(*inputs, 32), None

    def step():
        out = run()
        _sync(device)
        return out

    step()  # warm-up (compilation, extension load)
    benchmark.group = f"{op} {mode} {fmt}"
    size = x.numel() * x.element_size()
    benchmark.extra_info["min_bytes"] = size * (5 if backward else 2)
    y, _grads = benchmark(step)
    device_timer(benchmark, run)
    want = getattr(ref, op)(x.detach().float(), w.detach(), b.detach(), *(m.detach().float() for m in modulation), 32)
    tol = 1e-4 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(y.detach().float(), want, rtol=tol, atol=tol)
    if memory_format == torch.channels_last and provider == "fused":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_group_norm_silu(benchmark, compiled, device_timer, provider, shape, fmt, mode):
    fn = _provider("group_norm_silu", provider, _eager, compiled)
    _bench_norm(benchmark, device_timer, "group_norm_silu", fn, shape, fmt, mode, provider)


@pytest.mark.parametrize("provider", ["reference"])
def test_copy_bandwidth(benchmark, device_timer, provider):
    """What a plain copy achieves here (read + write), for the GB/s column."""
    device = _device()
    src = torch.randn(16 * 1024 * 1024 // 4 * 4, device=device)  # 64 MiB
    dst = torch.empty_like(src)

    def step():
        dst.copy_(src)
        _sync(device)

    benchmark.group = "memory copy 64MiB"
    benchmark.extra_info["min_bytes"] = 2 * src.numel() * 4
    benchmark(step)
    device_timer(benchmark, lambda: dst.copy_(src))
    assert torch.equal(dst, src)


# The attention blocks' plain GroupNorm (no SiLU) at their resolutions: the
# original's GroupNorm32 (float32 round trip, "reference"), F.group_norm
# ("eager"), torch.compile of the reference, and the fused op without SiLU.
ATTENTION_SHAPES = [(256, 256, 16, 16), (256, 256, 8, 8)] if torch.cuda.is_available() else [(16, 128, 16, 16)]


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("fmt", ["fp32", "bf16_channels_last"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_group_norm(benchmark, compiled, device_timer, provider, shape, fmt, mode):
    def eager(x, w, b, groups):
        return F.group_norm(x, groups, w.to(x.dtype), b.to(x.dtype))

    fn = _provider("group_norm", provider, eager, compiled)
    _bench_norm(benchmark, device_timer, "group_norm", fn, shape, fmt, mode, provider)


# The out_layers' variant with use_scale_shift_norm: GroupNorm, then
# h * (1 + scale) + shift with per-(sample, channel) scale and shift from the
# timestep embedding, then SiLU. The gradients include d scale and d shift.
def _eager_scale_shift(x, w, b, scale, shift, groups):
    h = F.group_norm(x, groups, w.to(x.dtype), b.to(x.dtype))
    return F.silu(h * (1 + scale[..., None, None]) + shift[..., None, None])


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("fmt", ["fp32", "bf16_channels_last"])
@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_group_norm_scale_shift_silu(benchmark, compiled, device_timer, provider, shape, fmt, mode):
    fn = _provider("group_norm_scale_shift_silu", provider, _eager_scale_shift, compiled)
    _bench_norm(benchmark, device_timer, "group_norm_scale_shift_silu", fn, shape, fmt, mode, provider,
                scale_shift=True)
