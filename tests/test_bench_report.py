"""The benchmark report renders pytest-benchmark JSON as a table and a chart."""

import json

import pytest

from iddpm_fast import cli
from iddpm_fast.bench_report import load_results, report


def _write(folder):
    data = {
        "iddpm_fast": {"device": "cpu-test"},
        "benchmarks": [
            {"name": "test_op[reference-16]", "group": "op fwd", "params": {"provider": "reference", "n": 16},
             "stats": {"median": 0.004}},
            {"name": "test_op[torch_compile-16]", "group": "op fwd", "params": {"provider": "torch_compile", "n": 16},
             "stats": {"median": 0.002}},
            {"name": "test_op[fused-16]", "group": "op fwd", "params": {"provider": "fused", "n": 16},
             "stats": {"median": 0.001}},
        ],
    }
    (folder / "run.json").write_text(json.dumps(data))


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


def test_report_without_results_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="run `pytest bench/ --benchmark` first"):
        report(str(tmp_path))
    _write(tmp_path)
    assert cli.main(["bench", "--report", "--results", str(tmp_path)]) == 0
    assert "speedups.png" in capsys.readouterr().out
