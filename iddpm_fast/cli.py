"""
Command line: ``python -m iddpm_fast <command> [--flag value ...]`` (also the
``iddpm-fast`` console script).

Commands:
  train   improved-diffusion's image_train.py flags plus this library's
          (see ``python -m iddpm_fast train --help``); with no --data_dir it
          trains the built-in digits preset.
  sample  image_sample.py's flags; the model config comes from the run that
          wrote --model_path when it was trained by iddpm_fast.
  nll     image_nll.py's flags: bits/dim with per-timestep terms and a plot.
  info    what runs here: versions, the C++ extension, each op's backend.
  fid     Frechet Inception Distance between two .npz files (images or
          statistics); the Inception weights file is given by path.
  bench   run `pytest bench/ --benchmark` (from a source checkout), or with
          --report render bench/results/*.json as REPORT.md + speedups.png.
  reproduce  re-test the paper's findings on small data and write a report.
"""

import argparse
import os
import signal
import sys

from .script_util import str2bool


def tune_malloc():
    """glibc keeps freed memory (see :mod:`iddpm_fast.cpu_memory`; kept
    under this name for callers of the earlier CLI-only version).

    :return: True when the settings were applied.
    """
    from .cpu_memory import retain_freed_memory

    return retain_freed_memory()


def _flag_type(default):
    if isinstance(default, bool):
        return str2bool
    return str if default is None else type(default)


def _add_config_flags(parser, defaults, aliases=None):
    """A --key flag per option; ``aliases`` (alias -> key) adds --alias as
    another name of --key, kept apart so that the command's own alias check
    sees both when both are given."""
    for key, default in defaults.items():
        parser.add_argument(f"--{key}", type=_flag_type(default), default=argparse.SUPPRESS,
                            help=f"(default: {default!r})")
    for alias, key in (aliases or {}).items():
        parser.add_argument(f"--{alias}", type=_flag_type(defaults[key]), default=argparse.SUPPRESS,
                            help=f"the same as --{key}")


def _train(args):
    from .training import train

    result = train(**args)
    print(f"done: {result['step']} steps in {result['seconds']:.0f} s; outputs in {result['out_dir']}")
    if result.get("samples"):
        print(f"samples: {result['samples']}")
    if result.get("nll_bpd") is not None:
        print(f"held-out NLL: {result['nll_bpd']:.4f} bits/dim")
    return 0


def _sample(args):
    from .sampling import sample

    result = sample(**args)
    if result.get("npz"):
        print(f"samples: {result['npz']}" + (f"  grid: {result['grid']}" if result.get("grid") else ""))
    return 0


def _nll(args):
    from .sampling import nll

    result = nll(**args)
    print(f"NLL: {result['bpd']:.4f} bits/dim over {result['num_images']} images")
    return 0


def _bench(args):
    import subprocess

    folder = args.get("results", "bench/results")
    if not args.get("report"):
        bench_dir = os.path.join(os.path.dirname(os.path.abspath(folder)))
        if not os.path.isdir(bench_dir):
            raise SystemExit(f"no benchmark suites at {bench_dir}: run this from a source checkout")
        code = subprocess.call([sys.executable, "-m", "pytest", bench_dir, "--benchmark", "-q"])
        if code:
            return code
    from .bench_report import report

    markdown, chart = report(folder)
    print(markdown)
    print(f"written: {os.path.join(folder, 'REPORT.md')} and {chart}")
    return 0


def _fid(args):
    from .fid import fid, save_statistics

    if args.get("save_stats"):
        path = save_statistics(args["ref"], args["save_stats"], args.get("inception_weights"),
                               int(args["batch_size"]), args.get("device", ""))
        print(f"statistics of {args['ref']} written to {path}")
        return 0
    if not args.get("samples"):
        raise SystemExit("fid: give REF.npz and SAMPLES.npz (or --save_stats OUT.npz with REF.npz)")
    value = fid(args["ref"], args["samples"], args.get("inception_weights"), int(args["batch_size"]),
                args.get("device", ""), progress=True)
    print(f"FID: {value:.4f}")
    return 0


def _reproduce(args):
    from .reproduce import run_study

    seeds = [int(x) for x in args["seeds"].split(",")] if args.get("seeds") else None
    path = run_study(out=args["out"], cache=args["cache"], scale=args["scale"], data_dir=args["data_dir"],
                     seeds=seeds, steps=args.get("steps"), image_size=args.get("image_size"))
    print(f"report: {path}")
    return 0


def _info(args):
    """What runs here: versions, devices, the C++ extension, each op's backend."""
    import platform

    import torch

    from . import __version__, _ext, ops

    print(f"iddpm_fast {__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        print(f"cuda: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")
    reason = _ext.load()
    if reason is None:
        isa = torch.ops.iddpm_fast.cpu_kernel_isa()
        cuda = "with CUDA kernels" if _ext.has_cuda_kernels() else "CPU kernels only"
        print(f"C++ extension: {_ext.how_loaded()} ({cuda}; CPU kernels: {isa})")
    else:
        print(f"C++ extension: not available: {reason}")
    from . import kernels

    why = kernels._triton_import_error()
    if why is not None:
        print(f"Triton: not available: {why}")
    else:
        import triton

        from .kernels._common import Launcher

        if kernels.interpreting():
            launches = "through the interpreter (TRITON_INTERPRET=1: kernels on CPU tensors, for tests)"
        elif Launcher.direct:
            launches = "direct once a specialisation has been seen (IDDPM_FAST_TRITON_LAUNCH=triton: Triton's own)"
        else:
            launches = "Triton's own (IDDPM_FAST_TRITON_LAUNCH=triton)"
        print(f"Triton {triton.__version__}: launches {launches}")
    requested = ops.requested_backend()
    print(f"backend requested: {requested} (IDDPM_FAST_BACKEND)")
    import warnings

    def resolved(name, device):
        try:
            return ops.resolve_name(name, device)
        except ops.BackendUnavailableError as exc:  # a forced backend that cannot run here
            return f"UNAVAILABLE ({str(exc).split(': ', 1)[-1].split('. Unset')[0]})"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ops.declared_ops():
            kinds = ", ".join(f"{d.type}: {resolved(name, d)}" for d in devices)
            if (name == "group_norm_silu" and torch.cuda.is_available() and requested == "auto"
                    and resolved(name, torch.device("cuda")) == "cpp" and ops._cuda_wants_stock()):
                kinds += " (IDDPM_FAST_CUDA_GN=stock: F.group_norm + F.silu on cuda)"
            if name == "dropout" and torch.cuda.is_available() and resolved(name, torch.device("cuda")) == "cpp":
                kinds += " (on cuda: F.dropout, already one fused kernel)"
            print(f"  {name:38s} {kinds}")
    return 0


def build_parser():
    from .sampling import EVAL_ALIASES
    from .training import TRAIN_ALIASES, train_defaults

    parser = argparse.ArgumentParser(prog="python -m iddpm_fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--malloc_tuning", type=str2bool, default=argparse.SUPPRESS,
                        help="raise glibc's trim/mmap thresholds (default: true; or IDDPM_FAST_MALLOC_TUNING=0)")
    sub = parser.add_subparsers(dest="command", required=True)
    from .training import DIGITS_PRESET

    preset = ", ".join(f"{k}={v!r}" for k, v in DIGITS_PRESET.items() if k != "data_dir")
    p_train = sub.add_parser(
        "train", help="train a model (built-in digits when no --data_dir)",
        description="improved-diffusion's image_train.py flags (same defaults) plus this library's. Without "
                    f"--data_dir (or with --data_dir digits) the built-in digits preset changes these defaults: "
                    f"{preset}; flags given still win.")
    _add_config_flags(p_train, train_defaults(), TRAIN_ALIASES)
    p_train.add_argument("--malloc_tuning", type=str2bool, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p_train.set_defaults(_run=_train)

    from .sampling import COMMON_NEW, NLL_DEFAULTS, SAMPLE_DEFAULTS, SAMPLE_NEW
    from .script_util import model_and_diffusion_defaults

    p_sample = sub.add_parser("sample", help="draw samples from a checkpoint (image_sample.py)")
    _add_config_flags(p_sample, {**SAMPLE_DEFAULTS, **model_and_diffusion_defaults(), **COMMON_NEW, **SAMPLE_NEW},
                      EVAL_ALIASES)
    p_sample.set_defaults(_run=_sample)
    p_nll = sub.add_parser("nll", help="bits/dim of a checkpoint on a dataset (image_nll.py)")
    _add_config_flags(p_nll, {**NLL_DEFAULTS, **model_and_diffusion_defaults(), **COMMON_NEW}, EVAL_ALIASES)
    p_nll.set_defaults(_run=_nll)
    p_bench = sub.add_parser("bench", help="run the benchmarks or render their results")
    p_bench.add_argument("--report", action="store_true", help="only render existing results")
    p_bench.add_argument("--results", default="bench/results", help="folder of pytest-benchmark JSON files")
    p_bench.set_defaults(_run=_bench)
    p_fid = sub.add_parser("fid", help="Frechet Inception Distance between two .npz (images or statistics)")
    p_fid.add_argument("ref", help="reference .npz: images (arr_0 uint8 NHWC) or statistics (mu, sigma)")
    p_fid.add_argument("samples", nargs="?", help="samples .npz (e.g. what `sample` wrote)")
    p_fid.add_argument("--inception_weights", default=None,
                       help="path of pt_inception-2015-12-05-6726825d.pth (nothing is downloaded; default: "
                            "$IDDPM_FAST_INCEPTION_WEIGHTS or ~/.cache/iddpm_fast/)")
    p_fid.add_argument("--batch_size", type=int, default=50)
    p_fid.add_argument("--device", default="")
    p_fid.add_argument("--save_stats", default=None, help="write REF's feature statistics to this .npz and stop")
    p_fid.set_defaults(_run=_fid)
    p_info = sub.add_parser("info", help="versions, devices, the C++ extension and each op's backend here")
    p_info.set_defaults(_run=_info)
    p_rep = sub.add_parser("reproduce", help="re-test the paper's six findings at small scale; write a report")
    p_rep.add_argument("--scale", default="small", choices=["small", "tiny"],
                       help="small: the committed report (about an hour on 2 CPU cores); tiny: seconds (CI)")
    p_rep.add_argument("--out", default=None, help="where reproduction.md and figures/ go (default: reports/ for "
                       "the small scale, reports/SCALE/ otherwise)")
    p_rep.add_argument("--cache", default=None, help="finished runs, re-used (default: runs/reproduce for the "
                       "small scale, runs/reproduce-SCALE otherwise)")
    p_rep.add_argument("--data_dir", default="digits", help="digits (built in), an image folder or an .npz")
    p_rep.add_argument("--image_size", type=int, default=None, help="needed for data other than digits")
    p_rep.add_argument("--seeds", default=None, help="comma-separated seeds (default: the scale's)")
    p_rep.add_argument("--steps", type=int, default=None, help="training steps per run (default: the scale's)")
    p_rep.set_defaults(_run=_reproduce)
    for p in (p_sample, p_nll, p_bench, p_fid, p_info, p_rep):
        p.add_argument("--malloc_tuning", type=str2bool, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    run = args.pop("_run")
    command = args.pop("command")
    malloc = args.pop("malloc_tuning", os.environ.get("IDDPM_FAST_MALLOC_TUNING", "1") != "0")
    if malloc:
        tune_malloc()
    else:  # also for the train()/sample()/nll() this process runs next
        os.environ["IDDPM_FAST_MALLOC_TUNING"] = "0"
    try:
        return run(args)
    except KeyboardInterrupt as exc:
        print(f"\n{exc or 'interrupted'}", file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))  # 130 for Ctrl-C, 143 for SIGTERM
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        # A bad flag, path or file: the message says what is wrong, and a
        # traceback would bury it. IDDPM_FAST_TRACEBACK=1 shows where it came from.
        if os.environ.get("IDDPM_FAST_TRACEBACK", "0").strip() not in ("", "0"):
            raise
        print(f"iddpm_fast {command}: error: {exc}\n(IDDPM_FAST_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
