"""The reproduction study (python -m iddpm_fast reproduce) in its tiny
configuration: every run, the report with its six verdicts and figures, and
the cache that makes a second call re-render without training."""

import json
import os

import pytest

from iddpm_fast import cli
from iddpm_fast import reproduce as rep


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    out, cache = str(root / "reports"), str(root / "cache")
    assert cli.main(["reproduce", "--scale", "tiny", "--out", out, "--cache", cache]) == 0
    return out, cache


def test_report_has_six_verdicts_and_its_figures(study):
    out, _ = study
    text = open(os.path.join(out, "reproduction.md")).read()
    summary = text.split("## Summary")[1].split("##")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 6
    for line in rows:
        assert any(v in line for v in ("reproduced", "not reproduced", "inconclusive"))
    for fig in ("schedules_alphabar.png", "schedules_snr.png", "vlb_learning_curves.png", "vb_terms.png",
                "vb_cumulative.png", "steps_sweep.png", "samples_hybrid.png"):
        path = os.path.join(out, "figures", fig)
        assert os.path.getsize(path) > 1000, fig
        assert f"figures/{fig}" in text
    verdicts = json.load(open(os.path.join(out, "reproduction.json")))["verdicts"]
    assert sorted(verdicts) == ["1", "2", "3", "4", "5", "6"]


def test_every_run_is_cached_and_a_second_call_does_not_train(study, monkeypatch):
    out, cache = study
    for name in rep.VARIANTS:
        metrics = json.load(open(os.path.join(cache, name, "seed0", "metrics.json")))
        assert metrics["name"] == name and metrics["nll_bpd"] > 0 and metrics["quality"]["fd"] >= 0
    import iddpm_fast.training

    def no_training(**_):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(iddpm_fast.training, "train", no_training)
    os.remove(os.path.join(out, "reproduction.md"))
    rep.run_study(out=out, cache=cache, scale="tiny")
    assert os.path.exists(os.path.join(out, "reproduction.md"))


def test_a_cache_made_with_other_settings_is_refused(study):
    out, cache = study
    with pytest.raises(ValueError, match="was made with other settings.*steps: 2 there, 3 now"):
        rep.run_study(out=out, cache=cache, scale="tiny", steps=3)


def test_verdict_rule():
    assert rep.compare([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])[0] == "reproduced"
    assert rep.compare([2.0, 2.1, 1.9], [1.0, 1.1, 0.9])[0] == "not reproduced"
    assert rep.compare([1.0, 2.0, 3.0], [1.5, 2.5, 1.0])[0] == "inconclusive"
    assert rep.compare([1.0], [2.0])[0].startswith("inconclusive")
    assert rep.compare([3.0, 3.1, 2.9], [1.0, 1.1, 0.9], lower_is_better=False)[0] == "reproduced"


def test_other_data_needs_an_image_size(tmp_path):
    with pytest.raises(ValueError, match="image size"):
        rep.run_study(out=str(tmp_path), cache=str(tmp_path / "c"), scale="tiny", data_dir=str(tmp_path))


def test_line_plot_rejects_empty_series(tmp_path):
    with pytest.raises(ValueError, match="nothing to plot"):
        rep.line_plot(str(tmp_path / "x.png"), [("a", [1.0], [float("nan")])])
