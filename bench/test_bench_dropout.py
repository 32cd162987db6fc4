"""
Dropout at the UNet's ResBlock shapes (dropout sits between out_layers'
GroupNorm-SiLU and the last conv), per provider:

- "reference": F.dropout, what the original's nn.Dropout runs (on a CPU:
  bernoulli_ one element at a time, then div_ and mul);
- "torch_compile": torch.compile of it (inductor's own random numbers, so
  other masks: a speed comparison only);
- "fused": the C++ op, the same masks as F.dropout (skipped where it cannot
  run: no extension, or a GPU, where F.dropout is already one kernel).

Modes: forward, and forward + backward. Bytes a perfect fused kernel must
move (for GB/s): forward reads x and writes y and a one-byte mask; backward
reads dy and the mask and writes dx.
"""

import pytest
import torch
import torch.nn.functional as F

from iddpm_fast import _ext, ops
from iddpm_fast import reference as ref
from iddpm_fast.ops import _cpp

# The fused dropout is CPU-only (on CUDA, F.dropout is already one kernel);
# on a GPU machine this suite would only spend its time budget on the CPU.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only op; GPU machines skip this suite")

SHAPES = [(16, 64, 32, 32), (16, 128, 16, 16), (16, 128, 8, 8)]
PROVIDERS = ["reference", "torch_compile", "fused"]
FORMATS = {
    "fp32": (torch.float32, torch.contiguous_format),
    "bf16_channels_last": (torch.bfloat16, torch.channels_last),
}
P = 0.1


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_dropout(benchmark, compiled, provider, shape, fmt, mode):
    device = torch.device("cpu")
    if provider == "fused":
        if ops.resolve_name("dropout", device) != "cpp":
            pytest.skip(f"the C++ dropout does not run here: {_ext.load() or _cpp.dropout_available(device)}")
        fn = _cpp.dropout
    elif provider == "torch_compile":
        fn = compiled(ref.dropout)
    else:
        fn = ref.dropout
    dtype, memory_format = FORMATS[fmt]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=memory_format)
    dy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=memory_format)
    backward = mode != "forward"
    x.requires_grad_(backward)

    def step():
        if backward:
            y = fn(x, P)
            return y, torch.autograd.grad(y, x, dy)[0]
        with torch.no_grad():
            return fn(x, P), None

    step()  # warm-up (compilation, extension load)
    benchmark.group = f"dropout {mode} {fmt}"
    size = x.numel() * x.element_size()
    benchmark.extra_info["min_bytes"] = 2 * size + x.numel() + (2 * size + x.numel() if backward else 0)
    benchmark(step)
    if provider != "torch_compile":  # the same draws as F.dropout, bit for bit
        torch.manual_seed(1)
        y, grad = step()
        torch.manual_seed(1)
        want = F.dropout(x.detach(), P)
        assert torch.equal(y.detach(), want)
        if backward:
            assert torch.equal(grad, dy * ((want != 0).to(dtype) * _cpp.dropout_scale(dtype, P)))
