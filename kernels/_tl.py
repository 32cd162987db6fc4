"""Triton device functions shared by the kernel families."""

import triton
import triton.language as tl


@triton.jit
def load_model_output(out_ptr, b, offs, mask, D, LEARNED: tl.constexpr):
    """
    The mean half and (when LEARNED) the variance half of one sample's model
    output, laid out [B, C' * S] with C' = 2C when learned; fp32.
    """
    if LEARNED:
        obase = b.to(tl.int64) * (2 * D)
        eo = tl.load(out_ptr + obase + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(out_ptr + obase + D + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        eo = tl.load(out_ptr + b.to(tl.int64) * D + offs, mask=mask, other=0.0).to(tl.float32)
        v = eo * 0.0
    return eo, v
