"""
Frechet Inception Distance between two sets of images.

`python -m iddpm_fast fid REF.npz SAMPLES.npz` (or :func:`fid`) compares the
2048-d pool features of Inception-v3 on both sets, as TensorFlow's FID code
and pytorch-fid do: images in [0, 255] are scaled to [0, 1], resized to
299x299 (bilinear), mapped to [-1, 1], and fed to the FID variant of
Inception-v3 (TensorFlow's 2015-12-05 graph: average pools that ignore the
padding, a max pool in the last block). Grayscale images are repeated to
three channels.

The network's weights are the standard file
``pt_inception-2015-12-05-6726825d.pth`` (published with pytorch-fid). This
library downloads nothing: give its path with ``--inception_weights`` or
``$IDDPM_FAST_INCEPTION_WEIGHTS``, or put it at
``~/.cache/iddpm_fast/pt_inception-2015-12-05-6726825d.pth``. It is loaded
with ``torch.load(weights_only=True)`` and ``strict=True``.

An .npz holds either images (``arr_0``: uint8 [N x H x W x C], what
``sample`` writes) or precomputed statistics (``mu`` [2048], ``sigma``
[2048 x 2048]); :func:`save_statistics` writes the latter.
"""

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dist_util

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SOURCE = "https://github.com/mseitzer/pytorch-fid/releases (fid_weights)"
_ENV = "IDDPM_FAST_INCEPTION_WEIGHTS"


def default_weights_path():
    return os.path.join(os.path.expanduser("~"), ".cache", "iddpm_fast", WEIGHTS_NAME)


class _ConvBN(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, inference statistics) -> ReLU."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x):
    # TensorFlow's average pool leaves the zero padding out of the mean.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):  # 35x35 blocks
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1 = _ConvBN(c_in, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_no_pad(x)),
        ], 1)


class _ReduceB(nn.Module):  # 35x35 -> 17x17
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class _MixedC(nn.Module):  # 17x17 blocks with factorised 7x7 convolutions
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_no_pad(x))], 1)


class _ReduceD(nn.Module):  # 17x17 -> 8x8
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = _ConvBN(c_in, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _MixedE(nn.Module):  # 8x8 blocks; the last one pools with a max (as the TF graph does)
    def __init__(self, c_in, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_no_pad(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as used for FID, up to the 2048-d average pool. Parameter
    names match the standard weights file (``fc`` is kept only so that the
    file loads with ``strict=True``; it is not used)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _MixedA(192, 32)
        self.Mixed_5c = _MixedA(256, 64)
        self.Mixed_5d = _MixedA(288, 64)
        self.Mixed_6a = _ReduceB(288)
        self.Mixed_6b = _MixedC(768, 128)
        self.Mixed_6c = _MixedC(768, 160)
        self.Mixed_6d = _MixedC(768, 160)
        self.Mixed_6e = _MixedC(768, 192)
        self.Mixed_7a = _ReduceD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        """
        :param images: [N x 3 x H x W] floats in [0, 1].
        :return: [N x 2048] pool features (float32).
        """
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_inception(weights_path=None, device="cpu"):
    """The FID network with the standard weights (never downloaded)."""
    path = weights_path or os.environ.get(_ENV) or default_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID needs the Inception-v3 weights file {WEIGHTS_NAME} (TensorFlow's FID network, published with "
            f"pytorch-fid: {WEIGHTS_SOURCE}); no file at {path}. iddpm_fast downloads nothing: put the file at "
            f"{default_weights_path()}, set ${_ENV}, or pass --inception_weights PATH."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not the FID Inception-v3 weights file {WEIGHTS_NAME}:\n{exc}") from None
    return model.to(device).eval()


def _images(arr):
    """uint8 [N x H x W x C] (C = 1 or 3) -> float [N x 3 x H x W] in [0, 1]."""
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N x H x W x C] with C = 1 or 3, got {arr.dtype} {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def features(model, arr, batch_size=50, device="cpu", progress=False):
    """Pool features [N x 2048] (float64) of uint8 images [N x H x W x C]."""
    x = _images(arr)
    out = []
    starts = range(0, len(x), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="inception features")
    for s in starts:
        out.append(model(x[s:s + batch_size].to(device)).double().cpu())
    return torch.cat(out).numpy()


def statistics(feats):
    """Mean [D] and covariance [D x D] (unbiased, as numpy.cov) of features [N x D]."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need at least 2 feature vectors [N x D], got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    The trace of the matrix square root is computed as the sum of the square
    roots of the eigenvalues of sigma1^(1/2) sigma2 sigma1^(1/2) (symmetric
    positive semi-definite, so no complex parts to discard), in float64.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _load_stats(path, model_fn, batch_size, device, progress):
    with np.load(path) as f:
        if "mu" in f and "sigma" in f:
            return f["mu"], f["sigma"]
        if "arr_0" not in f:
            raise ValueError(f"{path} has neither images (arr_0) nor statistics (mu, sigma)")
        arr = f["arr_0"]
    return statistics(features(model_fn(), arr, batch_size, device, progress))


def fid(ref, samples, inception_weights=None, batch_size=50, device="", progress=True):
    """
    FID between two .npz files (images or statistics).

    :return: the distance (float; lower is closer).
    """
    dev = dist_util.checked_device(device)
    cache = {}

    def model_fn():
        if "m" not in cache:
            cache["m"] = load_inception(inception_weights, dev)
        return cache["m"]

    mu1, s1 = _load_stats(ref, model_fn, batch_size, dev, progress)
    mu2, s2 = _load_stats(samples, model_fn, batch_size, dev, progress)
    return frechet_distance(mu1, s1, mu2, s2)


def save_statistics(npz_images, out_path, inception_weights=None, batch_size=50, device=""):
    """Write the features' mean and covariance of an image .npz (reusable as a reference)."""
    dev = dist_util.checked_device(device)
    with np.load(npz_images) as f:
        arr = f["arr_0"]
    mu, sigma = statistics(features(load_inception(inception_weights, dev), arr, batch_size, dev))
    np.savez(out_path, mu=mu, sigma=sigma)
    return out_path
