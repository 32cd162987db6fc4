"""
`iddpm_fast.sample(...)` and `iddpm_fast.nll(...)`: improved-diffusion's
`image_sample.py` and `image_nll.py` as functions (and CLI commands), with the
model/diffusion config read from the checkpoint's run when it was trained by
iddpm_fast, so forgotten flags cannot silently produce noise.

Outputs match the original's: ``samples_NxHxWxC.npz`` (``arr_0`` uint8 NHWC,
``arr_1`` labels when class-conditional) and ``vb_terms.npz`` /
``mse_terms.npz`` / ``xstart_mse_terms.npz`` (per-timestep means), plus PNG
pictures: a sample grid, optionally the denoising strip of one sample, and
the per-timestep bound terms against t.
"""

import json
import os
import re

import numpy as np
import torch

from . import cpu_memory, cuda_graphs, dist_util, fp16_util, logger
from .image_utils import save_grid, to_uint8
from .script_util import (
    apply_aliases,
    channels_last_option,
    coerce_options,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from .train_util import _warn_if_slow_bf16

__all__ = ["sample", "nll", "load_model_and_diffusion", "SAMPLE_DEFAULTS", "NLL_DEFAULTS"]

# The flags of improved-diffusion's scripts, same defaults.
SAMPLE_DEFAULTS = dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="")
NLL_DEFAULTS = dict(data_dir="", clip_denoised=True, num_samples=1000, batch_size=1, model_path="")
# This library's options.
COMMON_NEW = dict(out_dir="", seed=0, device="", amp="none", progress=True, channel_mult="", in_channels=0,
                  num_classes=0, channels_last="auto")  # auto: on for CPUs (250-step sampling 1.1x) and CUDA + bf16
SAMPLE_NEW = dict(eta=0.0, grid=True, progressive=False, cuda_graphs=False)

# Flags that may differ between training and sampling without changing the model.
_FREE_AT_EVAL = {"timestep_respacing", "dropout", "use_checkpoint", "use_kl", "rescale_learned_sigmas"}
_EXTRA_MODEL_KEYS = ("channel_mult", "in_channels", "num_classes")
# Other names accepted for options (alias -> name): train calls the image
# channels image_channels, as the data loaders do.
EVAL_ALIASES = {"image_channels": "in_channels"}


def _saved_config(model_path):
    """The run config saved beside an iddpm_fast checkpoint, or None."""
    folder = os.path.dirname(os.path.abspath(model_path))
    match = re.search(r"(\d{6,})\.pt$", os.path.basename(model_path))
    if match:
        state_path = os.path.join(folder, f"train_state{match.group(1)}.pt")
        if os.path.exists(state_path):
            state = dist_util.load_state_dict(state_path, map_location="cpu")
            if state.get("config"):
                return json.loads(state["config"]), state_path
    path = os.path.join(folder, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f), path
    return None, None


def _resolve(given, defaults):
    """defaults <- saved run config <- given flags, refusing contradictions."""
    given = coerce_options(given, defaults)
    model_path = given.get("model_path") or defaults.get("model_path")
    if not model_path:
        raise ValueError("model_path is required (a modelNNNNNN.pt or ema_<rate>_NNNNNN.pt file)")
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"model_path {model_path} does not exist")
    saved, source = _saved_config(model_path)
    model_keys = set(model_and_diffusion_defaults()) | set(_EXTRA_MODEL_KEYS)
    cfg = dict(defaults)
    if saved is not None:
        for key in model_keys - _FREE_AT_EVAL:
            if key in given and key in saved and not _same(given[key], saved[key]):
                raise ValueError(
                    f"--{key}={given[key]!r} contradicts the checkpoint's training config ({key}={saved[key]!r}, "
                    f"from {source}); drop the flag to use the saved value"
                )
        cfg.update({k: v for k, v in saved.items() if k in model_keys and v is not None})
        cfg["data_classes"] = saved.get("data_classes")
    cfg.update(given)
    cfg["_config_source"] = source
    return cfg


def _same(a, b):
    if isinstance(b, bool) or isinstance(a, bool):
        return bool(a) == bool(b)
    if isinstance(b, (int, float)) and isinstance(a, (int, float)):
        return float(a) == float(b)
    return str(a) == str(b)


def load_model_and_diffusion(cfg, device):
    """Build the model and diffusion of `cfg` and load cfg['model_path'] (weights only, strict)."""
    model_kwargs = {k: cfg[k] for k in model_and_diffusion_defaults()}
    model, diffusion = create_model_and_diffusion(
        **model_kwargs,
        channel_mult=cfg.get("channel_mult") or None,
        in_channels=int(cfg.get("in_channels") or 3),
        num_classes=int(cfg.get("num_classes") or 0) or None,
    )
    state = dist_util.load_state_dict(cfg["model_path"], map_location="cpu")
    if not isinstance(state, dict):
        raise ValueError(f"{cfg['model_path']} holds a {type(state).__name__}, not a model state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        where = (
            f"the config from {cfg['_config_source']}"
            if cfg.get("_config_source")
            else "the flags given (no iddpm_fast config was found beside the checkpoint, so pass the flags it was trained with)"
        )
        raise ValueError(f"{cfg['model_path']} does not fit the model built from {where}:\n{exc}") from None
    return model.to(device).eval(), diffusion


def _setup(cfg):
    for key in ("num_samples", "batch_size"):
        if int(cfg[key]) <= 0:
            raise ValueError(f"{key} must be positive, got {cfg[key]}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist_util.setup_dist()
    device = dist_util.checked_device(cfg.get("device"))
    if device.type == "cpu":
        cpu_memory.retain_freed_memory()
    return device


def _open_log(cfg):
    """The logger's folder for this call, opened once everything it needs has
    been checked: a refused flag leaves no folder behind."""
    if cfg.get("out_dir"):
        # Appended to: out_dir is often the training run's folder, whose log.txt is the run's record.
        logger.configure(dir=cfg["out_dir"], format_strs=["stdout", "log"] if dist_util.get_rank() == 0 else [],
                         append=True)
    elif _unchosen_log_dir():
        if logger.Logger.CURRENT is not None and logger.get_dir() in _OWN_LOG_DIRS:
            logger.get_current().close()  # the previous call's files
        # Like a fresh run of the original script: OPENAI_LOGDIR, else a new
        # /tmp/openai-<time> folder, so that a second sample() or nll() call in
        # one process does not overwrite the first one's files. A folder the
        # caller configured (logger.configure, train()) is used as it is.
        logger.configure(format_strs=["stdout", "log"])
        _OWN_LOG_DIRS.add(logger.get_dir())


_OWN_LOG_DIRS = set()


def _unchosen_log_dir():
    """True when no one chose the logger's folder: none yet, the implicit
    default one, or one an earlier sample()/nll() call made for itself."""
    current = logger.Logger.CURRENT
    return current is None or current is logger.Logger.DEFAULT or current.get_dir() in _OWN_LOG_DIRS


def _load_for_eval(cfg, device):
    """load_model_and_diffusion, with the model channels-last when cfg's
    channels_last option asks for it; returns (model, diffusion, channels_last)."""
    model, diffusion = load_model_and_diffusion(cfg, device)
    channels_last = channels_last_option(cfg.get("channels_last", "auto"), device, cfg.get("amp", "none"))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, diffusion, channels_last


def _autocast(cfg, device):
    amp = cfg.get("amp", "none")
    if amp not in ("none", "bf16"):
        raise ValueError(f"amp for sampling and NLL must be 'none' or 'bf16', got {amp!r}")
    if cfg.get("cuda_graphs"):
        return cuda_graphs.autocast(device, enabled=amp == "bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def _gather(t):
    """Concatenate a tensor from every rank (rank order) on every rank."""
    if dist_util.get_world_size() == 1:
        return t
    parts = [torch.zeros_like(t) for _ in range(dist_util.get_world_size())]
    torch.distributed.all_gather(parts, t)
    return torch.cat(parts)


def sample(**config):
    """
    Draw samples from a trained model.

    Keys: image_sample.py's flags (model_path, num_samples, batch_size,
    use_ddim, clip_denoised, timestep_respacing and the model/diffusion flags)
    plus eta (DDIM), seed, out_dir, device, amp ("none" | "bf16"), grid (PNG of
    the first 64), progressive (PNG strip of one sample's denoising), progress,
    cuda_graphs (capture each step once as a CUDA graph and replay it; CUDA
    only, same samples as without).
    Model/diffusion flags default to the config saved with the checkpoint;
    giving one that contradicts it is an error naming both.

    :return: dict with npz (path), grid, strip (paths or None) and shape.
    """
    config = apply_aliases(config, EVAL_ALIASES, COMMON_NEW)
    unknown = set(config) - set({**SAMPLE_DEFAULTS, **model_and_diffusion_defaults(), **COMMON_NEW, **SAMPLE_NEW})
    if unknown:
        raise TypeError(f"unknown sampling option(s): {sorted(unknown)}")
    if config.get("cuda_graphs"):  # before anything is read or written
        cuda_graphs.check_available(config.get("device") or dist_util.dev())
    cfg = _resolve(config, {**model_and_diffusion_defaults(), **SAMPLE_DEFAULTS, **COMMON_NEW, **SAMPLE_NEW})
    device = _setup(cfg)
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    model, diffusion, channels_last = _load_for_eval(cfg, device)
    _open_log(cfg)
    _warn_if_slow_bf16(cfg.get("amp"), device)
    if cfg.get("amp") == "bf16":  # the casts autocast would make at every step, made once: same numbers
        fp16_util.cast_autocast_weights(model, torch.bfloat16)
    channels = int(cfg.get("in_channels") or 3)
    size, batch = int(cfg["image_size"]), int(cfg["batch_size"])
    # Labels from the classes the training data held (saved by iddpm_fast's
    # train), else from the model's whole class embedding, as image_sample.py draws them.
    num_classes = int(cfg.get("data_classes") or 0) or int(cfg.get("num_classes") or 0) or 1000
    torch.manual_seed(int(cfg["seed"]) + rank)
    total = int(cfg["num_samples"])
    n_batches = -(-total // (batch * world))
    logger.log(
        f"sampling {total} images of {channels}x{size}x{size} with "
        f"{'DDIM (eta=%g)' % cfg['eta'] if cfg['use_ddim'] else 'ancestral sampling'}, "
        f"{diffusion.num_timesteps} steps, on {world} process(es)"
    )
    if float(cfg.get("eta") or 0.0) != 0.0 and not cfg["use_ddim"]:
        logger.log(f"note: eta={cfg['eta']} applies to DDIM only; pass use_ddim=True (--use_ddim true) to use it")
    images, labels, strip, graphed = [], [], None, None
    batches = range(n_batches)
    if cfg["progress"] and rank == 0:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="sample batches")
    for b in batches:
        model_kwargs = {}
        if cfg["class_cond"]:
            classes = torch.randint(0, num_classes, (batch,), device=device)
            model_kwargs["y"] = classes
        shape = (batch, channels, size, size)
        kwargs = dict(clip_denoised=bool(cfg["clip_denoised"]), model_kwargs=model_kwargs, device=device)
        if channels_last:
            # The loop's own first draw, laid out channels-last: same numbers.
            kwargs["noise"] = torch.randn(*shape, device=device).contiguous(memory_format=torch.channels_last)
        if cfg["use_ddim"]:
            loop, kwargs["eta"] = diffusion.ddim_sample_loop_progressive, float(cfg["eta"])
        else:
            loop = diffusion.p_sample_loop_progressive
        keep = set(np.linspace(0, diffusion.num_timesteps - 1, 10).round().astype(int).tolist())
        frames = []
        with _autocast(cfg, device):
            if cfg["cuda_graphs"]:
                if graphed is None:  # captured once, replayed for every step of every batch
                    graphed = cuda_graphs.GraphedSampler(
                        diffusion, model, shape, use_ddim=bool(cfg["use_ddim"]), eta=float(cfg["eta"]),
                        clip_denoised=bool(cfg["clip_denoised"]), model_kwargs=model_kwargs,
                        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                steps = graphed.loop_progressive(noise=kwargs.get("noise"), model_kwargs=model_kwargs)
            else:
                steps = loop(model, shape, **kwargs)
            for i, out in enumerate(steps):
                if cfg["progressive"] and b == 0 and rank == 0 and i in keep:
                    frames.append(out["sample"][:1].float())
                x = out["sample"]
        if frames:
            strip = torch.cat(frames)
        u8 = ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        images.append(_gather(u8).cpu().numpy())
        if cfg["class_cond"]:
            labels.append(_gather(classes).cpu().numpy())
        logger.log(f"created {sum(len(a) for a in images)} samples")
    arr = np.concatenate(images)[:total]
    result = {"npz": None, "grid": None, "strip": None, "shape": arr.shape}
    if rank == 0:
        out_dir = logger.get_dir()
        path = os.path.join(out_dir, f"samples_{'x'.join(str(s) for s in arr.shape)}.npz")
        if cfg["class_cond"]:
            np.savez(path, arr, np.concatenate(labels)[:total])
        else:
            np.savez(path, arr)
        logger.log(f"saved {path}")
        result["npz"] = path
        if cfg["grid"]:
            result["grid"] = save_grid(arr[:64], os.path.join(out_dir, "samples_grid.png"))
        if strip is not None:
            result["strip"] = save_grid(
                to_uint8(strip), os.path.join(out_dir, "denoising_strip.png"), nrow=len(strip), min_tile=64
            )
    dist_util.barrier()
    return result


def nll(**config):
    """
    Bits/dim of a trained model on a dataset (image_nll.py): the full
    variational bound per image, averaged, with the per-timestep terms saved
    (vb_terms.npz, mse_terms.npz, xstart_mse_terms.npz, each a [T] array of
    means over images, indexed as the original's: entry i is timestep
    T-1-i) and plotted against t (vb_terms.png).

    Keys: image_nll.py's flags (model_path, data_dir, num_samples, batch_size,
    clip_denoised and the model/diffusion flags; timestep_respacing evaluates
    a respaced chain) plus seed, out_dir, device, amp ("none" | "bf16": the
    model under bf16 autocast, the bound's terms still in float32), progress.
    With no data_dir, the built-in digits' held-out split.

    :return: dict with bpd (mean bits/dim), num_images and the saved paths.
    """
    config = apply_aliases(config, EVAL_ALIASES, COMMON_NEW)
    unknown = set(config) - set({**NLL_DEFAULTS, **model_and_diffusion_defaults(), **COMMON_NEW})
    if unknown:
        raise TypeError(f"unknown NLL option(s): {sorted(unknown)}")
    cfg = _resolve(config, {**model_and_diffusion_defaults(), **NLL_DEFAULTS, **COMMON_NEW})
    device = _setup(cfg)
    _autocast(cfg, device)  # refuses a bad amp before any work
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    model, diffusion, channels_last = _load_for_eval(cfg, device)
    from . import image_datasets

    digits = cfg["data_dir"] in ("", "digits")
    source = dict(data_dir="digits" if digits else cfg["data_dir"], image_size=int(cfg["image_size"]),
                  class_cond=bool(cfg["class_cond"]), image_channels=int(cfg.get("in_channels") or 0) or None,
                  split="test" if digits else "all")
    data = image_datasets.load_data(**source, batch_size=int(cfg["batch_size"]), deterministic=True)
    available = len(image_datasets.load_dataset(**source))
    _open_log(cfg)  # (the data's own errors came first)
    _warn_if_slow_bf16(cfg.get("amp"), device)
    torch.manual_seed(int(cfg["seed"]) + rank)
    total, batch = int(cfg["num_samples"]), int(cfg["batch_size"])
    # Images a pass over the data gives before it starts again (each rank's
    # incomplete last batch dropped, as image_nll.py's loader drops it), and
    # the images this call evaluates (whole steps of world * batch).
    per_pass = world * batch * ((available // world) // batch)
    evaluated = -(-total // (world * batch)) * world * batch
    if evaluated > per_pass and rank == 0:
        # The original's image_nll.py cycles through the data too; say so, as
        # the mean then counts some images more often than others.
        what = "the digits test split" if digits else cfg["data_dir"]
        logger.log(f"note: num_samples={total} evaluates {evaluated} images, more than the {per_pass} that one pass "
                   f"over the {available} images of {what} gives in batches of {batch}"
                   f"{f' on {world} processes' if world > 1 else ''}: images are evaluated more than once, as "
                   f"improved-diffusion's image_nll.py does (--num_samples {per_pass} evaluates each once)")
    all_bpd, metrics, done = [], {"vb": [], "mse": [], "xstart_mse": []}, 0
    bar = None
    if cfg["progress"] and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="nll", unit="img")
    while done < total:
        batch, model_kwargs = next(data)
        batch = batch.to(device)
        if channels_last and batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        model_kwargs = {k: v.to(device) for k, v in model_kwargs.items()}
        with _autocast(cfg, device):
            out = diffusion.calc_bpd_loop(
                model, batch, clip_denoised=bool(cfg["clip_denoised"]), model_kwargs=model_kwargs
            )
        for key, rows in metrics.items():
            terms = out[key].mean(dim=0) / world
            if world > 1:
                torch.distributed.all_reduce(terms)
            rows.append(terms.cpu().numpy())
        bpd = out["total_bpd"].mean() / world
        if world > 1:
            torch.distributed.all_reduce(bpd)
        all_bpd.append(bpd.item())
        done += world * batch.shape[0]
        logger.log(f"done {done} samples: bpd={np.mean(all_bpd)}")
        if bar is not None:
            bar.update(world * batch.shape[0])
            bar.set_postfix(bpd=f"{np.mean(all_bpd):.4f}")
    if bar is not None:
        bar.close()
    result = {"bpd": float(np.mean(all_bpd)), "num_images": done, "files": {}}
    if rank == 0:
        out_dir = logger.get_dir()
        for name, rows in metrics.items():
            path = os.path.join(out_dir, f"{name}_terms.npz")
            np.savez(path, np.mean(np.stack(rows), axis=0))
            result["files"][name] = path
        plot = os.path.join(out_dir, "vb_terms.png")
        # calc_bpd_loop stacks the terms from t = T-1 down to 0; plot them against t.
        vb_by_t = np.mean(np.stack(metrics["vb"]), axis=0)[::-1]
        plot_terms(vb_by_t, plot, title=f"vb term per timestep (bits/dim); total {result['bpd']:.3f} bits/dim")
        result["files"]["plot"] = plot
        logger.log(f"NLL: {result['bpd']:.4f} bits/dim over {done} images; terms in {out_dir}")
    dist_util.barrier()
    return result


def plot_terms(values, path, title="", width=640, height=360):
    """
    A log-scale line plot of per-timestep terms indexed by t (the paper's
    Figure 2 view), drawn with Pillow so no plotting library is needed.
    """
    from PIL import Image, ImageDraw

    v = np.clip(np.asarray(values, dtype=np.float64), 1e-8, None)
    logv = np.log10(v)
    lo, hi = np.floor(logv.min()), np.ceil(logv.max())
    hi = hi if hi > lo else lo + 1
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    pw, ph = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + pw, top + ph], outline="black")
    for d in range(int(lo), int(hi) + 1):
        y = top + ph * (hi - d) / (hi - lo)
        draw.line([left, y, left + pw, y], fill=(220, 220, 220))
        draw.text((5, y - 6), f"1e{d}", fill="black")
    n = len(v)
    pts = [(left + pw * i / max(n - 1, 1), top + ph * (hi - logv[i]) / (hi - lo)) for i in range(n)]
    draw.line(pts, fill=(31, 119, 180), width=2)
    for frac in (0, 0.25, 0.5, 0.75, 1):
        x = left + pw * frac
        draw.text((x - 10, top + ph + 8), str(int(round(frac * (n - 1)))), fill="black")
    draw.text((left + pw / 2 - 40, height - 16), "timestep t", fill="black")
    draw.text((left, 8), title or "vb term (bits/dim) vs t", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path

