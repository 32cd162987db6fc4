"""
Compile every Triton kernel for a Hopper GPU (sm_90) on this machine, with
the arguments the kernel functions really pass, without a GPU: run as a
script (by tests/test_triton_compile.py) in a process where TRITON_INTERPRET
is unset, since under the interpreter triton.jit makes interpreted functions,
which do not compile.

The interpreter runs a kernel's Python body and so accepts some programs that
Triton's compiler rejects (a variable of two types on the two sides of an if,
say); only a GPU session found those until now. Each launch is recorded by
replacing Launcher.__call__ (nothing runs), its argument types are turned into
a Triton signature, and triton.compile builds PTX and, through ptxas, a cubin.

    python tests/compile_kernels.py [--quick]   # prints a JSON report on stdout
"""

import inspect
import itertools
import json
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
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
    torch.int64: "*i64", torch.int32: "*i32", torch.bool: "*i1",
}


def record_launches(drive):
    """The (kernel, args, keywords) of every launch `drive()` makes; nothing runs."""
    launches = []

    def record(self, grid, *args, **constexprs):
        launches.append((self.kernel, args, {**constexprs, **_common.FIXED_OPTIONS}))  # as Launcher.__call__

    original = _common.Launcher.__call__
    _common.Launcher.__call__ = record
    try:
        drive()
    finally:
        _common.Launcher.__call__ = original
    return launches


def _scalar_type(value):
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def signature(kernel, args, constexprs):
    """ASTSource's (signature, constexprs) and the launch options of one launch."""
    params = kernel.params
    bound = dict(zip((p.name for p in params), args))
    bound.update({k: v for k, v in constexprs.items() if k not in LAUNCH_OPTIONS})
    sig, consts = {}, {}
    for i, p in enumerate(params):
        if p.name not in bound:
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{kernel.fn.__name__}: no value for {p.name}")
            bound[p.name] = p.default
        value = bound[p.name]
        if p.is_constexpr or value is None:
            sig[p.name] = "constexpr"
            consts[(i,)] = value
        elif isinstance(value, torch.Tensor):
            sig[p.name] = POINTER_TYPES[value.dtype]
        else:
            sig[p.name] = _scalar_type(value)
    options = {k: v for k, v in constexprs.items() if k in LAUNCH_OPTIONS}
    return sig, consts, options


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
    seen, report = set(), {"triton": triton.__version__, "target": "sm_90", "kernels": []}
    for kernel, args, constexprs in launches:
        sig, consts, options = signature(kernel, args, constexprs)
        key = (kernel.fn.__name__, tuple(sig.items()), tuple(sorted(consts.items())), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        start = time.perf_counter()
        entry = {"kernel": kernel.fn.__name__, "signature": {k: v for k, v in sig.items() if v != "constexpr"},
                 "constexprs": {kernel.params[i[0]].name: repr(v) for i, v in consts.items()}, "options": options}
        try:
            compiled = triton.compile(ASTSource(kernel, sig, consts), target=TARGET, options=options)
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
