"""
Where the GPU time goes: torch.profiler tables (self CUDA time per kernel) of
  1. one respaced sampling step of the 32x32 UNet (c128, batch 256) in bf16
     channels-last, the configuration compare_original.py times;
  2. the fused GroupNorm-SiLU op and stock F.group_norm + F.silu at the UNet's
     activation shapes (bf16 channels-last, float32 NCHW), forward and backward;
  3. one bf16 channels-last training step (c128, batch 128).

    python bench/profile_gpu.py [--what sample,gn,train] [--rows 25]
    python bench/profile_gpu.py --what ab_gn,ab_sample,ab_train,ab_qsample   # A/B timings only
    python bench/profile_gpu.py --what host_loss,ab_loss   # the fused training loss: host time, one/two launches
    python bench/profile_gpu.py --what host_split   # that host time taken apart
    python bench/profile_gpu.py --what ab_reduce    # the per-sample reductions' block sizes

Needs CUDA. Prints tables; writes nothing.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _table(prof, rows):
    ka = prof.key_averages()
    for key in ("self_cuda_time_total", "self_device_time_total"):
        try:
            return ka.table(sort_by=key, row_limit=rows, max_name_column_width=70)
        except (AttributeError, KeyError, ValueError):
            continue
    return ka.table(row_limit=rows)


def _time(fn, steps, *args):
    """Milliseconds per call of fn(*args), CUDA events around `steps` calls."""
    for _ in range(2):
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def _print_copy_bandwidth(indent):
    """What a device-to-device copy of 64 MiB achieves (read + write), the GB/s yardstick."""
    x = torch.empty(64 << 18, device="cuda")
    y = torch.empty_like(x)
    ms = _time(y.copy_, 50, x)
    print(f"{indent}copy 64 MiB: {ms:.4f} ms, {2 * x.numel() * 4 / ms / 1e6:.0f} GB/s")


def _cosine_tables():
    """The coefficient tables of a T = 4000 cosine diffusion on the GPU (the diffusion-op benchmarks')."""
    from iddpm_fast.script_util import create_gaussian_diffusion

    return create_gaussian_diffusion(steps=4000, noise_schedule="cosine").tables(torch.device("cuda"))


def _profile(fn, steps, rows, title, *args):
    """Times fn(*args) with CUDA events, then prints its profiler table."""
    from torch.profiler import ProfilerActivity, profile

    print(f"\n==== {title}: {_time(fn, steps, *args):.3f} ms per call (CUDA events, {steps} calls)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn(*args)
        torch.cuda.synchronize()
    print(_table(prof, rows))


def _model(channels, respacing, dropout=0.0):
    from iddpm_fast import script_util as su

    cfg = dict(
        su.model_and_diffusion_defaults(),
        image_size=32,
        num_channels=channels,
        num_res_blocks=2,
        learn_sigma=True,
        noise_schedule="cosine",
        diffusion_steps=4000,
        attention_resolutions="16,8",
        timestep_respacing=respacing,
        dropout=dropout,
    )
    torch.manual_seed(0)
    model, diffusion = su.create_model_and_diffusion(**cfg)
    return model.cuda().to(memory_format=torch.channels_last), diffusion


def _sampling_case():
    """The c128 model (eval, channels-last), its 100-step diffusion, and a
    batch of 256 noisy images at step 50."""
    model, diffusion = _model(128, "100")
    model.eval()
    B = 256
    x = torch.randn(B, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    t = torch.full((B,), 50, device="cuda", dtype=torch.long)
    return model, diffusion, x, t


def _train_step(amp, channels_last):
    """One training step of the c128 model (dropout 0.1, AdamW, batch 128),
    bf16 autocast when amp, activations and weights channels-last or NCHW."""
    model, diffusion = _model(128, "", dropout=0.1)
    if not channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    model.train()
    B = 128
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(B, 3, 32, 32, device="cuda") * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (B,), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = diffusion.training_losses(model, x, t)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def profile_sample(args):
    model, diffusion, x, t = _sampling_case()

    def step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            diffusion.p_sample(model, x, t)

    def model_only():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, diffusion._scale_timesteps(t) if hasattr(diffusion, "_scale_timesteps") else t)

    _profile(step, 5, args.rows, "sampling step, c128 batch 256, bf16 channels-last")
    _profile(model_only, 5, 8, "model forward only, same")


def _stock_fwd_bwd(x, w, b, gy):
    F.silu(F.group_norm(x, 32, w, b, 1e-5)).backward(gy)


def _stock_fwd(x, w, b):
    return F.silu(F.group_norm(x, 32, w, b, 1e-5))


def profile_gn(args):
    from iddpm_fast import _ext

    _ext.load()

    for shape in ((256, 128, 32, 32), (256, 256, 16, 16), (256, 256, 8, 8)):
        C = shape[1]
        for dtype, cl in ((torch.bfloat16, True), (torch.float32, False)):
            x = (torch.randn(shape, device="cuda") * 0.5 - 2.3).to(dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            w = torch.randn(C, device="cuda")
            b = torch.randn(C, device="cuda")
            gy = torch.randn_like(x)
            tag = f"{list(shape)} {str(dtype)[6:]} {'channels_last' if cl else 'NCHW'}"
            fwd = torch.ops.iddpm_fast.gn_silu_forward
            bwd = torch.ops.iddpm_fast.gn_silu_backward
            _y, mean, rstd = fwd(x, w, b, None, None, 32, 1e-5)
            nbytes = x.numel() * x.element_size()
            _profile(fwd, 10, 10, f"fused forward {tag} ({2 * nbytes / 1e6:.0f} MB min)", x, w, b, None, None, 32, 1e-5)
            _profile(
                bwd,
                10,
                12,
                f"fused backward {tag} ({3 * nbytes / 1e6:.0f} MB min)",
                gy,
                x,
                w,
                b,
                None,
                None,
                mean,
                rstd,
                32,
            )
            xs = x.detach().requires_grad_(True)
            ws, bs = w.to(dtype).requires_grad_(True), b.to(dtype).requires_grad_(True)
            _profile(_stock_fwd_bwd, 10, 12, f"stock F.group_norm + F.silu forward+backward {tag}", xs, ws, bs, gy)


def profile_train(args):
    _profile(_train_step(True, True), 3, args.rows, "training step, c128 batch 128, bf16 channels-last")


def _vec(on):
    os.environ["IDDPM_FAST_GN_CUDA_VEC"] = "1" if on else "0"


def ab_gn(args):
    """Fused op forward / backward with the vectorised kernels on and off, the
    one-pass kernels (IDDPM_FAST_GN_CUDA_ONEPASS=1; the split kernels where
    they do not apply), and stock F.group_norm + F.silu, at UNet shapes; GB/s
    against the minimal bytes."""
    from iddpm_fast import _ext

    _ext.load()
    fwd, bwd = torch.ops.iddpm_fast.gn_silu_forward, torch.ops.iddpm_fast.gn_silu_backward
    print("\n==== GroupNorm-SiLU A/B (ms per call, CUDA events; GB/s of the minimal bytes)")
    for shape in (
        (128, 128, 32, 32),
        (128, 256, 16, 16),
        (128, 512, 8, 8),
        (256, 128, 32, 32),
        (64, 128, 64, 64),
        (2, 128, 256, 256),
    ):
        for dtype, cl in (
            (torch.bfloat16, True),
            (torch.float32, True),
            (torch.float32, False),
            (torch.bfloat16, False),
        ):
            C = shape[1]
            x = (torch.randn(shape, device="cuda") * 0.5 - 2.3).to(dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
            gy = torch.randn_like(x)
            nb = x.numel() * x.element_size()
            row = {}
            for on in (True, False):
                _vec(on)
                _y, mean, rstd = fwd(x, w, b, None, None, 32, 1e-5)
                row[f"fwd_vec{int(on)}"] = _time(fwd, 20, x, w, b, None, None, 32, 1e-5)
                row[f"bwd_vec{int(on)}"] = _time(bwd, 20, gy, x, w, b, None, None, mean, rstd, 32)
            _vec(True)
            os.environ["IDDPM_FAST_GN_CUDA_ONEPASS"] = "1"  # the one-pass kernels where they apply
            _y, mean, rstd = fwd(x, w, b, None, None, 32, 1e-5)
            row["fwd_onepass"] = _time(fwd, 20, x, w, b, None, None, 32, 1e-5)
            row["bwd_onepass"] = _time(bwd, 20, gy, x, w, b, None, None, mean, rstd, 32)
            os.environ.pop("IDDPM_FAST_GN_CUDA_ONEPASS")
            xs = x.detach().requires_grad_(True)
            ws, bs = w.to(dtype).requires_grad_(True), b.to(dtype).requires_grad_(True)
            row["stock_fwd"] = _time(_stock_fwd, 20, x, ws.detach(), bs.detach())
            row["stock_fwdbwd"] = _time(_stock_fwd_bwd, 20, xs, ws, bs, gy)
            tag = f"{list(shape)} {str(dtype)[6:]} {'CL' if cl else 'NCHW'}"
            print(
                f"{tag:34s} fwd new {row['fwd_vec1']:.4f} ({2 * nb / row['fwd_vec1'] / 1e6:.0f} GB/s) "
                f"old {row['fwd_vec0']:.4f} one-pass {row['fwd_onepass']:.4f} "
                f"({2 * nb / row['fwd_onepass'] / 1e6:.0f} GB/s) | bwd new {row['bwd_vec1']:.4f} "
                f"({3 * nb / row['bwd_vec1'] / 1e6:.0f} GB/s)"
                f" old {row['bwd_vec0']:.4f} one-pass {row['bwd_onepass']:.4f} "
                f"({3 * nb / row['bwd_onepass'] / 1e6:.0f} GB/s) | stock fwd {row['stock_fwd']:.4f} "
                f"fwd+bwd {row['stock_fwdbwd']:.4f}"
                f" | fused fwd+bwd/stock {row['stock_fwdbwd'] / (row['fwd_vec1'] + row['bwd_vec1']):.2f}x,"
                f" one-pass {row['stock_fwdbwd'] / (row['fwd_onepass'] + row['bwd_onepass']):.2f}x"
            )
    _print_copy_bandwidth("")


def ab_qsample(args):
    """q_sample at 64x3x256x256 (the issue's bandwidth shape) with other
    elements per program and warps, against the device-to-device copy: GB/s of
    the minimal bytes (read x0 and noise, write x_t)."""
    from iddpm_fast.kernels import q_sample as k
    tables = _cosine_tables()
    print("\n==== q_sample A/B, 64x3x256x256 (ms per call, CUDA events; GB/s of 3 tensors)")
    for dtype in (torch.float32, torch.bfloat16):
        x0 = torch.randn(64, 3, 256, 256, device="cuda").to(dtype)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 4000, (64,), device="cuda")
        nb = 3 * x0.numel() * x0.element_size()
        for block, warps in ((1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)):
            ms = _time(lambda: k.q_sample(x0, t, noise, tables, block=block, num_warps=warps), 50)
            print(f"  {str(dtype)[6:]:8s} BLOCK {block:5d} warps {warps:2d}: {ms:.4f} ms, {nb / ms / 1e6:.0f} GB/s")
    _print_copy_bandwidth("  ")


def host_loss(args):
    """Where the host time of the fused training loss forward + backward goes
    (128x3x64x64, hybrid loss, as bench/test_bench_diffusion_ops.py times it):
    ms per call with and without a synchronisation after each, and the
    cProfile functions with the most own time."""
    import cProfile
    import pstats

    from iddpm_fast import ops
    tables = _cosine_tables()
    x0 = torch.randn(128, 3, 64, 64, device="cuda")
    noise = torch.randn_like(x0)
    out = torch.randn(128, 6, 64, 64, device="cuda", requires_grad=True)
    t = torch.randint(0, 4000, (128,), device="cuda")
    kinds = dict(model_mean_type="epsilon", model_var_type="learned_range", loss_type="mse")

    def run():
        out.grad = None
        loss, _, _ = ops.training_loss(out, x0, noise, t, tables, num_timesteps=4000, **kinds)
        loss.sum().backward()

    def run_sync():
        run()
        torch.cuda.synchronize()

    print("\n==== fused training loss fwd+bwd, 128x3x64x64: host time")
    print(f"  {_time(run, 50):.4f} ms per call back to back, {_time(run_sync, 50):.4f} ms with a sync after each")
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as kprof:
            for _ in range(50):
                run()
            torch.cuda.synchronize()
        kernel_us = sum(e.time_range.elapsed_us() for e in kprof.events() if e.device_type == DeviceType.CUDA)
        print(f"  {kernel_us / 50 / 1e3:.4f} ms per call in kernels and copies (profiler; the rest is host time)")
    except Exception as exc:  # the figures above stand without it
        print(f"  (kernel time unavailable: {type(exc).__name__}: {exc})")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        run()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.rows)


def ab_loss(args):
    """The training loss forward with one launch (one program per sample) and
    with two (partial sums + finalize), device time back to back, at the
    benchmark shapes (hybrid loss, fp32): where the one-launch path should stop."""
    from iddpm_fast.kernels import training_loss as k
    tables = _cosine_tables()
    kinds = ("epsilon", "learned_range", "mse", 4000)
    print(f"\n==== training loss forward, one launch vs two (ROW_CHUNKS_MAX = {k.ROW_CHUNKS_MAX})")
    for shape in ((16, 3, 32, 32), (128, 3, 64, 64), (32, 3, 128, 128), (64, 3, 256, 256)):
        x0 = torch.randn(shape, device="cuda")
        noise = torch.randn_like(x0)
        out = torch.randn(shape[0], 6, *shape[2:], device="cuda")
        t = torch.randint(0, 4000, (shape[0],), device="cuda")
        nb = 4 * x0.numel() * 4
        row = []
        for one in (True, False):
            ms = _time(lambda: k.training_loss_fwd(out, x0, noise, t, tables, *kinds, one_launch=one), 50)
            row.append(f"{'one' if one else 'two'} launch(es) {ms:.4f} ms ({nb / ms / 1e6:.0f} GB/s)")
        print(f"  {str(list(shape)):18s} " + " | ".join(row))


def host_split(args):
    """The fused training loss's host time taken apart (128x3x64x64, the
    benchmark's rescaled hybrid loss), microseconds per call back to back:
    allocation, Triton's own launch, kernels._common.Launcher's (direct
    after the first call), the launcher functions, the autograd Function,
    the op seam, and an autograd round trip through a Function that
    launches nothing; all with the Launcher's direct path off, then on."""
    from iddpm_fast import ops
    from iddpm_fast.kernels import training_loss as k
    from iddpm_fast.kernels._common import FIXED_OPTIONS
    from iddpm_fast.ops import _triton as ot

    tables = _cosine_tables()
    B = 128
    x0 = torch.randn(B, 3, 64, 64, device="cuda")
    noise = torch.randn_like(x0)
    out = torch.randn(B, 6, 64, 64, device="cuda", requires_grad=True)
    t = torch.randint(0, 4000, (B,), device="cuda")
    kinds = ("epsilon", "learned_range", "rescaled_mse", 4000)
    kw = dict(model_mean_type="epsilon", model_var_type="learned_range", loss_type="rescaled_mse", num_timesteps=4000)
    od = out.detach()
    loss, mse, vb = (torch.empty(B, device="cuda") for _ in range(3))
    D = x0[0].numel()
    block = k.block_size(D)
    n_chunks = k.cdiv(D, block)
    codes = dict(MEAN=k.MEAN_CODES["epsilon"], VAR=k.VAR_CODES["learned_range"], LEARNED=True)
    fargs = (od, x0, noise, t, tables, loss, mse, vb, D, tables.shape[1], n_chunks, float(D), k._LN2, 1.0, 4.0)
    fconst = dict(NEED_VB=True, IS_KL=False, K=k._K, BLOCK=block, **codes, **k._ROWS)

    def raw():  # (with the Launcher's fixed options, so that both compile the same kernel)
        return k._training_loss_fwd_rows_kernel[(B,)](*fargs, **fconst, **FIXED_OPTIONS)

    def launcher():
        k._training_loss_fwd_rows_launch((B,), *fargs, **fconst)

    loss.zero_()
    raw()
    l1 = loss.clone()
    loss.zero_()
    launcher()
    launcher()
    same = bool(torch.equal(l1, loss))

    def round_trip(backward):
        """forward + sum + backward through a Function of out whose forward
        launches nothing (returns `loss`) and whose backward is backward(g)."""

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, o):
                return loss

            @staticmethod
            def backward(ctx, g):
                return backward(g)

        def run():
            out.grad = None
            Fn.apply(out).sum().backward()

        return run

    gl = torch.ones(B, device="cuda")
    prepared = k._prepare(od, x0, noise, t, tables, *kinds[:3])
    noop_full = round_trip(lambda g: od)  # d out precomputed
    alloc_full = round_trip(lambda g: torch.empty_like(od))  # an allocation on autograd's device thread
    # the loss backward's launch on autograd's device thread, with no forward kernel
    bwd_only_full = round_trip(lambda g: k.backward_prepared(prepared, g, None, None, kinds[2], kinds[3]))

    def seam_grad():
        out.grad = None
        ops.training_loss(out, x0, noise, t, tables, **kw)

    def full():
        out.grad = None
        l, _, _ = ops.training_loss(out, x0, noise, t, tables, **kw)
        l.sum().backward()

    def apply_full():
        out.grad = None
        l, _, _ = ot._TrainingLoss.apply(out, x0, noise, t, tables, kinds)
        l.sum().backward()

    cases = [
        ("torch.empty x3", lambda: [torch.empty(B, device="cuda") for _ in range(3)]),
        ("raw Triton launch, forward kernel", raw),
        ("Launcher (direct after the first call), forward kernel", launcher),
        ("k.training_loss_fwd", lambda: k.training_loss_fwd(od, x0, noise, t, tables, *kinds)),
        ("k.training_loss_bwd (grad_loss only)",
         lambda: k.training_loss_bwd(od, x0, noise, t, tables, gl, None, None, *kinds)),
        ("_TrainingLoss.apply, no grad",
         lambda: torch.no_grad()(ot._TrainingLoss.apply)(od, x0, noise, t, tables, kinds)),
        ("ops.training_loss, no grad", lambda: torch.no_grad()(ops.training_loss)(od, x0, noise, t, tables, **kw)),
        ("ops.training_loss, graph built", seam_grad),
        ("Noop Function + sum + backward", noop_full),
        ("Function allocating d out + sum + backward", alloc_full),
        ("Function launching the loss backward + sum + backward", bwd_only_full),
        ("_TrainingLoss.apply + sum + backward", apply_full),
        ("ops.training_loss + sum + backward (the benchmark)", full),
    ]
    print("\n==== fused training loss host time taken apart, 128x3x64x64 (us per call, back to back)")
    print(f"  the Launcher's forward equals Triton's launch: {same}")
    from iddpm_fast.kernels._common import Launcher

    for direct in (False, True):
        Launcher.direct = direct
        print(f"  -- Launcher.direct = {direct}")
        for name, fn in cases:
            us = [_time(fn, 200) * 1e3 for _ in range(3)]
            print(f"  {name:52s} {min(us):8.1f}  (runs: {', '.join(f'{u:.1f}' for u in us)})")
    Launcher.direct = True


def ab_reduce(args):
    """The per-sample reductions at 64x3x256x256 (fp32), which the fifth lease
    measured under 80% of copy (bits/dim 2034 GB/s, the two-kernel loss
    forward 2043): device time back to back for programs of 1024 to 4096
    elements and 4 or 8 warps, GB/s against the minimal bytes."""
    from iddpm_fast.kernels import likelihood as lk
    from iddpm_fast.kernels import training_loss as k
    tables = _cosine_tables()
    shape = (64, 3, 256, 256)
    x = torch.rand(shape, device="cuda") * 2 - 1
    means = x + 0.01 * torch.randn_like(x)
    log_scales = torch.full_like(x, -3.0)
    noise = torch.randn_like(x)
    out = torch.randn(shape[0], 6, *shape[2:], device="cuda")
    t = torch.randint(0, 4000, (shape[0],), device="cuda")
    kinds = ("epsilon", "learned_range", "rescaled_mse", 4000)
    print("\n==== per-sample reductions, 64x3x256x256 fp32: block x warps (device time, back to back)")
    _print_copy_bandwidth("  ")
    configs = [(1024, None), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (8192, 8)]
    for name, nb, fn in (
        ("bits/dim", 3 * x.numel() * 4,
         lambda b, w: lk.discretized_gaussian_nll_bpd(x, means, log_scales, block=b, num_warps=w)),
        ("loss forward, two kernels", 4 * x.numel() * 4,
         lambda b, w: k.training_loss_fwd(out, x, noise, t, tables, *kinds, block=b, one_launch=False, num_warps=w)),
    ):
        row = []
        for b, w in configs:
            ms = _time(fn, 50, b, w)
            row.append(f"{b}/{w or 'default'} {ms:.4f} ms {nb / ms / 1e6:.0f} GB/s")
        print(f"  {name:26s} " + " | ".join(row))


def ab_sample(args):
    """Sampling step (bf16 channels-last, c128, batch 256): eager in one
    autocast context as in p_sample_loop, convolution biases added by the
    fused bias_add against stock; then replayed CUDA graphs (autocast cache
    off, as sample(cuda_graphs=True) runs), with stock biases and weights cast
    by autocast at each replay (the old default), fused biases, and fused
    biases with the weights stored in bf16 (the new default), that with the
    one-pass GroupNorm kernels; and the model call alone under a graph, for
    the share of a step spent outside it."""
    import copy

    from iddpm_fast import cuda_graphs, fp16_util

    model, diffusion, x, t = _sampling_case()
    print("\n==== sampling step A/B, c128 batch 256, bf16 channels-last")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for rnd in range(2):
            for policy in ("fused", "stock"):
                os.environ["IDDPM_FAST_CONV_BIAS"] = policy
                ms = _time(diffusion.p_sample, 10, model, x, t)
                print(f"  eager round {rnd} conv bias {policy}: {ms:.3f} ms/step")
        os.environ.pop("IDDPM_FAST_CONV_BIAS")
        _profile(diffusion.p_sample, 3, 16, "sampling step, eager, default policy (stock conv biases)", model, x, t)
    bf16_model = fp16_util.cast_autocast_weights(copy.deepcopy(model), torch.bfloat16)
    graphs = {}
    with cuda_graphs.autocast("cuda", enabled=True):
        for name, m, policy in (("stock bias, autocast weights", model, "stock"),
                                ("fused bias, autocast weights", model, "fused"),
                                ("fused bias, bf16 weights", bf16_model, "fused")):
            os.environ["IDDPM_FAST_CONV_BIAS"] = policy  # read while capturing
            graphs[name] = cuda_graphs.GraphedSampler(diffusion, m, tuple(x.shape),
                                                      memory_format=torch.channels_last)
    os.environ.pop("IDDPM_FAST_CONV_BIAS")
    # The model call alone (timesteps mapped as p_sample maps them), captured
    # like the sampler's step with the default policy: the step's time less
    # this is the time spent outside the model (#6: under 3% per step).
    wrapped = diffusion._wrap_model(bf16_model) if hasattr(diffusion, "_wrap_model") else bf16_model
    xs = x.clone(memory_format=torch.channels_last)
    model_graph = torch.cuda.CUDAGraph()
    with cuda_graphs.autocast("cuda", enabled=True), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                wrapped(xs, t)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(model_graph):
            wrapped(xs, t)
        graphs["default policy"] = cuda_graphs.GraphedSampler(diffusion, bf16_model, tuple(x.shape),
                                                              memory_format=torch.channels_last)
        os.environ["IDDPM_FAST_GN_CUDA_ONEPASS"] = "1"  # read while capturing
        graphs["default policy, one-pass GroupNorm"] = cuda_graphs.GraphedSampler(
            diffusion, bf16_model, tuple(x.shape), memory_format=torch.channels_last)
        os.environ.pop("IDDPM_FAST_GN_CUDA_ONEPASS")
    for rnd in range(2):
        for name, sampler in graphs.items():  # the sampler keeps the graph's input buffers alive
            print(f"  graphs round {rnd} {name}: {_time(sampler.graph.replay, 10):.3f} ms/step")
        model_ms = _time(model_graph.replay, 10)
        step_ms = _time(graphs["default policy"].graph.replay, 10)
        print(f"  graphs round {rnd} model call alone: {model_ms:.3f} ms; whole step (default policy) "
              f"{step_ms:.3f} ms; outside the model {100 * (step_ms - model_ms) / step_ms:.2f}%")


def _ab_train_case(amp, channels_last):
    step = _train_step(amp, channels_last)
    for rnd in range(2):
        for gn, bias in (("stock", "fused"), ("fused", "fused"), ("fused", "stock"), ("one-pass", "fused")):
            os.environ["IDDPM_FAST_CUDA_GN"] = "fused" if gn == "one-pass" else gn
            os.environ["IDDPM_FAST_CONV_BIAS"] = bias
            os.environ["IDDPM_FAST_GN_CUDA_ONEPASS"] = "1" if gn == "one-pass" else "0"
            print(f"  {'bf16 CL' if amp else 'fp32 NCHW'} round {rnd} GN {gn}, conv bias {bias}: "
                  f"{_time(step, 5):.2f} ms/step")
    for name in ("IDDPM_FAST_CUDA_GN", "IDDPM_FAST_CONV_BIAS", "IDDPM_FAST_GN_CUDA_ONEPASS"):
        os.environ.pop(name)


def ab_train(args):
    """Training step (c128, batch 128) with the CUDA GroupNorm-SiLU policy
    forced to stock kernels, to the fused op, and to the fused op with its
    one-pass forward; the convolution biases added by stock cuDNN or by
    bias_add; bf16 channels-last and fp32."""
    print("\n==== training step A/B, c128 batch 128")
    _ab_train_case(True, True)
    _ab_train_case(False, False)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--what", default="sample,gn,train")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    assert torch.cuda.is_available(), "profile_gpu.py needs CUDA"
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for what in args.what.split(","):
        {
            "sample": profile_sample,
            "gn": profile_gn,
            "train": profile_train,
            "ab_gn": ab_gn,
            "ab_sample": ab_sample,
            "ab_train": ab_train,
            "ab_qsample": ab_qsample,
            "host_loss": host_loss,
            "ab_loss": ab_loss,
            "host_split": host_split,
            "ab_reduce": ab_reduce,
        }[what](args)


if __name__ == "__main__":
    main()
