"""Helpers shared by the kernel launchers (no kernels here)."""

import functools
import math
import os

from iddpm_fast.reference import ROW

from . import interpreting

LN2 = math.log(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # the constant of the original's tanh CDF approximation

MEAN_CODES = {"previous_x": 0, "start_x": 1, "epsilon": 2}
VAR_CODES = {"learned": 0, "fixed_small": 1, "fixed_large": 2, "learned_range": 3}

# Table rows (constexpr arguments R_*) of the coefficients that _tl's
# model_distribution and bound_term read: the sampling, bound and loss kernels.
MODEL_ROWS = dict(
    R_C1=ROW["posterior_mean_coef1"], R_C2=ROW["posterior_mean_coef2"],
    R_PLV=ROW["posterior_log_variance_clipped"], R_SRA=ROW["sqrt_recip_alphas_cumprod"],
    R_SRM1=ROW["sqrt_recipm1_alphas_cumprod"], R_LOGB=ROW["log_betas"],
    R_FLLV=ROW["fixed_large_log_variance"], R_RC1=ROW["recip_posterior_mean_coef1"],
    R_C2C1=ROW["posterior_mean_coef2_over_coef1"],
)


def cdiv(a, b):
    """ceil(a / b) for ints. Launchers call this, not triton.cdiv: in recent
    Triton that is a ConstexprFunction whose call costs microseconds of host
    time (its arguments are unwrapped as constexprs), paid at every launch."""
    return -(-int(a) // int(b))


def next_power_of_2(n):
    """The smallest power of two >= n (1 for n <= 1); plain int math, see cdiv."""
    return 1 << max(int(n) - 1, 0).bit_length()


# Elements per program at most: larger under the interpreter, which is slow
# per program. Decided once, when the kernel modules are imported, as Triton
# itself decides at @triton.jit whether kernels are interpreted.
_BLOCK_CAP = 4096 if interpreting() else 1024


def block_size(n):
    """Elements per program: a power of two covering n, capped at _BLOCK_CAP."""
    return max(16, min(_BLOCK_CAP, next_power_of_2(max(int(n), 1))))


def per_sample_total(part, D):
    """[B] totals of per-sample partials [B, n_chunks] that the kernels have
    already scaled to the sample's mean (each program's sum times 1 / D);
    with D = 0, where no program ran, a mean over nothing: NaN."""
    return part.sum(dim=1) if D else part.sum(dim=1) / D


def warps(num_warps):
    """Launch options for a num_warps override (A/B timing): none when it is None, the kernel's default."""
    return {} if num_warps is None else {"num_warps": num_warps}


def check_contiguous_like(*tensors):
    """Contiguous copies where needed (kernels index flat [B, D] buffers); shapes must match."""
    shape = tensors[0].shape
    for x in tensors[1:]:
        if x.shape != shape:
            raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(shape)}")
    return tuple(x.contiguous() for x in tensors)


def check_device(*tensors):
    device = tensors[0].device
    for x in tensors[1:]:
        if x.device != device:
            raise ValueError(f"all inputs must be on {device}, got one on {x.device}")
    return device


# --- Launching a compiled kernel without Triton's per-call binding ---------
#
# kernel[grid](...) spends tens of microseconds of host time per call before
# the launch itself: it binds every argument (constexprs included) through a
# generated function, specialises each one natively, builds a cache key string
# and, on Triton 3.6, a launch-metadata dict for its (empty) hook chain. The
# fused training loss is two launches per step, and at 128x3x64x64 on an H100
# its forward + backward is bound by that host time, not by the GPU.
#
# Launcher does the same lookup with a key of its own: per tensor argument its
# dtype and whether its address is a multiple of 16, per int whether it is 1,
# whether it is a multiple of 16 and its width class, and the constexpr values;
# at least as fine as what Triton specialises a kernel on, so a hit is always
# the kernel Triton would have picked. A miss (a first call, a new
# specialisation) goes through kernel[grid](...) and keeps what it returns;
# a hit calls the compiled kernel's launcher directly, with the arguments in
# the kernel's parameter order, as JITFunction.run does (Triton 3.6 to 3.9).
# The interpreter, a launch hook (profilers such as proton set one), settings
# that JITFunction.run adds to its key (debug, instrumentation), pre-run hooks,
# a non-CUDA backend, a Triton older than 3.4 (no triton.knobs) and
# IDDPM_FAST_TRITON_LAUNCH=triton take Triton's own path every time.

_INT32 = (-(2**31), 2**31)
_LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion"}

# Launch options every kernel gets unless its call names them. Fused
# multiply-adds (a * b + c rounded once): Triton 3.9 warns that its default
# turns them off in 3.10. The kernels' speed and their tests' tolerances were
# measured with them on, so a Triton upgrade should not change either; asked
# for explicitly, the warning goes too. A user's own TRITON_DEFAULT_FP_FUSION
# (read at import) is left to Triton, as is TRITON_FORCE_DISABLE_FP_FUSION.
FIXED_OPTIONS = {} if os.environ.get("TRITON_DEFAULT_FP_FUSION") is not None else {"enable_fp_fusion": True}


def _arg_key(a):
    """What Triton specialises an argument on, as a hashable value."""
    if hasattr(a, "data_ptr"):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        return ("i", a == 1, a % 16 == 0, _INT32[0] <= a < _INT32[1], a < 2**63)
    if isinstance(a, float):
        return "f"
    return ("?", a)  # None and anything else: by value (a TypeError if unhashable: Triton's path)


def _hook_set(hook):
    """A launch hook in effect: Triton 3.4+ keeps hooks in a HookChain (empty: none), older ones a callable or None."""
    return bool(getattr(hook, "calls", hook))


class Launcher:
    """`Launcher(kernel)(grid, *args, **constexprs)`: `kernel[grid](*args,
    **constexprs)`, launched directly once its specialisation has been seen.
    Positional arguments are the kernel's leading parameters, keyword
    arguments the rest (every remaining parameter must be given, and be a
    constexpr) and launch options (num_warps, num_stages, num_ctas, maxnreg;
    FIXED_OPTIONS are added to every launch)."""

    direct = os.environ.get("IDDPM_FAST_TRITON_LAUNCH", "direct").strip().lower() != "triton"

    def __init__(self, kernel):
        self.kernel = kernel
        self._cache = {}
        self.misses = 0  # launches that went through kernel[grid] (tests count them)

    def __call__(self, grid, *args, **constexprs):
        constexprs = {**FIXED_OPTIONS, **constexprs}
        if not self.direct or interpreting():
            return self.kernel[grid](*args, **constexprs)
        try:
            env = _launch_env()
            if env is None or _triton_path_needed(env[2], env[3], self.kernel):
                return self.kernel[grid](*args, **constexprs)
            device = env[0]()
            key = (device, len(args), *map(_arg_key, args), *constexprs.items())
            hit = self._cache.get(key)
        except TypeError:  # an unhashable argument: Triton's path decides what it means
            return self.kernel[grid](*args, **constexprs)
        if hit is None:
            compiled = self.kernel[grid](*args, **constexprs)
            self.misses += 1
            self._cache[key] = self._entry(compiled, len(args), constexprs)
            return compiled
        if hit is False:
            return self.kernel[grid](*args, **constexprs)
        run, function, metadata, tail, _compiled = hit
        n = len(grid)
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, env[1](device), function, metadata,
            None, None, None, *args, *tail)
        return None

    def _entry(self, compiled, n_args, constexprs):
        """(launch function, CUfunction, packed metadata, constexpr values in
        parameter order, the compiled kernel), or False (always take Triton's
        path) when this kernel or Triton does not look as expected. The
        compiled kernel is kept: Triton 3.9 unloads its module when the
        CompiledKernel is freed, which would leave the function handle dangling."""
        try:
            params = {p.name: p for p in self.kernel.params}
            rest = list(self.kernel.arg_names)[n_args:]
            options = set(constexprs) - set(rest)  # num_warps and the like: in the key, not kernel arguments
            if not set(rest) <= set(constexprs) or not options <= _LAUNCH_OPTIONS:
                return False
            if not all(params[k].is_constexpr for k in rest):  # a keyword tensor would be keyed by identity
                return False
            tail = tuple(constexprs[k] for k in rest)
            return (compiled.run, compiled.function, compiled.packed_metadata, tail, compiled)
        except (AttributeError, KeyError):
            return False


def _triton_path_needed(runtime, compilation, kernel):
    """True where JITFunction.run would do more than look the kernel up and
    launch it: a launch hook (profilers), a pre-run hook, or a setting that
    JITFunction.run adds to the cache key at each call (debug, instrumentation,
    fpsan casts, a stages-inspection hook)."""
    if _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook):
        return True
    if getattr(kernel, "pre_run_hooks", None):
        return True
    return bool(getattr(runtime, "debug", False) or getattr(runtime, "add_stages_inspection_hook", None)
                or getattr(compilation, "instrumentation_mode", None) not in (None, "", "none")
                or getattr(compilation, "fpsan_homomorphic_casts", False))


@functools.lru_cache(maxsize=None)
def _launch_env():
    """(current device, current stream of a device, Triton's runtime and
    compilation knobs), as JITFunction.run gets them; None where the active
    backend is not CUDA (AMD's specialises tensors on their size too)."""
    try:
        from triton import knobs  # Triton 3.4+
        from triton.runtime import driver

        active = driver.active
        if active.get_current_target().backend != "cuda":
            return None
        return active.get_current_device, active.get_current_stream, knobs.runtime, knobs.compilation
    except (ImportError, AttributeError):  # an older or other Triton: its own launch path
        return None
