"""
iddpm_fast: Improved Denoising Diffusion Probabilistic Models (Nichol &
Dhariwal, ICLR 2021), a drop-in replacement for openai/improved-diffusion.

Replace ``improved_diffusion`` by ``iddpm_fast`` in your imports: the modules
(``gaussian_diffusion``, ``respace``, ``resample``, ``losses``, ``nn``,
``unet``, ``script_util``, ``fp16_util``) keep their names, signatures and
numbers. The math runs through :mod:`iddpm_fast.ops`, which picks a fused
kernel when one is available and the pure-PyTorch spec
(:mod:`iddpm_fast.reference`) otherwise.

Importing the package changes no process-wide setting.
"""

__version__ = "0.1.0"


def train(**config):
    """
    Train an Improved DDPM; see :func:`iddpm_fast.training.train` (keys:
    improved-diffusion's image_train.py flags plus this library's). With no
    `data_dir`, trains the built-in digits preset.
    """
    from .training import train as _train

    return _train(**config)


def sample(**config):
    """Draw samples from a checkpoint; see :func:`iddpm_fast.sampling.sample`."""
    from .sampling import sample as _sample

    return _sample(**config)


def nll(**config):
    """Bits/dim of a checkpoint on a dataset; see :func:`iddpm_fast.sampling.nll`."""
    from .sampling import nll as _nll

    return _nll(**config)
