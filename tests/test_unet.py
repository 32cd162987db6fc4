"""Tests for iddpm_fast.unet (plus the nn / fp16_util helpers it uses).

Fixtures in tests/fixtures were produced once by running the original
openai/improved-diffusion code:
  * unet_cifar10_keys.json  - {name: shape} of the official CIFAR-10 UNet's
                              state_dict, in state_dict order.
  * unet_small_golden.json  - output statistics of a tiny perturbed UNet
                              (recipe in its "description" field).
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from iddpm_fast import fp16_util
from iddpm_fast.nn import conv_nd, timestep_embedding, update_ema
from iddpm_fast.unet import Downsample, ResBlock, SuperResModel, UNetModel

FIXTURES = Path(__file__).parent / "fixtures"

CIFAR10_CONFIG = dict(
    in_channels=3,
    model_channels=128,
    out_channels=6,
    num_res_blocks=3,
    attention_resolutions=(2, 4),
    dropout=0.3,
    channel_mult=(1, 2, 2, 2),
    num_classes=None,
    use_checkpoint=False,
    num_heads=4,
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
)

SMALL = dict(
    in_channels=3,
    model_channels=32,
    out_channels=3,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
)


def _perturb(model, seed):
    """Add 0.02 * N(0, 1) noise to every parameter, in parameters() order."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return _perturb(UNetModel(**{**SMALL, **overrides}), seed + 1)


# --------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def cifar10_keys():
    with open(FIXTURES / "unet_cifar10_keys.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def cifar10_model():
    torch.manual_seed(0)
    return UNetModel(**CIFAR10_CONFIG)


def test_cifar10_state_dict_names_and_shapes(cifar10_model, cifar10_keys):
    ours = {k: list(v.shape) for k, v in cifar10_model.state_dict().items()}
    assert len(cifar10_keys) == 446
    assert ours == cifar10_keys
    # Order matters too: EMA / fp16 master params are matched by position.
    assert list(ours) == list(cifar10_keys)


def test_cifar10_load_state_dict_strict_round_trip(cifar10_model, cifar10_keys):
    gen = torch.Generator().manual_seed(123)
    state = {
        name: torch.randn(shape, generator=gen)
        for name, shape in cifar10_keys.items()
    }
    result = cifar10_model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = cifar10_model.state_dict()
    assert loaded.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


def test_load_state_dict_strict_rejects_wrong_shape(cifar10_keys):
    torch.manual_seed(0)
    model = UNetModel(**SMALL)
    bad = model.state_dict()
    bad["out.2.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(RuntimeError):
        model.load_state_dict(bad, strict=True)


# -------------------------------------------------------- golden (reference)


@pytest.fixture(scope="module")
def golden():
    with open(FIXTURES / "unet_small_golden.json") as f:
        return json.load(f)


def _golden_model_and_inputs(golden):
    cfg = dict(golden["config"])
    cfg["attention_resolutions"] = tuple(cfg["attention_resolutions"])
    cfg["channel_mult"] = tuple(cfg["channel_mult"])
    torch.manual_seed(0)
    model = _perturb(UNetModel(**cfg), 1)
    torch.manual_seed(2)
    x = torch.randn(*golden["input_shape"])
    t = torch.tensor(golden["timesteps"])
    y = torch.tensor(golden["y"])
    return model, x, t, y


def _check_against(out, expected, indices):
    flat = out.flatten()
    values = torch.tensor([flat[i].item() for i in indices], dtype=torch.float64)
    torch.testing.assert_close(
        values, torch.tensor(expected["values"], dtype=torch.float64),
        rtol=1e-5, atol=1e-6,
    )
    assert out.double().sum().item() == pytest.approx(expected["sum"], rel=1e-5, abs=1e-4)
    assert out.double().abs().sum().item() == pytest.approx(
        expected["abs_sum"], rel=1e-5, abs=1e-4
    )


@pytest.mark.parametrize("mode", ["eval", "train"])  # train: dropout RNG order
def test_matches_reference_golden_numbers(golden, mode):
    model, x, t, y = _golden_model_and_inputs(golden)
    getattr(model, mode)()
    if mode == "train":
        torch.manual_seed(3)
    with torch.no_grad():
        out = model(x, t, y)
    assert list(out.shape) == golden["output_shape"]
    _check_against(out, golden[mode], golden["indices"])


# -------------------------------------------------------------------- shapes

SHAPE_CASES = [
    # default-ish small 32x32, class-conditional, batch 2
    pytest.param(
        UNetModel,
        dict(SMALL, channel_mult=(1, 2, 2), num_res_blocks=2,
             attention_resolutions=(2, 4), num_heads=2, num_classes=10,
             use_scale_shift_norm=True, dropout=0.1),
        (2, 3, 32, 32), {"y": torch.tensor([0, 9])}, (2, 3, 32, 32),
        id="32x32-class-cond",
    ),
    # batch 1
    pytest.param(UNetModel, SMALL, (1, 3, 16, 16), {}, (1, 3, 16, 16), id="batch1"),
    # 64x64, four levels with a non-power-of-two multiplier
    pytest.param(
        UNetModel,
        dict(SMALL, channel_mult=(1, 2, 3, 4), attention_resolutions=(8,)),
        (1, 3, 64, 64), {}, (1, 3, 64, 64), id="64x64-mult1234",
    ),
    # grayscale, tiny 8x8, learned sigma (2 output channels)
    pytest.param(
        UNetModel, dict(SMALL, in_channels=1, out_channels=2),
        (2, 1, 8, 8), {}, (2, 2, 8, 8), id="grayscale-8x8-learned-sigma",
    ),
    # non-square
    pytest.param(UNetModel, SMALL, (2, 3, 8, 16), {}, (2, 3, 8, 16), id="non-square"),
    # 1-D signals
    pytest.param(UNetModel, dict(SMALL, dims=1), (2, 3, 16), {}, (2, 3, 16), id="1-D"),
    # 3-D volumes (only the last two axes are resampled)
    pytest.param(UNetModel, dict(SMALL, dims=3), (1, 3, 3, 8, 8), {}, (1, 3, 3, 8, 8),
                 id="3-D"),
    # average-pool downsampling (crashed at construction in the reference)
    pytest.param(UNetModel, dict(SMALL, conv_resample=False), (2, 3, 8, 8), {},
                 (2, 3, 8, 8), id="avgpool-no-conv-resample"),
    # first level wider than model_channels (output head crashed in the reference)
    pytest.param(UNetModel, dict(SMALL, channel_mult=(2, 2)), (2, 3, 8, 8), {},
                 (2, 3, 8, 8), id="channel-mult-first-2"),
    # super-resolution: low_res is upsampled 4x and concatenated
    pytest.param(
        SuperResModel, dict(SMALL, out_channels=6), (2, 3, 16, 16),
        {"low_res": torch.randn(2, 3, 4, 4)}, (2, 6, 16, 16), id="super-res",
    ),
]


@pytest.mark.parametrize("cls,cfg,x_shape,extra,out_shape", SHAPE_CASES)
def test_output_shapes(cls, cfg, x_shape, extra, out_shape):
    torch.manual_seed(0)
    model = cls(**cfg).eval()
    x = torch.randn(*x_shape)
    t = torch.randint(0, 1000, (x_shape[0],))
    with torch.no_grad():
        out = model(x, t, **extra)
    assert out.shape == out_shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_output_head_is_zero_initialised():
    torch.manual_seed(0)
    model = UNetModel(**SMALL)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0


def test_get_feature_vectors_superres():
    # The reference unpacked x.shape in the wrong order here.
    torch.manual_seed(0)
    model = SuperResModel(**SMALL).eval()
    x = torch.randn(2, 3, 16, 8)
    low = torch.randn(2, 3, 8, 4)
    with torch.no_grad():
        feats = model.get_feature_vectors(x, torch.tensor([5, 6]), low_res=low)
    assert len(feats["down"]) == len(model.input_blocks)
    assert len(feats["up"]) == len(model.output_blocks)
    assert feats["down"][0].shape == (2, 32, 16, 8)
    assert feats["middle"].shape == (2, 64, 8, 4)
    assert feats["up"][-1].shape == (2, 32, 16, 8)


def test_downsample_avg_pool_1d_2d_3d():
    assert Downsample(4, False, dims=1)(torch.ones(1, 4, 8)).shape == (1, 4, 4)
    assert Downsample(4, False, dims=2)(torch.ones(1, 4, 8, 6)).shape == (1, 4, 4, 3)
    out = Downsample(4, False, dims=3)(torch.ones(1, 4, 3, 8, 6))
    assert out.shape == (1, 4, 3, 4, 3)
    assert torch.equal(out, torch.ones_like(out))


def test_repr():
    torch.manual_seed(0)
    text = repr(UNetModel(**SMALL))
    assert isinstance(text, str) and text
    assert "ResBlock" in text and "AttentionBlock" in text


# -------------------------------------------------------------------- errors


def _inputs(batch=2, channels=3, size=8):
    return torch.randn(batch, channels, size, size), torch.arange(batch)


def test_error_wrong_input_channels():
    torch.manual_seed(0)
    model = UNetModel(**SMALL)
    x, t = _inputs(channels=4)
    with pytest.raises(ValueError, match=r"expected x with 3 input channels, got 4"):
        model(x, t)


def test_error_wrong_number_of_dims():
    torch.manual_seed(0)
    model = UNetModel(**SMALL)
    with pytest.raises(ValueError, match=r"expected x with 4 dims"):
        model(torch.randn(3, 8, 8), torch.arange(3))


@pytest.mark.parametrize(
    "timesteps",
    [
        torch.tensor(5),  # scalar (0-D)
        torch.zeros(2, 1),  # 2-D
        torch.arange(3),  # length != batch
    ],
    ids=["0-D", "2-D", "wrong-length"],
)
def test_error_bad_timesteps(timesteps):
    torch.manual_seed(0)
    model = UNetModel(**SMALL)
    x, _ = _inputs()
    with pytest.raises(ValueError, match=r"timesteps must be a 1-D tensor of length N=2"):
        model(x, timesteps)


def test_error_y_given_to_unconditional_model():
    torch.manual_seed(0)
    model = UNetModel(**SMALL)
    x, t = _inputs()
    with pytest.raises(ValueError, match=r"y .* was given, but this model is unconditional"):
        model(x, t, torch.tensor([0, 1]))


def test_error_y_missing_for_class_conditional_model():
    torch.manual_seed(0)
    model = UNetModel(**SMALL, num_classes=10)
    x, t = _inputs()
    with pytest.raises(ValueError, match=r"y .* is missing; this model is class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match=r"y must be a tensor of shape \(2,\)"):
        model(x, t, torch.tensor([[0], [1]]))


@pytest.mark.parametrize("size", [7, 10])  # odd; even but not divisible by 4
def test_error_spatial_size_not_divisible(size):
    torch.manual_seed(0)
    model = UNetModel(**dict(SMALL, channel_mult=(1, 1, 2)))
    x, t = _inputs(size=size)
    with pytest.raises(ValueError, match=r"not divisible by 2\*\*\(len\(channel_mult\)-1\) = 4"):
        model(x, t)


def test_error_superres_missing_low_res():
    torch.manual_seed(0)
    model = SuperResModel(**SMALL)
    x, t = _inputs()
    with pytest.raises(ValueError, match=r"low_res"):
        model(x, t)
    with pytest.raises(ValueError, match=r"expected x with 3 input channels, got 6"):
        model(torch.randn(2, 6, 8, 8), t, low_res=torch.randn(2, 3, 4, 4))


def test_error_unsupported_dims():
    with pytest.raises(ValueError, match=r"dims"):
        UNetModel(**dict(SMALL, dims=4))
    with pytest.raises(ValueError, match=r"unsupported number of spatial dimensions 4"):
        conv_nd(4, 3, 3, 3)


# ------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("mode", ["eval", "train"])  # train: dropout active
def test_gradient_checkpointing_same_outputs_and_grads(mode):
    runs = []
    for flag in (False, True):
        model = _small_model(use_checkpoint=flag, dropout=0.2, use_scale_shift_norm=True)
        getattr(model, mode)()
        torch.manual_seed(5)
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        out = model(x, torch.tensor([3, 400]))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        runs.append((out.detach(), [p.grad for p in model.parameters()], x.grad))
    (out0, grads0, xg0), (out1, grads1, xg1) = runs
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    assert all(g is not None for g in grads1)
    assert any(g.abs().sum() > 0 for g in grads0)
    for g0, g1 in zip(grads0, grads1):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xg1, xg0, rtol=1e-5, atol=1e-6)


def test_resblock_checkpoint_under_no_grad():
    torch.manual_seed(0)
    block = ResBlock(32, 16, 0.0, out_channels=64, use_checkpoint=True)
    with torch.no_grad():
        out = block(torch.randn(1, 32, 4, 4), torch.randn(1, 16))
    assert out.shape == (1, 64, 4, 4)


# ---------------------------------------------------------------------- fp16


def test_convert_to_fp16_and_back():
    model = _small_model(num_classes=10)
    assert model.inner_dtype == torch.float32
    model.convert_to_fp16()
    assert model.inner_dtype == torch.float16
    torso = [model.input_blocks, model.middle_block, model.output_blocks]
    for part in torso:
        for module in part.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                assert module.weight.dtype == torch.float16
                assert module.bias.dtype == torch.float16
            elif isinstance(module, (nn.Linear, nn.GroupNorm)):
                assert module.weight.dtype == torch.float32
    # Embeddings and the output head stay in float32.
    for p in (*model.time_embed.parameters(), *model.label_emb.parameters(),
              *model.out.parameters()):
        assert p.dtype == torch.float32

    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 917])
    y = torch.tensor([1, 2])
    model.eval()
    try:
        with torch.no_grad():
            out16 = model(x, t, y)
    except RuntimeError as exc:  # half conv unsupported on this CPU build
        out16 = None
        print(f"fp16 forward not supported here: {exc}")
    model.convert_to_fp32()
    assert model.inner_dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    if out16 is not None:
        assert out16.dtype == torch.float32
        with torch.no_grad():
            out32 = model(x, t, y)
        torch.testing.assert_close(out16, out32, rtol=0.05, atol=0.05)


def test_convert_module_to_f16_conv_without_bias():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    fp16_util.convert_module_to_f16(conv)
    assert conv.weight.dtype == torch.float16 and conv.bias is None
    fp16_util.convert_module_to_f32(conv)
    assert conv.weight.dtype == torch.float32
    lin = nn.Linear(2, 2)
    fp16_util.convert_module_to_f16(lin)
    assert lin.weight.dtype == torch.float32


def test_master_params_round_trip():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Linear(3, 5))
    params = list(model.parameters())
    master = fp16_util.make_master_params(params)
    assert len(master) == 1 and master[0].dtype == torch.float32
    assert master[0].numel() == sum(p.numel() for p in params)
    assert master[0].requires_grad
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    fp16_util.model_grads_to_master_grads(params, master)
    assert torch.equal(master[0].grad, torch.full_like(master[0], 2.0))
    with torch.no_grad():
        master[0].mul_(3)
    before = [p.detach().clone() for p in params]
    fp16_util.master_params_to_model_params(iter(params), master)  # generator ok
    for b, p in zip(before, params):
        torch.testing.assert_close(p.detach(), 3 * b)
    views = fp16_util.unflatten_master_params(model.parameters(), master)
    assert isinstance(views, tuple)  # as the original's _unflatten_dense_tensors
    assert [v.shape for v in views] == [p.shape for p in params]
    fp16_util.zero_grad(params)
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)


def test_update_ema():
    target = [torch.zeros(3)]
    update_ema(target, [torch.ones(3)], rate=0.9)
    torch.testing.assert_close(target[0], torch.full((3,), 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_update_ema_is_the_originals_per_tensor_update_in_every_dtype(dtype):
    # The original: targ.mul_(rate).add_(src, alpha=1 - rate) per tensor. The
    # multi-tensor kernels would round rate to a half-precision target's dtype.
    g = torch.Generator().manual_seed(0)
    targets = [torch.randn(257, generator=g).to(dtype) for _ in range(3)]
    sources = [torch.randn(257, generator=g).to(dtype) for _ in range(3)]
    want = [t.clone() for t in targets]
    for _ in range(5):
        update_ema(targets, sources, rate=0.99)
        for t, s in zip(want, sources):
            t.mul_(0.99).add_(s, alpha=1 - 0.99)
    for got, ref in zip(targets, want):
        assert torch.equal(got, ref)


# ------------------------------------------------------- timestep embedding


@pytest.mark.parametrize("dim", [1, 6, 7, 128])  # 1 and 7: odd, zero-padded
def test_timestep_embedding_formula(dim):
    t = torch.tensor([0.0, 1.0, 2.5, 999.0])
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    half = dim // 2
    expected = torch.zeros(4, dim, dtype=torch.float64)
    for i in range(half):
        freq = math.exp(-math.log(10000) * i / half)
        for row, step in enumerate(t.tolist()):
            expected[row, i] = math.cos(step * freq)
            expected[row, half + i] = math.sin(step * freq)
    # float32 phases of size ~1e3 carry ~1e-4 absolute rounding.
    torch.testing.assert_close(emb.double(), expected, rtol=0, atol=2e-4)
    if dim % 2:
        assert torch.count_nonzero(emb[:, -1]) == 0


def test_timestep_embedding_integer_and_max_period():
    t = torch.tensor([4, 17])
    emb = timestep_embedding(t, 8, max_period=100)
    freqs = 100.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    phases = t.double()[:, None] * freqs
    torch.testing.assert_close(
        emb.double(), torch.cat([phases.cos(), phases.sin()], dim=1), rtol=0, atol=1e-5
    )


# ------------------------------------------------------ fused GroupNorm-SiLU


def _out_and_grads(model, x, t, **autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", **autocast) if autocast else torch.autocast("cpu", enabled=False):
        out = model(x, t)
    out.float().square().mean().backward()
    return out.detach().float(), [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("scale_shift", [True, False], ids=["scale_shift", "plain"])
def test_fused_norm_modules_equal_the_unfused_unet(layout, scale_shift):
    """The UNet with fused GroupNorm-SiLU modules computes what the original
    module stack (GroupNorm32 then x*sigmoid(x)) does, within fp32 rounding,
    outputs and every parameter gradient; the reference backend is exactly
    the original's arithmetic."""
    from iddpm_fast import _ext, ops

    model = _small_model(use_scale_shift_norm=scale_shift).train(False)
    torch.manual_seed(5)
    x = -0.5 + torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 700])
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with ops.use_backend("reference"):
        ref_out, ref_grads = _out_and_grads(model, x, t)
    out, grads = _out_and_grads(model, x, t)
    if _ext.load() is None:
        assert ops.resolve_name("group_norm_silu", x.device) == "cpp"
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-3, atol=1e-5)


def test_fused_norm_modules_under_bf16_autocast_and_channels_last():
    """The fast training mode: bf16 autocast, channels-last activations. The
    fused path stays within bf16 rounding of the reference path."""
    from iddpm_fast import ops

    model = _small_model(use_scale_shift_norm=True).to(memory_format=torch.channels_last)
    torch.manual_seed(6)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([10, 3000])
    with ops.use_backend("reference"):
        ref_out, _ = _out_and_grads(model, x, t, dtype=torch.bfloat16)
    out, grads = _out_and_grads(model, x, t, dtype=torch.bfloat16)
    assert all(torch.isfinite(g).all() for g in grads)
    err = (out - ref_out).abs().max().item()
    assert err <= 0.05 * ref_out.abs().max().item(), err


def test_resblock_keeps_the_original_parameter_names():
    block = ResBlock(64, 128, 0.1, out_channels=64, use_scale_shift_norm=True)
    names = [name for name, _ in block.named_parameters()]
    assert names == [
        "in_layers.0.weight", "in_layers.0.bias", "in_layers.2.weight", "in_layers.2.bias",
        "emb_layers.1.weight", "emb_layers.1.bias",
        "out_layers.0.weight", "out_layers.0.bias", "out_layers.3.weight", "out_layers.3.bias",
    ]


@pytest.mark.parametrize("heads,length", [(1, 64), (4, 7)], ids=["1 head", "4 heads, odd length"])
def test_attention_through_sdpa_equals_the_legacy_einsum(heads, length):
    """QKVAttention runs scaled_dot_product_attention on float32 (and CUDA);
    it computes the original's legacy attention (same head split, same
    scaling) within fp32 rounding, values and gradients; under the reference
    backend it is the original's einsum arithmetic exactly."""
    from iddpm_fast import ops
    from iddpm_fast.unet import QKVAttention

    torch.manual_seed(7)
    qkv = torch.randn(2 * heads, 3 * 16, length, requires_grad=True)

    def legacy(qkv):
        w = qkv.shape[1] // 3
        q, k, v = torch.split(qkv, w, dim=1)
        f = 1 / math.sqrt(math.sqrt(w))
        a = torch.softmax(torch.einsum("bct,bcs->bts", q * f, k * f).float(), dim=-1)
        return torch.einsum("bts,bcs->bct", a, v)

    attn = QKVAttention()
    assert attn._use_sdpa(qkv)
    out = attn(qkv)
    (g,) = torch.autograd.grad(out.square().sum(), qkv)
    want = legacy(qkv)
    (gw,) = torch.autograd.grad(want.square().sum(), qkv)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, gw, rtol=1e-4, atol=1e-5)
    with ops.use_backend("reference"):
        assert not attn._use_sdpa(qkv)
        assert torch.equal(attn(qkv), want)


def test_unet_compiles_fullgraph_from_a_fresh_process():
    """torch.compile(fullgraph=True) of the UNet traces through the op seam,
    including the first use of the C++ extension (loaded outside the trace)."""
    import os
    import subprocess
    import sys

    code = r"""
import torch
from iddpm_fast.unet import UNetModel
m = UNetModel(in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
              attention_resolutions=(2,), channel_mult=(1, 2), use_scale_shift_norm=True)
x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
y = torch.compile(m, fullgraph=True, backend="aot_eager")(x, t)
torch.testing.assert_close(y, m(x, t))
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_attention_in_bf16_under_autocast_stays_bf16_and_close():
    """Half-precision attention on CPUs runs SDPA in float32 (outside
    autocast, which would cast it back) and returns the input dtype."""
    from iddpm_fast.unet import QKVAttention

    torch.manual_seed(8)
    qkv = torch.randn(4, 3 * 16, 33).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = QKVAttention()(qkv)
    assert out.dtype == torch.bfloat16
    w = 16
    q, k, v = torch.split(qkv.double(), w, dim=1)
    a = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(w), dim=-1)
    want = torch.einsum("bts,bcs->bct", a, v)
    assert (out.double() - want).abs().max() < 2e-2


@pytest.mark.parametrize("heads,channels,size", [(1, 64, 16), (4, 128, 8), (2, 64, 5)],
                         ids=["1 head 16x16", "4 heads 8x8", "2 heads odd 5x5"])
def test_attention_block_on_channels_last_tokens_equals_the_nct_route(heads, channels, size):
    """A channels-last image is attended as [N, T, C] tokens (1x1 convs as
    linear layers on the same weights, no layout copies): the same function
    within fp32 rounding, values and every gradient, and the result stays
    channels-last; NCHW input and the reference backend keep the original
    [N, C, T] route."""
    from iddpm_fast import ops
    from iddpm_fast.unet import AttentionBlock

    torch.manual_seed(9)
    block = AttentionBlock(channels, num_heads=heads)
    with torch.no_grad():  # proj_out starts at zero; make the attention count
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, channels, size, size) - 1
    x_cl = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    x_nchw = x.clone().requires_grad_()
    assert block._tokens_last(x_cl) and not block._tokens_last(x_nchw)
    with ops.use_backend("reference"):
        assert not block._tokens_last(x_cl)
    results = []
    for inp in (x_nchw, x_cl):
        out = block(inp)
        grads = torch.autograd.grad(out.square().sum(), [inp, *block.parameters()])
        results.append((out, grads))
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(results[1][1], results[0][1]):
        # Sums over thousands of terms in another order: error relative to the tensor's scale.
        assert (got - want).abs().max() <= 2e-5 * want.abs().max(), (got - want).abs().max() / want.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = block(x_cl.detach().bfloat16()), block(x_nchw.detach().bfloat16())
    assert got.dtype == want.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() < 0.1  # a few bf16 ulps at |x| ~ 3


def test_half_precision_attention_upcasts_on_cpu_only_for_training():
    """CPU bf16 attention runs in float32 when autograd will differentiate it
    (the flash kernel's bf16 backward is the slower one) and in bf16 for
    inference (its faster forward); both stay close to float64."""
    from iddpm_fast.unet import QKVAttention

    torch.manual_seed(10)
    qkv = torch.randn(4, 3 * 16, 40).bfloat16()
    assert not QKVAttention._upcast(qkv)
    assert QKVAttention._upcast(qkv.clone().requires_grad_())
    with torch.no_grad():
        assert not QKVAttention._upcast(qkv.clone().requires_grad_())
    assert not QKVAttention._upcast(qkv.float().requires_grad_())
    q, k, v = torch.split(qkv.double(), 16, dim=1)
    want = torch.einsum("bts,bcs->bct", torch.softmax(torch.einsum("bct,bcs->bts", q, k) / 4, dim=-1), v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        infer = QKVAttention()(qkv)
        train = QKVAttention()(qkv.clone().requires_grad_())
    for out in (infer, train):
        assert out.dtype == torch.bfloat16
        assert (out.double() - want).abs().max() < 2e-2


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_whole_model_under_torch_compile_fullgraph(memory_format):
    """torch.compile(model, fullgraph=True) traces every seam op of the UNet
    (fused GroupNorms, convolution biases, attention) without a graph
    break, with the eager model's output and gradients."""
    model = _small_model(3, use_scale_shift_norm=True).to(memory_format=memory_format)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)).contiguous(memory_format=memory_format)
    t = torch.tensor([0, 5])
    params = list(model.parameters())
    eager = model(x, t)
    grads_eager = torch.autograd.grad(eager.square().mean(), params)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, t)
    grads = torch.autograd.grad(out.square().mean(), params)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_autocast_keeps_the_parts_improved_diffusion_kept_in_float32(dtype):
    # improved-diffusion's fp16 mode halves only the torso's convolutions: the
    # time embedding, each block's emb_layers and the output head stay float32.
    # Under fp16 autocast they run with autocast off, so the output conv's
    # weight gradient at the initial loss scale (2^20) does not overflow fp16;
    # bf16 (float32's range) keeps autocast everywhere.
    model = _small_model(seed=3, out_channels=6)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)

        return hook

    model.out[-1].register_forward_hook(record("head"))
    model.time_embed[0].register_forward_hook(record("time_embed"))
    model.input_blocks[1][0].emb_layers[-1].register_forward_hook(record("emb_layers"))
    model.input_blocks[1][0].in_layers[-1].register_forward_hook(record("torso conv"))
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 500, 999])
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, t)
    kept = torch.float32 if dtype == torch.float16 else dtype
    assert seen == {"head": kept, "time_embed": kept, "emb_layers": kept, "torso conv": dtype}
    (out.float().square().mean() * 2.0**20).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
