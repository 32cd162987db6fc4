"""Tensor helpers shared by the op tests (imported as a plain module: the
tests folder is on sys.path while pytest imports the test files)."""

import torch


def offset_copy(t, elements=1):
    """t's values and layout (plain or 4-D channels-last) in a tensor that
    starts `elements` elements into its (aligned) storage: by default 2, 4 or
    8 bytes past a 16-byte boundary, so kernels with 16-byte vector loads must
    take their other path."""
    storage = torch.empty(t.numel() + elements, dtype=t.dtype, device=t.device)
    if t.dim() == 4 and not t.is_contiguous():  # channels-last
        n, c, h, w = t.shape
        view = storage[elements:].view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        view = storage[elements:].view(t.shape)
    return view.copy_(t)
