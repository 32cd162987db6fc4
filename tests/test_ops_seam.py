"""The op seam: backend selection, fallbacks, input checks, dtype contract."""

import warnings

import pytest
import torch

from iddpm_fast import ops
from iddpm_fast import reference as ref
from iddpm_fast.ops import _backend
from iddpm_fast.script_util import create_gaussian_diffusion


@pytest.fixture
def scratch_op():
    """A throwaway op declared with every kind, removed afterwards."""
    name = "_test_scratch_op"
    warned = set(_backend._warned)
    _backend.declare(name, ("triton", "cpp", "reference"))
    _backend.register(name, "reference", lambda x: ("reference", x))
    yield name
    _backend._OPS.pop(name)
    _backend._warned.intersection_update(warned)


def test_every_op_resolves_to_reference_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv("IDDPM_FAST_BACKEND", raising=False)
    assert set(ops.declared_ops()) >= {
        "q_sample", "q_posterior_mean_variance", "p_mean_variance", "p_sample_step", "ddim_step",
        "discretized_gaussian_log_likelihood", "discretized_gaussian_nll_bpd", "vb_terms_bpd", "training_loss",
        "group_norm_silu", "group_norm_scale_shift_silu",
    }
    for name in ops.declared_ops():
        assert ops.resolve_name(name, torch.device("cpu")) in ("reference", "cpp")


def test_forcing_an_unavailable_backend_fails_clearly(monkeypatch):
    monkeypatch.setenv("IDDPM_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # without it Triton cannot run CPU tensors
    x = torch.randn(2, 3, 4, 4)
    d = create_gaussian_diffusion(steps=100)
    with pytest.raises(ops.BackendUnavailableError, match="IDDPM_FAST_BACKEND=triton was requested but q_sample"):
        d.q_sample(x, torch.tensor([1, 2]))
    # An op whose C++ extension cannot be had says why (simulated here).
    from iddpm_fast import _ext

    monkeypatch.setitem(_ext._state, "done", True)
    monkeypatch.setitem(_ext._state, "reason", "simulated: no C++ compiler")
    monkeypatch.setenv("IDDPM_FAST_BACKEND", "cpp")
    with pytest.raises(ops.BackendUnavailableError, match="group_norm_silu cannot run it on cpu: simulated"):
        ops.group_norm_silu(torch.randn(2, 32, 4, 4), None, None, 32)


def test_bad_backend_name_is_rejected(monkeypatch):
    monkeypatch.setenv("IDDPM_FAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="is not one of auto, triton, cpp, reference"):
        ops.requested_backend()
    with pytest.raises(ValueError):
        with ops.use_backend("nope"):
            pass


def test_reference_backend_forced_everywhere(monkeypatch):
    monkeypatch.setenv("IDDPM_FAST_BACKEND", "reference")
    for name in ops.declared_ops():
        assert ops.resolve_name(name, torch.device("cpu")) == "reference"


def test_auto_prefers_an_available_fused_kind_and_warns_once_when_it_cannot(scratch_op, monkeypatch):
    monkeypatch.delenv("IDDPM_FAST_BACKEND", raising=False)
    cpu = torch.device("cpu")
    _backend.register(scratch_op, "cpp", lambda x: ("cpp", x), available=lambda d: "extension failed to compile")
    with pytest.warns(RuntimeWarning, match="falls back from cpp on cpu: extension failed to compile"):
        assert _backend.resolve(scratch_op, cpu)(1) == ("reference", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback stays quiet
        assert _backend.resolve(scratch_op, cpu)(2) == ("reference", 2)
    _backend.register(scratch_op, "cpp", lambda x: ("cpp", x))
    assert _backend.resolve(scratch_op, cpu)(3) == ("cpp", 3)
    with ops.use_backend("reference"):
        assert _backend.resolve(scratch_op, cpu)(4) == ("reference", 4)
    # Triton is not in the CPU preference order: only an explicit request runs it.
    _backend.register(scratch_op, "triton", lambda x: ("triton", x))
    assert _backend.resolve(scratch_op, cpu)(5) == ("cpp", 5)
    with ops.use_backend("triton"):
        assert _backend.resolve(scratch_op, cpu)(6) == ("triton", 6)


def test_forced_kind_an_op_never_has_keeps_the_automatic_choice(monkeypatch):
    # "cpp" is the GroupNorm ops' kind; the diffusion math has no C++ version.
    monkeypatch.setenv("IDDPM_FAST_BACKEND", "cpp")
    assert ops.resolve_name("q_sample", torch.device("cpu")) == "reference"


def test_register_rejects_undeclared_kinds():
    with pytest.raises(ValueError, match="does not declare"):
        ops.register("q_sample", "cpp", lambda *a: None)


def test_triton_availability_reason_on_cpu(monkeypatch):
    from iddpm_fast import kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = kernels.unavailable_reason(torch.device("cpu"))
    assert why is not None and ("TRITON_INTERPRET" in why or "triton" in why)


# ------------------------------------------------------------ input checks


def _tables(T=20):
    return create_gaussian_diffusion(steps=T, learn_sigma=True, noise_schedule="cosine").tables("cpu")


def test_op_input_checks():
    tables = _tables()
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 19])
    with pytest.raises(ValueError, match="floating-point"):
        ops.q_sample(x.long(), t, x, tables)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.q_sample(x, [0, 1], x, tables)
    with pytest.raises(ValueError, match="coefficient tensor"):
        ops.q_sample(x, t, x, tables[:3])
    with pytest.raises(ValueError, match="model_mean_type='eps'"):
        ops.p_mean_variance(torch.randn(2, 6, 4, 4), x, t, tables, model_mean_type="eps",
                            model_var_type="learned_range", clip_denoised=True)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ops.ddim_step(torch.randn(2, 6, 4, 4), x, t, x, tables, eta=-1, model_mean_type="epsilon",
                      model_var_type="learned_range", clip_denoised=True)
    with pytest.raises(ValueError, match="cannot be split into 32 groups"):
        ops.group_norm_silu(torch.randn(2, 48, 4, 4), None, None, 32)
    with pytest.raises(ValueError, match=r"scale must have shape \[N x C\]"):
        ops.group_norm_scale_shift_silu(torch.randn(2, 64, 4, 4), None, None, torch.zeros(2, 32), torch.zeros(2, 64), 32)
    # indexing takes int64/int32 only: uint8 or bool would act as a mask, int16 fails
    for dtype in (torch.uint8, torch.int16, torch.bool, torch.float32):
        with pytest.raises(ValueError, match="int64"):
            ops.q_sample(x, t.to(dtype), x, tables)
    # parameters on another device: the dispatcher would route a meta one to the
    # fake kernel and return uninitialised memory
    x64 = torch.randn(2, 64, 4, 4)
    meta = torch.empty(64, device="meta")
    with pytest.raises(ValueError, match="GroupNorm weight is on meta"):
        ops.group_norm_silu(x64, meta, None, 32)
    with pytest.raises(ValueError, match="shift is on meta"):
        ops.group_norm_scale_shift_silu(x64, None, None, torch.zeros(2, 64), torch.zeros(2, 64, device="meta"), 32)
    with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
        ops.group_norm_scale_shift_silu(x64, None, None, 0.5, torch.zeros(2, 64), 32)


# ------------------------------------------------------------ dtype contract


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_ops_compute_in_fp32_and_return_the_input_dtype(dtype):
    tables = _tables()
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(3, 2, 5, 3, generator=g) * 2 - 1)  # odd HxW
    noise = torch.randn(3, 2, 5, 3, generator=g)
    out = torch.randn(3, 4, 5, 3, generator=g)
    t = torch.tensor([0, 7, 19])  # edge timesteps 0 and T-1
    kinds = dict(model_mean_type="epsilon", model_var_type="learned_range")
    lo = [v.to(dtype) for v in (x0, noise, out)]
    x_t = ops.q_sample(lo[0], t, lo[1], tables)
    assert x_t.dtype == dtype
    torch.testing.assert_close(x_t.float(), ref.q_sample(x0, t, noise, tables), rtol=1e-2, atol=1e-2)
    loss, mse, vb = ops.training_loss(lo[2], lo[0], lo[1], t, tables, loss_type="rescaled_mse",
                                      num_timesteps=20, **kinds)
    assert loss.dtype == mse.dtype == vb.dtype == torch.float32
    ref_loss = ref.training_loss(lo[2].float(), lo[0].float(), lo[1].float(), t, tables, loss_type="rescaled_mse",
                                 num_timesteps=20, **kinds)[0]
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=1e-2)
    sample, pred = ops.p_sample_step(lo[2], x_t, t, lo[1], tables, clip_denoised=True, **kinds)
    assert sample.dtype == pred.dtype == dtype and pred.float().abs().max() <= 1


def test_reference_ops_accept_non_contiguous_inputs():
    tables = _tables()
    x0 = torch.randn(3, 5, 2, 4).permute(0, 2, 3, 1)[..., :3]  # [3, 2, 4, 3], strided
    noise = torch.randn(3, 2, 3, 4).transpose(2, 3)
    assert not x0.is_contiguous() and not noise.is_contiguous()
    t = torch.tensor([0, 5, 19])
    torch.testing.assert_close(ops.q_sample(x0, t, noise, tables),
                               ops.q_sample(x0.contiguous(), t, noise.contiguous(), tables))


def test_group_norm_silu_reference_matches_the_unet_modules():
    from iddpm_fast.nn import SiLU, normalization

    x = -2.3 + 0.5 * torch.randn(2, 64, 5, 7)  # non-zero mean, odd HxW
    norm = normalization(64)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    want = SiLU()(norm(x))
    torch.testing.assert_close(ops.group_norm_silu(x, norm.weight, norm.bias, 32), want)
    scale, shift = torch.randn(2, 64), torch.randn(2, 64)
    want = SiLU()(norm(x) * (1 + scale[..., None, None]) + shift[..., None, None])
    torch.testing.assert_close(ops.group_norm_scale_shift_silu(x, norm.weight, norm.bias, scale, shift, 32), want)
    x1d = torch.randn(2, 64, 9)  # 1-D attention input [N, C, L]
    torch.testing.assert_close(ops.group_norm_silu(x1d, norm.weight, norm.bias, 32), SiLU()(norm(x1d)))
