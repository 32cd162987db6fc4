"""
The C++ extension's bias_add (a convolution's bias, then the residual add,
in one pass) against its twin in iddpm_fast/reference.py: forward bit for bit
in every dtype (both round after each add), gradients, fp64 gradcheck, both
memory layouts, strided and misaligned input, opcheck, torch.compile, input
errors; and the UNet with convolution biases added by it against the stock
convolutions. The CUDA kernels run where a GPU and a CUDA build exist.
"""

import pytest
import torch
import torch.nn.functional as F
from _tensors import offset_copy

from iddpm_fast import _ext, ops
from iddpm_fast import reference as ref
from iddpm_fast.script_util import create_model_and_diffusion, model_and_diffusion_defaults

REASON = _ext.load()
needs_ext = pytest.mark.skipif(REASON is not None, reason=f"C++ extension unavailable: {REASON}")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and REASON is None and _ext.has_cuda_kernels() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

SHAPES = {
    "minimal": (1, 1, 1, 1),
    "batch 1": (1, 32, 8, 8),
    "odd HxW": (2, 16, 7, 9),
    # Neither layout's 16-byte vectors fit: per-element CUDA kernel.
    "C and HxW not multiples of the vector width": (3, 6, 5, 5),
    "output head (6 channels)": (2, 6, 8, 8),
    "UNet 16x16": (2, 128, 16, 16),
    "1-D attention input": (2, 24, 16),
    "3-D volume": (2, 8, 3, 4, 5),
}


def _layout(t, layout):
    if layout == "channels_last":
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "strided":
        return torch.cat([t, t], dim=-1)[..., : t.shape[-1]]  # a view with a padded last dim
    return t.contiguous()


def _inputs(shape, dtype, layout, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64)
    r = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    x, r = (_layout(t.to(device=device, dtype=dtype), layout) for t in (x, r))
    return x, b.to(device), r, gy.to(device=device, dtype=dtype)


@needs_ext
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["bias", "bias+residual"])
@pytest.mark.parametrize("device", DEVICES)
def test_forward_equals_reference_bit_for_bit_and_gradients(name, dtype, layout, with_residual, device):
    shape = SHAPES[name]
    x, b, r, gy = _inputs(shape, dtype, layout, device)
    bias = b.float()  # a float32 parameter, as under autocast
    res = r if with_residual else None
    y = ops.bias_add(x, bias, res)
    want = ref.bias_add(x, bias, res)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(y, want)
    if layout == "channels_last" and x.dim() >= 3 and not x.is_contiguous():
        assert y.movedim(1, -1).is_contiguous()  # stays channels-last
    leaves = [x.detach().clone().requires_grad_(), bias.clone().requires_grad_()]
    if with_residual:
        leaves.append(r.detach().clone().requires_grad_())
    got = torch.autograd.grad(ops.bias_add(*leaves), leaves, gy)
    want = torch.autograd.grad(ref.bias_add(*leaves), leaves, gy)
    for g_got, g_want in zip(got, want):
        assert g_got.dtype == g_want.dtype
        # d bias: the same sum in x's dtype as the reference's broadcast backward (reduction order aside).
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(g_got, g_want, rtol=2 * eps, atol=2 * eps)


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(layout, device):
    x, b, r, _ = _inputs((2, 5, 3, 4), torch.float64, layout, device)
    args = (x.requires_grad_(), b.requires_grad_(), r.requires_grad_())
    assert torch.autograd.gradcheck(ops.bias_add, args)
    assert torch.autograd.gradgradcheck(ops.bias_add, args)
    assert torch.autograd.gradcheck(lambda x, b: ops.bias_add(x, b), args[:2])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_inputs_off_16_byte_alignment(dtype, layout, device):
    """A view one element into its storage (x, residual and bias) takes the
    CUDA per-element kernel; same numbers as aligned copies."""
    x, b, r, _ = _inputs((2, 16, 4, 4), dtype, layout, device)
    xo, ro, bo = offset_copy(x), offset_copy(r), offset_copy(b.to(dtype))
    assert xo.data_ptr() % 16 and ro.data_ptr() % 16 and bo.data_ptr() % 16
    assert torch.equal(ops.bias_add(xo, bo, ro), ref.bias_add(x, b.to(dtype), r))


@needs_ext
@pytest.mark.parametrize("bias_kind", ["float32 4 bytes past 32", "float32 16 bytes past 32", "float16", "float64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_bias_in_its_own_dtype_and_alignment(bias_kind, layout, device):
    """A bf16 x with a bias of another dtype. The CUDA kernels read a
    float32 bias as it is (a channels-last vector of 8 float32 values needs
    32-byte alignment, else the per-element kernel) and cast any other dtype
    first; each gives the reference's bias.to(x.dtype) rounding."""
    x, b, r, _ = _inputs((2, 16, 4, 4), torch.bfloat16, layout, device)
    if bias_kind.startswith("float32"):
        skip = 1 if bias_kind.startswith("float32 4") else 4
        bias = offset_copy(b.float(), elements=skip)
        assert bias.data_ptr() % 32 == 4 * skip
    else:
        bias = b.to(getattr(torch, bias_kind))
    assert torch.equal(ops.bias_add(x, bias, r), ref.bias_add(x, bias, r))
    assert torch.equal(ops.bias_add(x, bias), ref.bias_add(x, bias))


@needs_ext
@pytest.mark.skipif("cuda" not in DEVICES, reason="the CUDA kernels need a GPU and a CUDA build")
@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (2, 320, 6, 6), (2, 24, 16)], ids=["8x8", "wide", "1-D"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_vectorised_and_per_element_kernels_agree(shape, layout, monkeypatch):
    x, b, r, _ = _inputs(shape, torch.bfloat16, layout, "cuda")
    out = {}
    for vec in ("1", "0"):
        monkeypatch.setenv("IDDPM_FAST_BIAS_ADD_CUDA_VEC", vec)
        out[vec] = ops.bias_add(x, b.float(), r)
    assert torch.equal(out["1"], out["0"])


@needs_ext
def test_residual_in_another_layout_or_dtype():
    x, b, r, _ = _inputs((2, 8, 4, 4), torch.float32, "channels_last")
    rc = r.contiguous()  # laid out differently from x: copied into x's layout
    assert torch.equal(ops.bias_add(x, b, rc), ref.bias_add(x, b, rc))
    r64 = r.double()  # type promotion, as residual + y
    y = ops.bias_add(x, b, r64)
    assert y.dtype == torch.float64 and torch.equal(y, ref.bias_add(x, b, r64))


@needs_ext
def test_empty_batch():
    x = torch.empty(0, 8, 4, 4)
    assert ops.bias_add(x, torch.ones(8), torch.empty(0, 8, 4, 4)).shape == x.shape


@needs_ext
def test_opcheck():
    x, b, r, _ = _inputs((2, 8, 3, 3), torch.float32, "channels_last")
    op = torch.ops.iddpm_fast.bias_add.default
    torch.library.opcheck(op, (x.requires_grad_(), b.float().requires_grad_(), r.requires_grad_()))
    torch.library.opcheck(op, (x.detach(), b.float(), None))
    # Neither contiguous nor channels-last (a transposed 2-D input, a strided
    # view): the op computes on a contiguous copy, and its fake says so.
    torch.library.opcheck(op, (torch.randn(6, 4).t(), torch.ones(6), None))
    xs = torch.randn(2, 3, 4, 10)[..., ::2]
    torch.library.opcheck(op, (xs, torch.ones(3), torch.randn(2, 3, 4, 5)))


@needs_ext
def test_torch_compile_fullgraph():
    x, b, r, _ = _inputs((2, 8, 5, 5), torch.float32, "channels_last")

    def block(x, b, r):
        return (ops.bias_add(x, b, r) * 2).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves_e = [t.clone().float().requires_grad_() for t in (x, b, r)]
    leaves_c = [t.clone().float().requires_grad_() for t in (x, b, r)]
    eager_out, compiled_out = block(*leaves_e), compiled(*leaves_c)
    torch.testing.assert_close(compiled_out, eager_out)
    for ge, gc in zip(torch.autograd.grad(eager_out, leaves_e), torch.autograd.grad(compiled_out, leaves_c)):
        torch.testing.assert_close(gc, ge)


@needs_ext
def test_clear_errors():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(RuntimeError, match=r"bias must have shape \[6\]"):
        torch.ops.iddpm_fast.bias_add(x, torch.ones(5), None)
    with pytest.raises(RuntimeError, match=r"residual has shape \[2, 6, 4, 3\]"):
        torch.ops.iddpm_fast.bias_add(x, torch.ones(6), torch.zeros(2, 6, 4, 3))
    with pytest.raises(RuntimeError, match="residual must match x's device and dtype"):
        torch.ops.iddpm_fast.bias_add(x, torch.ones(6), torch.zeros(2, 6, 4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="must be float32, float64, float16 or bfloat16"):
        torch.ops.iddpm_fast.bias_add(x.int(), torch.ones(6), None)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        ops.bias_add(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"residual has shape \(2, 6, 4\) but x has shape \(2, 6, 4, 4\)"):
        ops.bias_add(x, torch.ones(6), torch.zeros(2, 6, 4))
    with pytest.raises(ValueError, match="floating-point"):
        ops.bias_add(x, torch.ones(6, dtype=torch.long))


def test_policy(monkeypatch):
    """auto: only while capturing a CUDA graph (not on CPUs); fused: wherever
    the C++ op runs; stock: never; never with the reference backend asked for."""
    cpu = torch.zeros(1, 2, 3, 3)
    monkeypatch.delenv("IDDPM_FAST_CONV_BIAS", raising=False)
    assert not ops.fuse_conv_bias(cpu)
    monkeypatch.setenv("IDDPM_FAST_CONV_BIAS", "stock")
    assert not ops.fuse_conv_bias(cpu)
    monkeypatch.setenv("IDDPM_FAST_CONV_BIAS", "fused")
    assert ops.fuse_conv_bias(cpu) is (REASON is None)
    with ops.use_backend("reference"):
        assert not ops.fuse_conv_bias(cpu)
    monkeypatch.setenv("IDDPM_FAST_CONV_BIAS", "always")
    with pytest.raises(ValueError, match="auto, fused or stock"):
        ops.fuse_conv_bias(cpu)


@needs_ext
@pytest.mark.skipif("cuda" not in DEVICES, reason="the CUDA kernels need a GPU and a CUDA build")
def test_auto_policy_fuses_on_cuda_only_while_capturing_a_graph(monkeypatch):
    monkeypatch.delenv("IDDPM_FAST_CONV_BIAS", raising=False)
    x = torch.zeros(1, 2, 3, 3, device="cuda")
    assert not ops.fuse_conv_bias(x)  # eager: launch-bound, stock
    seen = []
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seen.append(ops.fuse_conv_bias(x))
        x.add_(1)
    assert seen == [True]
    monkeypatch.setenv("IDDPM_FAST_CONV_BIAS", "fused")
    assert ops.fuse_conv_bias(x)
    monkeypatch.setenv("IDDPM_FAST_CONV_BIAS", "stock")
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        seen.append(ops.fuse_conv_bias(x))
        x.add_(1)
    assert seen == [True, False]


def _unet(use_scale_shift_norm):
    torch.manual_seed(0)
    cfg = dict(model_and_diffusion_defaults(), image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
               attention_resolutions="4", num_heads=2, learn_sigma=True, use_scale_shift_norm=use_scale_shift_norm)
    model, _ = create_model_and_diffusion(**cfg)
    for p in model.parameters():  # zero-initialised convolutions would hide their biases
        p.data.add_(0.05 * torch.randn_like(p))
    return model


@needs_ext
@pytest.mark.parametrize("use_scale_shift_norm", [True, False], ids=["scale_shift", "add_emb"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_unet_with_fused_convolution_biases(use_scale_shift_norm, layout, device, monkeypatch):
    """Every convolution's bias through bias_add (the ResBlocks' and the
    attention's residual adds fused into it) against stock convolutions:
    bit-identical on CUDA, where PyTorch itself adds a cuDNN convolution's
    bias afterwards; within rounding on CPUs, where oneDNN adds it inside the
    convolution. Gradients of every parameter too."""
    model = _unet(use_scale_shift_norm).to(device)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model.to(memory_format=fmt)
    x = torch.randn(2, 3, 8, 8, device=device).contiguous(memory_format=fmt)
    t = torch.tensor([0, 3], device=device)
    calls = []
    from iddpm_fast.ops import _cpp as cpp_ops  # the convolutions call the C++ op's wrapper directly

    real = cpp_ops.bias_add
    monkeypatch.setattr(cpp_ops, "bias_add", lambda *a: calls.append(a[2] is not None) or real(*a))
    results = {}
    for policy in ("stock", "fused"):
        monkeypatch.setenv("IDDPM_FAST_CONV_BIAS", policy)
        model.zero_grad()
        out = model(x, t)
        out.square().mean().backward()
        results[policy] = [out.detach()] + [p.grad.clone() for p in model.parameters()]
    from iddpm_fast.unet import AttentionBlock, ResBlock

    def count(kinds):
        return sum(isinstance(m, kinds) for m in model.modules())

    # Channels-last images attend on the tokens-last route (linear layers, no
    # Conv1d calls) on CPUs and CUDA; the NCHW route runs the attention's two 1x1 convs.
    attention = 0 if layout == "channels_last" else count(AttentionBlock)
    skipped = 2 * count(AttentionBlock) - 2 * attention
    assert len(calls) == count((torch.nn.Conv1d, torch.nn.Conv2d)) - skipped
    assert sum(calls) == count(ResBlock) + attention  # with a residual: ResBlocks' last convs (+ attention proj_out)
    assert device != "cuda" or torch.equal(results["fused"][0], results["stock"][0])
    # Weight gradients: cuDNN may pick nondeterministic algorithms.
    for a, e in zip(results["fused"], results["stock"]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_unet_bf16_autocast_with_fused_convolution_biases(device, monkeypatch):
    model = _unet(True).to(device).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([0, 3], device=device)
    out = {}
    for policy in ("stock", "fused"):
        monkeypatch.setenv("IDDPM_FAST_CONV_BIAS", policy)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            out[policy] = model(x, t)
    assert out["fused"].dtype == out["stock"].dtype
    if device == "cuda":
        assert torch.equal(out["fused"], out["stock"])
    else:  # oneDNN adds the bias in float32 before rounding to bf16; bias_add after
        torch.testing.assert_close(out["fused"].float(), out["stock"].float(), rtol=0.05, atol=0.05)


def test_conv_modules_keep_the_stock_interface():
    """conv_nd builds nn.ConvNd subclasses: same parameters, state-dict keys
    and outputs as torch's (the original's) classes."""
    from iddpm_fast.nn import conv_nd

    for dims, cls in ((1, torch.nn.Conv1d), (2, torch.nn.Conv2d), (3, torch.nn.Conv3d)):
        conv = conv_nd(dims, 4, 6, 3, padding=1)
        stock = cls(4, 6, 3, padding=1)
        stock.load_state_dict(conv.state_dict(), strict=True)
        assert isinstance(conv, cls) and list(conv.state_dict()) == list(stock.state_dict())
        x = torch.randn((2, 4) + (5,) * dims)
        assert torch.equal(conv(x), stock(x))
        r = torch.randn((2, 6) + (5,) * dims)
        assert torch.equal(conv(x, residual=r), r + stock(x))
        assert torch.equal(conv(input=x), stock(input=x))  # nn.ConvNd's argument name
    nobias = conv_nd(2, 4, 6, 1, bias=False)
    assert torch.equal(nobias(torch.ones(1, 4, 2, 2)), F.conv2d(torch.ones(1, 4, 2, 2), nobias.weight))
