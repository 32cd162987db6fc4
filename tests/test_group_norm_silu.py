"""
The C++ extension's fused GroupNorm-SiLU ops (csrc/) against their twins in
iddpm_fast/reference.py: forward and every gradient, fp32/bf16/fp16 with
tolerances tied to the error PyTorch itself makes in that dtype, fp64
gradcheck, both memory layouts, strided input, opcheck, torch.compile, input
errors, and the package's fallback when the extension cannot be built.
"""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _gn import inputs as _inputs
from _gn import reference as _reference
from _gn import run as _run
from _tensors import offset_copy

from iddpm_fast import _ext, ops
from iddpm_fast import reference as ref
from iddpm_fast.ops import _cpp

REASON = _ext.load()
needs_ext = pytest.mark.skipif(REASON is not None, reason=f"C++ extension unavailable: {REASON}")

SHAPES = {
    "minimal": ((1, 2, 1, 1), 1),
    "group == channel": ((2, 8, 3, 3), 8),
    "single group": ((2, 6, 4, 5), 1),
    "odd HxW": ((2, 64, 7, 9), 32),
    "batch 1": ((1, 32, 8, 8), 32),
    "1-D attention input": ((2, 96, 10), 32),
    "1x1 map": ((3, 64, 1, 1), 32),  # the CPU op runs it as channels-last
    "UNet 16x16": ((2, 128, 16, 16), 32),
    "channels not a multiple of the vector width": ((3, 12, 5, 5), 4),
    "HxW over one CUDA slice": ((1, 4, 48, 48), 2),  # 2304 positions: several slices per channel
    # CUDA channels-last: several blocks along the channels, some threads idle.
    "wide channels, odd HxW": ((2, 320, 5, 7), 32),
    # CUDA NCHW: one warp per row, several (and partial) steps per lane.
    "576-position rows": ((1, 32, 24, 24), 8),
    # CPU NCHW: rows of exactly one AVX-512 vector, taken two channels at a
    # time; the backward's row sums reduced 8 channels at a time (16 = 8 + 8,
    # 5 = one pair, one single, a part-filled reduction).
    "4x4 map, 16 channels per group": ((2, 64, 4, 4), 4),
    "4x4 map, 5 channels per group": ((2, 40, 4, 4), 8),
    # CPU channels-last: several 128-position windows of 16-position tiles,
    # the last ones partial, with channels past the last full vector.
    "1-D, 129 positions, tail channels": ((2, 65, 129), 5),
    "1-D, 257 positions, 17 channels": ((2, 17, 257), 17),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The CUDA kernels are tested wherever a GPU and a CUDA build exist.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and REASON is None and _ext.has_cuda_kernels() else [])


def _fused(scale_shift):
    if scale_shift is None:
        return _cpp.group_norm
    return _cpp.group_norm_scale_shift_silu if scale_shift else _cpp.group_norm_silu


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@needs_ext
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("scale_shift", [False, True, None], ids=["plain", "scale_shift", "no_silu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_gradients_match_reference(name, dtype, scale_shift, layout, device):
    shape, groups = SHAPES[name]
    x, w, b, sc, sh, gy = _inputs(shape, dtype, scale_shift, layout, device=device)
    truth = _run(_reference(scale_shift), x.double(), w, b, sc, sh, gy, groups, torch.float64)
    torch_err = _run(_reference(scale_shift), x, w, b, sc, sh, gy, groups, torch.float32)
    fused = _run(_fused(scale_shift), x, w, b, sc, sh, gy, groups, torch.float32)
    names = ["y", "dx", "dweight", "dbias", "dscale", "dshift"]
    eps = torch.finfo(dtype).eps
    for what, t, p, f in zip(names, truth, torch_err, fused):
        assert f.dtype == p.dtype and f.shape == p.shape, what
        # Inputs are O(1), so terms of O(1) can cancel into a small result
        # (dx of a 2-element group): measure ulps against at least 1.
        scale = max(t.abs().max().item(), 1.0)
        # At most twice PyTorch's own error in this dtype, plus a few ulps
        # (PyTorch is sometimes exact by luck).
        allowed = 2 * _max_err(p, t) + 8 * eps * scale
        assert _max_err(f, t) <= allowed, f"{what}: fused error {_max_err(f, t):.3g} > allowed {allowed:.3g}"
    if layout == "channels_last" and x.dim() == 4:
        assert fused[0].is_contiguous(memory_format=torch.channels_last)
        assert fused[1].is_contiguous(memory_format=torch.channels_last)


@needs_ext
@pytest.mark.parametrize("scale_shift", [False, True, None], ids=["plain", "scale_shift", "no_silu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,groups", [((2, 4, 3, 2), 2), ((1, 6, 5), 3)], ids=["4-D", "1-D attention input"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(scale_shift, layout, shape, groups, device):
    x, w, b, sc, sh, _ = _inputs(shape, torch.float64, scale_shift, layout, device=device)
    args = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()]
    if scale_shift:
        args += [sc.requires_grad_(), sh.requires_grad_()]
    fn = _fused(scale_shift)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, groups), args, eps=1e-6, atol=1e-6, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_inputs_off_16_byte_alignment(dtype, layout, device):
    # The CUDA kernels load 16 bytes at a time only from aligned tensors; a
    # view one element into its storage must take the other path and give the
    # same forward and backward as aligned copies of the same values.
    x, w, b, sc, sh, gy = _inputs((2, 16, 4, 4), dtype, True, layout, device=device)
    w, b, sc, sh, gy = w.float(), b.float(), sc.float(), sh.float(), gy.to(dtype)
    if layout == "channels_last":
        gy = gy.contiguous(memory_format=torch.channels_last)
    xo, gyo = offset_copy(x), offset_copy(gy)
    assert xo.data_ptr() % 16 and gyo.data_ptr() % 16 and torch.equal(xo, x)
    fwd, bwd = torch.ops.iddpm_fast.gn_silu_forward, torch.ops.iddpm_fast.gn_silu_backward
    y, mean, rstd = fwd(x, w, b, sc, sh, 4, 1e-5)
    yo, meano, rstdo = fwd(xo, w, b, sc, sh, 4, 1e-5)
    # Two kernel paths sum in different orders: a few ulps apart (an H200
    # measured 7.5e-7 in y at float32).
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(yo, y, rtol=16 * eps, atol=16 * eps)
    torch.testing.assert_close(meano, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstdo, rstd, rtol=1e-6, atol=1e-6)
    grads = bwd(gy, x, w, b, sc, sh, mean, rstd, 4)
    grads_o = bwd(gyo, xo, w, b, sc, sh, mean, rstd, 4)
    for name, g, go in zip(["dx", "dweight", "dbias", "dscale", "dshift"], grads, grads_o):
        torch.testing.assert_close(go, g, rtol=8 * eps, atol=8 * eps * max(g.abs().max().item(), 1.0), msg=name)


@needs_ext
@pytest.mark.skipif("cuda" not in DEVICES, reason="the CUDA kernels need a GPU and a CUDA build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 64, 8, 8), (2, 320, 6, 6), (1, 8, 48, 48)], ids=["8x8", "wide", "48x48"])
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "no_silu"])
def test_cuda_vectorised_and_per_element_kernels_agree(shape, layout, dtype, silu, monkeypatch):
    # IDDPM_FAST_GN_CUDA_VEC=0 forces the per-element kernels (read per call):
    # both kernel sets give the same forward and backward within rounding.
    x, w, b, sc, sh, gy = _inputs(shape, dtype, True, layout, device="cuda")
    w, b, sc, sh, gy = w.float(), b.float(), sc.float(), sh.float(), gy.to(dtype)
    if layout == "channels_last":
        gy = gy.contiguous(memory_format=torch.channels_last)
    groups = 4 if shape[1] == 8 else 32
    fwd, bwd = torch.ops.iddpm_fast.gn_silu_forward, torch.ops.iddpm_fast.gn_silu_backward
    results = {}
    for vec in ("1", "0"):
        monkeypatch.setenv("IDDPM_FAST_GN_CUDA_VEC", vec)
        y, mean, rstd = fwd(x, w, b, sc, sh, groups, 1e-5, silu)
        results[vec] = (y, mean, rstd, *bwd(gy, x, w, b, sc, sh, mean, rstd, groups, silu))
    names = ["y", "mean", "rstd", "dx", "dweight", "dbias", "dscale", "dshift"]
    for name, a, c in zip(names, results["1"], results["0"]):
        scale = max(c.abs().max().item(), 1.0)
        # Statistics and elementwise outputs: a few ulps of their dtype (1e-5 in
        # float32: the two kernel sets merge the statistics in other orders).
        # Sums over a channel (float32, other orders): cancellation allows more.
        eps = torch.finfo(a.dtype).eps
        tol = max(16 * eps, 1e-5) if name in ("y", "mean", "rstd", "dx") else max(16 * eps, 1e-4)
        torch.testing.assert_close(a, c, rtol=tol, atol=tol * scale, msg=name)


# The CUDA kernel sets by their switches (read per call): the default (one-pass
# where it applies), the split vectorised kernels, the per-element ones.
CUDA_KERNEL_SETS = {
    "default": {},
    "split": {"IDDPM_FAST_GN_CUDA_ONEPASS": "0"},
    "per-element": {"IDDPM_FAST_GN_CUDA_VEC": "0"},
}


@needs_ext
@pytest.mark.parametrize("kernels", ["cpu"] + [f"cuda-{k}" for k in CUDA_KERNEL_SETS if "cuda" in DEVICES])
@pytest.mark.parametrize("scale_shift", [False, True], ids=["plain", "scale_shift"])
# (32 x 8 groups: enough blocks for the CUDA one-pass kernels on an H100's 132 multiprocessors)
@pytest.mark.parametrize("shape", [(32, 64, 4, 4), (13, 40, 7, 9)], ids=["4x4", "7x9, 5 channels per group"])
def test_parameter_gradients_come_out_in_their_dtype_rounded_once(shape, scale_shift, kernels, monkeypatch):
    """d weight and d bias, summed in float64: the kernels write them in the
    parameters' dtype where that is float32 (or float64), else the op casts
    its float64 sums. Each way they equal the float64 sums rounded once to
    that dtype, which the same op computes with float64 parameters (the same
    values: float32 data runs its math in float32 either way)."""
    device = "cpu" if kernels == "cpu" else "cuda"
    for name, value in CUDA_KERNEL_SETS.get(kernels.removeprefix("cuda-"), {}).items():
        monkeypatch.setenv(name, value)
    x, w, b, sc, sh, gy = _inputs(shape, torch.float32, True, "contiguous", device=device)
    w, b = w.float(), b.float()
    sc, sh = (sc.float(), sh.float()) if scale_shift else (None, None)
    groups = 8
    fwd, bwd = torch.ops.iddpm_fast.gn_silu_forward, torch.ops.iddpm_fast.gn_silu_backward

    def param_grads(wt, bt):
        y, mean, rstd = fwd(x, wt, bt, sc, sh, groups, 1e-5)
        return bwd(gy.float(), x, wt, bt, sc, sh, mean, rstd, groups, True)[1:3]

    exact = param_grads(w.double(), b.double())  # float64 buffers, no rounding
    assert all(g.dtype == torch.float64 for g in exact)
    for wdt, bdt in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]:
        # Parameters that their dtype represents exactly, so that the math is the same.
        wt, bt = w.to(wdt), b.to(bdt)
        got = param_grads(wt.double().to(wdt), bt.double().to(bdt))
        want_w = param_grads(wt.double(), bt.double())
        for g, e, dt in zip(got, want_w, (wdt, bdt)):
            assert g.dtype == dt
            assert torch.equal(g, e.to(dt)), (wdt, bdt)
    got32 = param_grads(w, b)
    for g, e in zip(got32, exact):
        assert torch.equal(g, e.float())


@needs_ext
def test_no_affine_and_edge_values():
    # weight/bias None (GroupNorm(affine=False)); a constant group (variance
    # 0: rstd = 1/sqrt(eps)); very large |z| where the sigmoid saturates.
    x = torch.full((2, 4, 3, 3), 5.0)
    x[1] = torch.linspace(-200, 200, 36).reshape(4, 3, 3)
    y = _cpp.group_norm_silu(x, None, None, 2)
    truth = ref.group_norm_silu(x.double(), None, None, 2).float()
    torch.testing.assert_close(y, truth, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(y).all()
    w = torch.full((4,), 300.0)  # z = +-600: exp overflows without the cap
    x.requires_grad_(True)
    y = _cpp.group_norm_silu(x, w, None, 2)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    truth = ref.group_norm_silu(x.detach().double(), w.double(), None, 2).float()
    torch.testing.assert_close(y, truth, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_float64_input_with_float32_parameters(backend):
    # GroupNorm32 of the original with float32 parameters on float64 data:
    # the math runs in float64 with the parameters cast (the reference raised
    # "mixed dtype" in F.group_norm).
    if backend == "cpp" and REASON is not None:
        pytest.skip(f"C++ extension unavailable: {REASON}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, 3, generator=g, dtype=torch.float64)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    sc, sh = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    with ops.use_backend(backend):
        got = [ops.group_norm(x, w, b, 4), ops.group_norm_silu(x, w, b, 4),
               ops.group_norm_scale_shift_silu(x, w, b, sc, sh, 4)]
    want = [ref.group_norm(x, w.double(), b.double(), 4), ref.group_norm_silu(x, w.double(), b.double(), 4),
            ref.group_norm_scale_shift_silu(x, w.double(), b.double(), sc.double(), sh.double(), 4)]
    for y, truth in zip(got, want):
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, truth)


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("L", [4, 32])  # a partial vector only, and full vector rows
def test_inf_in_x_gives_nan_like_pytorch(layout, L):
    # inf - inf in the variance is NaN; a clamp at 0 must not turn it into a
    # finite rstd (the output was then +-inf, and NaN checks downstream missed it).
    x = torch.randn(2, 4, 2, L)
    x[0, 1, 1, 2] = float("inf")
    x[1, 2, 0, 1] = float("-inf")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(4), torch.zeros(4)
    for fused, stock in ((_cpp.group_norm(x, w, b, 2), F.group_norm(x, 2, w, b)),
                         (_cpp.group_norm_silu(x, w, b, 2), F.silu(F.group_norm(x, 2, w, b)))):
        assert torch.equal(fused.isnan(), stock.isnan())
        assert fused.isnan().any()


@needs_ext
def test_silu_of_huge_pre_activations_saturates_like_pytorch():
    # Below z = -80 the capped exp left sigmoid at e^-80, so z * sigmoid(z)
    # grew with |z| (-180 at z = -1e37). Rows of 17 end in a zero-padded
    # partial vector, whose padding lanes (NaN for an infinite bias) must
    # not reach the sums.
    x = torch.randn(2, 4, 17)
    w = torch.ones(4)
    for value in (-1e37, -1e30, -100.0, -85.0, -79.0, 1e37, float("-inf")):
        b = torch.full((4,), value, requires_grad=True)
        y = _cpp.group_norm_silu(x, w, b, 2)
        (gb,) = torch.autograd.grad(y.sum(), b)
        b_ref = b.detach().clone().requires_grad_(True)
        y_ref = F.silu(F.group_norm(x, 2, w, b_ref))
        (gb_ref,) = torch.autograd.grad(y_ref.sum(), b_ref)
        torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=1e-6, atol=1e-30, msg=str(value))
        torch.testing.assert_close(gb, gb_ref, equal_nan=True, rtol=1e-5, atol=1e-30, msg=str(value))


@needs_ext
@pytest.mark.parametrize("L", [3, 19])  # a partial vector only; full vectors and a partial one
def test_padding_lanes_of_a_partial_vector_stay_out_of_the_sums(L):
    # A mean of 1e6 and a weight of 1e33: in the zero padding of a row's last
    # partial vector z = (0 - 1e6) * 1e33 * rstd is -inf and dz = 0 * 0 * -inf
    # is NaN, while every real lane is finite. The padding must not reach the
    # channel sums (d weight, d bias, and through them d x).
    g = torch.Generator().manual_seed(0)
    x = 1e6 + torch.randn(2, 4, L, generator=g)
    w, b = torch.full((4,), 1e33), torch.zeros(4)
    gy = torch.randn(x.shape, generator=g)
    y, mean, rstd = torch.ops.iddpm_fast.gn_silu_forward(x, w, b, None, None, 2, 1e-5)
    dx, dw, db, _, _ = torch.ops.iddpm_fast.gn_silu_backward(gy, x, w, b, None, None, mean, rstd, 2)
    for name, t in (("y", y), ("dx", dx), ("dweight", dw), ("dbias", db)):
        assert t.isfinite().all(), name


@needs_ext
def test_empty_batch():
    x = torch.empty(0, 8, 4, 4)
    assert _cpp.group_norm_silu(x, torch.ones(8), torch.zeros(8), 4).shape == x.shape


@needs_ext
@pytest.mark.parametrize("scale_shift", [False, True, None], ids=["plain", "scale_shift", "no_silu"])
def test_opcheck(scale_shift):
    x, w, b, sc, sh, gy = _inputs((2, 8, 3, 3), torch.float32, scale_shift, "contiguous")
    params = [w.float(), b.float()] + ([sc.float(), sh.float()] if scale_shift else [None, None])
    silu = scale_shift is not None
    args = (x.requires_grad_(), *[p.requires_grad_() if p is not None else None for p in params], 4, 1e-5, silu)
    torch.library.opcheck(torch.ops.iddpm_fast.gn_silu_forward.default, args)
    plain = [a.detach() if torch.is_tensor(a) else a for a in args]
    _y, mean, rstd = torch.ops.iddpm_fast.gn_silu_forward(*plain)
    bargs = (gy.float(), *plain[:5], mean, rstd, 4, silu)
    torch.library.opcheck(torch.ops.iddpm_fast.gn_silu_backward.default, bargs)
    # Neither contiguous nor channels-last: computed on a contiguous copy, as the fake kernel says.
    strided = torch.randn(2, 8, 3, 6)[..., ::2]
    torch.library.opcheck(torch.ops.iddpm_fast.gn_silu_forward.default, (strided, *plain[1:5], 4, 1e-5, silu))


@needs_ext
@pytest.mark.parametrize("scale_shift", [False, True, None], ids=["plain", "scale_shift", "no_silu"])
def test_torch_compile_fullgraph(scale_shift):
    x, w, b, sc, sh, gy = _inputs((2, 8, 5, 5), torch.float32, scale_shift, "channels_last")
    fn = _fused(scale_shift)

    def block(x, w, b, sc, sh):
        h = fn(x, w, b, sc, sh, 4) if scale_shift else fn(x, w, b, 4)
        return (h * 2).sum()

    w, b = w.float(), b.float()
    sc = sc.float() if scale_shift else None
    sh = sh.float() if scale_shift else None
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    xe = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    eager_out, compiled_out = block(xe, w, b, sc, sh), compiled(xc, w, b, sc, sh)
    torch.testing.assert_close(compiled_out, eager_out)
    (ge,) = torch.autograd.grad(eager_out, xe)
    (gc,) = torch.autograd.grad(compiled_out, xc)
    torch.testing.assert_close(gc, ge)


@needs_ext
def test_clear_errors_from_the_cpp_op():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(RuntimeError, match="6 channels cannot be split into 4 groups"):
        torch.ops.iddpm_fast.gn_silu_forward(x, None, None, None, None, 4, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[6\]"):
        torch.ops.iddpm_fast.gn_silu_forward(x, torch.ones(5), None, None, None, 3, 1e-5)
    with pytest.raises(RuntimeError, match="scale and shift must be given together"):
        torch.ops.iddpm_fast.gn_silu_forward(x, None, None, torch.zeros(2, 6), None, 3, 1e-5)
    with pytest.raises(RuntimeError, match="must be float32, float64, float16 or bfloat16"):
        torch.ops.iddpm_fast.gn_silu_forward(x.int(), None, None, None, None, 3, 1e-5)
    with pytest.raises(RuntimeError, match=r"saved statistics must have shape \[2, 3\]"):
        torch.ops.iddpm_fast.gn_silu_backward(x, x, None, None, None, None, torch.zeros(2, 2), torch.zeros(2, 2), 3)


def test_seam_rejects_bad_shapes_before_any_kernel():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="6 channels cannot be split into 4 groups"):
        ops.group_norm_silu(x, None, None, 4)
    with pytest.raises(ValueError, match=r"scale must have shape \[N x C\]"):
        ops.group_norm_scale_shift_silu(x, None, None, torch.zeros(6), torch.zeros(2, 6), 3)


@needs_ext
def test_seam_picks_cpp_on_cpu_and_reference_when_asked():
    assert ops.resolve_name("group_norm_silu", torch.device("cpu")) == "cpp"
    with ops.use_backend("reference"):
        assert ops.resolve_name("group_norm_silu", torch.device("cpu")) == "reference"


def test_extension_builds_where_a_compiler_and_ninja_exist():
    """The JIT build must work on a machine with the tools (CI is one); a
    broken source or build script fails here instead of silently falling back."""
    if os.environ.get("IDDPM_FAST_NO_EXT") == "1":
        pytest.skip("extension disabled by IDDPM_FAST_NO_EXT=1")
    if not (shutil.which("c++") or shutil.which("g++")) or not shutil.which("ninja"):
        pytest.skip("no C++ compiler or ninja here")
    if _ext._cpu_reason() is not None:
        pytest.skip(_ext._cpu_reason())
    assert REASON is None, REASON


def _python_prints_ok(code, drop=(), **env_vars):
    """Run `code` in a fresh interpreter (this checkout importable, env_vars
    set, the variables in `drop` unset) and require it to print ok."""
    env = dict(os.environ, PYTHONPATH=os.getcwd(), **env_vars)
    for name in drop:
        env.pop(name, None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.build
def test_cmake_build_and_ctest(tmp_path):
    """CMakeLists.txt builds csrc/ and the C++ test (tests/cpp/test_*.cpp),
    and ctest passes: the build setup.py does not exercise. (Its test glob
    had taken in tests/cpp/gn_onepass_emulation.cpp, a Python extension,
    and the CMake build stopped at Python.h.)"""
    from torch.utils import cpp_extension

    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("ctest") is None or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no cmake/ctest or C++ compiler here")
    if _ext._cpu_reason() is not None:
        pytest.skip(_ext._cpu_reason())
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is None:
        pytest.skip("a CUDA build of torch without a CUDA toolkit: its CMake config cannot be used")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build = str(tmp_path / "build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        [cmake, "-S", root, "-B", build, *generator, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
         "-DCMAKE_BUILD_TYPE=Release"],
        [cmake, "--build", build, "-j", "2"],
        ["ctest", "--test-dir", build, "--output-on-failure"],
    ]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"{' '.join(cmd[:3])} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "100% tests passed" in res.stdout


@pytest.mark.build
def test_first_use_build_prints_one_line_and_loads(tmp_path):
    """`pip install .` (build isolation: no extension in the wheel) compiles
    it on first use with ninja into a cache folder, saying so in one line on
    stderr, once; a second process finds it built and says nothing."""
    if os.environ.get("IDDPM_FAST_NO_EXT") == "1":
        pytest.skip("extension disabled by IDDPM_FAST_NO_EXT=1")
    if not (shutil.which("c++") or shutil.which("g++")) or not shutil.which("ninja") or _ext._cpu_reason():
        pytest.skip("no C++ compiler or ninja here, or a CPU the kernels are not compiled for")
    code = r"""
import torch
from iddpm_fast import _ext, ops, reference as ref
_ext._try_prebuilt = lambda: "no prebuilt iddpm_fast._C"
assert _ext.load() is None and _ext.load() is None
assert _ext.how_loaded() == "jit"
x, w, b = torch.randn(2, 8, 3, 3), torch.randn(8), torch.randn(8)
assert ops.resolve_name("group_norm_silu", x.device) == "cpp"
torch.testing.assert_close(ops.group_norm_silu(x, w, b, 4), ref.group_norm_silu(x, w, b, 4))
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, IDDPM_FAST_EXT_DIR=str(tmp_path / "ext"))
    env.pop("IDDPM_FAST_NO_EXT", None)
    env.pop("IDDPM_FAST_BACKEND", None)
    lines = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1500)
        assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
        lines.append([line for line in res.stderr.splitlines() if "compiling the C++ extension" in line])
    assert len(lines[0]) == 1 and str(tmp_path / "ext") in lines[0][0], lines
    assert lines[1] == [], lines


@pytest.mark.build
def test_setup_py_builds_the_extension_ahead_of_time(tmp_path):
    """`pip install --no-build-isolation .`: with torch importable, setup.py
    compiles csrc/ into iddpm_fast._C, and that library loads and registers
    the ops. (CI installs with build isolation, which takes the first-use
    build instead: only this test runs the ahead-of-time path there.)"""
    import glob

    if _ext._cpu_reason() is not None or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no compiler, or a CPU the kernels are not compiled for")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "IDDPM_FAST_NO_EXT"}
    res = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "-b", str(tmp_path / "lib"), "-t", str(tmp_path / "tmp")],
        cwd=root, env=env, capture_output=True, text=True, timeout=1500,
    )
    libs = glob.glob(str(tmp_path / "lib" / "iddpm_fast" / "_C*.so"))
    assert res.returncode == 0 and len(libs) == 1, res.stdout[-3000:] + res.stderr[-3000:]
    code = f"""
import torch
torch.ops.load_library({libs[0]!r})
x = torch.randn(2, 8, 3, 3)
y, mean, rstd = torch.ops.iddpm_fast.gn_silu_forward(x, None, None, None, None, 4, 1e-5, True)
want = torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4))
assert torch.ops.iddpm_fast.cpu_kernel_isa() in ("avx2", "avx512")
assert (y - want).abs().max() < 1e-5
print("ok")
"""
    _python_prints_ok(code)


def test_a_cpu_without_avx2_gets_the_reference_and_the_reason(monkeypatch):
    """The CPU kernels are compiled with AVX2/FMA/F16C: on a CPU without them
    (simulated: /proc/cpuinfo without those flags) the extension is not
    loaded, and the ops warn with that reason and run the reference."""
    import io

    monkeypatch.setattr(_ext.platform, "machine", lambda: "x86_64")
    cpuinfo = "processor\t: 0\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx\n"
    monkeypatch.setattr(_ext, "open", lambda *a, **k: io.StringIO(cpuinfo), raising=False)
    assert _ext._cpu_reason() == "this CPU lacks avx2/fma/f16c, which the extension's CPU kernels are compiled for"
    monkeypatch.delenv("IDDPM_FAST_NO_EXT", raising=False)
    monkeypatch.delenv("IDDPM_FAST_BACKEND", raising=False)
    monkeypatch.setitem(_ext._state, "done", False)
    monkeypatch.setitem(_ext._state, "reason", None)
    monkeypatch.setattr(ops._backend, "_warned", set())
    assert _ext.load().startswith("this CPU lacks avx2")
    x, w, b = torch.randn(2, 8, 3, 3), torch.randn(8), torch.randn(8)
    with pytest.warns(RuntimeWarning, match="group_norm_silu falls back from cpp on cpu: this CPU lacks avx2"):
        y = ops.group_norm_silu(x, w, b, 4)
    assert torch.equal(y, ref.group_norm_silu(x, w, b, 4))


def test_package_works_without_the_extension(tmp_path):
    """Simulate a machine where the extension cannot be had: the package
    imports, the ops warn once naming the reason and run the reference, and
    the UNet trains a step."""
    code = r"""
import warnings, torch
from iddpm_fast import ops, reference as ref
from iddpm_fast.script_util import create_model
x = torch.randn(2, 8, 4, 4)
w, b = torch.randn(8), torch.randn(8)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y1 = ops.group_norm_silu(x, w, b, 4)
    y2 = ops.group_norm_silu(x, w, b, 4)
msgs = [str(c.message) for c in caught if "falls back from cpp" in str(c.message)]
assert len(msgs) == 1, msgs
assert "IDDPM_FAST_NO_EXT" in msgs[0], msgs[0]
assert torch.equal(y1, ref.group_norm_silu(x, w, b, 4))
model = create_model(32, 32, 1, learn_sigma=False, class_cond=False, use_checkpoint=False,
                     attention_resolutions="16", num_heads=1, num_heads_upsample=-1,
                     use_scale_shift_norm=True, dropout=0.1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    out.square().mean().backward()
# The UNet's other C++ ops (the scale-shift norm, the plain norm, dropout) share
# the reason: no further warning.
assert not [str(c.message) for c in caught if "falls back" in str(c.message)], [str(c.message) for c in caught]
print("ok")
"""
    _python_prints_ok(code, IDDPM_FAST_NO_EXT="1")


@needs_ext
def test_avx2_build_of_the_kernels_also_matches_the_reference():
    """The CPU kernels are compiled twice (AVX-512 and AVX2) and chosen at run
    time; this CPU may pick AVX-512, so force the AVX2 build in a subprocess."""
    code = r"""
import torch
from iddpm_fast import _ext, reference as ref
from iddpm_fast.ops import _cpp
assert _ext.load() is None
assert torch.ops.iddpm_fast.cpu_kernel_isa() == "avx2"
g = torch.Generator().manual_seed(0)
# (2, 40, 2, 4): rows of exactly one AVX2 vector, 5 channels per group (the
# backward's row sums reduced 4 channels at a time: 4 + 1).
for shape, groups in [((2, 64, 7, 9), 32), ((3, 12, 5), 4), ((2, 40, 2, 4), 8)]:
    for cl in (False, True):
        x = (-2.3 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64))
        if cl:
            x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        w, b = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
        sc, sh = torch.randn(shape[0], shape[1], dtype=torch.float64), torch.randn(shape[0], shape[1], dtype=torch.float64)
        gy = torch.randn(shape, generator=g, dtype=torch.float64)
        for dt in (torch.float32, torch.bfloat16):
            args = [t.to(dt).requires_grad_() for t in (x, sc, sh)] + [t.float().requires_grad_() for t in (w, b)]
            xd, scd, shd, wd, bd = args
            y = _cpp.group_norm_scale_shift_silu(xd, wd, bd, scd, shd, groups)
            got = torch.autograd.grad(y.float(), args, gy.float())
            ref_args = [t.detach().double().requires_grad_() for t in args]
            xr, scr, shr, wr, br = ref_args
            yr = ref.group_norm_scale_shift_silu(xr, wr, br, scr, shr, groups)
            want = torch.autograd.grad(yr, ref_args, gy)
            tol = 2e-5 if dt == torch.float32 else 3e-2
            assert (y.double() - yr).abs().max() <= tol * max(1, yr.abs().max()), (shape, cl, dt)
            for name, a, b in zip(("x", "scale", "shift", "weight", "bias"), got, want):
                scale = max(1, b.abs().max())
                assert (a.double() - b).abs().max() <= tol * scale, (shape, cl, dt, name, (a.double() - b).abs().max())
print("ok")
"""
    _python_prints_ok(code, IDDPM_FAST_CPU_CAPABILITY="avx2")


@needs_ext
def test_extreme_values_on_the_avx2_build():
    """The saturation and padding tests above, again with the AVX2 kernels (a
    fresh pytest process: the build is chosen per process). On AVX2 a one-step
    reciprocal had left sigmoid(z) at 1 - 6e-8 for large z, and the gradient
    off by 6e-8 * z (33.9 instead of 32 at z = 1e6)."""
    if torch.ops.iddpm_fast.cpu_kernel_isa() == "avx2" and os.environ.get("IDDPM_FAST_CPU_CAPABILITY") == "avx2":
        pytest.skip("this process already runs the AVX2 build")
    env = dict(os.environ, PYTHONPATH=os.getcwd(), IDDPM_FAST_CPU_CAPABILITY="avx2")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "huge_pre_activations or padding_lanes"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0 and "3 passed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]


@needs_ext
def test_avx512_object_shares_no_weak_functions():
    """The AVX-512 translation unit must not define weak (shared inline)
    functions: the linker could pick its AVX-512 copy for code that also runs
    on CPUs without AVX-512."""
    obj = os.path.join(_ext._cache_dir(_ext._want_cuda()), "gn_silu_avx512.o")
    if _ext.how_loaded() != "jit" or not os.path.exists(obj) or not shutil.which("nm"):
        pytest.skip("no just-in-time build object (or nm) to inspect")
    out = subprocess.run(["nm", "--defined-only", "-C", obj], capture_output=True, text=True, check=True).stdout
    weak = [line for line in out.splitlines() if line.split()[1:2] and line.split()[1] in ("W", "w")]
    assert not weak, weak[:10]


def test_info_command_reports_the_extension_and_backends(capsys):
    from iddpm_fast import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "C++ extension:" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("group_norm_silu "))
    assert ("cpu: cpp" in line) == (REASON is None), line


def test_unwritable_build_directory_is_a_reason_not_a_crash(tmp_path):
    """Where the first-use build cannot write its cache, the package says why
    and runs the reference (simulated in a subprocess: no prebuilt library,
    an impossible cache path)."""
    code = r"""
import warnings, torch
from iddpm_fast import _ext, ops
_ext._try_prebuilt = lambda: "no prebuilt iddpm_fast._C"
reason = _ext.load()
assert reason is not None and "cannot be created" in reason, reason
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = ops.group_norm_silu(torch.randn(2, 4, 3, 3), None, None, 2)
assert any("cannot be created" in str(c.message) for c in caught)
print("ok")
"""
    if not shutil.which("ninja") or _ext._cpu_reason() is not None:
        pytest.skip("the build would stop earlier here (no ninja, or a CPU without AVX2)")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    _python_prints_ok(code, drop=("IDDPM_FAST_NO_EXT",), IDDPM_FAST_EXT_DIR=str(blocker / "sub"))


def _one_pass_applies(shape, groups, layout, dtype, backward, sms=0):
    """Whether the one-pass CUDA kernels (csrc/cuda/gn_onepass.h: plan,
    backward_plan) take this shape, the rules written out again, with sms
    multiprocessors (one block each at least); assumes 16-byte aligned tensors."""
    d, length = shape[1] // groups, math.prod(shape[2:])
    w = vec = 16 // torch.empty((), dtype=dtype).element_size()
    elements, blocks = d * length, shape[0] * groups  # a block's elements; blocks
    if (layout == "channels_last" and not backward and d < vec and vec % d == 0 and groups % (vec // d) == 0
            and blocks // (vec // d) >= sms):  # else one group per block, if that fills the GPU
        elements = vec * length  # a slab of vec / d groups, one 16-byte pack a position
        blocks //= vec // d
    elif layout == "channels_last":
        while w > 2 and d % w:
            w //= 2
        if d % w:
            return False
    elif length % w:
        return False
    packs_per_thread = -(-elements // w // 256)
    if d > 256 or packs_per_thread > (4 if backward else 8) or blocks < sms:
        return False
    if not backward:
        return True
    per = d // w if layout == "channels_last" else length // w
    pow2 = per & (per - 1) == 0
    return pow2 and per <= 32 if layout == "channels_last" else pow2 or per % 32 == 0


@needs_ext
@pytest.mark.skipif("cuda" not in DEVICES, reason="the CUDA kernels need a GPU and a CUDA build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
# At least one block per multiprocessor, as the one-pass kernels need, even where
# channels-last slabs put up to 8 groups in a block (40 x 32 / 8 = 160 blocks);
# the last shape has too few slabs (6 x 32 / 2 or 4 < 132) but enough groups.
@pytest.mark.parametrize(
    "shape, groups",
    [
        ((40, 128, 32, 32), 32),
        ((40, 64, 16, 16), 32),
        ((16, 512, 8, 8), 32),
        ((12, 96, 6, 10), 32),
        ((136, 256, 4, 4), 1),
        ((40, 32, 16, 16), 32),
        ((40, 32, 32, 64), 32),
        ((6, 64, 8, 8), 32),
    ],
    ids=["32x32 4 channels per group", "16x16 2 per group", "8x8 16 per group", "6x10 3 per group",
         "4x4 256 per group", "16x16 group == channel", "32x64 group == channel",
         "8x8 2 per group, too few slabs"],
)
@pytest.mark.parametrize("variant", ["silu", "scale_shift", "no_silu"])
def test_cuda_one_pass_kernels_agree_with_the_split_kernels(shape, groups, layout, dtype, variant, monkeypatch):
    """IDDPM_FAST_GN_CUDA_ONEPASS=1 (read per call) turns on the one-pass
    forward and backward (csrc/cuda/gn_onepass.h) where they apply; the
    profiler shows which ran, and their outputs equal the split kernels'
    within rounding."""
    x, w, b, sc, sh, gy = _inputs(shape, dtype, variant == "scale_shift", layout, device="cuda")
    w, b, gy = w.float(), b.float(), gy.to(dtype)
    if layout == "channels_last":
        gy = gy.contiguous(memory_format=torch.channels_last)
    sc, sh = (sc.float(), sh.float()) if sc is not None else (None, None)
    act = variant != "no_silu"
    fwd, bwd = torch.ops.iddpm_fast.gn_silu_forward, torch.ops.iddpm_fast.gn_silu_backward
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("IDDPM_FAST_GN_CUDA_ONEPASS", flag)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            y, mean, rstd = fwd(x, w, b, sc, sh, groups, 1e-5, act)
            torch.cuda.synchronize()
        ran_fwd = any("gn_onepass" in e.name for e in prof.events())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            grads = bwd(gy, x, w, b, sc, sh, mean, rstd, groups, act)
            torch.cuda.synchronize()
        ran_bwd = any("gn_onepass" in e.name for e in prof.events())
        results[flag] = (y, mean, rstd, *grads)
        on, sms = flag == "1", torch.cuda.get_device_properties(0).multi_processor_count
        assert ran_fwd == (on and _one_pass_applies(shape, groups, layout, dtype, False, sms)), (flag, ran_fwd)
        assert ran_bwd == (on and _one_pass_applies(shape, groups, layout, dtype, True, sms)), (flag, ran_bwd)
    names = ["y", "mean", "rstd", "dx", "dweight", "dbias", "dscale", "dshift"]
    for name, a, c in zip(names, results["1"], results["0"]):
        if c.numel() == 0:  # d scale / d shift without scale and shift
            assert a.numel() == 0, name
            continue
        eps = torch.finfo(a.dtype).eps
        # Sums over a channel (float32, other orders): cancellation allows more.
        tol = max(16 * eps, 1e-5) if name in ("y", "mean", "rstd", "dx") else max(16 * eps, 1e-4)
        torch.testing.assert_close(a, c, rtol=tol, atol=tol * max(c.abs().max().item(), 1.0), msg=name)


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
# CUDA: the per-element kernels; the vectorised ones (warp per row / channels-last);
# long rows (block per row slice / channels-last in several slices).
@pytest.mark.parametrize("hw", [(9, 7), (8, 8), (48, 48)], ids=["odd HxW", "8x8", "48x48"])
@pytest.mark.parametrize("device", DEVICES)
def test_statistics_stay_accurate_far_from_zero_mean(layout, hw, device):
    """Groups with |mean| / std = 3e4: a one-pass sum of squares about zero
    would lose every digit of the variance, and merging partial means near
    300 rounds each to float32's spacing there (3e-5, 0.3% of std: the CUDA
    channels-last kernel once merged 64 of them and was 2.8x PyTorch's
    error); the kernels stay within twice PyTorch's own float32 error."""
    g = torch.Generator().manual_seed(3)
    x = (300.0 + 0.01 * torch.randn(2, 8, *hw, generator=g)).float().to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, generator=g).to(device), torch.randn(8, generator=g).to(device)
    truth = ref.group_norm_silu(x.double(), w.double(), b.double(), 4)
    torch_err = (ref.group_norm_silu(x, w, b, 4).double() - truth).abs().max().item()
    err = (_cpp.group_norm_silu(x, w, b, 4).double() - truth).abs().max().item()
    assert err <= 2 * torch_err + 1e-5, (err, torch_err)


def test_cuda_policy_switch(monkeypatch):
    """On CUDA the fused op runs unless IDDPM_FAST_CUDA_GN=stock asks for
    F.group_norm + F.silu (an A/B switch); the rule and the stock path are
    device-independent, so they are checked here on CPU tensors."""
    from iddpm_fast.ops import _cuda_wants_stock, _stock_group_norm_silu

    monkeypatch.delenv("IDDPM_FAST_CUDA_GN", raising=False)
    assert not _cuda_wants_stock()
    for policy, stock in (("auto", False), ("fused", False), ("stock", True)):
        monkeypatch.setenv("IDDPM_FAST_CUDA_GN", policy)
        assert _cuda_wants_stock() is stock
    monkeypatch.setenv("IDDPM_FAST_CUDA_GN", "fastest")
    with pytest.raises(ValueError, match="auto, fused or stock"):
        _cuda_wants_stock()
    w, b = torch.randn(8), torch.randn(8)
    nchw = torch.randn(2, 8, 4, 4)
    got = _stock_group_norm_silu(nchw, w, b, 4, 1e-5)
    torch.testing.assert_close(got, ref.group_norm_silu(nchw, w, b, 4), rtol=1e-6, atol=1e-6)


def _params_case(weight, bias, scale_shift, wants):
    """Inputs for one combination of given parameters and of which inputs
    require grad (wants: names among x, weight, bias, scale, shift)."""
    x, w, b, sc, sh, _gy = _inputs((2, 8, 3, 3), torch.float64, scale_shift, "contiguous", seed=5)
    given = {"x": x, "weight": w if weight else None, "bias": b if bias else None, "scale": sc, "shift": sh}
    return {k: (v.requires_grad_() if v is not None and k in wants else v) for k, v in given.items()}


@needs_ext
@pytest.mark.parametrize("weight, bias, scale_shift", [(True, True, True), (False, False, True), (True, False, False),
                                                       (False, True, True), (False, False, False)],
                         ids=["all", "no affine + scale/shift", "weight only", "bias only + scale/shift", "x only"])
@pytest.mark.parametrize("wants", [("x",), ("weight", "bias"), ("x", "scale"), ("shift",), ("x", "bias", "shift")],
                         ids="+".join)
def test_gradients_for_every_combination_of_given_and_differentiated_inputs(weight, bias, scale_shift, wants):
    """The C++ autograd hands each gradient to the right input whichever
    optional parameters are absent and whichever inputs require grad (the
    reference substitutes ones/zeros for absent parameters)."""
    case = _params_case(weight, bias, scale_shift, wants)
    leaves = [v for k, v in case.items() if v is not None and v.requires_grad]
    if not leaves:
        pytest.skip("nothing requires grad in this combination")
    y = torch.ops.iddpm_fast.gn_silu_forward(case["x"], case["weight"], case["bias"], case["scale"], case["shift"],
                                             4, 1e-5)[0]
    got = torch.autograd.grad(y.square().sum(), leaves)
    w = case["weight"] if case["weight"] is not None else torch.ones(8, dtype=torch.float64)
    b = case["bias"] if case["bias"] is not None else torch.zeros(8, dtype=torch.float64)
    if scale_shift:
        want_y = ref.group_norm_scale_shift_silu(case["x"], w, b, case["scale"], case["shift"], 4)
    else:
        want_y = ref.group_norm_silu(case["x"], w, b, 4)
    want = torch.autograd.grad(want_y.square().sum(), leaves)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@needs_ext
def test_statistics_outputs_carry_no_gradient():
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    y, mean, rstd = torch.ops.iddpm_fast.gn_silu_forward(x, None, None, None, None, 4, 1e-5)
    assert y.requires_grad and not mean.requires_grad and not rstd.requires_grad


@needs_ext
@pytest.mark.parametrize("variant", ["group_norm", "group_norm_silu", "scale_shift"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_double_backward_equals_the_reference(variant, dtype):
    # A gradient penalty: d/d(params) of y.sum() + |d(y^2)/dx|^2. The backward
    # op has no derivative of its own; under create_graph the C++ autograd
    # differentiates the composite forward instead (it used to return plain
    # tensors, so the penalty's gradient was silently dropped).
    def run(backend):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 8, 3, 3, generator=g, dtype=dtype).requires_grad_()
        params = [torch.randn(8, generator=g, dtype=dtype).requires_grad_() for _ in range(2)]
        if variant == "scale_shift":
            params += [torch.randn(2, 8, generator=g, dtype=dtype).requires_grad_() for _ in range(2)]
        with ops.use_backend(backend):
            fn = {"group_norm": ops.group_norm, "group_norm_silu": ops.group_norm_silu,
                  "scale_shift": ops.group_norm_scale_shift_silu}[variant]
            y = fn(x, *params, 4)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        assert gx.requires_grad
        (y.sum() + gx.square().sum()).backward()
        return [x.grad] + [p.grad for p in params]

    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for got, want in zip(run("cpp"), run("reference")):
        torch.testing.assert_close(got, want, **tol)


@needs_ext
def test_compiled_autograd_runs_the_cpp_backwards():
    """torch._dynamo.compiled_autograd traces the C++ autograd Functions (it
    rejects ones that mark outputs non-differentiable)."""
    x = torch.randn(2, 8, 3, 3)
    w, b = torch.randn(8), torch.randn(8)
    results = []
    for compiled in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = torch.ops.iddpm_fast.gn_silu_forward(*leaves, None, None, 4, 1e-5)[0]
        loss = torch.ops.iddpm_fast.dropout_forward(y, 0.3, 1 / 0.7, torch.Generator().manual_seed(0))[0].square().sum()
        if compiled:
            with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
                loss.backward()
        else:
            loss.backward()
        results.append([t.grad for t in leaves])
    for a, e in zip(*results):
        torch.testing.assert_close(a, e)


@needs_ext
def test_a_library_without_the_cpp_autograd_counts_as_stale(monkeypatch):
    """A prebuilt library from before the autograd moved to C++ would run the
    ops without gradients; the loader must not accept it as registered."""
    real = torch._C._dispatch_has_kernel_for_dispatch_key
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda name, key: False if key == "Autograd" else real(name, key))
    assert not _ext._registered()
    monkeypatch.undo()
    assert _ext._registered()
