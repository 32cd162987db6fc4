"""FID: the Frechet distance, the Inception-v3 definition against the standard
weights file's layout, and the command (with stand-in weights: the real file
is never downloaded)."""

import os

import numpy as np
import pytest
import torch

from iddpm_fast import cli
from iddpm_fast import fid as fidlib


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    s = a @ a.T + np.eye(6)
    mu = rng.normal(size=6)
    assert abs(fidlib.frechet_distance(mu, s, mu, s)) < 1e-8
    # Commuting (diagonal) covariances: sum (sqrt(s1) - sqrt(s2))^2.
    d1, d2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    mu2 = mu + 1.5
    want = ((mu - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert fidlib.frechet_distance(mu, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(want, rel=1e-10)
    # One-dimensional: (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations.
    assert fidlib.frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9 + 1)
    with pytest.raises(ValueError, match="mismatched statistics"):
        fidlib.frechet_distance(mu, s, mu[:3], s)


def test_inception_layout_matches_the_standard_weights_file():
    """The parameter names and shapes that the pytorch-fid weights file holds
    (Inception-v3 with 1008 classes and no auxiliary head): 94 conv+BN units."""
    model = fidlib.FIDInceptionV3()
    state = model.state_dict()
    convs = [k for k in state if k.endswith(".conv.weight")]
    assert len(convs) == 94
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["fc.weight"].shape == (1008, 2048)
    assert "Mixed_7c.branch_pool.bn.running_var" in state
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 2048)


def test_missing_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("IDDPM_FAST_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="downloads nothing: put the file at"):
        fidlib.load_inception(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="is not the FID Inception-v3 weights file"):
        fidlib.load_inception(str(bad))


def test_fid_command_end_to_end_with_stand_in_weights(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / fidlib.WEIGHTS_NAME
    model = fidlib.FIDInceptionV3()
    for m in model.modules():  # variance-preserving stand-in weights, so features differ between images
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(model.state_dict(), weights)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(12, 8, 8, 1), dtype=np.uint8)
    b = np.clip(a.astype(int) + 60, 0, 255).astype(np.uint8)
    for name, arr in (("a.npz", a), ("b.npz", b)):
        np.savez(tmp_path / name, arr)
    common = ["--inception_weights", str(weights), "--batch_size", "5", "--device", "cpu"]
    assert cli.main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), *common]) == 0
    same = float(capsys.readouterr().out.strip().split()[-1])
    assert cli.main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), *common]) == 0
    different = float(capsys.readouterr().out.strip().split()[-1])
    assert abs(same) < 1e-6 < different
    # Statistics saved once and reused as the reference give the same number.
    assert cli.main(["fid", str(tmp_path / "a.npz"), "--save_stats", str(tmp_path / "ref.npz"), *common]) == 0
    capsys.readouterr()
    assert cli.main(["fid", str(tmp_path / "ref.npz"), str(tmp_path / "b.npz"), *common]) == 0
    again = float(capsys.readouterr().out.strip().split()[-1])
    assert again == pytest.approx(different, rel=1e-9)
    assert os.path.exists(tmp_path / "ref.npz")
