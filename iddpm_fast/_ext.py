"""
Loading the optional C++/CUDA extension (fused GroupNorm-SiLU, csrc/).

Order of attempts, on the first call of :func:`load` (never at import):

1. ``iddpm_fast._C`` built ahead of time by ``pip install --no-build-isolation .``;
2. otherwise, or when that library does not match the torch now installed,
   a just-in-time build of the shipped sources with ninja into a cache
   directory (``$IDDPM_FAST_EXT_DIR``, default
   ``~/.cache/iddpm_fast/ext/<torch version>``), announced by one line on
   stderr; later processes reuse it;
3. otherwise nothing: :func:`load` returns the reason, and the op seam warns
   once with it and runs the pure-PyTorch reference.

``IDDPM_FAST_NO_EXT=1`` disables the extension (the reference runs).
"""

import hashlib
import importlib.util
import os
import platform
import sys
import threading

import torch

_ENV_DISABLE = "IDDPM_FAST_NO_EXT"
_ENV_DIR = "IDDPM_FAST_EXT_DIR"
_OPS = ("gn_silu_forward", "gn_silu_backward", "bias_add", "dropout_forward", "dropout_backward")
# -fopenmp: at::parallel_for is an inline `#pragma omp parallel`, serial
# without it. The extension then binds to the libgomp torch already loaded.
_CPU_FLAGS = ["-O3", "-fopenmp"]  # no -std: cpp_extension picks what the torch headers need
if platform.machine() in ("x86_64", "AMD64"):
    # at::vec::Vectorized is only vectorised with these; see _cpu_reason().
    _CPU_FLAGS += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]

_lock = threading.Lock()
_state = {"done": False, "reason": None, "how": None}


def _source_dir():
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
    return here


def sources(with_cuda=False):
    """The extension's source files shipped with the package."""
    root = _source_dir()
    found = []
    for sub, ext in (("", ".cpp"), ("cpu", ".cpp")) + ((("cuda", ".cu"),) if with_cuda else ()):
        folder = os.path.join(root, sub)
        if os.path.isdir(folder):
            found += sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(ext))
    return found


def headers():
    """The extension's header files (a change in one means a rebuild)."""
    root = _source_dir()
    found = []
    for folder in (root, os.path.join(root, "cpu"), os.path.join(root, "cuda")):
        if os.path.isdir(folder):
            found += sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".h"))
    return found


def cpu_flags():
    """This x86 CPU's feature flags from /proc/cpuinfo, or None where they are unknown."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None


def _cpu_reason():
    """Why this CPU cannot run the AVX2-compiled kernels, or None."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags = cpu_flags()
    if flags is None:
        capability = torch.backends.cpu.get_cpu_capability()
        return None if capability in ("AVX2", "AVX512") else f"this CPU reports capability {capability}, not AVX2"
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    return f"this CPU lacks {'/'.join(missing)}, which the extension's CPU kernels are compiled for" if missing else None


# Ops whose autograd the library itself registers (csrc/autograd.cpp): a
# stale build without it would run without gradients.
_AUTOGRAD_OPS = ("gn_silu_forward", "bias_add", "dropout_forward", "dropout_backward")


def _registered():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    try:
        return all(has(f"iddpm_fast::{op}", "CPU") for op in _OPS) and all(
            has(f"iddpm_fast::{op}", "Autograd") for op in _AUTOGRAD_OPS
        )
    except RuntimeError:  # "operator ... does not exist": nothing loaded yet
        return False


def _try_prebuilt():
    spec = importlib.util.find_spec("iddpm_fast._C")
    if spec is None or not spec.origin:
        return "no prebuilt iddpm_fast._C"
    try:
        torch.ops.load_library(spec.origin)
    except OSError as e:  # built against another torch
        return f"prebuilt {os.path.basename(spec.origin)} does not load ({e})"
    return None


def _cache_dir(with_cuda):
    base = os.environ.get(_ENV_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "iddpm_fast", "ext")
    tag = f"torch{torch.__version__}-{'cuda' + str(torch.version.cuda) if with_cuda else 'cpu'}"
    digest = hashlib.sha1(" ".join(_CPU_FLAGS).encode()).hexdigest()[:8]
    return os.path.join(base, f"{tag}-{digest}".replace("+", "_"))


def _want_cuda():
    from torch.utils import cpp_extension

    has_cu = any(f.endswith(".cu") for f in sources(with_cuda=True))
    return has_cu and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _jit_build():
    from torch.utils import cpp_extension

    srcs = sources()
    if not srcs:
        return "the package ships no C++ sources"
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja), so it cannot be compiled on first use"
    with_cuda = _want_cuda()
    build_dir = _cache_dir(with_cuda)
    try:
        os.makedirs(build_dir, exist_ok=True)
    except OSError as e:
        return f"its build directory {build_dir} cannot be created ({e}); set ${_ENV_DIR} to a writable folder"
    built = os.path.join(build_dir, "iddpm_fast_C.so")
    inputs = sources(with_cuda) + headers()
    stale = not os.path.exists(built) or os.path.getmtime(built) < max(
        os.path.getmtime(f) for f in inputs if os.path.exists(f)
    )
    if stale:
        print(
            f"iddpm_fast: compiling the C++ extension{' with CUDA' if with_cuda else ''} into {build_dir} "
            "(first use only; takes about a minute)",
            file=sys.stderr,
            flush=True,
        )
    flags = list(_CPU_FLAGS)
    if with_cuda:
        flags.append("-DIDDPM_FAST_WITH_CUDA")
    try:
        cpp_extension.load(
            name="iddpm_fast_C",
            sources=sources(with_cuda),
            extra_cflags=flags,
            extra_cuda_cflags=["-O3", "-DIDDPM_FAST_WITH_CUDA"],
            extra_ldflags=["-fopenmp"],
            build_directory=build_dir,
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # compiler missing, compile error, ...
        lines = str(e).strip().splitlines()
        errors = [line.strip() for line in lines if "error:" in line.lower()]
        errors += [line.strip() for line in lines if "error" in line.lower() and "error:" not in line.lower()]
        detail = (errors or lines or [type(e).__name__])[0]
        return f"compiling it failed ({detail}; build directory {build_dir})"
    return None


def _assume_constant(fn):
    # torch.compile traces the seam; loading (and maybe compiling) a library
    # cannot be traced, and its answer never changes within a process. This
    # is what torch._dynamo.assume_constant_result does; importing dynamo
    # here would import triton before tests can set TRITON_INTERPRET.
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant
def load():
    """
    Make the extension's ops available as ``torch.ops.iddpm_fast.*``.

    :return: None when they are, else a sentence saying why not.
    """
    if _state["done"]:
        return _state["reason"]
    with _lock:
        if _state["done"]:
            return _state["reason"]
        reason = None
        if os.environ.get(_ENV_DISABLE) == "1":
            reason = f"the C++ extension is disabled by {_ENV_DISABLE}=1"
        else:
            reason = _cpu_reason()
        if reason is None and not _registered():
            why_not_prebuilt = _try_prebuilt()
            if why_not_prebuilt is not None or not _registered():
                reason = _jit_build()
                if reason is None and not _registered():
                    reason = "the compiled library does not register the iddpm_fast ops"
                if reason is not None and why_not_prebuilt and "no prebuilt" not in why_not_prebuilt:
                    reason = f"{why_not_prebuilt}; {reason}"
            _state["how"] = "prebuilt" if why_not_prebuilt is None else "jit"
        if reason is None:
            from .ops import _cpp

            _cpp.register_python_parts()
        _state["reason"] = reason
        _state["done"] = True
        return reason


def has_cuda_kernels():
    """Whether the loaded extension has CUDA implementations."""
    return load() is None and torch._C._dispatch_has_kernel_for_dispatch_key("iddpm_fast::gn_silu_forward", "CUDA")


def how_loaded():
    """'prebuilt', 'jit', or None (not loaded)."""
    load()
    return _state["how"] if _state["reason"] is None else None
