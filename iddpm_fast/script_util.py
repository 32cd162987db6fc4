"""
Model and diffusion factories and argparse helpers with improved-diffusion's
names, arguments and defaults.

Beyond the original, :func:`create_model` takes any image size when given a
`channel_mult`, and any number of input channels (e.g. 1 for grayscale).
"""

import argparse
import inspect

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .unet import SuperResModel, UNetModel

NUM_CLASSES = 1000

# Channel multipliers of the image sizes the original supports.
_DEFAULT_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


def model_and_diffusion_defaults():
    """Defaults for image training (the original's, unchanged)."""
    return dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        attention_resolutions="16,8",
        dropout=0.0,
        learn_sigma=False,
        sigma_small=False,
        class_cond=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
        use_checkpoint=False,
        use_scale_shift_norm=True,
    )


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    sigma_small,
    num_channels,
    num_res_blocks,
    num_heads,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    *,
    channel_mult=None,
    in_channels=3,
    num_classes=None,
):
    """
    A (UNetModel, SpacedDiffusion) pair from the flat config of
    :func:`model_and_diffusion_defaults`. The keyword-only extras are this
    library's: see :func:`create_model`.
    """
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        channel_mult=channel_mult,
        in_channels=in_channels,
        num_classes=num_classes,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


def _parse_channel_mult(channel_mult, image_size, what="image_size"):
    if channel_mult in (None, ""):
        if image_size not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"unsupported {what} {image_size}: the built-in channel multipliers cover "
                f"{sorted(_DEFAULT_CHANNEL_MULT)}; pass channel_mult (--channel_mult on the command line), "
                "e.g. '1,2,2', for other sizes"
            )
        return _DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(channel_mult, str):
        try:
            mult = tuple(int(m) for m in channel_mult.split(","))
        except ValueError:
            raise ValueError(f"channel_mult {channel_mult!r} must be comma-separated integers like '1,2,2'") from None
    else:
        mult = tuple(int(m) for m in channel_mult)
    if not mult or any(m < 1 for m in mult):
        raise ValueError(f"channel_mult must be positive integers, got {channel_mult!r}")
    down = 2 ** (len(mult) - 1)
    if image_size % down:
        raise ValueError(f"{what} {image_size} is not divisible by 2**(len(channel_mult)-1) = {down}")
    return mult


def _attention_ds(attention_resolutions, image_size):
    """Downsampling rates with attention; a resolution the model never reaches just adds none (as the original)."""
    ds = []
    for res in str(attention_resolutions).split(","):
        res = res.strip()
        if not res:
            continue
        try:
            r = int(res)
        except ValueError:
            raise ValueError(f"attention_resolutions {attention_resolutions!r} must be comma-separated integers") from None
        if r < 1:
            raise ValueError(f"attention resolution must be positive, got {r}")
        ds.append(image_size // r)
    return tuple(ds)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    *,
    channel_mult=None,
    in_channels=3,
    num_classes=None,
):
    """
    A UNetModel for square images of side `image_size`.

    :param channel_mult: per-level channel multipliers (tuple or "1,2,2");
                         required for sizes other than 32, 64 and 256.
    :param in_channels: image channels (3 for RGB, 1 for grayscale); the
                        model outputs as many (twice as many with learn_sigma).
    :param num_classes: classes for class_cond (default 1000, as the original).
    """
    mult = _parse_channel_mult(channel_mult, image_size)
    return UNetModel(
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=(in_channels if not learn_sigma else 2 * in_channels),
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=mult,
        num_classes=((num_classes or NUM_CLASSES) if class_cond else None),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
    )


def sr_model_and_diffusion_defaults():
    """Defaults for super-resolution training."""
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    arg_names = inspect.getfullargspec(sr_create_model_and_diffusion).args
    return {k: v for k, v in res.items() if k in arg_names}


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
):
    """A (SuperResModel, SpacedDiffusion) pair from the flat super-resolution config."""
    model = sr_create_model(
        large_size,
        small_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    *,
    channel_mult=None,
):
    """A SuperResModel producing `large_size` images from `small_size` ones."""
    if channel_mult in (None, "") and large_size not in (64, 256):
        raise ValueError(f"unsupported large size: {large_size} (built in: 64, 256); pass channel_mult")
    mult = _parse_channel_mult(channel_mult, large_size, what="large_size")
    return SuperResModel(
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_ds(attention_resolutions, large_size),
        dropout=dropout,
        channel_mult=mult,
        num_classes=(NUM_CLASSES if class_cond else None),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
    )


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
    """
    A SpacedDiffusion from flags: the loss is RESCALED_KL with use_kl, else
    RESCALED_MSE with rescale_learned_sigmas, else MSE; the variance is
    LEARNED_RANGE with learn_sigma, else FIXED_SMALL / FIXED_LARGE by
    sigma_small; the model predicts x_0 with predict_xstart, else epsilon.
    """
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=(gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON),
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def add_dict_to_argparser(parser, default_dict):
    """Add a --key flag per entry, typed by its default (bools parse yes/no/true/false/1/0)."""
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    """Parse a command-line boolean."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def apply_aliases(given, aliases, defaults=None):
    """
    ``given`` with each alias key (``aliases``: alias -> canonical name)
    renamed to its canonical name; both given with different values (compared
    as :func:`coerce_options` converts them with ``defaults``) is an error
    naming both. ``given`` itself is not changed.
    """
    out = dict(given)
    for alias, canonical in aliases.items():
        if alias in out:
            value = out.pop(alias)
            if canonical in out:
                a, b = value, out[canonical]
                if defaults is not None:
                    a, b = (coerce_options({canonical: v}, defaults)[canonical] for v in (a, b))
                if a != b:
                    raise ValueError(f"{alias}={value!r} and {canonical}={out[canonical]!r} are the same option; "
                                     "give one")
            out[canonical] = value
    return out


def coerce_options(given, defaults):
    """
    ``given`` with each value converted to the type of its default, as the
    command line's flags are, so that keyword arguments from Python mean what
    the same flags mean: "False" is False for a bool option (not a true
    string), "8" is 8 for an int one, 10 is "10" for a string one such as
    ``timestep_respacing``, (1, 2) is "1,2" for ``channel_mult``. A value that
    does not convert is a ValueError naming the option. Keys without a
    default, None values and bools given to string options (``channels_last``)
    pass unchanged.
    """
    out = dict(given)
    for key, value in given.items():
        if key not in defaults or value is None:
            continue
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if isinstance(value, str):
                    out[key] = str2bool(value)
                elif isinstance(value, (int, float)) and value in (0, 1):
                    out[key] = bool(value)
                elif not isinstance(value, bool):
                    raise TypeError
            elif isinstance(default, int):
                if isinstance(value, str):
                    out[key] = int(value.strip())
                elif isinstance(value, float) and value.is_integer():
                    out[key] = int(value)
                elif isinstance(value, bool) or not isinstance(value, int):
                    raise TypeError
            elif isinstance(default, float):
                if isinstance(value, (str, int)) and not isinstance(value, bool):
                    out[key] = float(value)
                elif not isinstance(value, float):
                    raise TypeError
            elif isinstance(default, str):
                if isinstance(value, (list, tuple)):
                    out[key] = ",".join(str(v) for v in value)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[key] = str(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            kind = {"bool": "a bool", "int": "an int", "float": "a float"}.get(type(default).__name__, "a string")
            raise ValueError(f"{key} takes {kind} (default {default!r}), got {value!r}") from None
    return out


def channels_last_option(value, device, amp="none"):
    """The `channels_last` option of train / sample / nll: a bool (or its
    command-line spelling), or "auto": on for CPUs, where the convolutions and
    the fused GroupNorm-SiLU are faster channels-last, and on CUDA with bf16
    autocast, where tensor-core convolutions want it (sampling on an H200:
    1.65x the original channels-last against 1.36x in NCHW)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return device.type == "cpu" or (device.type == "cuda" and str(amp).lower() == "bf16")
    return str2bool(value) if isinstance(value, str) else bool(value)
