"""The training product: train(), the CLI, TrainLoop, checkpoints, resume, DDP."""

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

import iddpm_fast
from iddpm_fast import cli, logger
from iddpm_fast.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from iddpm_fast.train_util import TrainingDiverged, TrainingInterrupted, TrainLoop, latest_checkpoint
from iddpm_fast.training import resolve_config

TINY = dict(
    data_dir="digits", image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
    attention_resolutions="4", num_heads=1, diffusion_steps=10, noise_schedule="cosine", learn_sigma=True,
    batch_size=16, lr=2e-3, ema_rate="0.99", log_interval=2, save_interval=3, progress=False,
    num_samples=4, sample_respacing="5", nll_samples=0, dropout=0.1,
)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", IDDPM_FAST_MALLOC_TUNING="0")
    env.pop("OPENAI_LOGDIR", None)
    return env


def _rows(out_dir):
    with open(os.path.join(out_dir, "progress.csv")) as f:
        return list(csv.DictReader(f))


def _params(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def _assert_same_state(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_train_learns_and_writes_everything(tmp_path):
    out = str(tmp_path / "run")
    result = iddpm_fast.train(**dict(TINY, max_steps=24, out_dir=out, nll_samples=8, nll_respacing="10",
                                     dropout=0.0))
    rows = _rows(out)
    mse = [float(r["mse"]) for r in rows if r.get("mse")]
    assert len(mse) >= 10 and np.mean(mse[-3:]) < 0.7 * np.mean(mse[:2]), mse
    assert {"loss_q0", "loss_q3", "vb", "grad_norm", "samples_per_sec"} <= set(rows[-2])
    with open(os.path.join(out, "progress.json")) as f:
        assert json.loads(f.readline())["step"] is not None
    assert result["step"] == 24 and result["checkpoint"].endswith("model000024.pt")
    for name in ("model000024.pt", "ema_0.99_000024.pt", "opt000024.pt", "train_state000024.pt", "config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    state = _params(os.path.join(out, "train_state000024.pt"))
    assert json.loads(state["config"])["num_channels"] == 32 and state["step"] == 24
    # Checkpoints load with strict=True into a freshly built model (weights_only, no pickle).
    cfg = {k: TINY.get(k, v) for k, v in model_and_diffusion_defaults().items()}
    model, _ = create_model_and_diffusion(**cfg, channel_mult="1,2", in_channels=1, num_classes=10)
    model.load_state_dict(_params(os.path.join(out, "ema_0.99_000024.pt")), strict=True)
    from PIL import Image

    assert Image.open(result["samples"]).size[0] >= 256
    assert result["nll_bpd"] is not None and 0 < result["nll_bpd"] < 20
    with open(os.path.join(out, "log.txt")) as f:
        assert "held-out NLL" in f.read()


def test_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = dict(TINY, schedule_sampler="loss-second-moment", random_flip=True)
    full = str(tmp_path / "full")
    iddpm_fast.train(**cfg, max_steps=6, out_dir=full)
    part = str(tmp_path / "part")
    iddpm_fast.train(**cfg, max_steps=3, out_dir=part)
    torch.manual_seed(999)  # the resumed run must restore every RNG itself
    np.random.seed(999)
    iddpm_fast.train(**cfg, max_steps=6, out_dir=part)  # auto-resumes from model000003.pt
    for name in ("model000006.pt", "ema_0.99_000006.pt"):
        _assert_same_state(_params(os.path.join(full, name)), _params(os.path.join(part, name)))
    # after the resume the rows fall at the uninterrupted run's steps (the first run's last,
    # partial window was flushed when it stopped)
    def steps(out):
        return [r["step"] for r in _rows(out) if r.get("loss") and int(r["step"]) >= 3]

    assert steps(part) == steps(full) == ["3", "5"]
    sampler_full = _params(os.path.join(full, "train_state000006.pt"))["sampler"]
    sampler_part = _params(os.path.join(part, "train_state000006.pt"))["sampler"]
    assert torch.equal(sampler_full["loss_history"], sampler_part["loss_history"])


def test_random_flips_are_a_function_of_seed_and_step():
    from iddpm_fast.image_datasets import load_dataset
    from iddpm_fast.training import _StepBatches

    dataset = load_dataset("digits", 8, split="train")

    def batches(start, flip, n, seed=3):
        it = _StepBatches(dataset, 8, 1, 0, seed, start, 0, random_flip=flip)
        return [next(it)[0] for _ in range(n)]

    flipped, plain = batches(0, True, 4), batches(0, False, 4)
    for a, b in zip(flipped, batches(0, True, 4)):
        assert torch.equal(a, b)  # the same seed gives the same flips (no OS entropy)
    for a, b in zip(flipped[2:], batches(2, True, 2)):
        assert torch.equal(a, b)  # a resumed run at step 2 sees the same flips
    mirrored = torch.cat([(f == p.flip(-1)).flatten(1).all(1) for f, p in zip(flipped, plain)])
    kept = torch.cat([(f == p).flatten(1).all(1) for f, p in zip(flipped, plain)])
    assert (mirrored | kept).all() and 4 <= int((mirrored & ~kept).sum()) <= 28
    other = batches(0, True, 4, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(other, batches(0, False, 4, seed=4)))
    # two ranks of 4 see (and flip) what one process with a global batch of 8 does
    ranks = [_StepBatches(dataset, 4, 2, r, 3, 0, 0, random_flip=True) for r in (0, 1)]
    for whole in flipped[:3]:
        assert torch.equal(torch.cat([next(it)[0] for it in ranks]), whole)


def test_resumed_run_continues_its_logs(tmp_path):
    """A resumed run keeps the log rows of the steps before its checkpoint and
    appends the rest (rows logged after the checkpoint by the interrupted run
    are dropped, so no step appears twice)."""
    cfg = dict(TINY, log_interval=1, save_interval=2)
    out = str(tmp_path / "run")
    iddpm_fast.train(**cfg, max_steps=3, out_dir=out)  # checkpoints at 2 and 3 (the end)
    os.remove(os.path.join(out, "model000003.pt"))  # as if killed after logging step 3 but before saving it
    steps_before = [int(float(r["step"])) for r in _rows(out)]
    assert steps_before == [0, 1, 2]
    iddpm_fast.train(**cfg, max_steps=5, out_dir=out)  # resumes from model000002.pt
    assert [int(float(r["step"])) for r in _rows(out)] == [0, 1, 2, 3, 4]
    with open(os.path.join(out, "progress.json")) as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2, 3, 4]
    with open(os.path.join(out, "log.txt")) as f:
        assert f.read().count("Logging to") == 2  # appended, not started over


def test_csv_log_keeps_rows_before_the_resume_step(tmp_path):
    path = str(tmp_path / "progress.csv")
    w = logger.CSVOutputFormat(path)
    for step in range(4):
        w.writekvs({"step": step, "loss": 1.0 / (step + 1)})
    w.close()
    w = logger.CSVOutputFormat(path, keep_before_step=2)
    w.writekvs({"step": 2, "loss": 0.5, "vb": 0.1})  # a new key extends the header of the kept rows
    w.close()
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "1", "2"] and rows[-1]["vb"] == "0.1" and rows[0]["vb"] == ""


def _cli_args(out, **over):
    cfg = dict(TINY, out_dir=out, **over)
    args = []
    for k, v in cfg.items():
        args += [f"--{k}", str(v)]
    return args


def test_sigkill_then_resume(tmp_path):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "iddpm_fast", "train"] + _cli_args(out, max_steps=1000, save_interval=2, dropout=0.0)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(os.path.join(out, "train_state000004.pt")):
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    killed_at = int(os.path.basename(ckpt)[5:11])
    assert killed_at >= 4
    resumed = subprocess.run([sys.executable, "-m", "iddpm_fast", "train"]
                             + _cli_args(out, max_steps=killed_at + 2, save_interval=2, dropout=0.0),
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from the newest complete checkpoint in {out}" in resumed.stdout
    ref = str(tmp_path / "ref")
    iddpm_fast.train(**dict(TINY, max_steps=killed_at + 2, save_interval=2, dropout=0.0, out_dir=ref))
    name = f"model{killed_at + 2:06d}.pt"
    _assert_same_state(_params(os.path.join(ref, name)), _params(os.path.join(out, name)))


def _signal_after_rows(out, args, signum, rows):
    """Start `train` on the command line, send it `signum` once it has logged
    `rows` steps, and return its (exit code, stderr)."""
    cmd = [sys.executable, "-m", "iddpm_fast", "train"] + _cli_args(out, **args)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    log = os.path.join(out, "progress.csv")
    while time.time() < deadline and len(_rows(out) if os.path.exists(log) else []) < rows:
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_ctrl_c_finishes_the_step_saves_and_resumes(tmp_path):
    out = str(tmp_path / "interrupted")
    args = dict(max_steps=1000, save_interval=1000, log_interval=1, dropout=0.0)
    code, err = _signal_after_rows(out, args, signal.SIGINT, rows=3)
    assert code == 130, err[-2000:]
    assert "rerun the same command to resume" in err and "Traceback" not in err
    ckpt = latest_checkpoint(out)
    assert ckpt is not None  # saved at the step it stopped after, though save_interval is 1000
    stopped_at = int(os.path.basename(ckpt)[5:11])
    assert stopped_at >= 3
    resumed = subprocess.run([sys.executable, "-m", "iddpm_fast", "train"]
                             + _cli_args(out, **dict(args, max_steps=stopped_at + 1)),
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert os.path.exists(os.path.join(out, f"model{stopped_at + 1:06d}.pt"))


def test_resuming_follows_this_runs_flags_and_refuses_another_model(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    iddpm_fast.train(**dict(TINY, max_steps=3, out_dir=out))
    # lr and weight_decay of the resumed run apply (the saved optimizer groups held the old ones)
    iddpm_fast.train(**dict(TINY, max_steps=4, out_dir=out, lr=5e-4, weight_decay=0.01))
    groups = _params(os.path.join(out, "opt000004.pt"))["param_groups"]
    assert all(g["lr"] == 5e-4 and g["weight_decay"] == 0.01 for g in groups)
    with open(os.path.join(out, "log.txt")) as f:
        assert "resuming with changed flags: lr 0.002 -> 0.0005" in f.read()
    rows = _rows(out)
    with pytest.raises(ValueError, match=r"num_channels=64 \(saved: 32\)"):
        iddpm_fast.train(**dict(TINY, max_steps=5, out_dir=out, num_channels=64))
    assert _rows(out) == rows  # refused before the logs were cut back to the checkpoint's step
    # a checkpoint inside the out_dir is a deliberate rollback, not replaced by the newest
    with open(os.path.join(out, "log.txt")) as f:
        before = f.read()
    iddpm_fast.train(**dict(TINY, max_steps=4, out_dir=out, resume_checkpoint=os.path.join(out, "model000003.pt"),
                            lr=5e-4, weight_decay=0.01))
    with open(os.path.join(out, "log.txt")) as f:
        assert f"loading model from checkpoint: {os.path.join(out, 'model000003.pt')}" in f.read()[len(before):]
    # an unreadable optimizer file is an error naming it, not a silent fresh AdamW
    opt = os.path.join(out, "opt000004.pt")
    with open(opt, "rb") as f:
        data = f.read()
    with open(opt, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="opt000004.pt"):
        iddpm_fast.train(**dict(TINY, max_steps=5, out_dir=out, lr=5e-4, weight_decay=0.01))
    with open(opt, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match="already holds the checkpoints of a run"):
        iddpm_fast.train(**dict(TINY, max_steps=5, out_dir=out, auto_resume=False))
    # a fine-tuning command (resume_checkpoint) rerun continues its own newer checkpoints
    tuned = str(tmp_path / "tuned")
    start = os.path.join(out, "model000004.pt")
    iddpm_fast.train(**dict(TINY, max_steps=6, out_dir=tuned, resume_checkpoint=start))
    first = _params(os.path.join(tuned, "model000006.pt"))
    monkeypatch.setattr(logger.Logger, "CURRENT", None)  # as in a new process (restored afterwards)
    monkeypatch.setattr(logger.Logger, "DEFAULT", None)
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "default_logger"))
    result = iddpm_fast.train(**dict(TINY, max_steps=7, out_dir=tuned, resume_checkpoint=start))
    assert result["step"] == 7
    _assert_same_state(first, _params(os.path.join(tuned, "model000006.pt")))  # not overwritten
    with open(os.path.join(tuned, "log.txt")) as f:
        log = f.read()
    assert f"loading model from checkpoint: {os.path.join(tuned, 'model000006.pt')}" in log
    # (said in the run's own log: it had gone to a default logger's folder, opened before the run's)
    assert f"holds newer checkpoints of this run: continuing from {os.path.join(tuned, 'model000006.pt')}" in log
    assert not os.path.exists(tmp_path / "default_logger")


def test_bad_numeric_options_fail_before_training(tmp_path):
    for bad in (dict(log_interval=0), dict(max_steps=-1), dict(sample_interval=-1), dict(num_samples=-1),
                dict(lr=-1.0), dict(weight_decay=float("nan")), dict(sample_respacing="25,3"),
                dict(nll_respacing="11"), dict(num_heads=0)):  # (TINY has attention)
        with pytest.raises(ValueError, match=next(iter(bad))):
            iddpm_fast.train(**dict(TINY, out_dir=str(tmp_path / "x"), **bad))
        assert not os.path.exists(tmp_path / "x")  # refused before the run's folder is made
    # What the data or the model refuse is refused before the folder is made too.
    for bad, message in ((dict(channel_mult="1,x"), "channel_mult"), (dict(image_size=7), "image_size"),
                         (dict(attention_resolutions="a"), "attention_resolutions"),
                         (dict(data_dir=str(tmp_path / "none")), "does not exist")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            iddpm_fast.train(**dict(TINY, out_dir=str(tmp_path / "x"), **bad))
        assert not os.path.exists(tmp_path / "x")
    res = iddpm_fast.train(**dict(TINY, max_steps=1, num_samples=0, out_dir=str(tmp_path / "no_samples")))
    assert res["samples"] is None and res["step"] == 1
    # The default grid respacing, "100", on a run of 10 steps: the full chain.
    res = iddpm_fast.train(**dict(TINY, max_steps=1, sample_respacing="100", out_dir=str(tmp_path / "short")))
    assert os.path.exists(res["samples"])


def test_options_from_python_mean_what_the_same_flags_mean():
    cfg = resolve_config(dict(learn_sigma="False", image_size="8", lr="1e-3", timestep_respacing=10,
                              channel_mult=(1, 2), class_cond=1))
    assert (cfg["learn_sigma"], cfg["image_size"], cfg["lr"]) == (False, 8, 1e-3)
    assert (cfg["timestep_respacing"], cfg["channel_mult"], cfg["class_cond"]) == ("10", "1,2", True)
    with pytest.raises(ValueError, match=r"learn_sigma takes a bool \(default False\), got 'nope'"):
        resolve_config(dict(learn_sigma="nope"))
    with pytest.raises(ValueError, match="image_size takes an int"):
        resolve_config(dict(image_size=8.5))


def test_sigterm_finishes_the_step_saves_and_exits_143(tmp_path):
    """SLURM, docker stop and timeout send SIGTERM before killing: it stops
    the run as a first Ctrl-C does, after the step, with a checkpoint."""
    out = str(tmp_path / "terminated")
    args = dict(max_steps=1000, save_interval=1000, log_interval=1, dropout=0.0)
    code, err = _signal_after_rows(out, args, signal.SIGTERM, rows=2)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "terminated (SIGTERM)" in err and "rerun the same command to resume" in err and "Traceback" not in err
    assert latest_checkpoint(out) is not None  # though save_interval is 1000


def test_an_unreadable_newest_checkpoint_names_the_step_to_fall_back_to(tmp_path):
    out = str(tmp_path / "run")
    iddpm_fast.train(**dict(TINY, max_steps=2, save_interval=1, num_samples=0, out_dir=out))
    path = os.path.join(out, "model000002.pt")
    with open(path, "rb") as f:
        head = f.read(1000)
    with open(path, "wb") as f:  # truncated, as by a full disk or an interrupted copy
        f.write(head)
    with pytest.raises(ValueError, match=r"(?s)step 2\) failed: cannot load checkpoint.*resume from step 1.*"
                                         r"model000002\.pt, opt000002\.pt"):
        iddpm_fast.train(**dict(TINY, max_steps=3, save_interval=1, num_samples=0, out_dir=out))


def test_an_interrupted_run_in_a_new_temporary_folder_says_how_to_resume(tmp_path, monkeypatch):
    """Without out_dir (and OPENAI_LOGDIR) a run logs to a new /tmp folder:
    rerunning the same command would start another, so the message names it."""
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", images)
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    monkeypatch.setattr(logger.Logger, "CURRENT", None)  # restored afterwards
    monkeypatch.setattr(logger.Logger, "DEFAULT", None)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def interrupted(loop):
        raise TrainingInterrupted(f"training interrupted after step 0: {loop.resume_hint}")

    monkeypatch.setattr(TrainLoop, "run_loop", interrupted)
    tiny = {k: v for k, v in TINY.items() if k != "out_dir"}
    with pytest.raises(TrainingInterrupted, match=r"rerun it with --out_dir .*openai-.* to resume"):
        iddpm_fast.train(**dict(tiny, data_dir=str(tmp_path / "data.npz"), max_steps=1))


def test_stale_checkpoint_temporaries_are_removed(tmp_path):
    from iddpm_fast.train_util import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model000050.pt.tmp{dead.pid}"
    mine = tmp_path / f".model000050.pt.tmp{os.getpid()}"
    stale.write_bytes(b"half")
    mine.write_bytes(b"writing")
    assert remove_stale_temporaries(str(tmp_path)) == [stale.name]
    assert not stale.exists() and mine.exists()


def test_two_process_ddp_equals_one_process(tmp_path):
    # One update: Adam's g/sqrt(v) turns the rounding noise of near-zero
    # gradients (sum order differs between an all-reduce and one batch) into
    # visible parameter differences after a few more, so compare after one.
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = dict(max_steps=1, save_interval=1, dropout=0.0)
    iddpm_fast.train(**dict(TINY, batch_size=16, out_dir=one, **common))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "iddpm_fast", "train"] + _cli_args(two, **dict(common, batch_size=8))
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_same_state(_params(os.path.join(one, "model000001.pt")), _params(os.path.join(two, "model000001.pt")),
                       exact=False)


def test_cli_accepts_image_train_flags(tmp_path, capsys):
    out = str(tmp_path / "cli")
    flags = ["--schedule_sampler", "loss-second-moment", "--lr", "1e-3", "--weight_decay", "0.0",
             "--lr_anneal_steps", "4", "--batch_size", "16", "--microbatch", "8", "--ema_rate", "0.9999,0.99",
             "--log_interval", "2", "--save_interval", "2", "--resume_checkpoint", "", "--use_fp16", "False",
             "--fp16_scale_growth", "1e-3", "--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1",
             "--num_heads", "1", "--num_heads_upsample", "-1", "--attention_resolutions", "4", "--dropout", "0.0",
             "--learn_sigma", "True", "--sigma_small", "False", "--class_cond", "True", "--diffusion_steps", "10",
             "--noise_schedule", "cosine", "--timestep_respacing", "", "--use_kl", "False", "--predict_xstart", "False",
             "--rescale_timesteps", "True", "--rescale_learned_sigmas", "True", "--use_checkpoint", "False",
             "--use_scale_shift_norm", "True", "--channel_mult", "1,2", "--out_dir", out, "--progress", "false",
             "--num_samples", "4", "--sample_respacing", "5", "--nll_samples", "0"]
    assert cli.main(["train"] + flags) == 0
    # lr_anneal_steps=4 ends the run at 4 updates, as in the original
    for name in ("model000004.pt", "ema_0.9999_000004.pt", "ema_0.99_000004.pt", "model000002.pt"):
        assert os.path.exists(os.path.join(out, name)), name
    assert "done: 4 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["train", "--no_such_flag", "1"])


def test_train_rejects_unknown_and_contradictory_options():
    with pytest.raises(TypeError, match="did you mean 'batch_size'"):
        iddpm_fast.train(batchsize=3)
    with pytest.raises(ValueError, match="contradicts"):
        iddpm_fast.train(use_fp16=True, amp="bf16")
    with pytest.raises(ValueError, match="amp must be"):
        iddpm_fast.train(amp="fp8")


def test_image_channels_has_one_name_for_every_command(tmp_path):
    """train's image_channels is also in_channels, the name sample and nll
    use (and they take image_channels too), from Python and on the command
    line; the two names with different values are an error naming both."""
    assert resolve_config({"in_channels": 1})["image_channels"] == 1
    assert resolve_config({"in_channels": 1, "image_channels": 1})["image_channels"] == 1
    with pytest.raises(ValueError, match="in_channels=1 and image_channels=3 are the same option"):
        resolve_config({"in_channels": 1, "image_channels": 3})
    with pytest.raises(ValueError, match="image_channels=1 and in_channels=3"):
        iddpm_fast.sample(model_path="unused.pt", image_channels=1, in_channels=3)
    assert resolve_config({"in_channels": "1", "image_channels": 1})["image_channels"] == 1  # (the same value)
    parser = cli.build_parser()
    args = vars(parser.parse_args(["train", "--in_channels", "1"]))
    assert resolve_config({k: v for k, v in args.items() if k not in ("_run", "command")})["image_channels"] == 1
    for command in ("sample", "nll"):
        assert vars(parser.parse_args([command, "--image_channels", "1"]))["image_channels"] == 1
    # both flags with different values: the same named error, exit status 2, before any work
    for command, flags in (("train", ["--in_channels", "1", "--image_channels", "3"]),
                           ("sample", ["--image_channels", "1", "--in_channels", "3"])):
        assert cli.main([command, "--out_dir", str(tmp_path / command), *flags]) == 2
        assert not os.path.exists(tmp_path / command)


@pytest.mark.parametrize("amp,channels_last", [("bf16", True), ("fp16", False)])
def test_mixed_precision_runs(tmp_path, amp, channels_last):
    out = str(tmp_path / amp)
    iddpm_fast.train(**dict(TINY, max_steps=3, out_dir=out, amp=amp, channels_last=channels_last, dropout=0.0))
    rows = _rows(out)
    assert all(np.isfinite(float(r["loss"])) for r in rows if r.get("loss"))
    if amp == "fp16":
        assert "lg_loss_scale" in rows[-1]


# --------------------------------------------------------------- TrainLoop


def _tiny_model_and_diffusion():
    cfg = dict(model_and_diffusion_defaults(), image_size=8, num_channels=32, num_res_blocks=1,
               attention_resolutions="4", num_heads=1, diffusion_steps=10, learn_sigma=True, noise_schedule="cosine")
    return create_model_and_diffusion(**cfg, channel_mult="1,2", in_channels=1)


def _batches(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, {}


def _loop(tmp_path, model, diffusion, **kw):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    args = dict(model=model, diffusion=diffusion, data=_batches(), batch_size=16, microbatch=-1, lr=1e-3,
                ema_rate="0.99", log_interval=100, save_interval=100, resume_checkpoint="", checkpoint_dir=str(tmp_path))
    args.update(kw)
    return TrainLoop(**args)


def test_bf16_note_names_cpus_without_native_bfloat16():
    from iddpm_fast import train_util

    note = train_util._cpu_bf16_note(["fpu", "avx2", "avx512f"])
    assert "AMX-BF16" in note and "amp='none'" in note
    assert train_util._cpu_bf16_note(["avx512f", "amx_bf16"]) is None
    assert train_util._cpu_bf16_note(["avx512f", "avx512_bf16"]) is None
    assert train_util._cpu_bf16_note(None) is None  # flags unknown: no claim


@pytest.mark.parametrize("flags", [["avx2", "avx512f"], ["avx2", "avx512f", "amx_bf16"]])
def test_bf16_training_on_a_cpu_without_native_bfloat16_warns_once(tmp_path, monkeypatch, flags):
    """amp='bf16' on a CPU whose convolutions have no bf16 instructions is
    slower than float32: TrainLoop says so once per process (and in the
    log); with AMX-BF16, or with amp='none', it says nothing."""
    import warnings

    from iddpm_fast import _ext, train_util

    monkeypatch.setattr(_ext, "cpu_flags", lambda: flags)
    monkeypatch.setattr(train_util, "_bf16_warned", False)
    logged = []
    monkeypatch.setattr(train_util.logger, "log", lambda *args, **kw: logged.append(" ".join(map(str, args))))
    model, diffusion = _tiny_model_and_diffusion()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loop(tmp_path / "none", model, diffusion, amp="none", max_steps=1)
        _loop(tmp_path / "a", model, diffusion, amp="bf16", max_steps=1)
        _loop(tmp_path / "b", model, diffusion, amp="bf16", max_steps=1)
    notes = [str(c.message) for c in caught if "AMX-BF16" in str(c.message)]
    assert len(notes) == (0 if "amx_bf16" in flags else 1), notes
    assert sum("AMX-BF16" in line for line in logged) == len(notes), logged


def test_microbatch_gradients_are_averaged(tmp_path):
    results = []
    for micro in (-1, 8):
        torch.manual_seed(0)
        model, diffusion = _tiny_model_and_diffusion()
        loop = _loop(tmp_path / str(micro), model, diffusion, microbatch=micro, max_steps=1)
        torch.manual_seed(1)
        np.random.seed(1)
        loop.run_loop()
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    _assert_same_state(results[0], results[1], exact=False)


def test_ranks_draw_their_own_dropout_masks_from_a_shared_stream(tmp_path):
    # With several ranks the timesteps and noise come from one stream every rank
    # shares; the model's own draws (dropout) must differ between ranks, and the
    # shared stream must stay the same on every rank afterwards.
    model, diffusion = _tiny_model_and_diffusion()
    loop = _loop(tmp_path, model, diffusion, max_steps=1)
    loop.world_size = 2
    draws, after = [], []
    for rank in (0, 1):
        loop.rank = rank
        torch.manual_seed(5)
        with loop._rank_rng():
            draws.append(torch.rand(8))
        after.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(after[0], after[1])
    # ...and draws nothing from it: on CPUs the training noise comes from that stream
    torch.manual_seed(5)
    assert torch.equal(after[0], torch.rand(4))
    # a local batch of another size would take another rank's slice of the global draw
    with pytest.raises(ValueError, match="exactly batch_size=16 examples, got 12 on rank 1"):
        loop._draw_global(12)


def test_nonfinite_loss_stops_with_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model, diffusion = _tiny_model_and_diffusion()
    calls = {"n": 0}

    class Poisoned(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t, **kw):
            calls["n"] += 1
            out = self.inner(x, t, **kw)
            return out * float("nan") if calls["n"] > 2 else out

    wrapped = Poisoned(model)
    loop = _loop(tmp_path, wrapped, diffusion, max_steps=50, nonfinite_patience=3)
    # 2 good updates, then 3 skipped iterations: the checkpoint is labelled with
    # the 5 iterations done and holds the parameters of the last good update.
    with pytest.raises(TrainingDiverged, match=r"non-finite for 3 consecutive steps.*model000005\.pt"):
        loop.run_loop()
    saved = _params(os.path.join(str(tmp_path), "model000005.pt"))
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_resume_from_a_missing_checkpoint_is_an_error(tmp_path):
    model, diffusion = _tiny_model_and_diffusion()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _loop(tmp_path, model, diffusion, resume_checkpoint=str(tmp_path / "model000123.pt"))


def test_malloc_tuning_flag_turns_it_off_for_the_whole_process(monkeypatch):
    """--malloc_tuning false also keeps train()/sample()/nll(), which the
    command runs next, from tuning (they read IDDPM_FAST_MALLOC_TUNING)."""
    monkeypatch.setenv("IDDPM_FAST_MALLOC_TUNING", "1")  # restored after the test
    seen = {}
    monkeypatch.setattr(cli, "_info", lambda args: seen.setdefault("env", os.environ["IDDPM_FAST_MALLOC_TUNING"]))
    cli.main(["--malloc_tuning", "false", "info"])
    assert seen["env"] == "0"
    assert cli.tune_malloc() in (True, False)


def test_resume_from_an_improved_diffusion_checkpoint(tmp_path):
    # improved-diffusion writes plain state dicts (modelNNNNNN.pt, ema_<rate>_NNNNNN.pt,
    # optNNNNNN.pt) and no train_state file; those must load.
    torch.manual_seed(0)
    model, diffusion = _tiny_model_and_diffusion()
    folder = tmp_path / "orig"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "model000007.pt")
    ema = {k: v + 0.5 for k, v in model.state_dict().items()}
    torch.save(ema, folder / "ema_0.99_000007.pt")
    # its AdamW (a plain one, fused=None in the saved param group)
    other, _ = _tiny_model_and_diffusion()
    opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    for p in other.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    torch.save(opt.state_dict(), folder / "opt000007.pt")
    torch.manual_seed(1)
    fresh, _ = _tiny_model_and_diffusion()
    loop = _loop(tmp_path, fresh, diffusion, resume_checkpoint=str(folder / "model000007.pt"), max_steps=8)
    assert loop.resume_step == 7
    assert loop.lg_loss_scale == 20.0  # the original's attribute, 20 without fp16
    # the loaded state is the saved one, and the fused kernel stays on
    assert loop.opt.state_dict()["state"][0]["step"] == 1
    assert all(g["fused"] == loop.opt.defaults["fused"] for g in loop.opt.param_groups)
    assert loop.opt.defaults["fused"] is True
    _assert_same_state(fresh.state_dict(), model.state_dict())
    torch.testing.assert_close(loop.ema_params[0][0], ema[next(iter(dict(fresh.named_parameters())))])
    loop.run_loop()
    assert os.path.exists(tmp_path / "model000008.pt")


@pytest.mark.parametrize("name,step", [
    ("model000100.pt", 100), ("runs/models/model000100.pt", 100), ("model000100.pth", 100),
    ("model000100.pt.bak", 100), ("model000100.ckpt", 100), ("ema_0.99_000100.pt", 0), ("opt000100.pt", 0),
    ("model-5.pt", 0), ("modelfinal.pt", 0), ("checkpoint.pt", 0),
])
def test_parse_resume_step_from_filename_reads_any_extension_like_the_original(name, step):
    from iddpm_fast.train_util import parse_resume_step_from_filename

    assert parse_resume_step_from_filename(name) == step


def test_adamw_is_fused_where_possible_and_matches_the_plain_update():
    from iddpm_fast.train_util import _adamw

    torch.manual_seed(0)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    fused = _adamw(a, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    assert fused.defaults.get("fused") is True
    for _ in range(3):
        for pa, pb in zip(a, b):
            g = torch.randn_like(pa)
            pa.grad, pb.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert set(fused.state_dict()["state"][0]) == set(plain.state_dict()["state"][0])


@pytest.mark.parametrize("last", [0.7, float("nan"), float("inf")], ids=["finite", "nan", "inf"])
def test_one_copy_loss_logging_logs_what_log_loss_dict_logs(tmp_path, last):
    """TrainLoop logs the per-quartile losses and tests the loss for
    finiteness from one device-to-host copy (train_util._log_losses_and_check);
    the logged numbers are log_loss_dict's, bit for bit."""
    from iddpm_fast import train_util
    from iddpm_fast.script_util import create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(steps=4000, learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 4000, (9,), generator=g)
    losses = {k: torch.rand(9, generator=g) * 3 for k in ("loss", "mse", "vb")}
    losses["vb"] = losses["vb"].to(torch.bfloat16)  # a term in another dtype, as under autocast
    logged = []
    for fn in (lambda: train_util.log_loss_dict(diffusion, t, losses),
               lambda: train_util._log_losses_and_check(diffusion, t, losses, torch.tensor(last))):
        logger.configure(dir=str(tmp_path), format_strs=[])
        result = fn()
        logged.append((dict(logger.getkvs()), result))
    (want, _), (got, finite) = logged
    assert got == want and len(got) > 3
    assert finite == np.isfinite(last)
    with pytest.raises(ValueError, match="one value per timestep"):
        train_util._log_losses_and_check(diffusion, t, {"loss": losses["loss"][:4]}, torch.tensor(last))
