"""Converting model-space images to pictures: uint8 arrays and PNG grids."""

import math
import os

import numpy as np
import torch


def to_uint8(x):
    """
    [N x C x H x W] float images in [-1, 1] -> [N x H x W x C] uint8 numpy,
    rounded exactly as improved-diffusion's image_sample.py does.
    """
    x = ((x.detach().float().cpu() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images_u8, nrow=None, pad=1, pad_value=255):
    """
    Tile [N x H x W x C] uint8 images into one [H' x W' x C] uint8 grid.

    :param nrow: images per row (default: ceil(sqrt(N))).
    """
    n, h, w, c = images_u8.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images_u8[i]
    return grid


def save_grid(x, path, nrow=None, min_size=256, min_tile=0):
    """
    Save a batch of images as one PNG grid, upscaled (nearest neighbour) so
    that small images such as 8x8 digits are visible.

    :param x: [N x C x H x W] float tensor in [-1, 1], or [N x H x W x C] uint8 array.
    :param min_size: upscale until the grid's longer side is at least this (pixels).
    :param min_tile: upscale until each image is at least this tall (pixels).
    :return: the path written.
    """
    from PIL import Image

    u8 = to_uint8(x) if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.uint8)
    grid = make_grid(u8, nrow=nrow)
    scale = max(1, math.ceil(min_size / max(grid.shape[:2])), math.ceil(min_tile / u8.shape[1]))
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    image.save(tmp)
    os.replace(tmp, path)
    return path
