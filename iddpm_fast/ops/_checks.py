"""
Input checks shared by the op seam. None of them reads tensor values, so they
never synchronise with the device; value checks (t in range, finite data)
live in the public `GaussianDiffusion` methods.
"""

import torch

from .. import reference as ref

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(name, x, min_dim=2):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a floating-point tensor (fp32, bf16, fp16 or fp64), got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must be [N x C x ...], got shape {tuple(x.shape)}")


def check_like(name, x, ref_name, other):
    check_float(name, x, min_dim=0)
    if x.shape != other.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(other.shape)}; they must match")
    if x.device != other.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {other.device}")


def check_t(t, x, tables):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor of timestep indices, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        # (indexing takes int64/int32; uint8 and bool would act as masks, int16 fails)
        raise ValueError(f"t must be an integer tensor (int64 or int32) of timestep indices, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be 1-D with one timestep per sample ({x.shape[0]}), got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"t is on {t.device} but the data is on {x.device}")
    check_tables(tables, x)


def check_tables(tables, x):
    if not isinstance(tables, torch.Tensor) or tables.dim() != 2 or tables.shape[0] != len(ref.TABLE_ROWS):
        raise ValueError(
            f"tables must be the [{len(ref.TABLE_ROWS)} x T] coefficient tensor of a diffusion "
            "(GaussianDiffusion.tables(device))"
        )
    if tables.device != x.device:
        raise ValueError(f"the coefficient tables are on {tables.device} but the data is on {x.device}")


def check_model_output(model_output, x_t, model_var_type):
    check_float("model_output", model_output)
    C = x_t.shape[1]
    want = 2 * C if model_var_type in ref.LEARNED_VAR_TYPES else C
    expected = (x_t.shape[0], want, *x_t.shape[2:])
    if tuple(model_output.shape) != expected:
        hint = ""
        if model_var_type in ref.LEARNED_VAR_TYPES and model_output.shape[1:2] == (C,):
            hint = (
                f" A learned variance ({model_var_type}) needs 2*C = {2 * C} output channels "
                "(mean then variance); build the model with learn_sigma=True."
            )
        elif model_output.shape[1:2] == (2 * C,):
            hint = f" The model outputs 2*C channels but the diffusion's variance is fixed ({model_var_type}); set learn_sigma consistently."
        raise ValueError(
            f"model output has shape {tuple(model_output.shape)}, expected {expected} for input {tuple(x_t.shape)}.{hint}"
        )
    if model_output.device != x_t.device:
        raise ValueError(f"model output is on {model_output.device} but x_t is on {x_t.device}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")
