"""The benchmark report renders pytest-benchmark JSON as a table and a chart."""

import json

import pytest

from iddpm_fast import cli
from iddpm_fast.bench_report import load_results, report


def _write_run(path, device, medians, extra_info=None):
    """A pytest-benchmark JSON file with one case ("op fwd", n=16): a median
    per provider, and extra_info per provider where given."""
    extra_info = extra_info or {}
    benchmarks = [
        {"name": f"test_op[{provider}-16]", "group": "op fwd", "params": {"provider": provider, "n": 16},
         "stats": {"median": median}, **({"extra_info": extra_info[provider]} if provider in extra_info else {})}
        for provider, median in medians.items()
    ]
    path.write_text(json.dumps({"iddpm_fast": {"device": device}, "benchmarks": benchmarks}))


def _write(folder):
    _write_run(folder / "run.json", "cpu-test", {"reference": 0.004, "torch_compile": 0.002, "fused": 0.001})


def test_report_table_and_chart(tmp_path):
    _write(tmp_path)
    rows = load_results(str(tmp_path))
    assert {r["provider"] for r in rows} == {"reference", "torch_compile", "fused"}
    md, chart = report(str(tmp_path))
    fused = next(line for line in md.splitlines() if "| fused |" in line)
    assert "| 4.00x | 2.00x |" in fused and "n=16" in fused
    from PIL import Image

    assert Image.open(chart).size[0] == 900
    assert (tmp_path / "REPORT.md").read_text().count("| cpu-test |") == 3


def test_chart_uses_the_newest_run_of_each_case(tmp_path):
    from PIL import Image

    from iddpm_fast.bench_report import _latest_cases, render_chart

    for stamp, fused in (("20260101-000000", 0.008), ("20260102-000000", 0.002)):
        _write_run(tmp_path / f"cpu-{stamp}.json", "cpu-test", {"reference": 0.004, "fused": fused})
    rows = load_results(str(tmp_path))
    assert len(rows) == 4
    (by,) = _latest_cases(rows).values()
    assert by == {"reference": 0.004, "fused": 0.002}
    one = Image.open(render_chart(rows, str(tmp_path / "one.png"))).size
    # A case slower than its reference (the older run alone) draws too, to the left of 1x.
    older = [r for r in rows if r["file"].endswith("0101-000000.json")]
    assert Image.open(render_chart(older, str(tmp_path / "older.png"))).size == one


def test_report_shows_kernel_time_where_recorded(tmp_path):
    from iddpm_fast.bench_report import render_markdown

    _write_run(tmp_path / "gpu.json", "gpu-test", {"reference": 0.004, "fused": 0.002},
               {"reference": {"min_bytes": 8e6, "device_ms": 2.0, "kernel_ms": 0.5},
                "fused": {"min_bytes": 8e6, "device_ms": 1.0}})
    md = render_markdown(load_results(str(tmp_path)))
    assert "kernel time | kernel GB/s |" in md
    ref = next(line for line in md.splitlines() if "| reference |" in line)
    fused = next(line for line in md.splitlines() if "| fused |" in line)
    # 8 MB in 2 ms of events is 4 GB/s; in 0.5 ms of kernels, 16 GB/s.
    assert ref.endswith("| 2.000 ms | 4 | 0.500 ms | 16 |")
    assert fused.endswith("| 1.000 ms | 8 | - | - |")


def test_report_without_results_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="run `pytest bench/ --benchmark` first"):
        report(str(tmp_path))
    _write(tmp_path)
    assert cli.main(["bench", "--report", "--results", str(tmp_path)]) == 0
    assert "speedups.png" in capsys.readouterr().out


def _bench_conftest():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "conftest.py")
    spec = importlib.util.spec_from_file_location("iddpm_bench_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeBenchmark:
    def __init__(self, disabled=False):
        self.disabled = disabled
        self.extra_info = {}


def test_device_time_is_recorded_on_cuda_only(monkeypatch):
    """bench/conftest.py's time_on_device: on CUDA, CUDA events around back-to-back
    calls (no sync between them) give extra_info["device_ms"]; on CPUs and in
    smoke runs nothing is recorded and nothing runs. CUDA is simulated here."""
    import torch

    conf = _bench_conftest()
    calls = []
    bench = _FakeBenchmark()
    conf.time_on_device(bench, lambda: calls.append(1))
    assert not torch.cuda.is_available() or "device_ms" in bench.extra_info
    if not torch.cuda.is_available():
        assert bench.extra_info == {} and calls == []

    clock = iter([10.0, 10.5])  # the events' record times, in seconds

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = next(clock)

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    syncs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(len(calls)))
    # The kernels' own time comes from the profiler (kernel_ms), after the events.
    profiled = []
    monkeypatch.setattr(conf, "kernel_ms", lambda run, calls: profiled.append(calls) or 0.125)
    calls.clear()
    bench = _FakeBenchmark()
    conf.time_on_device(bench, lambda: calls.append(1), calls=20)
    assert len(calls) == 21  # one warm-up call, then 20 timed
    assert syncs == [1, 21]  # after the warm-up and after the last call, never in between
    assert bench.extra_info["device_ms"] == pytest.approx(500.0 / 20)
    assert bench.extra_info["kernel_ms"] == 0.125 and profiled == [20]
    # A profiler that fails leaves the events' figure and says why.

    def broken(run, calls):
        raise RuntimeError("no CUPTI")

    monkeypatch.setattr(conf, "kernel_ms", broken)
    clock = iter([10.0, 10.5])
    bench = _FakeBenchmark()
    conf.time_on_device(bench, lambda: None, calls=20)
    assert bench.extra_info["device_ms"] == pytest.approx(25.0)
    assert bench.extra_info["kernel_ms_error"] == "RuntimeError: no CUPTI" and "kernel_ms" not in bench.extra_info
    calls.clear()
    disabled = _FakeBenchmark(disabled=True)
    conf.time_on_device(disabled, lambda: calls.append(1))
    assert disabled.extra_info == {} and calls == []


def test_report_device_time_columns(tmp_path):
    """Cases with a recorded device time get its column and its GB/s; the others a dash."""
    data = {
        "iddpm_fast": {"device": "gpu-test"},
        "benchmarks": [
            {"name": "t[reference]", "group": "op", "params": {"provider": "reference"},
             "stats": {"median": 0.004}, "extra_info": {"min_bytes": 2_000_000, "device_ms": 0.002}},
            {"name": "t[fused]", "group": "op", "params": {"provider": "fused"},
             "stats": {"median": 0.001}, "extra_info": {"min_bytes": 2_000_000}},
        ],
    }
    (tmp_path / "gpu.json").write_text(json.dumps(data))
    from iddpm_fast.bench_report import render_markdown

    md = render_markdown(load_results(str(tmp_path)))
    assert "| device time | device GB/s |" in md
    assert "| reference | 4.000 ms | 1.00x | - | 0.002 ms | 1000 |" in md
    assert "| fused | 1.000 ms | 4.00x | - | - | - |" in md
