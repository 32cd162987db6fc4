"""
Runs the one-pass CUDA GroupNorm-SiLU kernels (csrc/cuda/gn_onepass.h,
IDDPM_FAST_GN_CUDA_ONEPASS=1) forward and backward once per case, for
compute-sanitizer (memcheck: out-of-bounds and misaligned accesses;
racecheck: shared-memory races), which the CPU emulation of these kernels
cannot show:

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_onepass.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/sanitize_onepass.py --quick

Every case is also checked against the split kernels (IDDPM_FAST_GN_CUDA_ONEPASS=0).
Needs CUDA and the extension; exits non-zero on a mismatch.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (shape, groups): at least one block per multiprocessor (132 on an H100/H200) even with
# channels-last slabs of up to 8 groups a block; channels per group 1, 2, 4, 16, 256, HxW 4x4 to 32x64.
CASES = [((40, 64, 16, 16), 32), ((40, 128, 32, 32), 32), ((16, 512, 8, 8), 32), ((136, 256, 4, 4), 1),
         ((40, 32, 32, 64), 32)]


def run(shape, groups, dtype, channels_last, scale_shift):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, c = shape[:2]
    x = (-2.3 + 0.5 * torch.randn(shape, device="cuda", generator=g)).to(dtype)
    gy = torch.randn(shape, device="cuda", generator=g).to(dtype)
    if channels_last:
        x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
    w, b = torch.randn(c, device="cuda", generator=g), torch.randn(c, device="cuda", generator=g)
    sc = torch.randn(n, c, device="cuda", generator=g) if scale_shift else None
    sh = torch.randn(n, c, device="cuda", generator=g) if scale_shift else None
    fwd, bwd = torch.ops.iddpm_fast.gn_silu_forward, torch.ops.iddpm_fast.gn_silu_backward
    outs = {}
    for flag in ("1", "0"):
        os.environ["IDDPM_FAST_GN_CUDA_ONEPASS"] = flag
        y, mean, rstd = fwd(x, w, b, sc, sh, groups, 1e-5, True)
        outs[flag] = (y, mean, rstd, *bwd(gy, x, w, b, sc, sh, mean, rstd, groups, True))
    torch.cuda.synchronize()
    for name, a, r in zip(["y", "mean", "rstd", "dx", "dweight", "dbias", "dscale", "dshift"], outs["1"], outs["0"]):
        if r.numel() == 0:  # d scale / d shift without scale and shift
            assert a.numel() == 0, name
            continue
        tol = max(16 * torch.finfo(a.dtype).eps, 1e-4)
        torch.testing.assert_close(a, r, rtol=tol, atol=tol * max(r.abs().max().item(), 1.0), msg=name)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--quick", action="store_true", help="bf16 and fp32 channels-last only (racecheck is slow)")
    args = p.parse_args()
    from iddpm_fast import _ext

    reason = _ext.load()
    if not torch.cuda.is_available() or reason is not None:
        sys.exit(f"sanitize_onepass.py needs a GPU and the CUDA extension (CUDA available: "
                 f"{torch.cuda.is_available()}; extension: {reason or 'loaded'})")
    formats = [(torch.bfloat16, True), (torch.float32, True)]
    if not args.quick:
        formats += [(torch.float32, False), (torch.bfloat16, False), (torch.float16, True)]
    count = 0
    for shape, groups in CASES:
        for dtype, cl in formats:
            for scale_shift in ((False, True) if not args.quick else (True,)):
                run(shape, groups, dtype, cl, scale_shift)
                count += 1
    print(f"{count} cases: one-pass and split kernels agree")


if __name__ == "__main__":
    main()
