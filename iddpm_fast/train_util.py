"""
The training loop: improved-diffusion's `TrainLoop` with the same constructor
arguments, on a modern PyTorch.

What it adds (new keyword-only arguments, defaults keep the original's
behaviour where it was sound):

- ``max_steps``: stop after this many optimizer updates (0: run forever, or
  until ``lr_anneal_steps`` as the original).
- ``amp``: "none", "bf16" (autocast) or "fp16" (autocast + dynamic loss
  scaling that skips steps with inf/NaN gradients). ``use_fp16=True`` means
  ``amp="fp16"``; the original's fp16 master-weight scheme is replaced by
  PyTorch's autocast + GradScaler, and ``lg_loss_scale`` is still logged.
- ``channels_last``: run the model on channels-last activations (with bf16 on
  CPUs with AMX this is the fast path).
- ``grad_clip``: clip the global gradient norm (0: off).
- ``checkpoint_dir``: where checkpoints go (default: ``DIFFUSION_BLOB_LOGDIR``
  or the logger's directory, as the original).
- ``sample_interval`` / ``sample_fn``: write a PNG grid of EMA samples every
  so many steps.
- ``config``: a JSON-able dict saved beside every checkpoint.
- ``nonfinite_patience``: after this many consecutive updates with a
  non-finite loss (each skipped), stop with :class:`TrainingDiverged`,
  keeping the last good checkpoint.

Deliberate differences from the original, documented in the README:

- Microbatch gradients are **averaged** over the batch (the original summed
  the per-microbatch means, so its effective learning rate grew with the
  number of microbatches).
- ``modelNNNNNN.pt`` holds the parameters after exactly NNNNNN updates (the
  original's held NNNNNN+1, and a resumed run repeated one step); nothing is
  saved before the first update.
- Checkpoints are written atomically (temp file + rename), and
  ``train_stateNNNNNN.pt`` beside them holds the sampler history, RNG states,
  loss scaler and config, so a resumed run continues exactly.
- Distributed training (DDP over ``torch.distributed``) works on CPU (gloo)
  as well as GPU (NCCL). With several ranks every rank draws the timesteps
  and noise of the *global* batch from identically seeded generators and
  keeps its slice, so N ranks compute the same update as one process with
  the same global batch.
"""

import contextlib
import copy
import glob
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings

import numpy as np
import torch as th
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import _ext, cpu_memory, dist_util, logger
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler

INITIAL_LOG_LOSS_SCALE = 20.0

__all__ = [
    "TrainLoop",
    "TrainingDiverged",
    "TrainingInterrupted",
    "parse_resume_step_from_filename",
    "get_blob_logdir",
    "find_resume_checkpoint",
    "find_ema_checkpoint",
    "latest_checkpoint",
    "log_loss_dict",
    "atomic_save",
]


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for too many consecutive updates."""


def _adamw(params, lr, weight_decay):
    """AdamW as the original's, with PyTorch's fused kernel where it exists
    (CPU since torch 2.4, CUDA): the same update within float rounding, about
    3x faster a step on CPUs (26.6 -> 8.6 ms for the 10 M-parameter 32x32
    model on 2 cores). Its state dict is the standard AdamW one."""
    params = list(params)
    devices = {p.device.type for p in params}
    if devices <= {"cpu", "cuda"}:
        try:
            return th.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):  # older torch, or dtypes the fused kernel lacks
            pass
    return th.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint; ``signum`` is
    the signal (SIGINT or SIGTERM; the command line exits with 128 + it)."""

    def __init__(self, message, signum=None):
        super().__init__(message)
        self.signum = signal.SIGINT if signum is None else signum


def _cpu_bf16_note(flags):
    """Why amp="bf16" is likely slower than float32 on a CPU with these
    flags, or None (unknown flags: no note)."""
    if flags is None or "amx_bf16" in flags or "avx512_bf16" in flags:
        return None
    return (
        "amp='bf16' on a CPU without AMX-BF16 or AVX512-BF16: its bfloat16 convolutions have no native "
        "instructions there (on such a CPU a 128-channel 3x3 convolution, forward + backward at 16x128x32x32, took "
        "275 ms in bf16 against 67-83 ms in float32), so amp='none' is likely faster"
    )


_bf16_warned = False


def _warn_if_slow_bf16(amp, device):
    """Warn once per process, and log, when amp="bf16" runs on a CPU that
    _cpu_bf16_note names (TrainLoop, sample() and nll() call this)."""
    global _bf16_warned
    if amp != "bf16" or th.device(device).type != "cpu" or _bf16_warned:
        return
    note = _cpu_bf16_note(_ext.cpu_flags())
    if note:
        _bf16_warned = True
        warnings.warn(note, RuntimeWarning, stacklevel=3)
        logger.log(f"note: {note}")


class TrainLoop:
    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.0,
        lr_anneal_steps=0,
        max_steps=0,
        amp=None,
        channels_last=False,
        grad_clip=0.0,
        checkpoint_dir=None,
        sample_interval=0,
        sample_fn=None,
        config=None,
        nonfinite_patience=5,
        progress=False,
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = int(batch_size)
        self.microbatch = microbatch if microbatch and microbatch > 0 else self.batch_size
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.lr = lr
        if isinstance(ema_rate, (int, float)):
            self.ema_rate = [float(ema_rate)]
        else:
            self.ema_rate = [float(x) for x in str(ema_rate).split(",") if x.strip()]
        for rate in self.ema_rate:
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"ema_rate values must lie in [0, 1), got {rate}")
        self.log_interval = int(log_interval)
        self.save_interval = int(save_interval)
        self.resume_checkpoint = resume_checkpoint
        if amp is None:
            amp = "fp16" if use_fp16 else "none"
        if amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
        self.amp = amp
        self.use_fp16 = amp == "fp16"
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = int(max_steps or 0)
        self.channels_last = bool(channels_last)
        self.grad_clip = float(grad_clip or 0.0)
        self.checkpoint_dir = checkpoint_dir
        self.sample_interval = int(sample_interval or 0)
        self.sample_fn = sample_fn
        self.config = config
        self.nonfinite_patience = int(nonfinite_patience)
        self.progress = progress

        self.step = 0
        self.resume_step = 0
        self.rank = dist_util.get_rank()
        self.world_size = dist_util.get_world_size()
        self.global_batch = self.batch_size * self.world_size
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            cpu_memory.retain_freed_memory()  # no page faults re-zeroing last step's activations
        _warn_if_slow_bf16(self.amp, self.device)
        self.sync_cuda = th.cuda.is_available()
        self._nonfinite_run = 0
        self._last_saved_step = None

        if self.channels_last:
            self.model.to(memory_format=th.channels_last)
        self.model_params = list(self.model.parameters())
        self.master_params = self.model_params

        # The original grew log2(scale) by fp16_scale_growth after every good
        # step and lowered it by 1 on overflow; GradScaler does the same with
        # growth_interval=1.
        self.scaler = th.amp.GradScaler(
            self.device.type,
            init_scale=2.0**INITIAL_LOG_LOSS_SCALE,
            growth_factor=2.0 ** max(float(fp16_scale_growth), 1e-6),
            backoff_factor=0.5,
            growth_interval=1,
            enabled=self.use_fp16,
        )

        self._load_and_sync_parameters()
        self.opt = _adamw(self.master_params, lr=self.lr, weight_decay=self.weight_decay)
        if self.resume_step:
            self._load_optimizer_state()
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
            self._load_train_state()
        else:
            self.ema_params = [[p.detach().clone() for p in self.master_params] for _ in self.ema_rate]

        if self.world_size > 1:
            self.use_ddp = True
            # The UNet has no buffers to keep in sync.
            kwargs = dict(bucket_cap_mb=128, find_unused_parameters=False)
            if self.device.type == "cuda":
                kwargs.update(device_ids=[self.device], output_device=self.device)
            self.ddp_model = DDP(self.model, **kwargs)
        else:
            self.use_ddp = False
            self.ddp_model = self.model

    # ------------------------------------------------------------------
    # Checkpoint loading
    # ------------------------------------------------------------------

    def _main_checkpoint(self):
        return find_resume_checkpoint() or self.resume_checkpoint

    def _load_and_sync_parameters(self):
        resume_checkpoint = self._main_checkpoint()
        if resume_checkpoint:
            if not os.path.exists(resume_checkpoint):
                raise FileNotFoundError(f"resume_checkpoint {resume_checkpoint} does not exist")
            self.resume_step = parse_resume_step_from_filename(resume_checkpoint)
            if self.rank == 0:
                logger.log(f"loading model from checkpoint: {resume_checkpoint}...")
            state = dist_util.load_state_dict(resume_checkpoint, map_location=self.device)
            self.model.load_state_dict(state)
        dist_util.sync_params(self.model.parameters())

    def _load_ema_parameters(self, rate):
        ema_params = [p.detach().clone() for p in self.master_params]
        ema_checkpoint = find_ema_checkpoint(self._main_checkpoint(), self.resume_step, rate)
        if ema_checkpoint:
            if self.rank == 0:
                logger.log(f"loading EMA from checkpoint: {ema_checkpoint}...")
            state_dict = dist_util.load_state_dict(ema_checkpoint, map_location=self.device)
            ema_params = [state_dict[name].detach().clone().to(self.device) for name, _ in self.model.named_parameters()]
        elif self.rank == 0:
            logger.warn(f"no EMA checkpoint for rate {rate} at step {self.resume_step}; starting it from the model")
        dist_util.sync_params(ema_params)
        return ema_params

    def _load_optimizer_state(self):
        opt_checkpoint = os.path.join(os.path.dirname(self._main_checkpoint()), f"opt{self.resume_step:06d}.pt")
        if os.path.exists(opt_checkpoint):
            logger.log(f"loading optimizer state from checkpoint: {opt_checkpoint}")
            # A saved param group carries its implementation flags; improved-diffusion's
            # say fused=None, which would switch this optimizer's fused kernel off.
            impl = {k: self.opt.defaults.get(k) for k in ("fused", "foreach")}
            # A file that cannot be read is an error (dist_util names it); only a
            # state that does not fit this model starts AdamW afresh.
            state = dist_util.load_state_dict(opt_checkpoint, map_location=self.device)
            try:
                self.opt.load_state_dict(state)
                if impl["fused"]:
                    # torch < 1.12 saved `step` as an int, which load_state_dict makes a CPU
                    # tensor; the fused kernel wants float32 on the parameter's device.
                    for param, st in self.opt.state.items():
                        if "step" in st:
                            st["step"] = th.as_tensor(st["step"], dtype=th.float32).to(param.device)
                saved = self.opt.param_groups[0]
                if (saved["lr"], saved["weight_decay"]) != (self.lr, self.weight_decay):
                    logger.log(f"optimizer state saved with lr={saved['lr']}, weight_decay={saved['weight_decay']}; "
                               f"continuing with this run's lr={self.lr}, weight_decay={self.weight_decay}")
                for group in self.opt.param_groups:
                    # This run's flags, not the saved ones (the original kept the saved
                    # lr, so `--lr` on a resumed run did nothing without annealing).
                    group.update(impl, lr=self.lr, weight_decay=self.weight_decay)
            except ValueError as exc:
                # e.g. improved-diffusion's fp16 runs saved the state of one flattened master parameter
                logger.warn(f"optimizer state in {opt_checkpoint} does not fit this model ({exc}); starting AdamW afresh")

    def _load_train_state(self):
        path = os.path.join(os.path.dirname(self._main_checkpoint()), f"train_state{self.resume_step:06d}.pt")
        if not os.path.exists(path):
            return  # e.g. a checkpoint written by improved-diffusion itself
        state = dist_util.load_state_dict(path, map_location="cpu")
        sampler_state = state.get("sampler")
        if sampler_state and hasattr(self.schedule_sampler, "load_state_dict"):
            self.schedule_sampler.load_state_dict(sampler_state)
        if "scaler" in state and self.use_fp16:
            self.scaler.load_state_dict(state["scaler"])
        rng = state.get("rng")
        if rng is not None:
            _set_rng_state(rng)

    # ------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------

    @property
    def lg_loss_scale(self):
        """log2 of the fp16 loss scale (the original's attribute; 20 when fp16 is off, as there)."""
        return math.log2(self.scaler.get_scale()) if self.use_fp16 else INITIAL_LOG_LOSS_SCALE

    @property
    def global_step(self):
        """Optimizer updates done, including those before a resume."""
        return self.step + self.resume_step

    def _done(self):
        if self.lr_anneal_steps and self.global_step >= self.lr_anneal_steps:
            return True
        return bool(self.max_steps) and self.global_step >= self.max_steps

    def run_loop(self):
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm

            limits = [n for n in (self.max_steps, self.lr_anneal_steps) if n]
            bar = tqdm(total=min(limits) if limits else None, initial=self.global_step, desc="train",
                       dynamic_ncols=True)
        try:
            with self._stop_after_step_on_interrupt():
                interrupted = self._steps(bar)
        finally:
            if bar is not None:
                bar.close()
        if self._last_saved_step != self.global_step and self.step > 0:
            self.save()
        if interrupted:
            name = "terminated (SIGTERM)" if self._interrupt_signal == signal.SIGTERM else "interrupted"
            raise TrainingInterrupted(
                f"training {name} after step {self.global_step}; its checkpoint is saved in "
                f"{self._checkpoint_dir()}: {self.resume_hint}",
                signum=self._interrupt_signal,
            )

    # What the message of an interrupted run tells the user to do (train() names
    # the folder when none was chosen, so that rerunning finds it).
    resume_hint = "rerun the same command to resume"

    @contextlib.contextmanager
    def _stop_after_step_on_interrupt(self):
        """
        Ctrl-C (SIGINT) lets the current step finish, then the loop stops and
        saves a checkpoint before raising :class:`TrainingInterrupted` (a
        KeyboardInterrupt); a second Ctrl-C stops at once. SIGTERM (what
        SLURM, ``docker stop`` and ``timeout`` send before killing) does the
        same where no one else handles it. Only in the main thread (where
        Python handles signals).
        """
        self._interrupt_requested = False
        self._interrupt_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield  # signals are handled in the main thread
            return

        def request(signum, frame):
            if self._interrupt_requested:
                raise KeyboardInterrupt
            self._interrupt_requested = True
            self._interrupt_signal = signum
            what = "SIGTERM" if signum == signal.SIGTERM else "interrupt"
            again = "a second signal" if signum == signal.SIGTERM else "Ctrl-C again"
            print(f"\n{what}: finishing this step, then saving a checkpoint ({again} to stop at once)",
                  file=sys.stderr, flush=True)

        previous = {}
        # An ignored SIGINT (nohup) stays ignored; a SIGTERM handler someone installed stays theirs.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, request)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, request)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                if handler is None:
                    handler = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
                signal.signal(signum, handler)

    def _stop_agreed(self):
        """Whether to stop after this step: an interrupt on any rank stops all of them at the same step."""
        if self.world_size == 1:
            return self._interrupt_requested
        return getattr(self, "_stop_all", False)  # agreed in forward_backward's all_reduce

    def _steps(self, bar):
        """The loop's steps; True when it stopped for an interrupt."""
        while not self._done():
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            self.step += 1
            if self._nonfinite_run >= self.nonfinite_patience:
                self._diverged()
            if bar is not None:
                bar.update(1)
                loss = logger.getkvs().get("loss")
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            # The global step, so that a resumed run logs the rows of the uninterrupted one.
            if self.global_step % self.log_interval == 0:
                logger.dumpkvs()
            if self.save_interval and self.global_step % self.save_interval == 0:
                self.save()
                if os.environ.get("DIFFUSION_TRAINING_TEST", ""):
                    return False
            if self.sample_interval and self.sample_fn is not None and self.global_step % self.sample_interval == 0:
                self.write_samples()
            if self._stop_agreed():
                return True
        return False

    def run_step(self, batch, cond):
        t0 = time.perf_counter()
        finite = self.forward_backward(batch, cond)
        if finite:
            self._nonfinite_run = 0
            self.optimize()
        else:
            self._nonfinite_run += 1
            self.opt.zero_grad(set_to_none=True)
            logger.log(f"non-finite loss at step {self.global_step}: update skipped ({self._nonfinite_run} in a row)")
        self.log_step(time.perf_counter() - t0)

    def _diverged(self):
        last = self._last_saved_step
        if last is None or last != self.global_step:
            # The skipped updates left the parameters at the last good values.
            self.save()
            last = self.global_step
        path = os.path.join(self._checkpoint_dir(), f"model{last:06d}.pt")
        raise TrainingDiverged(
            f"the loss was non-finite for {self._nonfinite_run} consecutive steps (step {self.global_step}); "
            f"stopping. The last good parameters are in {path}. Lower lr, enable grad_clip, or use amp='bf16' "
            "instead of 'fp16', then resume from that checkpoint."
        )

    def _draw_global(self, n_local):
        """Timesteps, weights and noise for this rank's batch (see the module docstring)."""
        if self.world_size == 1:
            return None
        if n_local != self.batch_size:
            # The global draw is sliced by rank position: a short or long local
            # batch would take another rank's timesteps and noise (or too few).
            raise ValueError(
                f"with {self.world_size} processes every rank's batch must hold exactly batch_size="
                f"{self.batch_size} examples, got {n_local} on rank {self.rank} (drop the last partial batch)"
            )
        t_all, w_all = self.schedule_sampler.sample(self.global_batch, self.device)
        lo = self.rank * n_local
        return t_all[lo : lo + n_local], w_all[lo : lo + n_local]

    def forward_backward(self, batch, cond):
        """Accumulate the batch's gradient; False when its loss was non-finite."""
        self.opt.zero_grad(set_to_none=True)
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=th.channels_last)
        cond = {k: v.to(self.device, non_blocking=True) for k, v in cond.items()}
        n = batch.shape[0]
        drawn = self._draw_global(n)
        noise_all = None
        if drawn is not None:
            # Same generator state on every rank: draw the global batch's noise, keep our slice.
            noise_all = th.randn((self.global_batch, *batch.shape[1:]), device=self.device, dtype=batch.dtype)
            noise_all = noise_all[self.rank * n : (self.rank + 1) * n]
        with self._rank_rng():
            finite = self._microbatches(batch, cond, n, drawn, noise_all)
        if self.use_ddp:
            # One collective for both: skip the update unless every rank's loss
            # was finite; stop after this step if any rank was interrupted.
            stop = getattr(self, "_interrupt_requested", False)
            flag = th.tensor([1.0 if finite else 0.0, 0.0 if stop else 1.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            all_finite, none_stopped = (flag == 1).tolist()
            finite, self._stop_all = all_finite, not none_stopped
        return finite

    @contextlib.contextmanager
    def _rank_rng(self):
        """
        With several ranks, the model's own draws (dropout) come from a
        generator seeded per rank, so ranks draw independent dropout masks
        (with one shared stream, example i of every rank had the same masks).
        The seed is a function of the initial seed, the step and the rank, so
        a resumed run draws the same masks.
        """
        if self.world_size == 1:
            yield
            return
        # From (the generator's seed, step, rank), drawing nothing from the
        # shared stream: on CPUs the training noise comes from it, and one more
        # draw per step would make N ranks draw other noise than one process.
        seed = int(np.random.SeedSequence([th.initial_seed(), self.global_step, self.rank, 0xD80]).generate_state(1)[0])
        with th.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            th.manual_seed(seed)
            yield

    def _microbatches(self, batch, cond, n, drawn, noise_all):
        finite = True
        for i in range(0, n, self.microbatch):
            micro = batch[i : i + self.microbatch]
            micro_cond = {k: v[i : i + self.microbatch] for k, v in cond.items()}
            last_batch = i + self.microbatch >= n
            if drawn is None:
                t, weights = self.schedule_sampler.sample(micro.shape[0], self.device)
                noise = None
            else:
                t, weights = drawn[0][i : i + self.microbatch], drawn[1][i : i + self.microbatch]
                noise = noise_all[i : i + self.microbatch]
            with self._autocast():
                if last_batch or not self.use_ddp:
                    losses = self.diffusion.training_losses(self.ddp_model, micro, t, model_kwargs=micro_cond, noise=noise)
                else:
                    with self.ddp_model.no_sync():
                        losses = self.diffusion.training_losses(
                            self.ddp_model, micro, t, model_kwargs=micro_cond, noise=noise
                        )
            if isinstance(self.schedule_sampler, LossAwareSampler):
                # Every rank must join the gather; non-finite losses stay out of the history.
                local = losses["loss"].detach()
                keep = th.isfinite(local)
                self.schedule_sampler.update_with_local_losses(t[keep], local[keep])
            # Average, not sum, over microbatches: the update does not depend on `microbatch`.
            loss = (losses["loss"] * weights).mean() * (micro.shape[0] / n)
            if not _log_losses_and_check(self.diffusion, t, {k: v * weights for k, v in losses.items()}, loss):
                finite = False
                # Keep the backward (and DDP's gradient all-reduce) going on every
                # rank; the update is skipped below on all ranks together.
                loss = th.nan_to_num(losses["loss"], 0.0, 0.0, 0.0).sum() * 0.0
            self.scaler.scale(loss).backward()
        return finite

    def _autocast(self):
        if self.amp == "none":
            return th.autocast(self.device.type, enabled=False)
        dtype = th.bfloat16 if self.amp == "bf16" else th.float16
        return th.autocast(self.device.type, dtype=dtype)

    def optimize(self):
        self._anneal_lr()
        if self.use_fp16:
            self.scaler.unscale_(self.opt)
        grads = [p.grad for p in self.master_params if p.grad is not None]
        if self.grad_clip > 0:
            norm = th.nn.utils.clip_grad_norm_(self.master_params, self.grad_clip)
        else:
            norm = th.linalg.vector_norm(th.stack(th._foreach_norm(grads))) if grads else th.zeros(())
        norm = float(norm)
        if math.isfinite(norm):
            logger.logkv_mean("grad_norm", norm)
        if self.use_fp16:
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.scaler.get_scale() < scale_before:
                logger.log(f"found inf/NaN gradients, decreased lg_loss_scale to {math.log2(self.scaler.get_scale()):.2f}")
                return
        else:
            self.opt.step()
        self._update_ema()

    # The original's names for the two update paths.
    def optimize_normal(self):
        self.optimize()

    def optimize_fp16(self):
        self.optimize()

    def _update_ema(self):
        with th.no_grad():
            for rate, params in zip(self.ema_rate, self.ema_params):
                update_ema(params, self.master_params, rate=rate)

    def _anneal_lr(self):
        if not self.lr_anneal_steps:
            return
        frac_done = self.global_step / self.lr_anneal_steps
        for group in self.opt.param_groups:
            group["lr"] = self.lr * (1 - frac_done)

    def log_step(self, seconds=None):
        logger.logkv("step", self.global_step)
        logger.logkv("samples", (self.global_step + 1) * self.global_batch)
        if seconds:
            logger.logkv_mean("samples_per_sec", self.global_batch / seconds)
        if self.use_fp16:
            logger.logkv("lg_loss_scale", math.log2(self.scaler.get_scale()))

    # ------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------

    def _checkpoint_dir(self):
        return self.checkpoint_dir or get_blob_logdir()

    def save(self):
        """Write model, EMA, optimizer and training-state files for the current step (rank 0)."""
        step = self.global_step
        if self.rank == 0:
            folder = self._checkpoint_dir()
            os.makedirs(folder, exist_ok=True)
            if self._last_saved_step is None:
                removed = remove_stale_temporaries(folder)
                if removed:
                    logger.log(f"removed {len(removed)} temporary file(s) of interrupted checkpoint writes: {removed}")
            logger.log(f"saving checkpoint at step {step} to {folder}")
            atomic_save(self._params_to_state_dict(self.master_params), os.path.join(folder, f"model{step:06d}.pt"))
            for rate, params in zip(self.ema_rate, self.ema_params):
                atomic_save(self._params_to_state_dict(params), os.path.join(folder, f"ema_{rate}_{step:06d}.pt"))
            atomic_save(self.opt.state_dict(), os.path.join(folder, f"opt{step:06d}.pt"))
            state = {
                "step": step,
                "rng": _get_rng_state(),
                "config": json.dumps(self.config, sort_keys=True, default=str) if self.config is not None else None,
                "ema_rate": list(self.ema_rate),
            }
            if hasattr(self.schedule_sampler, "state_dict"):
                state["sampler"] = self.schedule_sampler.state_dict()
            if self.use_fp16:
                state["scaler"] = self.scaler.state_dict()
            # Written last: its presence marks the step's checkpoint as complete.
            atomic_save(state, os.path.join(folder, f"train_state{step:06d}.pt"))
        self._last_saved_step = step
        dist_util.barrier()

    def _params_to_state_dict(self, params):
        state_dict = self.model.state_dict()
        for (name, _), value in zip(self.model.named_parameters(), params):
            state_dict[name] = value.detach().contiguous()
        return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}

    def ema_state_dict(self, rate=None):
        """The model's state dict with the EMA parameters of `rate` (default: the first)."""
        idx = 0 if rate is None else self.ema_rate.index(float(rate))
        return self._params_to_state_dict(self.ema_params[idx])

    def write_samples(self):
        if self.rank == 0 and self.sample_fn is not None:
            path = self.sample_fn(self, self.global_step)
            if path:
                logger.log(f"wrote samples to {path}")
        dist_util.barrier()


# ----------------------------------------------------------------------
# Helpers with the original's names
# ----------------------------------------------------------------------


def parse_resume_step_from_filename(filename):
    """
    The step NNNNNN of a path like .../modelNNNNNN.pt (0 when absent): as in
    the original, the digits after the last "model" of the file name up to
    its first dot, whatever the extension (model000100.pth gives 100).
    """
    name = os.path.basename(str(filename))
    if "model" not in name:
        return 0
    digits = name.split("model")[-1].split(".")[0]
    return int(digits) if digits.isdigit() else 0


def get_blob_logdir():
    return os.environ.get("DIFFUSION_BLOB_LOGDIR", logger.get_dir())


def find_resume_checkpoint():
    """Hook kept from the original: return a checkpoint to resume from automatically."""
    return None


def find_ema_checkpoint(main_checkpoint, step, rate):
    if not main_checkpoint:
        return None
    path = os.path.join(os.path.dirname(main_checkpoint), f"ema_{rate}_{step:06d}.pt")
    return path if os.path.exists(path) else None


def complete_checkpoints(folder):
    """The complete checkpoints in `folder` (modelNNNNNN.pt whose
    train_stateNNNNNN.pt exists), oldest first."""
    found = []
    for path in glob.glob(os.path.join(folder, "model[0-9]*.pt")):
        step = parse_resume_step_from_filename(path)
        if os.path.exists(os.path.join(folder, f"train_state{step:06d}.pt")):
            found.append((step, path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(folder):
    """
    The newest complete checkpoint (modelNNNNNN.pt whose train_stateNNNNNN.pt
    exists) in `folder`, or None.
    """
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def log_loss_dict(diffusion, ts, losses):
    """Log each loss's mean and its mean per quartile of t (key_q0 .. key_q3)."""
    quartiles = (4 * ts.detach().cpu().numpy()) // diffusion.num_timesteps
    for key, values in losses.items():
        _log_loss_values(key, values.detach().float().cpu().numpy(), quartiles)


def _log_loss_values(key, vals, quartiles):
    logger.logkv_mean(key, float(vals.mean()))
    for q, v in zip(quartiles, vals):
        logger.logkv_mean(f"{key}_q{int(q)}", float(v))


def _log_losses_and_check(diffusion, ts, losses, loss):
    """
    log_loss_dict(diffusion, ts, losses), then whether the scalar `loss` is
    finite, from one device-to-host copy (log_loss_dict makes one per key
    and one for ts, and a finiteness test is one more: each waits for the
    device, which then idles while the host queues the backward). Logs the
    same numbers: everything travels as float64, which holds the float32
    losses and the integer timesteps exactly, and the losses are logged from
    float32 arrays as log_loss_dict logs them.
    """
    n = ts.numel()
    for key, values in losses.items():
        if values.numel() != n:
            raise ValueError(
                f"loss term {key!r} has shape {tuple(values.shape)}; expected one value per timestep ({n})"
            )
    rows = [values.detach().float().reshape(-1) for values in losses.values()] + [ts.detach().reshape(-1)]
    host = th.cat([r.double() for r in rows] + [loss.detach().double().reshape(1)]).cpu().numpy()
    quartiles = (4 * host[len(losses) * n : (len(losses) + 1) * n].astype(np.int64)) // diffusion.num_timesteps
    for i, key in enumerate(losses):
        _log_loss_values(key, host[i * n : (i + 1) * n].astype(np.float32), quartiles)
    return math.isfinite(float(host[-1]))


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            th.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        # torch.save reports a full disk as "unexpected pos ..." from its zip writer.
        free = shutil.disk_usage(folder).free if os.path.isdir(folder) else None
        where = f" ({free / 2**20:.1f} MiB free there)" if free is not None else ""
        raise RuntimeError(
            f"could not write checkpoint {path}{where}: {exc}; the earlier checkpoints are intact"
        ) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(folder):
    """Delete the temporary files of checkpoint writes killed half way (their
    process is gone); returns their names."""
    removed = []
    for path in glob.glob(os.path.join(folder, ".*.pt.tmp*")):
        pid = path.rsplit(".tmp", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # a live process is writing it
        except ProcessLookupError:
            pass
        except OSError:
            continue
        os.remove(path)
        removed.append(os.path.basename(path))
    return removed


def _get_rng_state():
    np_state = np.random.get_state()
    state = {
        "torch": th.get_rng_state(),
        "numpy": {
            "keys": th.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_state_to_tensors(random.getstate()),
    }
    if th.cuda.is_available() and th.cuda.is_initialized():
        state["cuda"] = th.cuda.get_rng_state()  # this rank's current device only
    return state


def _set_rng_state(state):
    th.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        ("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    )
    if "python" in state:
        random.setstate(_python_state_from_tensors(state["python"]))
    if "cuda" in state and th.cuda.is_available():
        th.cuda.set_rng_state(state["cuda"].cpu())


def _python_state_to_tensors(pystate):
    version, internal, gauss = pystate
    return {"version": version, "internal": th.tensor(internal, dtype=th.int64), "gauss": gauss}


def _python_state_from_tensors(d):
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])


def copy_model_with(model, state_dict):
    """A deep copy of `model` with `state_dict` loaded (e.g. EMA weights for sampling)."""
    clone = copy.deepcopy(model)
    clone.load_state_dict(state_dict)
    return clone
