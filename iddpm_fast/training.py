"""
`iddpm_fast.train(**config)`: the training product.

The configuration is improved-diffusion's `image_train.py` flags (same names,
defaults and meaning) plus this library's keys (:data:`NEW_DEFAULTS`). With no
`data_dir` it trains on the built-in digits with :data:`DIGITS_PRESET`
(any key you pass overrides the preset).
"""

import contextlib
import difflib
import glob
import json
import os
import random
import time

import numpy as np
import torch

from . import cpu_memory, dist_util, logger
from .image_utils import save_grid
from .resample import create_named_schedule_sampler
from .script_util import (
    apply_aliases,
    channels_last_option,
    coerce_options,
    create_gaussian_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from .train_util import (
    TrainLoop,
    complete_checkpoints,
    copy_model_with,
    latest_checkpoint,
    parse_resume_step_from_filename,
)

__all__ = ["train", "train_defaults", "resolve_config", "IMAGE_TRAIN_DEFAULTS", "NEW_DEFAULTS", "DIGITS_PRESET"]

# improved-diffusion's scripts/image_train.py flags, same defaults.
IMAGE_TRAIN_DEFAULTS = dict(
    data_dir="",
    schedule_sampler="uniform",
    lr=1e-4,
    weight_decay=0.0,
    lr_anneal_steps=0,
    batch_size=1,
    microbatch=-1,
    ema_rate="0.9999",
    log_interval=10,
    save_interval=10000,
    resume_checkpoint="",
    use_fp16=False,
    fp16_scale_growth=1e-3,
)

# This library's options.
NEW_DEFAULTS = dict(
    max_steps=0,  # stop after this many updates (0: no limit, as the original)
    out_dir="",  # logs, checkpoints and pictures (default: $OPENAI_LOGDIR or a temp dir)
    seed=0,
    amp="none",  # none | bf16 | fp16
    channels_last="auto",  # auto: on for CPUs (5-8% faster a step in fp32, more in bf16) and CUDA + bf16; true | false
    grad_clip=0.0,
    sample_interval=0,  # write a PNG grid of EMA samples every N steps (0: only at the end)
    num_samples=64,  # samples in each grid
    sample_respacing="100",  # respacing used for the grids
    num_workers=0,
    device="",  # "" picks cuda:LOCAL_RANK when available, else cpu
    channel_mult="",  # "" uses the original's per-size table
    image_channels=0,  # 0: the data's own (3 for image folders, 1 for digits); also in_channels, as in sample/nll
    num_classes=0,  # 0: 10 for digits, else 1000 as the original
    random_flip=False,
    nll_samples=0,  # held-out images for the final NLL (0: none; digits preset sets it)
    nll_respacing="",  # "" = the full chain (the paper's exact bound)
    auto_resume=True,  # resume from the newest complete checkpoint in out_dir
    nonfinite_patience=5,
    progress=True,
)

# The built-in default: scikit-learn's 8x8 digits. Chosen by measurement on a
# 2-core CPU (see README): 7.1 minutes in all, recognisable samples, 4.37
# bits/dim held out. A 64-channel, 1-block model in bf16 + channels_last took
# 8.3 minutes for the same quality and NLL (4.39).
DIGITS_PRESET = dict(
    data_dir="digits",
    image_size=8,
    num_channels=32,
    num_res_blocks=2,
    channel_mult="1,2",
    attention_resolutions="4",
    num_heads=4,
    dropout=0.1,
    learn_sigma=True,
    noise_schedule="cosine",
    diffusion_steps=1000,
    lr=1e-3,
    batch_size=128,
    ema_rate="0.999",
    max_steps=2400,
    log_interval=100,
    save_interval=500,
    out_dir="runs/digits",
    nll_samples=128,
    nll_respacing="",
)

_MODEL_KEYS = tuple(model_and_diffusion_defaults())

# Other names accepted for options (alias -> name): sample and nll call the
# image channels in_channels, as the model does.
TRAIN_ALIASES = {"in_channels": "image_channels"}


def train_defaults():
    """Every accepted key with its default (without the digits preset)."""
    return {**IMAGE_TRAIN_DEFAULTS, **model_and_diffusion_defaults(), **NEW_DEFAULTS}


def _is_digits(data_dir):
    return data_dir in ("", None, "digits")


def resolve_config(config):
    """
    The full configuration: defaults, then the digits preset when training on
    the built-in data, then the keys given. Unknown keys are an error.
    """
    defaults = train_defaults()
    config = apply_aliases(config, TRAIN_ALIASES, defaults)
    unknown = [k for k in config if k not in defaults]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, defaults, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"unknown training option(s): {', '.join(hints)}")
    cfg = dict(defaults)
    if _is_digits(config.get("data_dir", "")):
        cfg.update(DIGITS_PRESET)
    cfg.update(coerce_options(config, defaults))
    if cfg["amp"] not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be none, bf16 or fp16, got {cfg['amp']!r}")
    if cfg["use_fp16"] and cfg["amp"] == "bf16":
        raise ValueError("use_fp16=True contradicts amp='bf16'; pick one")
    if cfg["use_fp16"]:
        cfg["amp"] = "fp16"
    for key in ("batch_size", "image_size", "num_channels", "log_interval"):
        if int(cfg[key]) <= 0:
            raise ValueError(f"{key} must be positive, got {cfg[key]}")
    if str(cfg["attention_resolutions"]).strip() and int(cfg["num_heads"]) <= 0:
        raise ValueError(f"num_heads must be positive with attention (attention_resolutions="
                         f"{cfg['attention_resolutions']!r}), got {cfg['num_heads']}")
    for key in ("max_steps", "lr_anneal_steps", "save_interval", "sample_interval", "num_samples", "nll_samples",
                "num_workers"):
        if int(cfg[key]) < 0:
            raise ValueError(f"{key} must be >= 0, got {cfg[key]}")
    for key in ("lr", "weight_decay", "grad_clip"):
        if not float(cfg[key]) >= 0:  # (NaN too)
            raise ValueError(f"{key} must be >= 0, got {cfg[key]}")
    return cfg


class _StepBatches:
    """
    Batches as a pure function of the step: the data order of a resumed run is
    the data order the uninterrupted run would have seen. Each step takes the
    next `global_batch` indices of a per-epoch permutation (seeded by
    (seed, epoch)); every rank keeps its contiguous slice. With random_flip,
    each image of a step's batch is mirrored left-right with probability 1/2
    by draws seeded by (seed, step), so the flips too are those of the
    uninterrupted run, whatever the number of DataLoader workers; they are
    drawn for the global batch and sliced by rank, as the timesteps and noise
    are, so N ranks flip what one process with the global batch flips.
    """

    def __init__(self, dataset, batch_size, world_size, rank, seed, start_step, num_workers, random_flip=False):
        self.dataset = dataset
        self.random_flip = random_flip
        self.step = start_step
        self.batch_size = batch_size
        self.global_batch = batch_size * world_size
        self.rank = rank
        self.seed = seed
        n = len(dataset)
        if n < self.global_batch:
            raise ValueError(
                f"the dataset has {n} images, fewer than one global batch ({self.global_batch}); lower batch_size"
            )
        self.steps_per_epoch = n // self.global_batch
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self._indices(start_step),
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
        self._it = iter(loader)

    def _indices(self, step):
        epoch, perm = None, None
        while True:
            e, k = divmod(step, self.steps_per_epoch)
            if e != epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
                perm = torch.randperm(len(self.dataset), generator=g).tolist()
                epoch = e
            lo = k * self.global_batch + self.rank * self.batch_size
            yield perm[lo : lo + self.batch_size]
            step += 1

    def __iter__(self):
        return self

    def __next__(self):
        batch, cond = next(self._it)
        if self.random_flip:
            seed = np.random.SeedSequence([self.seed, self.step, 0xF11B]).generate_state(1)[0]
            flip = torch.rand(self.global_batch, generator=torch.Generator().manual_seed(int(seed))) < 0.5
            flip = flip[self.rank * self.batch_size : self.rank * self.batch_size + batch.shape[0]]
            batch = torch.where(flip.view(-1, *([1] * (batch.dim() - 1))), batch.flip(-1), batch)
        self.step += 1
        return batch, cond


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _configure_logging(out_dir, resume_step=None):
    formats = ["stdout", "log", "csv", "json"]
    try:
        import torch.utils.tensorboard  # noqa: F401

        formats.append("tensorboard")
    except Exception:
        pass
    logger.configure(dir=out_dir or None, format_strs=formats if dist_util.get_rank() == 0 else [],
                     resume_step=resume_step)
    return logger.get_dir()


def _resume_checkpoint(cfg, log_dir):
    """The checkpoint this run resumes from: resume_checkpoint, else (with
    auto_resume) the newest complete one in the log directory, else "";
    and a line for the log when that is not the one given, else None (the
    logger is not configured yet)."""
    newest = latest_checkpoint(log_dir) if cfg["auto_resume"] and log_dir else None
    given = cfg["resume_checkpoint"]
    if given:
        # Rerunning a fine-tuning command must continue its own newer
        # checkpoints, not start over from the given one (and overwrite them).
        # A checkpoint inside the out_dir itself is a deliberate rollback.
        inside = os.path.abspath(os.path.dirname(given)) == os.path.abspath(log_dir or ".")
        if newest and not inside and parse_resume_step_from_filename(newest) > parse_resume_step_from_filename(given):
            return newest, (f"{log_dir} holds newer checkpoints of this run: continuing from {newest} "
                            f"instead of resume_checkpoint {given}")
        return given, None
    return newest or "", None


# Flags that define the model and its diffusion: resuming a run with other
# values cannot continue it (dropout and use_checkpoint may change).
_RUN_DEFINING = tuple(k for k in _MODEL_KEYS if k not in ("dropout", "use_checkpoint")) + (
    "channel_mult", "in_channels", "num_classes")


def _check_resumed_config(run_config, resume, saved, keys=_RUN_DEFINING):
    """Refuse to resume a run whose saved config (``sampling._saved_config``'s
    (config, source) of `resume`) defines another model or diffusion; return
    a line for the log naming the other flags that changed, else None."""
    from .sampling import _same

    saved, source = saved
    if saved is None:
        return None  # e.g. a checkpoint written by improved-diffusion
    bad = [k for k in keys if k in saved and not _same(run_config.get(k), saved[k])]
    if bad:
        diffs = ", ".join(f"{k}={run_config.get(k)!r} (saved: {saved[k]!r})" for k in bad)
        raise ValueError(
            f"cannot resume {resume}: {diffs} differ from its run's config ({source}). Give the same flags, "
            "or train this configuration in another out_dir."
        )
    changed = [k for k in sorted(saved) if k in run_config and k not in ("resume_checkpoint", "out_dir")
               and not _same(run_config[k], saved[k])]
    if not changed:
        return None
    return "resuming with changed flags: " + ", ".join(f"{k} {saved[k]!r} -> {run_config[k]!r}" for k in changed)


def _grid_diffusion(cfg):
    """
    The diffusion of the sample grids: respaced by sample_respacing, where a
    step count of at least diffusion_steps means the full chain (the default
    "100" on a run of fewer steps). Both respacings are checked here, before
    the run starts.
    """
    steps = int(cfg["diffusion_steps"])
    grid = str(cfg["sample_respacing"]).strip()
    if grid.isdigit() and int(grid) >= steps:
        grid = ""
    _respaced(cfg, "")  # the schedule itself (its own errors name diffusion_steps and noise_schedule)

    def respaced(key, value):
        try:
            return _respaced(cfg, value)
        except ValueError as exc:
            raise ValueError(f"{key}={cfg[key]!r} does not fit diffusion_steps={steps}: {exc}") from None

    diffusion = respaced("sample_respacing", grid)
    respaced("nll_respacing", str(cfg["nll_respacing"]).strip())
    return diffusion


@contextlib.contextmanager
def _explain_resume_failure(resume):
    """A checkpoint of the run being resumed that cannot be read: say which
    step's files to move away to resume from the one before."""
    try:
        yield
    except dist_util.CheckpointError as exc:
        if not resume:
            raise
        folder, step = os.path.dirname(os.path.abspath(resume)), parse_resume_step_from_filename(resume)
        earlier = [parse_resume_step_from_filename(p) for p in complete_checkpoints(folder)]
        earlier = [s for s in earlier if s < step]  # (oldest first)
        files = ", ".join(os.path.basename(p) for p in sorted(glob.glob(os.path.join(folder, f"*{step:06d}.pt"))))
        then = (f"to resume from step {earlier[-1]}, the newest complete checkpoint before it, move that step's files "
                f"({files}) out of {folder}" if earlier else "no earlier complete checkpoint is there to fall back on")
        raise dist_util.CheckpointError(f"resuming from {resume} (step {step}) failed: {exc}\n{then}") from exc


def _respaced(cfg, respacing):
    """The run's diffusion with another timestep respacing ("" = the full chain)."""
    return create_gaussian_diffusion(
        steps=int(cfg["diffusion_steps"]),
        learn_sigma=bool(cfg["learn_sigma"]),
        sigma_small=bool(cfg["sigma_small"]),
        noise_schedule=cfg["noise_schedule"],
        use_kl=bool(cfg["use_kl"]),
        predict_xstart=bool(cfg["predict_xstart"]),
        rescale_timesteps=bool(cfg["rescale_timesteps"]),
        rescale_learned_sigmas=bool(cfg["rescale_learned_sigmas"]),
        timestep_respacing=respacing,
    )


def train(**config):
    """
    Train an Improved DDPM. Keys: improved-diffusion's image_train.py flags
    plus :data:`NEW_DEFAULTS`; see :func:`train_defaults`.

    :return: dict with out_dir, step (updates done), checkpoint (newest model
             file), samples (PNG grid of EMA samples), nll_bpd (held-out bits/dim
             or None) and seconds.
    """
    cfg = resolve_config(config)
    grid_diffusion = _grid_diffusion(cfg)
    started = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist_util.setup_dist()
    rank = dist_util.get_rank()
    device = dist_util.checked_device(cfg["device"])
    if device.type == "cpu":
        cpu_memory.retain_freed_memory()
    # The folder the logger will write to (as logger.configure picks it), known before it opens its
    # files: a resumed run's logs continue from its checkpoint's step.
    log_dir = cfg["out_dir"] or os.getenv("OPENAI_LOGDIR") or ""
    resume, resume_note = _resume_checkpoint(cfg, log_dir)
    other_run = None if resume or not log_dir else latest_checkpoint(log_dir)
    if other_run:
        raise ValueError(
            f"{log_dir} already holds the checkpoints of a run (newest: {os.path.basename(other_run)}); "
            "resume it (auto_resume=True, the default) or give another out_dir"
        )
    start_step = parse_resume_step_from_filename(resume) if resume else 0
    if resume:
        from .sampling import _saved_config

        with _explain_resume_failure(resume):
            saved = _saved_config(resume)
        # Before the data and the model are built (in_channels and num_classes,
        # which come from the data, are checked once it is loaded).
        early = [k for k in _RUN_DEFINING if k in cfg and k not in ("in_channels", "num_classes")]
        _check_resumed_config(cfg, resume, saved, early)
    _seed_everything(int(cfg["seed"]))

    # The data and the model before the logger opens (or, resuming, cuts back)
    # its files: a flag that the data or the model refuse leaves no folder behind.
    from . import image_datasets

    data_dir = "digits" if _is_digits(cfg["data_dir"]) else cfg["data_dir"]
    dataset = image_datasets.load_dataset(
        data_dir,
        int(cfg["image_size"]),
        class_cond=bool(cfg["class_cond"]),
        image_channels=int(cfg["image_channels"]) or None,
        split="train",
    )
    sample_x, _ = dataset[0]
    channels = int(np.shape(sample_x)[0])
    num_classes = int(cfg["num_classes"]) or (10 if data_dir == "digits" else None)
    model_kwargs = {k: cfg[k] for k in _MODEL_KEYS}
    model, diffusion = create_model_and_diffusion(
        **model_kwargs, channel_mult=cfg["channel_mult"] or None, in_channels=channels, num_classes=num_classes
    )
    # data_classes: the labels the data hold (sampling draws from those, not
    # from every row of the model's class embedding).
    data_classes = getattr(dataset, "num_classes", None) if cfg["class_cond"] else None
    run_config = {**cfg, "in_channels": channels, "num_classes": num_classes, "data_classes": data_classes}
    changed_note = _check_resumed_config(run_config, resume, saved) if resume else None
    out_dir = _configure_logging(log_dir, start_step if resume else None)
    for note in (resume_note, changed_note):
        if note:
            logger.log(note)
    model.to(device)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(run_config, f, indent=1, sort_keys=True)
        n_params = sum(p.numel() for p in model.parameters())
        logger.log(f"data: {data_dir} ({len(dataset)} training images, {channels} channel(s)); model: {n_params / 1e6:.2f} M parameters")

    if resume and not cfg["resume_checkpoint"]:
        logger.log(f"resuming from the newest complete checkpoint in {out_dir}: {resume}")

    data = _StepBatches(
        dataset,
        int(cfg["batch_size"]),
        dist_util.get_world_size(),
        rank,
        int(cfg["seed"]),
        start_step,
        int(cfg["num_workers"]),
        random_flip=bool(cfg["random_flip"]),
    )
    sampler = create_named_schedule_sampler(cfg["schedule_sampler"], diffusion)
    sample_shape = (int(cfg["num_samples"]), channels, int(cfg["image_size"]), int(cfg["image_size"]))
    # Grid labels: the data's classes (a folder's or an .npz's), not the 1000 of the original's default
    # embedding, most of which this run never trains (sample() draws from the same data_classes).
    label_count = data_classes or num_classes or 1000  # (labels are drawn only with class_cond)

    def write_samples(loop, step):
        ema_model = _ema_model(loop)
        kwargs = {}
        if cfg["class_cond"]:
            g = torch.Generator().manual_seed(step)
            kwargs["y"] = torch.randint(0, label_count, (sample_shape[0],), generator=g).to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(1234)
            with loop._autocast():
                x = grid_diffusion.p_sample_loop(ema_model, sample_shape, model_kwargs=kwargs, device=device)
        return save_grid(x, os.path.join(out_dir, f"samples_{step:06d}.png"))

    with _explain_resume_failure(resume):
        loop = TrainLoop(
            model=model,
            diffusion=diffusion,
            data=data,
            batch_size=int(cfg["batch_size"]),
            microbatch=int(cfg["microbatch"]),
            lr=float(cfg["lr"]),
            ema_rate=cfg["ema_rate"],
            log_interval=int(cfg["log_interval"]),
            save_interval=int(cfg["save_interval"]),
            resume_checkpoint=resume,
            fp16_scale_growth=float(cfg["fp16_scale_growth"]),
            schedule_sampler=sampler,
            weight_decay=float(cfg["weight_decay"]),
            lr_anneal_steps=int(cfg["lr_anneal_steps"]),
            max_steps=int(cfg["max_steps"]),
            amp=cfg["amp"],
            channels_last=channels_last_option(cfg["channels_last"], device, cfg.get("amp", "none")),
            grad_clip=float(cfg["grad_clip"]),
            checkpoint_dir=out_dir,
            sample_interval=int(cfg["sample_interval"]),
            sample_fn=write_samples,
            config=run_config,
            nonfinite_patience=int(cfg["nonfinite_patience"]),
            progress=bool(cfg["progress"]),
        )
    if not log_dir:  # a new /tmp folder per run: rerunning the same command would not find this one
        loop.resume_hint = f"rerun it with --out_dir {out_dir} (out_dir={out_dir!r}) to resume"
    logger.log("training...")
    loop.run_loop()
    if logger.getkvs():
        logger.dumpkvs()

    result = {"out_dir": out_dir, "step": loop.global_step, "checkpoint": latest_checkpoint(out_dir), "samples": None, "nll_bpd": None}
    if rank == 0 and int(cfg["num_samples"]) > 0:
        grid = os.path.join(out_dir, f"samples_{loop.global_step:06d}.png")
        last_interval = int(cfg["sample_interval"]) and loop.global_step % int(cfg["sample_interval"]) == 0
        # (sample_interval already drew this step's grid when it divides the last step)
        result["samples"] = grid if last_interval and os.path.exists(grid) else write_samples(loop, loop.global_step)
        logger.log(f"samples: {result['samples']}")
    if rank == 0:
        if int(cfg["nll_samples"]) > 0:
            result["nll_bpd"] = _held_out_nll(cfg, loop, data_dir, channels, device)
    result["seconds"] = time.time() - started
    return result


def _ema_model(loop):
    """A copy of the model in eval mode holding the first EMA rate's parameters."""
    return copy_model_with(loop.model, loop.ema_state_dict()).eval()


def _held_out_nll(cfg, loop, data_dir, channels, device):
    from . import image_datasets

    try:
        held_out = image_datasets.load_dataset(
            data_dir, int(cfg["image_size"]), class_cond=bool(cfg["class_cond"]),
            image_channels=channels, split="test",
        )
    except ValueError as exc:
        logger.log(f"no held-out split for the NLL: {exc}")
        return None
    n = min(int(cfg["nll_samples"]), len(held_out))
    items = [held_out[i] for i in range(n)]
    x = torch.stack([torch.as_tensor(np.asarray(img)) for img, _ in items]).float().to(device)
    kwargs = {}
    if cfg["class_cond"]:
        kwargs["y"] = torch.tensor([int(c["y"]) for _, c in items], device=device)
    diffusion = _respaced(cfg, cfg["nll_respacing"])
    ema_model = _ema_model(loop)
    torch.manual_seed(0)
    with torch.no_grad():
        bpd = diffusion.calc_bpd_loop(ema_model, x, model_kwargs=kwargs, progress=bool(cfg["progress"]))["total_bpd"]
    value = float(bpd.mean())
    steps = cfg["nll_respacing"] or f"all {diffusion.num_timesteps}"
    logger.log(f"held-out NLL: {value:.4f} bits/dim ({n} images, {steps} steps, EMA {loop.ema_rate[0]})")
    logger.logkv("step", loop.global_step)
    logger.logkv("held_out_nll_bpd", value)
    logger.dumpkvs()
    return value
