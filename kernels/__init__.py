"""
Triton kernels and their launchers, one file per op family (installed as
``iddpm_fast.kernels``). Nothing here knows about diffusion objects: kernels
take tensors and coefficient tables only; the op seam (``iddpm_fast.ops``)
registers them.

This module only answers whether Triton kernels can run, and why not.
"""

import functools
import importlib.util
import os


def interpreting():
    """True when Triton runs kernels on the CPU through its interpreter (tests):
    TRITON_INTERPRET read as Triton reads it (1, true, yes, on, y)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


@functools.lru_cache(maxsize=None)
def _triton_import_error():
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install must not break the package
        return f"importing triton failed: {exc}"
    return None


def unavailable_reason(device):
    """
    None when Triton kernels can run on `device`, else why not.

    CUDA tensors need triton; CPU tensors need TRITON_INTERPRET=1, set before
    the kernel modules are imported.
    """
    why = _triton_import_error()
    if why is not None:
        return why
    device_type = getattr(device, "type", str(device))
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if interpreting():
            return None
        return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (the interpreter, for tests)"
    return f"Triton kernels do not support {device_type} tensors"
