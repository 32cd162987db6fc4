"""
iddpm_fast against the original improved-diffusion, in one process, with the
variants interleaved (so machine noise hits them alike).

The original is not part of this repository: point --original at a checkout
of openai/improved-diffusion (the folder that holds `improved_diffusion/`).
Its only third-party imports that may be missing, mpi4py and blobfile, are
stubbed for a single process when absent or when --stub is given.

    python bench/compare_original.py --original ~/src/improved-diffusion --what sample,train

Sampling: the 32x32 UNet (T=4000 cosine, learned sigmas) with `--respacing`
steps at `--sample_batch`, original vs iddpm_fast fp32 eager and bf16
autocast (channels-last), on CUDA also with CUDA graphs. Prints images/s and each variant's
ratio to the original, plus the largest difference of a short fixed-seed run
against the original (fp32 eager: should be fp32 rounding).
Training: TrainLoop.run_step at `--train_batch`, original vs iddpm_fast fp32
and bf16 autocast (channels-last on CPUs), samples/s and ratios.
Writes the numbers as JSON with --json.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types

import torch


def _install_stubs():
    comm = types.SimpleNamespace(rank=0, size=1, Get_rank=lambda: 0, Get_size=lambda: 1,
                                 bcast=lambda x, root=0: x, gather=lambda x, root=0: [x])
    mpi4py = types.ModuleType("mpi4py")
    mpi4py.MPI = types.SimpleNamespace(COMM_WORLD=comm)
    sys.modules["mpi4py"] = mpi4py
    bf = types.ModuleType("blobfile")
    bf.BlobFile, bf.join, bf.dirname, bf.exists = open, os.path.join, os.path.dirname, os.path.exists
    bf.listdir, bf.isdir, bf.basename = os.listdir, os.path.isdir, os.path.basename
    sys.modules["blobfile"] = bf


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _cfg(osu, channels, respacing=""):
    return dict(osu.model_and_diffusion_defaults(), image_size=32, num_channels=channels, num_res_blocks=2,
                learn_sigma=True, noise_schedule="cosine", diffusion_steps=4000, attention_resolutions="16,8",
                timestep_respacing=respacing)


def _pair(osu, nsu, cfg, device):
    """The original's and our model with the same (perturbed) weights."""
    torch.manual_seed(0)
    mo, do = osu.create_model_and_diffusion(**cfg)
    torch.manual_seed(0)
    mn, dn = nsu.create_model_and_diffusion(**cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p, q in zip(mo.parameters(), mn.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
            q.copy_(p)
    return mo.to(device).eval(), do, mn.to(device).eval(), dn


def compare_sampling(args, osu, nsu, device):
    import copy

    from iddpm_fast import cuda_graphs, fp16_util

    cfg = _cfg(osu, args.channels, args.respacing)
    mo, do, mn, dn = _pair(osu, nsu, cfg, device)
    B = args.sample_batch
    shape = (B, 3, 32, 32)
    cl = device.type == "cpu"
    mcl = copy.deepcopy(mn).to(memory_format=torch.channels_last) if cl else mn
    steps = dn.num_timesteps

    def eager(diffusion, model, amp=False, channels_last=False):
        def run():
            x = torch.randn(*shape, device=device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                return diffusion.p_sample_loop(model, shape, noise=x, device=device)
        return run

    variants = {"original": eager(do, mo), "iddpm_fast fp32": eager(dn, mcl, channels_last=cl)}
    if device.type == "cpu":
        # bf16 autocast (AMX/AVX-512 bf16 convolutions and attention), channels-last.
        variants["iddpm_fast bf16 channels_last"] = eager(dn, mcl, amp=True, channels_last=True)
    if device.type == "cuda":
        # bf16 autocast with channels-last activations (what tensor-core convolutions want), eager and
        # with each step replayed from a CUDA graph.
        mcl = copy.deepcopy(mn).to(memory_format=torch.channels_last)
        variants["iddpm_fast bf16 channels_last"] = eager(dn, mcl, amp=True, channels_last=True)
        # As sample(amp="bf16", cuda_graphs=True) runs it: weights stored in bf16 (the same numbers as
        # autocast's casts, which without its cast cache would be replayed at every step).
        mbf = fp16_util.cast_autocast_weights(copy.deepcopy(mcl), torch.bfloat16)
        with cuda_graphs.autocast(device, True):
            graph = cuda_graphs.GraphedSampler(dn, mbf, shape, memory_format=torch.channels_last)

        def graphed():
            with cuda_graphs.autocast(device, True):
                return graph.loop(torch.randn(*shape, device=device).contiguous(memory_format=torch.channels_last))

        variants["iddpm_fast bf16 channels_last cuda_graphs"] = graphed
    times = {k: [] for k in variants}
    for r in range(args.rounds + 1):
        for name, run in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    # Fixed-seed agreement on a short chain (10 steps), fp32 eager, with TF32 off on CUDA (cuDNN
    # convolutions default to TF32, whose 10-bit mantissa the chain amplifies).
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    keys = ("learn_sigma", "sigma_small", "noise_schedule", "use_kl", "predict_xstart", "rescale_timesteps",
            "rescale_learned_sigmas")
    do10 = osu.create_gaussian_diffusion(steps=4000, timestep_respacing="10", **{k: cfg[k] for k in keys})
    dn10 = nsu.create_gaussian_diffusion(steps=4000, timestep_respacing="10", **{k: cfg[k] for k in keys})
    torch.manual_seed(3)
    a = do10.p_sample_loop(mo, (min(B, 16), 3, 32, 32), device=device)
    torch.manual_seed(3)
    b = dn10.p_sample_loop(mn, (min(B, 16), 3, 32, 32), device=device)
    diff = (a - b).abs().max().item()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = dict(seconds=med, images_per_s=B / med, ms_per_step=1e3 * med / steps,
                          vs_original=statistics.median(times["original"]) / med)
    return dict(batch=B, steps=steps, channels=args.channels, rounds=args.rounds, max_abs_diff_10_steps=diff,
                variants=rows)


def compare_training(args, osu, nsu, device):
    import torch.distributed as dist

    from improved_diffusion import logger as olog
    from improved_diffusion import train_util as otu

    from iddpm_fast import train_util as ntu

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    tmp = tempfile.mkdtemp(prefix="iddpm_compare_")
    olog.configure(dir=tmp, format_strs=[])
    B = args.train_batch
    cfg = dict(_cfg(osu, args.channels), dropout=0.1)

    def data():
        g = torch.Generator().manual_seed(0)
        while True:
            yield (torch.rand(B, 3, 32, 32, generator=g) * 2 - 1), {}

    common = dict(batch_size=B, microbatch=-1, lr=1e-4, ema_rate="0.9999", log_interval=10**9,
                  save_interval=10**9, resume_checkpoint="")
    torch.manual_seed(0)
    mo, do = osu.create_model_and_diffusion(**cfg)
    mo.to(device)
    loops = {"original": otu.TrainLoop(model=mo, diffusion=do, data=data(), **common)}
    for name, kw in (("iddpm_fast fp32", dict(channels_last=device.type == "cpu")),
                     ("iddpm_fast bf16", dict(amp="bf16", channels_last=True))):
        torch.manual_seed(0)
        m, d = nsu.create_model_and_diffusion(**cfg)
        m.to(device)
        loops[name] = ntu.TrainLoop(model=m, diffusion=d, data=data(), checkpoint_dir=tmp, **kw, **common)
    times = {k: [] for k in loops}
    for r in range(args.train_rounds + 1):
        for name, loop in loops.items():
            batch, cond = next(loop.data)
            batch = batch.to(device)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.train_steps):
                loop.run_step(batch, cond)
            _sync(device)
            if r:
                times[name].append((time.perf_counter() - t0) / args.train_steps)
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = dict(seconds_per_step=med, samples_per_s=B / med,
                          vs_original=statistics.median(times["original"]) / med,
                          min_s=min(ts), max_s=max(ts))
    return dict(batch=B, channels=args.channels, rounds=args.train_rounds, steps_per_round=args.train_steps,
                variants=rows,
                note="the original wraps the model in DDP whenever CUDA is available (also with one process)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--original", required=True, help="folder holding improved_diffusion/")
    p.add_argument("--what", default="sample,train")
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--respacing", default="100")
    p.add_argument("--sample_batch", type=int, default=0, help="default: 256 on CUDA, 16 on CPU")
    p.add_argument("--train_batch", type=int, default=0, help="default: 128 on CUDA, 16 on CPU")
    p.add_argument("--train_steps", type=int, default=0, help="steps per timed round; default: 5 on CUDA, 3 on CPU")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train_rounds", type=int, default=0,
                   help="timed rounds of training steps; default: 8 on CUDA (6 steps per variant proved too noisy "
                        "there), --rounds on CPU")
    p.add_argument("--stub", action="store_true", help="always stub mpi4py and blobfile")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.join(args.original, "improved_diffusion")):
        p.error(f"{args.original} holds no improved_diffusion/ folder")
    for mod in ("mpi4py", "blobfile"):
        try:
            if args.stub:
                raise ImportError
            __import__(mod)
        except ImportError:
            _install_stubs()
            break
    sys.path.insert(0, os.path.abspath(args.original))
    # The checkout this script belongs to, not whatever iddpm_fast pip
    # installed last (run as `python bench/compare_original.py`, sys.path[0]
    # is bench/, and a stale install would be measured instead).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from improved_diffusion import script_util as osu

    import iddpm_fast
    from iddpm_fast import script_util as nsu

    print(f"iddpm_fast from {os.path.dirname(iddpm_fast.__file__)}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.sample_batch = args.sample_batch or (256 if device.type == "cuda" else 16)
    args.train_batch = args.train_batch or (128 if device.type == "cuda" else 16)
    args.train_steps = args.train_steps or (5 if device.type == "cuda" else 3)
    args.train_rounds = args.train_rounds or (8 if device.type == "cuda" else args.rounds)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    result = {"device": name, "torch": torch.__version__}
    what = set(args.what.split(","))
    if "sample" in what:
        result["sample"] = res = compare_sampling(args, osu, nsu, device)
        print(f"sampling, 32x32 c{res['channels']}, batch {res['batch']}, {res['steps']} steps, on {name}:")
        for k, v in res["variants"].items():
            print(f"  {k:30s} {v['images_per_s']:9.1f} images/s {v['ms_per_step']:8.2f} ms/step "
                  f"x{v['vs_original']:.2f} vs original")
        print(f"  max |original - iddpm_fast| after 10 fixed-seed fp32 steps (TF32 off): "
              f"{res['max_abs_diff_10_steps']:.2e}")
    if "train" in what:
        result["train"] = res = compare_training(args, osu, nsu, device)
        print(f"training step, 32x32 c{res['channels']}, batch {res['batch']}, on {name} "
              f"(median of {res['rounds']} rounds of {res['steps_per_round']} steps; range across rounds):")
        for k, v in res["variants"].items():
            print(f"  {k:30s} {v['samples_per_s']:9.1f} samples/s {1e3 * v['seconds_per_step']:8.1f} ms/step "
                  f"({1e3 * v['min_s']:.1f}-{1e3 * v['max_s']:.1f}) x{v['vs_original']:.2f} vs original")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
