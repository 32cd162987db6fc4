"""iddpm_fast.sample / nll and their CLI commands."""

import os
import warnings

import numpy as np
import pytest
import torch

import iddpm_fast
from iddpm_fast import cli
from iddpm_fast.script_util import create_model_and_diffusion, model_and_diffusion_defaults

RUN = dict(data_dir="digits", image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
           attention_resolutions="4", num_heads=1, diffusion_steps=20, noise_schedule="cosine", learn_sigma=True,
           batch_size=16, lr=2e-3, ema_rate="0.99", log_interval=100, save_interval=100, progress=False,
           num_samples=4, sample_respacing="5", nll_samples=0, max_steps=2, class_cond=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    iddpm_fast.train(**RUN, out_dir=out)
    return out


def test_sample_uses_the_saved_config_and_writes_the_original_npz(run_dir, tmp_path):
    model_path = os.path.join(run_dir, "ema_0.99_000002.pt")
    res = iddpm_fast.sample(model_path=model_path, num_samples=5, batch_size=4, timestep_respacing="5",
                            out_dir=str(tmp_path), progressive=True, progress=False)
    assert os.path.basename(res["npz"]) == "samples_5x8x8x1.npz"
    with np.load(res["npz"]) as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (5, 8, 8, 1)
        labels = f["arr_1"]
        assert labels.shape == (5,) and labels.max() < 10  # digits: 10 classes from the saved config
    assert os.path.exists(res["grid"]) and os.path.exists(res["strip"])


def test_same_seed_same_samples_and_ddim(run_dir, tmp_path):
    model_path = os.path.join(run_dir, "model000002.pt")
    kw = dict(model_path=model_path, num_samples=4, batch_size=4, timestep_respacing="ddim5", use_ddim=True,
              progress=False, grid=False)
    a = np.load(iddpm_fast.sample(**kw, out_dir=str(tmp_path / "a"))["npz"])["arr_0"]
    b = np.load(iddpm_fast.sample(**kw, out_dir=str(tmp_path / "b"))["npz"])["arr_0"]
    c = np.load(iddpm_fast.sample(**kw, seed=1, out_dir=str(tmp_path / "c"))["npz"])["arr_0"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_channels_last_sampling_draws_the_same_samples(run_dir, tmp_path):
    """channels_last (default on CPUs) lays the model and the first noise out
    channels-last; the random draws and the samples are the same."""
    model_path = os.path.join(run_dir, "model000002.pt")
    kw = dict(model_path=model_path, num_samples=4, batch_size=4, timestep_respacing="5", progress=False, grid=False)
    a = np.load(iddpm_fast.sample(**kw, channels_last=True, out_dir=str(tmp_path / "a"))["npz"])["arr_0"]
    b = np.load(iddpm_fast.sample(**kw, channels_last=False, out_dir=str(tmp_path / "b"))["npz"])["arr_0"]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.parametrize("channels_last", [False, True])
def test_autocast_weights_stored_in_bf16_compute_the_same_numbers(channels_last):
    """cast_autocast_weights stores conv/linear parameters in bf16, which
    autocast would cast them to at each call: bit-identical outputs, norm
    parameters untouched."""
    from iddpm_fast import fp16_util

    torch.manual_seed(0)
    cfg = dict(model_and_diffusion_defaults(), image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
               attention_resolutions="4", num_heads=2, learn_sigma=True, use_scale_shift_norm=True, num_classes=3,
               class_cond=True)
    model, _ = create_model_and_diffusion(**{k: v for k, v in cfg.items() if k != "num_classes"})
    model.eval()
    for p in model.parameters():  # zero-initialised output convs would hide a difference
        p.data.add_(0.05 * torch.randn_like(p))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=fmt)
    t, y = torch.tensor([0, 7]), torch.tensor([1, 2])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        before = model(x, t, y=y)
        fp16_util.cast_autocast_weights(model, torch.bfloat16)
        after = model(x, t, y=y)
    assert model.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert model.time_embed[0].weight.dtype == torch.bfloat16
    assert model.out[0].weight.dtype == torch.float32  # the GroupNorm
    assert model.label_emb.weight.dtype == torch.float32
    assert before.dtype == after.dtype and torch.equal(before, after)


def test_bf16_sampling_casts_the_weights_once_with_the_same_samples(run_dir, tmp_path, monkeypatch):
    from iddpm_fast import fp16_util

    kw = dict(model_path=os.path.join(run_dir, "model000002.pt"), num_samples=4, batch_size=4,
              timestep_respacing="5", progress=False, grid=False, amp="bf16")
    calls = []
    cast = fp16_util.cast_autocast_weights
    monkeypatch.setattr(fp16_util, "cast_autocast_weights", lambda m, d: calls.append(d) or cast(m, d))
    a = np.load(iddpm_fast.sample(**kw, out_dir=str(tmp_path / "a"))["npz"])["arr_0"]
    assert calls == [torch.bfloat16]
    monkeypatch.setattr(fp16_util, "cast_autocast_weights", lambda m, d: m)
    b = np.load(iddpm_fast.sample(**kw, out_dir=str(tmp_path / "b"))["npz"])["arr_0"]
    assert np.array_equal(a, b)


def test_contradicting_flag_is_an_error_naming_both(run_dir):
    with pytest.raises(ValueError, match=r"--num_channels=64 contradicts the checkpoint's training config "
                                         r"\(num_channels=32"):
        iddpm_fast.sample(model_path=os.path.join(run_dir, "model000002.pt"), num_channels=64)
    with pytest.raises(ValueError, match="--learn_sigma=False contradicts"):
        iddpm_fast.sample(model_path=os.path.join(run_dir, "model000002.pt"), learn_sigma=False)


def test_checkpoint_without_config_needs_matching_flags(tmp_path):
    cfg = dict(model_and_diffusion_defaults(), image_size=32, num_channels=32, num_res_blocks=1,
               attention_resolutions="16", diffusion_steps=30, learn_sigma=True)
    model, _ = create_model_and_diffusion(**cfg)
    path = tmp_path / "model000001.pt"
    torch.save(model.state_dict(), path)  # as improved-diffusion writes it: no config beside it
    res = iddpm_fast.sample(model_path=str(path), num_samples=2, batch_size=2, timestep_respacing="3",
                            progress=False, out_dir=str(tmp_path / "ok"),
                            **{k: cfg[k] for k in ("image_size", "num_channels", "num_res_blocks",
                                                   "attention_resolutions", "diffusion_steps", "learn_sigma")})
    assert res["shape"] == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="pass the flags it was trained with"):
        iddpm_fast.sample(model_path=str(path), num_samples=2, batch_size=2, image_size=32, num_channels=64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        iddpm_fast.sample(model_path=str(tmp_path / "nope.pt"))


def test_nll_writes_terms_and_plot(run_dir, tmp_path):
    res = iddpm_fast.nll(model_path=os.path.join(run_dir, "model000002.pt"), num_samples=4, batch_size=2,
                         out_dir=str(tmp_path), progress=False)
    assert 0 < res["bpd"] < 30 and res["num_images"] == 4
    for name in ("vb", "mse", "xstart_mse"):
        with np.load(res["files"][name]) as f:
            assert f["arr_0"].shape == (20,)  # one mean per timestep
    with np.load(res["files"]["vb"]) as f:
        vb = f["arr_0"]
    # Column i is t = T-1-i (the original's order): the decoder term at t=0 dwarfs the last step's KL.
    assert vb[-1] > vb[0]
    from PIL import Image

    assert Image.open(res["files"]["plot"]).size == (640, 360)


def test_refused_flags_leave_no_output_folder(run_dir, tmp_path):
    """What the diffusion, the model or the data refuse is refused before
    the call's folder is made."""
    model_path = os.path.join(run_dir, "model000002.pt")
    out = tmp_path / "out"
    for call, bad, message in ((iddpm_fast.sample, dict(timestep_respacing="x"), "bad respacing"),
                               (iddpm_fast.nll, dict(timestep_respacing="x"), "bad respacing"),
                               (iddpm_fast.sample, dict(num_channels=64), "contradicts"),
                               (iddpm_fast.nll, dict(data_dir=str(tmp_path / "none")), "does not exist")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            call(model_path=model_path, out_dir=str(out), progress=False, **bad)
        assert not out.exists(), (call.__name__, bad)


def test_nll_says_when_it_evaluates_images_more_than_once(run_dir, tmp_path):
    """Past one pass over the data (whose last incomplete batch is dropped,
    as image_nll.py's loader drops it) nll cycles through it again, and its
    log says so, naming the num_samples that evaluates each image once."""
    model_path = os.path.join(run_dir, "model000002.pt")
    data = iddpm_fast.sample(model_path=model_path, num_samples=3, batch_size=3, timestep_respacing="3",
                             progress=False, grid=False, out_dir=str(tmp_path / "s"))["npz"]  # 3 images
    for num_samples, batch_size, note in ((3, 1, None), (2, 2, None), (4, 2, "num_samples=4 evaluates 4 images"),
                                          (3, 2, "num_samples=3 evaluates 4 images")):
        out = tmp_path / f"n{num_samples}-{batch_size}"
        res = iddpm_fast.nll(model_path=model_path, data_dir=data, num_samples=num_samples, batch_size=batch_size,
                             timestep_respacing="3", out_dir=str(out), progress=False)
        assert res["num_images"] == -(-num_samples // batch_size) * batch_size
        log = (out / "log.txt").read_text()
        assert ("evaluates each once" in log) == (note is not None), (num_samples, batch_size)
        if note:
            assert f"{note}, more than the 2 that one pass over the 3 images" in log
            assert "(--num_samples 2 evaluates each once)" in log


def test_cli_sample_and_nll(run_dir, tmp_path, capsys):
    model_path = os.path.join(run_dir, "model000002.pt")
    assert cli.main(["sample", "--model_path", model_path, "--num_samples", "2", "--batch_size", "2",
                     "--timestep_respacing", "4", "--out_dir", str(tmp_path / "s"), "--progress", "false"]) == 0
    assert cli.main(["nll", "--model_path", model_path, "--num_samples", "2", "--batch_size", "2",
                     "--timestep_respacing", "5", "--out_dir", str(tmp_path / "n"), "--progress", "false"]) == 0
    out = capsys.readouterr().out
    assert "samples_2x8x8x1.npz" in out and "bits/dim over 2 images" in out


def test_calls_without_out_dir_do_not_overwrite_each_other(run_dir, tmp_path, monkeypatch):
    from iddpm_fast import logger

    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    monkeypatch.setattr(logger.Logger, "CURRENT", None)  # both restored afterwards
    monkeypatch.setattr(logger.Logger, "DEFAULT", None)
    kw = dict(model_path=os.path.join(run_dir, "model000002.pt"), num_samples=2, batch_size=2,
              timestep_respacing="4", progress=False, grid=False)
    first = iddpm_fast.sample(**kw)["npz"]
    saved = np.load(first)["arr_0"].copy()
    second = iddpm_fast.sample(**kw, seed=1)["npz"]
    assert os.path.dirname(first) != os.path.dirname(second)
    assert np.array_equal(np.load(first)["arr_0"], saved)
    # a folder the caller configured is used as it is
    logger.configure(dir=str(tmp_path / "mine"), format_strs=[])
    assert os.path.dirname(iddpm_fast.sample(**kw)["npz"]) == str(tmp_path / "mine")


def test_nll_under_bf16_autocast_and_a_bad_amp(run_dir, tmp_path):
    kw = dict(model_path=os.path.join(run_dir, "model000002.pt"), num_samples=2, batch_size=2,
              timestep_respacing="5", progress=False)
    full = iddpm_fast.nll(**kw, out_dir=str(tmp_path / "fp32"))["bpd"]
    bf16 = iddpm_fast.nll(**kw, amp="bf16", out_dir=str(tmp_path / "bf16"))["bpd"]
    assert bf16 != full and abs(bf16 - full) < 0.05 * full
    with pytest.raises(ValueError, match="amp"):
        iddpm_fast.nll(**kw, amp="fp8", out_dir=str(tmp_path / "bad"))


def test_bf16_sample_and_nll_on_a_cpu_without_native_bfloat16_warn_and_log(run_dir, tmp_path, monkeypatch):
    """As TrainLoop does: amp='bf16' on a CPU without AMX-BF16/AVX512-BF16
    (simulated flags) warns once per process and says so in the call's log."""
    from iddpm_fast import _ext, train_util

    monkeypatch.setattr(_ext, "cpu_flags", lambda: ["avx2", "avx512f"])
    kw = dict(model_path=os.path.join(run_dir, "model000002.pt"), num_samples=2, batch_size=2,
              timestep_respacing="5", progress=False)
    for call in (iddpm_fast.nll, lambda **k: iddpm_fast.sample(**k, grid=False)):
        monkeypatch.setattr(train_util, "_bf16_warned", False)
        out = tmp_path / str(len(os.listdir(tmp_path)))
        with pytest.warns(RuntimeWarning, match="without AMX-BF16 or AVX512-BF16"):
            call(**kw, amp="bf16", out_dir=str(out))
        assert "without AMX-BF16 or AVX512-BF16" in (out / "log.txt").read_text()
    monkeypatch.setattr(_ext, "cpu_flags", lambda: ["avx2", "avx512f", "amx_bf16"])
    monkeypatch.setattr(train_util, "_bf16_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        iddpm_fast.nll(**kw, amp="bf16", out_dir=str(tmp_path / "amx"))


def test_a_checkpoint_that_is_not_a_state_dict_is_named(run_dir, tmp_path):
    path = tmp_path / "model000002.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="model000002.pt holds a Tensor"):
        iddpm_fast.sample(model_path=str(path), image_size=8, channel_mult="1,2", num_channels=32, num_samples=2,
                          batch_size=2, progress=False,
                          out_dir=str(tmp_path / "s"))


@pytest.mark.parametrize("mode,expected", [("direct", "launches direct once"), ("triton", "launches Triton's own"),
                                           ("interpreter", "launches through the interpreter")])
def test_info_reports_triton_and_its_launch_path(monkeypatch, capsys, mode, expected):
    pytest.importorskip("triton")
    from iddpm_fast.kernels._common import Launcher

    monkeypatch.setattr(Launcher, "direct", mode != "triton")
    if mode == "interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Triton"))
    assert expected in line, line


def test_info_reports_a_forced_backend_that_cannot_run(monkeypatch, capsys):
    monkeypatch.setenv("IDDPM_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("training_loss"))
    assert "cpu: UNAVAILABLE (Triton kernels run on CPU tensors only under TRITON_INTERPRET=1" in line


def test_sampling_into_the_run_folder_adds_to_its_log(run_dir):
    """out_dir is often the training run's own folder: its log.txt (the run's
    record) is appended to, not started over."""
    log = os.path.join(run_dir, "log.txt")
    with open(log) as f:
        before = f.read()
    assert "training..." in before
    kw = dict(model_path=os.path.join(run_dir, "model000002.pt"), num_samples=2, batch_size=2,
              timestep_respacing="4", progress=False, out_dir=run_dir)
    iddpm_fast.sample(**kw, grid=False)
    iddpm_fast.nll(**kw)
    with open(log) as f:
        after = f.read()
    assert after.startswith(before) and "sampling 2 images" in after[len(before):]


def test_samples_draw_the_labels_the_training_data_held(tmp_path):
    """A class-conditional model keeps the original's 1000-row class embedding
    when the data's classes are not given, but its samples take labels from
    the classes the data held (two here), which train() saves as data_classes."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        name = f"{'cat' if i % 2 else 'dog'}_{i}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)
    out = str(tmp_path / "run")
    iddpm_fast.train(**dict(RUN, data_dir=str(folder), batch_size=4, out_dir=out))
    res = iddpm_fast.sample(model_path=os.path.join(out, "model000002.pt"), num_samples=32, batch_size=16,
                            timestep_respacing="2", progress=False, grid=False, out_dir=out)
    with np.load(res["npz"]) as f:
        labels = f["arr_1"]
    assert set(labels.tolist()) == {0, 1}


def test_bad_sampling_counts_and_devices_are_named(run_dir):
    kw = dict(model_path=os.path.join(run_dir, "model000002.pt"), progress=False)
    with pytest.raises(ValueError, match="num_samples must be positive, got 0"):
        iddpm_fast.sample(**kw, num_samples=0)
    with pytest.raises(ValueError, match="batch_size must be positive, got -1"):
        iddpm_fast.nll(**kw, batch_size=-1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' but"):
            iddpm_fast.sample(**kw, device="cuda")
    with pytest.raises(ValueError, match="device='gpu0' is not a device"):
        iddpm_fast.sample(**kw, device="gpu0")
    with pytest.raises(ValueError, match=r"learn_sigma takes a bool \(default False\), got 'maybe'"):
        iddpm_fast.sample(**kw, learn_sigma="maybe")


def test_cli_errors_are_one_message_not_a_traceback(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IDDPM_FAST_TRACEBACK", raising=False)
    assert cli.main(["sample", "--model_path", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert "iddpm_fast sample: error: model_path" in err and "does not exist" in err and "Traceback" not in err
    bad = tmp_path / "model000001.pt"
    bad.write_bytes(os.urandom(2000))
    assert cli.main(["sample", "--model_path", str(bad), "--image_size", "8", "--channel_mult", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "cannot load checkpoint" in err and "weights_only set to `False`" not in err
    monkeypatch.setenv("IDDPM_FAST_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["sample", "--model_path", str(tmp_path / "missing.pt")])
