"""
kernels._common.Launcher: the direct launch of a compiled Triton kernel that
skips Triton's per-call argument binding. On the CPU a stand-in kernel
records what would be launched (the direct path never runs under the
interpreter); on a GPU the real kernels launched directly equal Triton's own
launches.
"""

import os

import pytest
import torch

# (TRITON_INTERPRET=1 without a GPU: tests/conftest.py sets it before any test module imports triton)
triton = pytest.importorskip("triton")

from iddpm_fast.kernels import _common  # noqa: E402


class _Compiled:
    """What kernel[grid](...) returns: records direct launches."""

    def __init__(self, log):
        self.function, self.packed_metadata = "cufunction", "metadata"
        # As in Triton, run is the launcher object, which holds no reference to the CompiledKernel.
        self.run = lambda *args: log.append(("direct", args))


class _Param:
    def __init__(self, name, is_constexpr):
        self.name, self.is_constexpr = name, is_constexpr


class _Kernel:
    """A @triton.jit kernel's stand-in: x_ptr, n, then constexprs A and BLOCK."""

    arg_names = ["x_ptr", "n", "A", "BLOCK"]

    def __init__(self):
        self.log = []
        self.params = [_Param("x_ptr", False), _Param("n", False), _Param("A", True), _Param("BLOCK", True)]
        self.pre_run_hooks = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return _Compiled(self.log)

        return launch


class _Hook:
    def __init__(self, calls=()):
        self.calls = list(calls)


class _Runtime:
    def __init__(self, enter=(), exit=()):
        self.launch_enter_hook, self.launch_exit_hook = _Hook(enter), _Hook(exit)
        self.debug, self.add_stages_inspection_hook = False, None
        self.device = 0


class _Compilation:
    instrumentation_mode, fpsan_homomorphic_casts = "", False


@pytest.fixture
def direct(monkeypatch):
    """The direct path enabled as on a GPU: current device runtime.device (0), its stream 1234 + device,
    no launch hooks."""
    runtime, compilation = _Runtime(), _Compilation()
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common.Launcher, "direct", True)
    env = (lambda: runtime.device, lambda device: 1234 + device, runtime, compilation)
    monkeypatch.setattr(_common, "_launch_env", lambda: env)
    return runtime


def _kinds(log):
    return [entry[0] for entry in log]


def test_first_call_through_triton_then_direct_with_constexprs_in_parameter_order(direct):
    kernel = _Kernel()
    launch = _common.Launcher(kernel)
    x = torch.zeros(64)
    launch((4,), x, 100, BLOCK=128, A=3)  # keyword order differs from the parameter order
    launch((5, 2), x, 100, BLOCK=128, A=3)
    assert _kinds(kernel.log) == ["triton", "direct"]
    assert kernel.log[0][1:] == ((4,), (x, 100), {"BLOCK": 128, "A": 3, "enable_fp_fusion": True})
    assert kernel.log[1][1] == (5, 2, 1, 1234, "cufunction", "metadata", None, None, None, x, 100, 3, 128)
    assert launch.misses == 1


@pytest.mark.parametrize("path", ["direct", "triton"])
def test_every_launch_asks_for_fused_multiply_adds(path, monkeypatch, request):
    """Triton 3.10 turns fused multiply-adds off by default (3.9 warns about
    it): the kernels ask for them, so their speed and rounding stay as measured."""
    if path == "direct":
        request.getfixturevalue("direct")
    else:
        monkeypatch.setattr(_common.Launcher, "direct", False)
    kernel = _Kernel()
    launch = _common.Launcher(kernel)
    launch((4,), torch.zeros(64), 100, BLOCK=128, A=3)
    assert kernel.log[0][0] == "triton" and kernel.log[0][3]["enable_fp_fusion"] is True
    launch((4,), torch.zeros(64), 100, BLOCK=128, A=3, enable_fp_fusion=False)  # a call's own choice stays
    assert kernel.log[-1][0] == "triton" and kernel.log[-1][3]["enable_fp_fusion"] is False


def test_a_users_fp_fusion_default_is_left_to_triton():
    import subprocess
    import sys

    code = "from iddpm_fast.kernels import _common; print(_common.FIXED_OPTIONS)"
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="0")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "{}", run.stderr[-2000:]


@pytest.mark.parametrize(
    "change",
    [
        "dtype",
        "unaligned pointer",
        "int becomes 1",
        "int becomes a multiple of 16",
        "int needs 64 bits",
        "int needs unsigned 64 bits",
        "int becomes a bool",
        "constexpr",
        "num_warps",
        "device",
    ],
)
def test_what_triton_specialises_on_is_a_new_launch_through_triton(direct, change):
    kernel = _Kernel()
    launch = _common.Launcher(kernel)
    buf = torch.zeros(64)
    base = dict(x=buf[:32], n=2**40 + 1 if change == "int needs unsigned 64 bits" else 1 if "bool" in change else 7,
                A=3, warps={})
    launch((1,), base["x"], base["n"], A=base["A"], BLOCK=16, **base["warps"])
    changed = dict(base)
    if change == "dtype":
        changed["x"] = torch.zeros(32, dtype=torch.float16)
    elif change == "unaligned pointer":
        changed["x"] = buf[1:33]  # 4 bytes past a 16-byte boundary
    elif change == "int becomes 1":
        changed["n"] = 1
    elif change == "int becomes a multiple of 16":
        changed["n"] = 48
    elif change == "int needs 64 bits":
        changed["n"] = 2**31 + 1
    elif change == "int needs unsigned 64 bits":
        changed["n"] = 2**63 + 1  # (from 2**40 + 1: i64, not 1, not a multiple of 16)
    elif change == "int becomes a bool":
        changed["n"] = True  # (from 1, equal to it and of the same hash: Triton makes 1 a constexpr, True a u1)
    elif change == "device":
        direct.device = 1
    elif change == "constexpr":
        changed["A"] = 4
    else:
        changed["warps"] = {"num_warps": 8}
    launch((1,), changed["x"], changed["n"], A=changed["A"], BLOCK=16, **changed["warps"])
    launch((1,), changed["x"], changed["n"], A=changed["A"], BLOCK=16, **changed["warps"])
    assert _kinds(kernel.log) == ["triton", "triton", "direct"]
    if change == "num_warps":  # a launch option: in the key, not among the kernel's arguments
        assert kernel.log[2][1][-4:] == (changed["x"], 7, 3, 16)
    if change == "device":  # launched on that device's stream
        assert kernel.log[2][1][3] == 1235


def test_the_same_specialisation_with_other_values_is_direct(direct):
    kernel = _Kernel()
    launch = _common.Launcher(kernel)
    launch((1,), torch.zeros(32), 7, A=3, BLOCK=16)
    launch((1,), torch.ones(48), 9, A=3, BLOCK=16)
    assert _kinds(kernel.log) == ["triton", "direct"]
    assert kernel.log[1][1][-3:] == (9, 3, 16)


@pytest.mark.parametrize("why", ["enter hook", "exit hook", "IDDPM_FAST_TRITON_LAUNCH=triton", "interpreter",
                                 "pre-run hook", "TRITON_DEBUG", "instrumentation", "not CUDA"])
def test_triton_path_every_time(direct, monkeypatch, why):
    kernel = _Kernel()
    if why == "enter hook":
        direct.launch_enter_hook.calls.append(print)
    elif why == "exit hook":
        direct.launch_exit_hook.calls.append(print)
    elif why == "interpreter":
        monkeypatch.setattr(_common, "interpreting", lambda: True)
    elif why == "pre-run hook":
        kernel.pre_run_hooks.append(print)
    elif why == "TRITON_DEBUG":
        direct.debug = True
    elif why == "instrumentation":
        monkeypatch.setattr(_Compilation, "instrumentation_mode", "consan")
    elif why == "not CUDA":
        monkeypatch.setattr(_common, "_launch_env", lambda: None)
    else:
        monkeypatch.setattr(_common.Launcher, "direct", False)
    launch = _common.Launcher(kernel)
    for _ in range(3):
        launch((1,), torch.zeros(32), 7, A=3, BLOCK=16)
    assert _kinds(kernel.log) == ["triton"] * 3


def test_a_parameter_left_to_its_default_keeps_the_triton_path(direct):
    kernel = _Kernel()
    launch = _common.Launcher(kernel)
    for _ in range(3):
        launch((1,), torch.zeros(32), 7, A=3)  # BLOCK not given: Triton fills in its default
    assert _kinds(kernel.log) == ["triton"] * 3


def test_a_non_constexpr_parameter_given_by_keyword_keeps_the_triton_path(direct):
    kernel = _Kernel()
    launch = _common.Launcher(kernel)
    for _ in range(3):
        launch((1,), torch.zeros(32), n=7, A=3, BLOCK=16)
    assert _kinds(kernel.log) == ["triton"] * 3


def test_the_cache_keeps_the_compiled_kernel_alive(direct):
    """Triton 3.9 unloads a kernel's module when its CompiledKernel is freed."""
    import gc
    import weakref

    kernel = _Kernel()
    launch = _common.Launcher(kernel)
    compiled = weakref.ref(launch((1,), torch.zeros(32), 7, A=3, BLOCK=16))
    gc.collect()
    assert compiled() is not None


def test_an_unhashable_argument_takes_the_triton_path(direct):
    kernel = _Kernel()
    launch = _common.Launcher(kernel)
    for _ in range(2):
        launch((1,), torch.zeros(32), 7, A=[3], BLOCK=16)
    assert _kinds(kernel.log) == ["triton"] * 2


def test_hook_set_reads_hook_chains_and_plain_hooks():
    assert not _common._hook_set(None)
    assert not _common._hook_set(_Hook())
    assert _common._hook_set(_Hook([print]))
    assert _common._hook_set(print)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the direct launch runs on a GPU")
def test_cuda_direct_launches_equal_triton_launches(monkeypatch):
    from iddpm_fast import reference as ref
    from iddpm_fast.kernels import q_sample as k
    from iddpm_fast.kernels import training_loss as tl
    from iddpm_fast.script_util import create_gaussian_diffusion

    tables = create_gaussian_diffusion(steps=40, learn_sigma=True).tables("cuda")
    kinds = ("epsilon", "learned_range", "rescaled_mse", 40)
    for dtype in (torch.float32, torch.bfloat16):
        for i in range(3):  # the first call of a specialisation goes through Triton, the others directly
            x0 = torch.randn(4, 3, 8, 8, device="cuda", dtype=dtype)
            noise = torch.randn_like(x0)
            out = torch.randn(4, 6, 8, 8, device="cuda", dtype=dtype)
            t = torch.tensor([0, 5, 17, 39], device="cuda")
            misses = (k._q_sample_launch.misses, tl._training_loss_fwd_rows_launch.misses)
            y = k.q_sample(x0, t, noise, tables)
            torch.testing.assert_close(y, ref.q_sample(x0, t, noise, tables), rtol=1e-2, atol=1e-2)
            loss = tl.training_loss_fwd(out, x0, noise, t, tables, *kinds)
            gl = torch.rand(4, device="cuda")
            grad = tl.training_loss_bwd(out, x0, noise, t, tables, gl, None, None, *kinds)
            monkeypatch.setattr(_common.Launcher, "direct", False)
            y_triton = k.q_sample(x0, t, noise, tables)
            loss_triton = tl.training_loss_fwd(out, x0, noise, t, tables, *kinds)
            grad_triton = tl.training_loss_bwd(out, x0, noise, t, tables, gl, None, None, *kinds)
            monkeypatch.setattr(_common.Launcher, "direct", True)
            assert torch.equal(y, y_triton) and torch.equal(grad, grad_triton)
            for a, b in zip(loss, loss_triton):
                assert torch.equal(a, b)
            if i > 0:
                assert misses == (k._q_sample_launch.misses, tl._training_loss_fwd_rows_launch.misses)


def test_a_triton_without_knobs_takes_its_own_path(monkeypatch):
    """Triton before 3.4 has no triton.knobs: _launch_env says so (None), and
    the Launcher then always calls kernel[grid](...)."""
    import sys

    monkeypatch.delattr(triton, "knobs", raising=False)
    monkeypatch.setitem(sys.modules, "triton.knobs", None)
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common.Launcher, "direct", True)
    _common._launch_env.cache_clear()
    try:
        assert _common._launch_env() is None
        kernel = _Kernel()
        launch = _common.Launcher(kernel)
        for _ in range(2):
            launch((1,), torch.zeros(32), 7, A=3, BLOCK=16)
        assert _kinds(kernel.log) == ["triton"] * 2
    finally:
        _common._launch_env.cache_clear()
