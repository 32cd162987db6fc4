"""
Benchmarks (pytest-benchmark). `pytest bench/ --benchmark` times every case
and saves the results as JSON under bench/results/ (named after the device);
plain `pytest bench/` runs each case once as a smoke test. pytest-benchmark's
own --benchmark-* flags work as usual.

Every suite compares providers measured in the same process: "reference"
(the pure-PyTorch spec, eager), "torch_compile" (torch.compile of the
reference) and "fused" (the Triton / C++ kernel, skipped where it cannot run).
At the end a table gives each case's median and its ratio to the reference
and to torch.compile.
"""

import datetime
import os
import platform
import re

import pytest
import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="time the benchmarks and save JSON under bench/results/ (default: run each case once)",
    )


def device_name():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def pytest_configure(config):
    if not config.getoption("benchmark"):
        config.option.benchmark_disable = True
        return
    os.makedirs(RESULTS, exist_ok=True)
    # Every suite under the allocator setting train() / sample() run with (glibc keeps freed memory;
    # see iddpm_fast.cpu_memory), whichever suite happens to build a TrainLoop first.
    from iddpm_fast import cpu_memory

    cpu_memory.retain_freed_memory()
    if getattr(config.option, "benchmark_json", None) is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        slug = re.sub(r"[^A-Za-z0-9]+", "_", device_name()).strip("_")
        path = os.path.join(RESULTS, f"{slug}-{stamp}.json")
        config.option.benchmark_json = open(path, "wb")  # noqa: SIM115 (pytest-benchmark closes it)
        config._iddpm_bench_json = path


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["iddpm_fast"] = {"device": device_name(), "torch": torch.__version__}
    # Summary statistics only: every round's raw time made a full CPU run a 14 MB file.
    for bench in output_json.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or config.option.benchmark_disable or not session.benchmarks:
        return
    cases = {}
    for bench in session.benchmarks:
        provider = bench.params.get("provider") if bench.params else None
        if provider is None or not bench.stats:
            continue
        group = bench.group or bench.name
        # Parameters not already spelled out in the group name (shapes, mostly).
        extra = [
            "x".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
            for k, v in sorted(bench.params.items())
            if k != "provider" and str(v) not in group
        ]
        key = (group, *extra)
        cases.setdefault(key, {})[provider] = (
            bench.stats.median,
            bench.extra_info.get("min_bytes"),
            bench.extra_info.get("device_ms"),
            bench.extra_info.get("kernel_ms"),
        )
    if not cases:
        return
    tr = terminalreporter
    tr.write_sep("=", "iddpm_fast: median time, speed-up (same run) and GB/s against the minimal bytes")
    tr.write_line(
        f"{'case':66s} {'provider':14s} {'median':>12s} {'vs ref':>8s} {'vs compile':>10s} {'vs eager':>8s} {'GB/s':>7s}"
        f" {'device':>10s} {'dev GB/s':>8s} {'kernels':>10s} {'kern GB/s':>9s}"
    )
    for key, by in sorted(cases.items()):
        for provider, (median, nbytes, device_ms, kern_ms) in sorted(by.items()):
            cols = []
            for base, width in (("reference", 8), ("torch_compile", 10), ("eager", 8)):
                other = by.get(base)
                cols.append(f"{other[0] / median:{width}.2f}" if other else f"{'-':>{width}s}")
            gbs = f"{nbytes / median / 1e9:7.1f}" if nbytes else f"{'-':>7s}"
            # Device time (CUDA events, back-to-back calls) where the suite measured it.
            dev = f"{device_ms:8.3f}ms" if device_ms else f"{'-':>10s}"
            dev_gbs = f"{nbytes / device_ms / 1e6:8.1f}" if nbytes and device_ms else f"{'-':>8s}"
            # The kernels' own time (profiler), without the host's.
            kern = f"{kern_ms:8.3f}ms" if kern_ms else f"{'-':>10s}"
            kern_gbs = f"{nbytes / kern_ms / 1e6:9.1f}" if nbytes and kern_ms else f"{'-':>9s}"
            tr.write_line(
                f"{' '.join(key)[:66]:66s} {provider:14s} {median * 1e3:10.3f}ms {' '.join(cols)} {gbs} {dev} {dev_gbs}"
                f" {kern} {kern_gbs}"
            )
    path = getattr(config, "_iddpm_bench_json", None)
    if path:
        tr.write_line(f"results: {path}")


def time_on_device(benchmark, run, calls=50):
    """On CUDA, also record the device time of `run` (no synchronisation
    inside): CUDA events around `calls` back-to-back calls, milliseconds per
    call in extra_info["device_ms"]. pytest-benchmark's own timing
    synchronises after every call, so at small sizes it measures host
    latency (Python, dispatch, launch, sync: tens of microseconds); this is
    the figure to hold against the copy bandwidth. A no-op on CPUs, and when
    benchmarks only smoke-run."""
    if not torch.cuda.is_available() or benchmark.disabled:
        return
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        run()
    end.record()
    torch.cuda.synchronize()
    benchmark.extra_info["device_ms"] = start.elapsed_time(end) / calls
    try:
        benchmark.extra_info["kernel_ms"] = kernel_ms(run, calls=min(calls, 20))
    except Exception as exc:  # a profiler that cannot run here must not cost the benchmark
        benchmark.extra_info["kernel_ms_error"] = f"{type(exc).__name__}: {exc}"[:200]


def kernel_ms(run, calls=20):
    """Milliseconds per call that the GPU spends in `run`'s kernels and
    copies (torch.profiler, CUDA activity only): the sum of their durations,
    with no host time in it. The events figure above is the wall time of
    back-to-back calls, which equals the device time only while the GPU is
    the bottleneck; where Python and launches take longer than the kernels
    (small tensors, the host of a fast GPU), it measures the host, and only
    this figure says how close the kernels come to the copy bandwidth."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    # Device events only (kernels, copies, memsets), not user annotations'
    # GPU-side copies of record_function ranges, which would count twice.
    events = [e for e in prof.events()
              if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    total_us = sum(e.time_range.elapsed_us() for e in events)
    if total_us <= 0:
        raise RuntimeError("the profiler recorded no CUDA kernels")
    # A profiler that drops events (seen in long runs with many sessions)
    # would understate the time: every call launches the same kernels.
    if len(events) % calls:
        raise RuntimeError(f"the profiler recorded {len(events)} device events for {calls} calls")
    return total_us / 1e3 / calls


@pytest.fixture
def device_timer():
    """:func:`time_on_device` as a fixture: device_timer(benchmark, run)."""
    return time_on_device


@pytest.fixture
def compiled():
    """torch.compile with a fresh cache per test, so providers don't share graphs."""
    torch._dynamo.reset()
    return lambda fn: torch.compile(fn, dynamic=False)
