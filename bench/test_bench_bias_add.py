"""
A convolution's bias added after it, alone ("bias") and fused with the
ResBlock's residual add ("bias+residual"), at the UNet's convolution output
shapes, per provider:

- "reference": what PyTorch runs after a cuDNN convolution, ``x + bias``
  (TensorIterator's broadcast kernel), then ``residual + y``;
  iddpm_fast.reference.bias_add;
- "torch_compile": torch.compile of it;
- "fused": the C++ op, one pass (CUDA only: on CPUs oneDNN adds the bias
  inside the convolution, and the CPU op is the ATen composite).

Forward only: the backward is the identity for x and the residual and a sum
for the bias, the same ops either way. Bytes a perfect kernel must move:
read x (and the residual), write y.
"""

import pytest
import torch

from iddpm_fast import _ext, ops
from iddpm_fast import reference as ref
from iddpm_fast.ops import _cpp

CPU_SHAPES = [(16, 64, 32, 32), (16, 128, 16, 16)]
GPU_SHAPES = [(256, 128, 32, 32), (256, 256, 16, 16), (256, 256, 8, 8)]
PROVIDERS = ["reference", "torch_compile", "fused"]
FORMATS = {
    "fp32": (torch.float32, torch.contiguous_format),
    "bf16_channels_last": (torch.bfloat16, torch.channels_last),
}


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("mode", ["bias", "bias+residual"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize(
    "shape", GPU_SHAPES if torch.cuda.is_available() else CPU_SHAPES, ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bias_add(benchmark, compiled, device_timer, provider, shape, fmt, mode):
    device = _device()
    if provider == "fused":
        if device.type != "cuda":
            pytest.skip("CUDA only: on CPUs oneDNN adds a convolution's bias itself")
        if ops.resolve_name("bias_add", device) != "cpp":
            pytest.skip(f"the C++ extension does not run on {device.type} here: {_ext.load()}")
        fn = _cpp.bias_add
    elif provider == "torch_compile":
        fn = compiled(ref.bias_add)
    else:
        fn = ref.bias_add
    dtype, memory_format = FORMATS[fmt]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=memory_format)
    bias = torch.randn(shape[1], generator=g).to(device)
    residual = None
    if mode == "bias+residual":
        residual = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=memory_format)

    def run():
        return fn(x, bias, residual)

    def step():
        y = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return y

    with torch.no_grad():
        step()  # warm-up (compilation, extension load)
        benchmark.group = f"bias_add {mode} {fmt}"
        size = x.numel() * x.element_size()
        benchmark.extra_info["min_bytes"] = size * (3 if residual is not None else 2)
        y = benchmark(step)
        device_timer(benchmark, run)
    want = ref.bias_add(x, bias, residual)
    if provider == "torch_compile":  # inductor may round the two adds once: an ulp of y apart
        atol = 0.1 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(y, want, rtol=2 * torch.finfo(dtype).eps, atol=atol)
    else:
        assert torch.equal(y, want)
    if memory_format == torch.channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
