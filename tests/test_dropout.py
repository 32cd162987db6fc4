"""
The C++ extension's CPU dropout (csrc/cpu/dropout_cpu.cpp) against its twin,
iddpm_fast.reference.dropout = F.dropout (what the original's nn.Dropout
runs): the same outputs and gradients bit for bit, and the generator left in
the same state, for every dtype, both memory layouts, odd sizes, generator
positions inside and across the Mersenne Twister's 624-word blocks; plus
gradcheck, opcheck, torch.compile, input errors, the fallbacks, and the UNet
trained with it equal to the UNet with nn.Dropout.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from iddpm_fast import _ext, ops
from iddpm_fast import nn as inn
from iddpm_fast import reference as ref
from iddpm_fast.ops import _cpp

REASON = _ext.load()
needs_ext = pytest.mark.skipif(REASON is not None, reason=f"C++ extension unavailable: {REASON}")

SHAPES = {
    "minimal": ((1,), "contiguous"),
    "odd sizes": ((3, 5, 7, 11), "contiguous"),
    "channels-last image": ((4, 6, 9, 13), "channels_last"),
    "1-D attention input": ((2, 8, 33), "contiguous"),
    "UNet 32x32, many Twister blocks": ((2, 64, 32, 32), "channels_last"),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _x(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (-1.5 + 2 * torch.randn(shape, generator=g)).to(dtype)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x


def _advance(words):
    """Use up `words` 32-bit words of the default generator (an int32 draw
    takes one), so the dropout starts mid-block or at a block edge."""
    if words:
        torch.randint(0, 2, (words,), dtype=torch.int32)


def _run(fn, x, p, seed, words):
    """fn(x, p) and d/dx under a seeded default generator; also the
    generator's state afterwards."""
    torch.manual_seed(seed)
    _advance(words)
    leaf = x.detach().clone().requires_grad_()
    y = fn(leaf, p)
    (grad,) = torch.autograd.grad(y, leaf, torch.full_like(y, 0.75) + leaf.detach())
    return y.detach(), grad, torch.get_rng_state()


def _same_bits(a, b):
    """Equal values, including the sign of zeros, NaN where NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype in (torch.bfloat16, torch.float16):
        a, b = a.view(torch.int16), b.view(torch.int16)
    elif a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    else:
        a, b = a.view(torch.int64), b.view(torch.int64)
    assert torch.equal(a, b), f"{(a != b).sum().item()} of {a.numel()} elements differ"


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("words", [0, 1, 623, 1000], ids=lambda w: f"after{w}words")
def test_same_draws_outputs_and_gradients_as_f_dropout(name, dtype, words):
    shape, layout = SHAPES[name]
    x = _x(shape, dtype, layout)
    p = 0.1 if dtype != torch.float64 else 0.3
    y, g, state = _run(_cpp.dropout, x, p, seed=3, words=words)
    y_ref, g_ref, state_ref = _run(ref.dropout, x, p, seed=3, words=words)
    _same_bits(y, y_ref)
    _same_bits(g, g_ref)
    assert torch.equal(state, state_ref), "the generator did not end where bernoulli_ leaves it"
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    # Something was dropped and something kept (the test could tell).
    assert 0 < int((y == 0).sum()) < y.numel() or y.numel() < 8


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("p", [1e-6, 0.5, 0.9, 0.99999, 0.999999])
def test_probabilities_near_the_ends_draw_the_same_mask(p, dtype):
    # float16 at p > ~0.99998: 1 / (1 - p) rounds to inf, and a dropped
    # element must still be x * +0, not x * (0 * inf) = NaN.
    x = _x((5, 16, 12, 12), dtype, "contiguous")
    y, g, state = _run(_cpp.dropout, x, p, seed=11, words=5)
    y_ref, g_ref, state_ref = _run(ref.dropout, x, p, seed=11, words=5)
    _same_bits(y, y_ref)
    _same_bits(g, g_ref)
    assert torch.equal(state, state_ref)


@needs_ext
def test_explicit_generator_and_many_seeds():
    """The op with its own generator equals bernoulli_/div_/mul on a twin
    generator, over 40 seeds (2.4 million draws, so that values within
    rounding of the threshold turn up)."""
    op = torch.ops.iddpm_fast.dropout_forward
    for seed in range(40):
        p = (0.1, 0.25, 0.5, 0.8)[seed % 4]
        x = _x((16, 32, 11, 13), torch.float32, "channels_last" if seed % 2 else "contiguous", seed)
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        noise = torch.empty_like(x).bernoulli_(1 - p, generator=g1).div_(1 - p)
        y, mask = op(x, p, _cpp.dropout_scale(x.dtype, p), g2)
        _same_bits(y, x * noise)
        assert torch.equal(mask, noise != 0)
        assert torch.equal(g1.get_state(), g2.get_state())


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_signed_zeros_infinities_and_nans_as_f_dropout(dtype):
    """x * noise semantics: a dropped -x stays -0, a dropped inf or NaN gives
    NaN, a kept one stays inf/NaN. Bit for bit, except bfloat16 NaN payloads
    (ATen's vector and scalar conversions differ; NaN stays NaN)."""
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -1.0, 1e-30])
    x = specials.repeat(7 * 33 + 5).to(dtype)  # vector body and scalar tail
    y, g, state = _run(_cpp.dropout, x, 0.5, seed=6, words=3)
    y_ref, g_ref, state_ref = _run(ref.dropout, x, 0.5, seed=6, words=3)
    assert torch.equal(state, state_ref)
    for a, b in ((y, y_ref), (g, g_ref)):
        assert torch.equal(a.isnan(), b.isnan())
        if dtype == torch.bfloat16:
            ok = ~a.isnan()
            _same_bits(a[ok], b[ok])
        else:
            _same_bits(a, b)


def test_reference_is_the_documented_noise_chain():
    x = _x((3, 4, 5, 6), torch.float32, "channels_last")
    torch.manual_seed(1)
    y = ref.dropout(x, 0.2)
    torch.manual_seed(1)
    noise = torch.empty_like(x).bernoulli_(0.8)
    noise.div_(0.8)
    _same_bits(y, x * noise)


@pytest.mark.parametrize("p, training", [(0.0, True), (1.0, True), (0.3, False)])
def test_no_draws_where_f_dropout_draws_none(p, training):
    x = _x((2, 3, 4, 4), torch.float32, "contiguous")
    torch.manual_seed(2)
    y = ops.dropout(x, p, training)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    y_ref = F.dropout(x, p, training)
    assert torch.equal(state, torch.get_rng_state())
    _same_bits(y, y_ref)


@needs_ext
def test_strided_input_falls_back_to_f_dropout_draws():
    base = _x((2, 6, 8, 10), torch.float32, "contiguous")
    x = base[..., ::2]  # not dense: bernoulli_ then fills a compacted noise tensor
    y, g, state = _run(_cpp.dropout, x, 0.3, seed=4, words=0)
    y_ref, g_ref, state_ref = _run(ref.dropout, x, 0.3, seed=4, words=0)
    _same_bits(y, y_ref)
    _same_bits(g, g_ref)
    assert torch.equal(state, state_ref)


@needs_ext
def test_gradcheck_and_gradgradcheck_float64():
    x = _x((2, 3, 4, 5), torch.float64, "channels_last").requires_grad_()

    def fn(v):  # the same mask at every evaluation
        return torch.ops.iddpm_fast.dropout_forward(v, 0.4, 1 / 0.6, torch.Generator().manual_seed(0))[0]

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@needs_ext
def test_opcheck():
    # The op draws random numbers, so opcheck's test that runs it twice and
    # compares (aot_dispatch) cannot apply; schema, autograd registration and
    # the fake kernel are checked.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    x = _x((2, 3, 4, 5), torch.float32, "contiguous").requires_grad_()
    torch.library.opcheck(torch.ops.iddpm_fast.dropout_forward.default, (x, 0.3, 1 / 0.7, None), test_utils=utils)
    _y, mask = torch.ops.iddpm_fast.dropout_forward(x.detach(), 0.3, 1 / 0.7)
    torch.library.opcheck(
        torch.ops.iddpm_fast.dropout_backward.default, (torch.randn(2, 3, 4, 5), mask, 1 / 0.7), test_utils=utils
    )


@needs_ext
def test_torch_compile_fullgraph_runs_the_op_with_the_same_draws():
    x = _x((2, 8, 5, 5), torch.float32, "channels_last")
    scale = _cpp.dropout_scale(torch.float32, 0.25)

    def block(v):
        return (torch.ops.iddpm_fast.dropout_forward(v, 0.25, scale)[0] * 2).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(9)
    eager_out = block(xe)
    torch.manual_seed(9)
    compiled_out = compiled(xc)
    torch.testing.assert_close(compiled_out, eager_out, rtol=0, atol=0)
    (ge,) = torch.autograd.grad(eager_out, xe)
    (gc,) = torch.autograd.grad(compiled_out, xc)
    assert torch.equal(gc, ge)


@needs_ext
def test_the_seam_under_torch_compile_keeps_every_random_call():
    """Two identical dropout calls must draw two masks under torch.compile
    too. AOTAutograd's common-subexpression elimination (torch 2.13) spares
    only the aten random ops it lists, not ops tagged nondeterministic_seeded,
    so it would merge two calls of the raw C++ op; the seam therefore hands
    compiled code F.dropout."""
    x = _x((4, 8, 6, 6), torch.float32, "contiguous").requires_grad_()  # a joint graph, where CSE runs

    def twice(v):
        return ops.dropout(v, 0.5) - ops.dropout(v, 0.5)

    compiled = torch.compile(twice, fullgraph=True, backend="aot_eager")(x)
    assert int((compiled != 0).sum()) > 0


@needs_ext
def test_unet_with_dropout_compiles_fullgraph():
    """Through the seam, torch.compile traces F.dropout (the one-time self
    check is a constant to it, its lock never traced)."""
    from iddpm_fast.script_util import create_model

    model = create_model(32, 32, 1, learn_sigma=False, class_cond=False, use_checkpoint=False,
                         attention_resolutions="8", num_heads=1, num_heads_upsample=-1,
                         use_scale_shift_norm=True, dropout=0.3)
    ops.dropout(torch.randn(4), 0.5)  # the self-check has run (as in any real use before compiling)
    out = torch.compile(model, fullgraph=True, backend="eager")(torch.randn(2, 3, 32, 32), torch.tensor([3, 7]))
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


@needs_ext
def test_clear_errors_from_the_cpp_op():
    x = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"p must be in \(0, 1\)"):
        torch.ops.iddpm_fast.dropout_forward(x, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="must be stored densely"):
        torch.ops.iddpm_fast.dropout_forward(x[..., ::2], 0.5, 2.0)
    with pytest.raises(RuntimeError, match="must be float32, float64, float16 or bfloat16"):
        torch.ops.iddpm_fast.dropout_forward(x.int(), 0.5, 2.0)
    _y, mask = torch.ops.iddpm_fast.dropout_forward(x, 0.5, 2.0)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.iddpm_fast.dropout_backward(x, mask.float(), 2.0)
    with pytest.raises(RuntimeError, match=r"grad_y has shape \[2, 3, 5\] but the mask \[2, 3, 4\]"):
        torch.ops.iddpm_fast.dropout_backward(torch.randn(2, 3, 5), mask, 2.0)


def test_seam_rejects_bad_probabilities_and_types():
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\], got 1.5"):
        ops.dropout(torch.randn(3), 1.5)
    with pytest.raises(ValueError, match="floating-point"):
        ops.dropout(torch.ones(3, dtype=torch.int64), 0.5)


@needs_ext
def test_gradient_in_another_layout_than_the_mask():
    x = _x((2, 4, 5, 6), torch.bfloat16, "channels_last")
    _y, mask = torch.ops.iddpm_fast.dropout_forward(x, 0.5, 2.0)
    gy = torch.randn(2, 4, 5, 6).bfloat16()  # contiguous, the mask is channels-last
    dx = torch.ops.iddpm_fast.dropout_backward(gy, mask, 2.0)
    _same_bits(dx, gy * (mask.to(gy.dtype) * 2))


@needs_ext
def test_a_failed_self_check_warns_once_and_keeps_f_dropout(monkeypatch):
    """On a torch whose bernoulli_ draws differently (e.g. through MKL), the
    seam names the reason once and runs F.dropout."""
    monkeypatch.setitem(_cpp._dropout_check, "done", True)
    monkeypatch.setitem(_cpp._dropout_check, "reason", "simulated: bernoulli_ draws differently")
    monkeypatch.setattr(ops._backend, "_warned", set())
    x = _x((2, 3, 4, 4), torch.float32, "contiguous")
    with pytest.warns(RuntimeWarning, match="dropout falls back from cpp on cpu: simulated"):
        ops.dropout(x, 0.5)
    assert ops.resolve_name("dropout", torch.device("cpu")) == "reference"


@needs_ext
@pytest.mark.parametrize("layout, use_checkpoint", [("contiguous", False), ("channels_last", False),
                                                    ("contiguous", True)])
def test_unet_trains_bit_for_bit_as_with_nn_dropout(layout, use_checkpoint):
    """Also with gradient checkpointing, whose recomputation must redraw the
    same masks (it restores the CPU generator's state, which the op reads)."""
    from iddpm_fast.script_util import create_model

    torch.manual_seed(0)
    model = create_model(32, 32, 1, learn_sigma=True, class_cond=False, use_checkpoint=use_checkpoint,
                         attention_resolutions="8", num_heads=2, num_heads_upsample=-1,
                         use_scale_shift_norm=True, dropout=0.3)
    with torch.no_grad():  # the out convs start at zero; make the dropped paths matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    stock = copy.deepcopy(model)
    swapped = 0
    for module in stock.modules():
        for name, child in module.named_children():
            if isinstance(child, inn.Dropout):
                setattr(module, name, torch.nn.Dropout(child.p))
                swapped += 1
    assert swapped > 0
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=memory_format)
    t = torch.tensor([1, 999])
    results = []
    for m in (model.to(memory_format=memory_format), stock.to(memory_format=memory_format)):
        torch.manual_seed(5)
        out = m(x, t)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad for p in m.parameters()], torch.get_rng_state()))
    _same_bits(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        _same_bits(a, b)
    assert torch.equal(results[0][2], results[1][2])


def _temper(y):
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    y ^= y >> 18
    return y & 0xFFFFFFFF


def _untemper(y):
    """The Mersenne Twister state word whose tempered output is y."""
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    t = y
    for _ in range(5):  # y ^= (y << 7) & mask, solved 7 bits at a time
        t = (y ^ ((t << 7) & 0x9D2C5680)) & 0xFFFFFFFF
    y = t
    for _ in range(3):  # y ^= y >> 11
        t = y ^ (t >> 11)
    return t & 0xFFFFFFFF


def _generator_about_to_return(words):
    """A CPU generator whose next len(words) 32-bit outputs are `words`
    (CPUGeneratorImplState: int64 seed, int left, int seeded, uint64 next,
    uint64 state[624], ...; with left = 624 and next = 1, state[1:] is read
    in order without a regeneration)."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    raw = g.get_state().numpy().copy()
    left = raw[8:12].view(np.int32)
    nxt = raw[16:24].view(np.uint64)
    state = raw[24 : 24 + 8 * 624].view(np.uint64)
    assert len(words) <= 623 and state.shape == (624,)
    left[0], nxt[0] = 624, 1
    state[1 : 1 + len(words)] = [_untemper(w) for w in words]
    g.set_state(torch.from_numpy(raw))
    return g


def test_untemper_inverts_the_tempering():
    g = torch.Generator().manual_seed(3)
    for w in torch.randint(0, 2**32, (200,), generator=g, dtype=torch.int64).tolist() + [0, 2**32 - 1]:
        assert _temper(_untemper(w)) == w


@needs_ext
@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_draws_exactly_at_the_keep_threshold(p):
    """Draws r = ((r1 & (2^21-1)) << 32 | r2) at and around the integer
    threshold ceil((1-p) 2^53), where a kernel comparing with <= instead of
    <, or looking at the high word only, would keep different elements."""
    import math

    threshold = math.ceil(math.ldexp(1 - p, 53))
    t_hi, t_lo = threshold >> 32, threshold & 0xFFFFFFFF
    assert 2 <= t_lo < 2**32 - 2
    pairs = []
    for high_bits in (0, 0x5A5, 0x7FF):  # bits above the 21 that count
        for hi in (t_hi - 1, t_hi, t_hi + 1):
            for lo in (0, t_lo - 1, t_lo, t_lo + 1, 2**32 - 1):
                pairs.append(((high_bits << 21) | hi, lo))
    words = [w for pair in pairs for w in pair]
    assert torch.randint(0, 2, (1,), generator=_generator_about_to_return(words), dtype=torch.int32).item() in (0, 1)
    expect = torch.tensor([((r1 & 0x1FFFFF) << 32 | r2) < threshold for r1, r2 in pairs])
    x = torch.full((len(pairs),), 2.0)
    noise = torch.empty_like(x).bernoulli_(1 - p, generator=_generator_about_to_return(words))
    assert torch.equal(noise.bool(), expect), "the generator setup does not give the intended draws"
    _y, mask = torch.ops.iddpm_fast.dropout_forward(x, p, 1 / (1 - p), _generator_about_to_return(words))
    assert torch.equal(mask, expect)
