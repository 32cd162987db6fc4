"""
The one-pass CUDA GroupNorm-SiLU forward (csrc/cuda/gn_onepass.h: one block
per (sample, group), the group held in registers) run on the CPU through an
emulation of a CUDA thread block (tests/cpp/gn_onepass_emulation.cpp: the
kernel's own source, threads as OS threads). Holds the kernel's indexing,
reductions and folded coefficients to reference.py for every pack width and
packs-per-thread it is built for, both layouts, fp32/bf16/fp16, with and
without scale/shift and SiLU, on machines without a GPU. On a GPU the same
kernel is tested through the op (tests/test_group_norm_silu.py).
"""

import os
import shutil

import _gn as gn
import pytest
import torch

from iddpm_fast import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    if shutil.which("ninja") is None:
        pytest.skip("no ninja (torch.utils.cpp_extension builds with it)")
    from torch.utils.cpp_extension import load

    build = tmp_path_factory.mktemp("gn_onepass_emulation")
    return load(
        name="gn_onepass_emulation",
        sources=[os.path.join(ROOT, "tests", "cpp", "gn_onepass_emulation.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc", "cuda")],
        extra_cflags=["-O1", "-std=c++20"],
        build_directory=str(build),
        verbose=False,
    )


# name: (shape, groups, layout, dtype, expected (pack width, packs per thread, groups per block))
CASES = {
    # contiguous: a pack is 16 bytes of one channel's row
    "fp32 8x8, one pack per thread, threads idle": ((2, 64, 8, 8), 32, "contiguous", torch.float32, (4, 1, 1)),
    "fp32 24x24, 4 packs per thread, last partial": ((1, 8, 24, 24), 2, "contiguous", torch.float32, (4, 4, 1)),
    "fp32 32x32, 8 packs per thread, full": ((1, 8, 32, 32), 1, "contiguous", torch.float32, (4, 8, 1)),
    "fp32 HxW 3x4 (rows of 12)": ((2, 16, 3, 4), 4, "contiguous", torch.float32, (4, 1, 1)),
    "bf16 16x16, 2 packs per thread": ((2, 64, 16, 16), 4, "contiguous", torch.bfloat16, (8, 2, 1)),
    "fp16 1-D input, L = 40": ((3, 64, 40), 32, "contiguous", torch.float16, (8, 1, 1)),
    # channels-last: a pack is W consecutive channels of one position
    "fp32 channels-last, 4 channels per group": ((2, 128, 8, 8), 32, "channels_last", torch.float32, (4, 1, 1)),
    "fp32 channels-last, 6 channels per group": ((1, 12, 16, 16), 2, "channels_last", torch.float32, (2, 4, 1)),
    "fp32 channels-last, 2 channels per group, odd group count (no slab)": (
        (2, 6, 8, 8), 3, "channels_last", torch.float32, (2, 1, 1)),
    "bf16 channels-last, 8 channels per group": ((2, 256, 8, 8), 32, "channels_last", torch.bfloat16, (8, 1, 1)),
    "bf16 channels-last, 16 channels per group (2 packs per position)": (
        (2, 512, 4, 4), 32, "channels_last", torch.bfloat16, (8, 1, 1)),
    "fp32 channels-last, 8 packs per thread": ((1, 16, 32, 32), 2, "channels_last", torch.float32, (4, 8, 1)),
    "bf16 channels-last, 256 channels per group": ((2, 256, 4, 4), 1, "channels_last", torch.bfloat16, (8, 2, 1)),
    # channels-last slabs: groups under 16 bytes a position, several per block, one 16-byte pack per position
    "fp32 channels-last, 2 channels per group, slabs of 2": (
        (2, 64, 16, 16), 32, "channels_last", torch.float32, (4, 1, 2)),
    "fp32 channels-last, group == channel, slabs of 4": ((2, 8, 4, 4), 8, "channels_last", torch.float32, (4, 1, 4)),
    "fp32 channels-last, 2 positions, slabs of 2": ((3, 4, 1, 2), 2, "channels_last", torch.float32, (4, 1, 2)),
    "bf16 channels-last, 4 channels per group, 32x32, slabs of 2": (
        (1, 128, 32, 32), 32, "channels_last", torch.bfloat16, (8, 4, 2)),
    "bf16 channels-last, 2 channels per group, slabs of 4": (
        (1, 64, 16, 16), 32, "channels_last", torch.bfloat16, (8, 1, 4)),
    "bf16 channels-last, group == channel, slabs of 8": ((2, 16, 5, 5), 16, "channels_last", torch.bfloat16, (8, 1, 8)),
    "fp16 channels-last, 2 channels per group, odd HxW, slabs of 4": (
        (2, 8, 7, 9), 4, "channels_last", torch.float16, (8, 1, 4)),
    "bf16 channels-last, group == channel, 8 packs per thread, slabs of 8": (
        (1, 16, 32, 64), 16, "channels_last", torch.bfloat16, (8, 8, 8)),
    "fp32 channels-last, 1x1, slabs of 4": ((4, 8, 1, 1), 8, "channels_last", torch.float32, (4, 1, 4)),
}


# The tests' variants as test_group_norm_silu.py's scale_shift argument.
SCALE_SHIFT = {"silu": False, "scale_shift": True, "no_silu": None}


def _inputs(shape, dtype, layout, variant, **kw):
    """x, weight, bias, scale, shift as test_group_norm_silu.py draws them."""
    return gn.inputs(shape, dtype, SCALE_SHIFT[variant], layout, **kw)[:5]


def _reference(variant, x, w, b, sc, sh, groups):
    return gn.call(gn.reference(SCALE_SHIFT[variant]), x, w, b, sc, sh, groups)


def _group_stats(x, groups):
    xg = x.double().reshape(x.shape[0], groups, -1)
    return xg.mean(-1), (xg.var(-1, unbiased=False) + 1e-5).rsqrt()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("variant", ["silu", "scale_shift", "no_silu"])
def test_emulated_one_pass_forward_matches_reference(emu, name, variant):
    shape, groups, layout, dtype, want_plan = CASES[name]
    # The case exercises the pack width and packs per thread its name says.
    assert tuple(emu.plan(torch.empty(shape, dtype=dtype), groups, layout == "channels_last")) == want_plan
    x, w, b, sc, sh = _inputs(shape, dtype, layout, variant)
    act = variant != "no_silu"
    y, mean, rstd = emu.forward(x, w.float(), b.float(), sc, sh, groups, 1e-5, act, layout == "channels_last")
    assert y.dtype == dtype and y.stride() == x.stride()
    truth = _reference(variant, x.double(), w, b, sc, sh, groups)
    # PyTorch's own error in this dtype (the reference run in it), as the op's tests.
    torch_err = (_reference(variant, x, w.float(), b.float(), sc, sh, groups).double() - truth).abs().max().item()
    err = (y.double() - truth).abs().max().item()
    assert err <= 2 * torch_err + 1e-5, (err, torch_err)
    true_mean, true_rstd = _group_stats(x, groups)
    torch.testing.assert_close(mean.double(), true_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), true_rstd, rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_emulated_statistics_far_from_zero_mean(emu, layout):
    """|mean| / std = 3e4: the shifted sums keep the deviations' digits."""
    x, w, b, _, _ = _inputs((2, 8, 16, 16), torch.float32, layout, "silu", seed=3, offset=300.0, spread=0.01)
    y, mean, rstd = emu.forward(x, w.float(), b.float(), None, None, 4, 1e-5, True, layout == "channels_last")
    truth = ref.group_norm_silu(x.double(), w, b, 4)
    torch_err = (ref.group_norm_silu(x, w.float(), b.float(), 4).double() - truth).abs().max().item()
    assert (y.double() - truth).abs().max().item() <= 2 * torch_err + 1e-5
    torch.testing.assert_close(rstd.double(), _group_stats(x, 4)[1], rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_emulated_slab_groups_far_from_zero_each_with_its_own_mean(emu, dtype):
    """A slab's groups, each far from zero mean and each at another mean
    (+-300 (i + 1)): every group's sums must be shifted by its own first
    value, or the deviations lose their digits."""
    n, c, groups = 2, 8, 8  # group == channel: slabs of 4 (fp32) or 8 (bf16)
    g = torch.Generator().manual_seed(5)
    offsets = torch.tensor([300.0 * (i + 1) * (-1) ** i for i in range(c)], dtype=torch.float64)
    x = (offsets.view(1, c, 1, 1) + 0.01 * torch.randn(n, c, 16, 16, generator=g, dtype=torch.float64)).float()
    x = x.contiguous(memory_format=torch.channels_last)
    assert emu.plan(x.to(dtype), groups, True)[2] > 1
    w, b = torch.randn(c, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64)
    if dtype == torch.bfloat16:  # bf16 cannot hold 0.01 next to 300: test the statistics of what it holds
        x = x.to(dtype)
    y, mean, rstd = emu.forward(x, w.float(), b.float(), None, None, groups, 1e-5, True, True)
    truth = ref.group_norm_silu(x.double(), w, b, groups)
    torch_err = (ref.group_norm_silu(x.float(), w.float(), b.float(), groups).double() - truth).abs().max().item()
    assert (y.double() - truth).abs().max().item() <= 2 * torch_err + 8 * torch.finfo(dtype).eps
    true_mean, true_rstd = _group_stats(x, groups)
    torch.testing.assert_close(mean.double(), true_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd.double(), true_rstd, rtol=1.5e-4, atol=0)


@pytest.mark.parametrize(
    "shape, groups, layout, dtype",
    [
        ((1, 8, 64, 64), 1, "contiguous", torch.float32),  # 32768 elements: over 8 packs per thread
        ((1, 514, 2, 2), 1, "contiguous", torch.float32),  # 514 channels per group: over the coefficient table
        ((2, 96, 10), 32, "contiguous", torch.float32),  # rows of 10: not whole 16-byte packs
        ((2, 96, 4, 4), 32, "channels_last", torch.float32),  # 3 channels per group: no pack of 2
    ],
    ids=["group too large", "too many channels per group", "rows not whole packs", "odd channels per group"],
)
def test_shapes_the_one_pass_kernel_leaves_to_the_split_kernels(emu, shape, groups, layout, dtype):
    assert tuple(emu.plan(torch.empty(shape, dtype=dtype), groups, layout == "channels_last"))[:2] == (0, 0)


# The backward needs, besides the forward's conditions: at most 4 packs per
# thread; contiguous, a power of two or a multiple of 32 packs per channel;
# channels-last, a power of two (at most 32) packs per position.
BACKWARD_CASES = {
    "fp32 8x8, 16 packs per channel (half-warp runs)": ((2, 64, 8, 8), 32, "contiguous", torch.float32, (4, 1, 1)),
    "fp32 2x2, one pack per channel": ((2, 64, 2, 2), 8, "contiguous", torch.float32, (4, 1, 1)),
    "bf16 16x16, 32 packs per channel, 2 per thread": ((2, 64, 16, 16), 4, "contiguous", torch.bfloat16, (8, 2, 1)),
    "fp32 16x24, 96 packs per channel": ((1, 8, 16, 24), 2, "contiguous", torch.float32, (4, 2, 1)),
    "fp32 32x32, 4 packs per thread": ((1, 32, 32, 32), 8, "contiguous", torch.float32, (4, 4, 1)),
    "fp16 1-D input, 8 packs per channel": ((2, 64, 64), 16, "contiguous", torch.float16, (8, 1, 1)),
    "fp32 channels-last, one pack per position": ((2, 128, 8, 8), 32, "channels_last", torch.float32, (4, 1, 1)),
    "bf16 channels-last, 2 packs per position": ((2, 512, 4, 4), 32, "channels_last", torch.bfloat16, (8, 1, 1)),
    "fp32 channels-last, 4 packs per position, 4 per thread": (
        (1, 64, 16, 16), 4, "channels_last", torch.float32, (4, 4, 1)),
    "fp32 channels-last, 16 packs per position": ((1, 128, 4, 4), 2, "channels_last", torch.float32, (4, 1, 1)),
    "bf16 channels-last, 4 channels per group, 32x32": (
        (1, 128, 32, 32), 32, "channels_last", torch.bfloat16, (4, 4, 1)),
    "fp16 channels-last, 2 channels per group, odd HxW": ((2, 8, 7, 9), 4, "channels_last", torch.float16, (2, 1, 1)),
    # 8 warps x 256 channels of partial sums: the largest channels-last slot table
    "bf16 channels-last, 256 channels per group (32 packs per position)": (
        (1, 512, 4, 8), 2, "channels_last", torch.bfloat16, (8, 4, 1)),
}


@pytest.mark.parametrize("name", list(BACKWARD_CASES))
@pytest.mark.parametrize("variant", ["silu", "scale_shift", "no_silu"])
def test_emulated_one_pass_backward_matches_autograd(emu, name, variant):
    shape, groups, layout, dtype, want_plan = BACKWARD_CASES[name]
    cl = layout == "channels_last"
    assert tuple(emu.backward_plan(torch.empty(shape, dtype=dtype), groups, cl)) == want_plan
    x, w, b, sc, sh = _inputs(shape, dtype, layout, variant)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dy = gy.to(dtype)
    if cl:
        dy = dy.movedim(1, -1).contiguous().movedim(-1, 1)
    act = variant != "no_silu"
    _, mean, rstd = emu.forward(x, w.float(), b.float(), sc, sh, groups, 1e-5, act, cl)
    dx, ds, db, dscale, dshift = emu.backward(dy, x, mean, rstd, w.float(), b.float(), sc, sh, groups, act, cl)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    # d weight and d bias as grad_params_blocks (gn_silu_cuda.cu) sums them over the samples.
    d = shape[1] // groups
    k = 1 + sc.float().double() if sc is not None else torch.ones_like(ds)
    r = rstd.double().repeat_interleave(d, dim=1)
    ours = [dx, (k * r * ds).sum(0), (k * db).sum(0)] + ([dscale, dshift] if sc is not None else [])
    fn = gn.reference(SCALE_SHIFT[variant])
    truth = gn.run(fn, x.double(), w, b, sc, sh, gy, groups, torch.float64)[1:]
    torch_err = gn.run(fn, x, w, b, sc, sh, gy, groups, torch.float32)[1:]
    eps = torch.finfo(dtype).eps
    for what, t, p, f in zip(["dx", "dweight", "dbias", "dscale", "dshift"], truth, torch_err, ours):
        scale = max(t.abs().max().item(), 1.0)
        err, allowed = (f.double() - t).abs().max().item(), 2 * (p.double() - t).abs().max().item() + 8 * eps * scale
        assert err <= allowed, f"{what}: error {err:.3g} > allowed {allowed:.3g}"


@pytest.mark.parametrize(
    "shape, groups, layout, dtype",
    [
        ((1, 12, 16, 16), 2, "channels_last", torch.float32),  # 3 packs per position
        ((2, 16, 3, 4), 4, "contiguous", torch.float32),  # 3 packs per channel
        ((3, 64, 40), 32, "contiguous", torch.float16),  # 5 packs per channel
        ((1, 8, 32, 32), 1, "contiguous", torch.float32),  # 8 packs per thread (x and dy: 16)
    ],
    ids=["3 packs per position", "3 packs per channel", "5 packs per channel", "8 packs per thread"],
)
def test_backward_leaves_irregular_or_large_groups_to_the_split_kernels(emu, shape, groups, layout, dtype):
    x = torch.empty(shape, dtype=dtype)
    cl = layout == "channels_last"
    assert tuple(emu.plan(x, groups, cl))[0] != 0  # the forward applies
    assert tuple(emu.backward_plan(x, groups, cl))[:2] == (0, 0)
