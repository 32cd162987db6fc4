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
    if getattr(config.option, "benchmark_json", None) is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        slug = re.sub(r"[^A-Za-z0-9]+", "_", device_name()).strip("_")
        path = os.path.join(RESULTS, f"{slug}-{stamp}.json")
        config.option.benchmark_json = open(path, "wb")  # noqa: SIM115 (pytest-benchmark closes it)
        config._iddpm_bench_json = path


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["iddpm_fast"] = {"device": device_name(), "torch": torch.__version__}


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
        cases.setdefault(key, {})[provider] = (bench.stats.median, bench.extra_info.get("min_bytes"))
    if not cases:
        return
    tr = terminalreporter
    tr.write_sep("=", "iddpm_fast: median time, speed-up (same run) and GB/s against the minimal bytes")
    tr.write_line(
        f"{'case':66s} {'provider':14s} {'median':>12s} {'vs ref':>8s} {'vs compile':>10s} {'vs eager':>8s} {'GB/s':>7s}"
    )
    for key, by in sorted(cases.items()):
        for provider, (median, nbytes) in sorted(by.items()):
            cols = []
            for base, width in (("reference", 8), ("torch_compile", 10), ("eager", 8)):
                other = by.get(base)
                cols.append(f"{other[0] / median:{width}.2f}" if other else f"{'-':>{width}s}")
            gbs = f"{nbytes / median / 1e9:7.1f}" if nbytes else f"{'-':>7s}"
            tr.write_line(f"{' '.join(key)[:66]:66s} {provider:14s} {median * 1e3:10.3f}ms {' '.join(cols)} {gbs}")
    path = getattr(config, "_iddpm_bench_json", None)
    if path:
        tr.write_line(f"results: {path}")


@pytest.fixture
def compiled():
    """torch.compile with a fresh cache per test, so providers don't share graphs."""
    torch._dynamo.reset()
    return lambda fn: torch.compile(fn, dynamic=False)
