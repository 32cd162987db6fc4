"""
Compile every Triton kernel for a Hopper GPU (sm_90) on this machine, with
the arguments the kernel functions really pass, without a GPU: run as a
script (by tests/test_triton_compile.py) in a process where TRITON_INTERPRET
is unset, since under the interpreter triton.jit makes interpreted functions,
which do not compile.

The interpreter runs a kernel's Python body and so accepts some programs that
Triton's compiler rejects (a variable of two types on the two sides of an if,
say); only a GPU session found those until now. Each launch is recorded as
the Launchers hand it to kernel[grid] (their fixed options included; nothing
runs), its arguments are specialised as Triton's launcher would (types, ints
equal to 1 as constexprs, 16-byte alignment hints), and triton.compile builds
PTX and, through ptxas, a cubin.

    python tests/compile_kernels.py [--quick]   # prints a JSON report on stdout
"""

import inspect
import itertools
import json
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
    sys.exit("tests/compile_kernels.py: run it with TRITON_INTERPRET unset (interpreted kernels do not compile)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from iddpm_fast import reference as ref  # noqa: E402
from iddpm_fast.kernels import _common, likelihood, q_sample, sampling, training_loss  # noqa: E402
from iddpm_fast.script_util import create_gaussian_diffusion  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
LAUNCH_OPTIONS = _common._LAUNCH_OPTIONS  # num_warps, enable_fp_fusion, ...: compile options, not arguments
POINTER_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
    torch.int64: "*i64", torch.int32: "*i32", torch.bool: "*u1",
}
try:  # Triton's own argument specialisation (3.4+): ints equal to 1 become constexprs, 16-byte alignment a hint
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
except ImportError:
    native_specialize_impl = None


class _Recorder:
    """Stands in for a Launcher's kernel: kernel[grid](...) records the launch."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.launches.append((self.kernel, args, constexprs))


def launchers():
    """Every Launcher of the kernel modules."""
    return [v for m in (likelihood, q_sample, sampling, training_loss) for v in vars(m).values()
            if isinstance(v, _common.Launcher)]


def record_launches(drive):
    """The (kernel, args, keywords) of every launch `drive()` makes, as the
    Launchers pass them to kernel[grid] (their fixed options included); nothing runs."""
    launches = []
    found = launchers()
    kernels = [launcher.kernel for launcher in found]
    direct = _common.Launcher.direct
    _common.Launcher.direct = False  # every call takes kernel[grid](...)
    for launcher in found:
        launcher.kernel = _Recorder(launcher.kernel, launches)
    try:
        drive()
    finally:
        _common.Launcher.direct = direct
        for launcher, kernel in zip(found, kernels):
            launcher.kernel = kernel
    return launches


def _specialise(param, value):
    """(Triton type, constexpr value or None, attributes) of one argument, as JITFunction.run specialises it."""
    if native_specialize_impl is not None:
        ty, spec = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)
        if ty == "constexpr":
            return ty, spec, None
        return ty, None, (BaseBackend.parse_attr(spec) if isinstance(spec, str) else None)
    if value is None:
        return "constexpr", None, None
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype], None, None
    if isinstance(value, bool):
        return "u1", None, None
    if isinstance(value, int):
        return ("i32" if -2**31 <= value < 2**31 else "i64"), None, None
    if isinstance(value, float):
        return "fp32", None, None
    raise TypeError(f"no Triton type for {type(value).__name__}")


def signature(kernel, args, constexprs):
    """ASTSource's (signature, constexprs, attrs) and the compile options of one launch."""
    params = kernel.params
    bound = dict(zip((p.name for p in params), args))
    bound.update({k: v for k, v in constexprs.items() if k not in LAUNCH_OPTIONS})
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(params):
        if p.name not in bound:
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{kernel.fn.__name__}: no value for {p.name}")
            bound[p.name] = p.default
        value = bound[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[(i,)] = value
            continue
        ty, const, attr = _specialise(p, value)
        sig[p.name] = ty
        if ty == "constexpr":
            consts[(i,)] = const
        elif attr:
            attrs[(i,)] = attr
    options = {k: v for k, v in constexprs.items() if k in LAUNCH_OPTIONS}
    return sig, consts, attrs, options


def _drive(quick):
    """Every kernel function, over the kinds and dtypes its kernels specialise on."""
    diffusion = create_gaussian_diffusion(steps=40, learn_sigma=True, noise_schedule="cosine")
    tables = diffusion.tables("cpu")
    shape = (2, 3, 8, 8)
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16, torch.float16]
    t = torch.tensor([0, 39])

    def data(dtype, channels):
        return [torch.zeros((shape[0], c, *shape[2:]), dtype=dtype) for c in channels]

    for dtype in dtypes:
        x0, noise = data(dtype, (3, 3))
        q_sample.q_sample(x0, t, noise, tables)
        q_sample.q_sample_backward(x0, t, tables, dtype, dtype, True, True)
        q_sample.q_sample_backward(x0, t, tables, dtype, dtype, False, True)
        likelihood.discretized_gaussian_log_likelihood(x0, noise, noise)
        likelihood.discretized_gaussian_nll_bpd(x0, noise, noise)
        likelihood.q_posterior_mean_variance(x0, noise, t, tables)
    sampling_kinds = list(itertools.product(ref.MEAN_TYPES, ref.VAR_TYPES, [True, False]))
    loss_kinds = list(itertools.product(ref.MEAN_TYPES, ref.VAR_TYPES, ref.LOSS_TYPES))
    if quick:
        sampling_kinds = [("epsilon", "learned_range", True)]
        loss_kinds = [("epsilon", "learned_range", "rescaled_mse"), ("epsilon", "fixed_small", "kl")]
    for (mean, var, clip), dtype in itertools.product(sampling_kinds, dtypes[:1]):
        learned = var in ref.LEARNED_VAR_TYPES
        x0, xt, out = data(dtype, (3, 3, 6 if learned else 3))
        sampling.p_mean_variance(out, xt, t, tables, mean, var, clip)
        sampling.p_sample_step(out, xt, t, x0, tables, mean, var, clip)
        sampling.ddim_step(out, xt, t, x0, tables, 0.5, mean, var, clip)
        sampling.vb_terms_bpd(out, x0, xt, t, tables, mean, var, clip)
    for (mean, var, loss), dtype in itertools.product(loss_kinds, dtypes[:1]):
        learned = var in ref.LEARNED_VAR_TYPES
        x0, noise, out = data(dtype, (3, 3, 6 if learned else 3))
        kinds = (mean, var, loss, 40)
        training_loss.training_loss_fwd(out, x0, noise, t, tables, *kinds, one_launch=True)
        training_loss.training_loss_fwd(out, x0, noise, t, tables, *kinds, one_launch=False)
        g = torch.ones(shape[0])
        training_loss.training_loss_bwd(out, x0, noise, t, tables, g, None, None, *kinds)
        training_loss.training_loss_bwd(out, x0, noise, t, tables, g, g, g, *kinds)
    if not quick:  # the half-precision loss and sampling kernels, one kind each
        for dtype in dtypes[1:]:
            x0, noise, out = data(dtype, (3, 3, 6))
            kinds = ("epsilon", "learned_range", "rescaled_mse", 40)
            training_loss.training_loss_fwd(out, x0, noise, t, tables, *kinds)
            training_loss.training_loss_bwd(out, x0, noise, t, tables, torch.ones(2), None, None, *kinds)
            sampling.p_sample_step(out, x0, t, noise, tables, "epsilon", "learned_range", True)


def main(quick=False):
    launches = record_launches(lambda: _drive(quick))
    seen, report = set(), {"triton": triton.__version__, "target": "sm_90", "kernels": [],
                           "launchers": sorted(launcher.kernel.fn.__name__ for launcher in launchers())}
    for kernel, args, constexprs in launches:
        sig, consts, attrs, options = signature(kernel, args, constexprs)
        key = (kernel.fn.__name__, tuple(sig.items()), tuple(sorted(consts.items(), key=repr)),
               tuple(sorted(attrs)), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        start = time.perf_counter()
        entry = {"kernel": kernel.fn.__name__, "signature": {k: v for k, v in sig.items() if v != "constexpr"},
                 "aligned": sorted(kernel.params[i[0]].name for i in attrs),
                 "constexprs": {kernel.params[i[0]].name: repr(v) for i, v in consts.items()}, "options": options}
        try:
            compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=TARGET, options=options)
            entry["ok"] = "cubin" in compiled.asm
            entry["ptx_lines"] = compiled.asm["ptx"].count("\n")
            if not entry["ok"]:
                entry["error"] = "no cubin (ptxas did not run)"
        except Exception as exc:  # reported, the test fails on it
            entry["ok"] = False
            entry["error"] = f"{type(exc).__name__}: {str(exc)[-3000:]}"
        entry["seconds"] = round(time.perf_counter() - start, 2)
        report["kernels"].append(entry)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
