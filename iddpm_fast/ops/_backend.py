"""
Backend selection for the fused ops.

Each op declares the implementation kinds it can have ("triton", "cpp",
"reference"); kernel modules register the implementations they provide with
:func:`register`, together with a check that says whether the implementation
can run on a given device (and why not). :func:`resolve` then picks one per
call:

- ``auto`` (default): the first *available* registered kind in the device's
  preference order (CUDA: triton, cpp, reference; CPU: cpp, reference).
  When a registered fused implementation is skipped because it cannot run,
  a warning names the reason, once per (kind, device type, reason).
- ``IDDPM_FAST_BACKEND=triton|cpp|reference`` (or :func:`use_backend`)
  forces that kind for every op that declares it; an op that declares it but
  cannot provide it raises :class:`BackendUnavailableError` with the reason.
  Ops that never have that kind (e.g. "cpp" for the diffusion math) keep
  their automatic choice.
"""

import contextlib
import os
import threading
import warnings

BACKENDS = ("auto", "triton", "cpp", "reference")
_ENV = "IDDPM_FAST_BACKEND"

_PREFERENCE = {
    "cuda": ("triton", "cpp", "reference"),
    "cpu": ("cpp", "reference"),
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run this op here."""


class _Op:
    def __init__(self, name, kinds):
        self.name = name
        self.kinds = tuple(kinds)
        self.impls = {}  # kind -> (fn, availability check)


_OPS = {}
_override = threading.local()
_warned = set()


def declare(name, kinds):
    """Declare an op and the implementation kinds it may have."""
    unknown = set(kinds) - set(BACKENDS[1:])
    if unknown or "reference" not in kinds:
        raise ValueError(f"op {name}: bad kinds {kinds}")
    _OPS[name] = _Op(name, kinds)


def register(name, kind, fn, available=None):
    """
    Register an implementation of a declared op.

    :param available: callable(device) -> None when `fn` can run on that
                      device, else a string saying why not.
    """
    op = _OPS[name]
    if kind not in op.kinds:
        raise ValueError(f"op {name} does not declare a {kind!r} implementation (declared: {op.kinds})")
    op.impls[kind] = (fn, available or (lambda device: None))


def requested_backend():
    """The backend asked for: :func:`use_backend` if active, else the environment."""
    value = getattr(_override, "value", None)
    if value is None:
        value = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{_ENV}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


@contextlib.contextmanager
def use_backend(name):
    """Force a backend for the ops called inside this block (this thread only)."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    previous = getattr(_override, "value", None)
    _override.value = name
    try:
        yield
    finally:
        _override.value = previous


def _reason(op, kind, device):
    if kind not in op.impls:
        return f"no {kind} implementation of {op.name} is registered in this build"
    return op.impls[kind][1](device)


def resolve_name(name, device):
    """The kind of implementation `name` runs on `device` under the current setting."""
    op = _OPS[name]
    device_type = getattr(device, "type", str(device))
    asked = requested_backend()
    if asked != "auto" and asked in op.kinds:
        why = _reason(op, asked, device)
        if why is not None:
            raise BackendUnavailableError(
                f"{_ENV}={asked} was requested but {name} cannot run it on {device_type}: {why}. "
                f"Unset {_ENV} (or set it to 'auto') to use the best available implementation."
            )
        return asked
    for kind in _PREFERENCE.get(device_type, ("reference",)):
        if kind not in op.kinds:
            continue
        why = _reason(op, kind, device)
        if why is None:
            return kind
        if kind in op.impls:
            # Once per kind, device and reason: a missing C++ extension is one
            # warning, not one per op it serves (a UNet step had given four).
            key = (kind, device_type, why)
            if key not in _warned and not _compiling():
                _warned.add(key)
                warnings.warn(
                    f"iddpm_fast: {name} falls back from {kind} on {device_type}: {why} "
                    f"(any other op with the same reason falls back too, without another warning)",
                    RuntimeWarning,
                    stacklevel=4,
                )
    return "reference"


def _compiling():
    """True while torch.compile traces (it cannot trace warnings.warn; the
    eager call that follows, or came before, warns)."""
    import torch

    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check()) if check is not None else False


def resolve(name, device):
    """The implementation callable `name` runs on `device`."""
    kind = resolve_name(name, device)
    return _OPS[name].impls[kind][0]


def declared_ops():
    """{op name: declared kinds}."""
    return {name: op.kinds for name, op in _OPS.items()}


def registered_kinds(name):
    """The kinds registered so far for op `name`."""
    return tuple(_OPS[name].impls)
