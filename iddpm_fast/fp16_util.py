"""
Helpers for mixed-precision (float16) training with float32 master weights.

Behaviour matches openai/improved-diffusion: only convolution layers are cast
to float16, and the master copy of the parameters is a single flat float32
tensor wrapped in a one-element list.
"""

import torch
import torch.nn as nn

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _cast_conv(module, dtype):
    if not isinstance(module, _CONV_TYPES):
        return
    module.weight.data = module.weight.data.to(dtype)
    if module.bias is not None:
        module.bias.data = module.bias.data.to(dtype)


def convert_module_to_f16(l):
    """Cast a convolution's weight and bias (if any) to float16; other
    module types are left untouched.  Meant for ``module.apply``."""
    _cast_conv(l, torch.float16)


def convert_module_to_f32(l):
    """Inverse of :func:`convert_module_to_f16`."""
    _cast_conv(l, torch.float32)


def cast_autocast_weights(model, dtype=torch.bfloat16):
    """
    Store the weight and bias of every convolution and linear layer of
    `model` in `dtype`, for inference under ``torch.autocast(dtype=dtype)``.

    Autocast casts these parameters to `dtype` at each call anyway, so the
    model computes exactly the same numbers; what goes are the cast kernels.
    Those matter under CUDA graphs, whose autocast runs without its cast
    cache: every replayed sampling step re-cast each weight (about 110 copy
    kernels per step of the 32x32 c128 UNet). Norm parameters stay as they
    are (the fused GroupNorm reads them in float32). Not for training: the
    optimizer would then update low-precision weights.

    :return: `model`, changed in place.
    """
    for module in model.modules():
        if isinstance(module, _CONV_TYPES + (nn.Linear,)):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
    return model


def _flatten(tensors):
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0)


def make_master_params(model_params):
    """Return ``[flat]``: one float32 Parameter holding all of
    ``model_params`` concatenated (flattened, in order)."""
    flat = _flatten([p.detach().float() for p in model_params])
    master = nn.Parameter(flat)
    master.requires_grad = True
    return [master]


def model_grads_to_master_grads(model_params, master_params):
    """Gather the model's gradients, as float32, into the flat master
    parameter's ``.grad``."""
    master_params[0].grad = _flatten(
        [p.grad.data.detach().float() for p in model_params]
    )


def unflatten_master_params(model_params, master_params):
    """Views of the flat master tensor, shaped like each of ``model_params``."""
    flat = master_params[0].detach()
    pieces = []
    offset = 0
    for p in model_params:
        n = p.numel()
        pieces.append(flat.narrow(0, offset, n).view_as(p))
        offset += n
    return tuple(pieces)  # a tuple, as the original's _unflatten_dense_tensors


def master_params_to_model_params(model_params, master_params):
    """Copy the master values back into the (possibly float16) model params."""
    # Materialise first: a generator would be exhausted by unflattening.
    model_params = list(model_params)
    views = unflatten_master_params(model_params, master_params)
    for param, value in zip(model_params, views):
        param.detach().copy_(value)


def zero_grad(model_params):
    """Zero the existing gradients of ``model_params`` in place."""
    for param in model_params:
        if param.grad is None:
            continue
        param.grad.detach_()
        param.grad.zero_()
