"""
Quickstart: train a small Improved DDPM on scikit-learn's 8x8 handwritten
digits (shipped with scikit-learn, nothing downloaded) with the hybrid loss and
learned variances, then draw samples with 100 respaced steps and write them as
a PNG grid, with the held-out NLL in bits/dim.

    python examples/quickstart.py [--steps 1500] [--out quickstart_out]

Uses only the drop-in API (script_util, resample, GaussianDiffusion).
"""

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from iddpm_fast import script_util as su
from iddpm_fast.nn import update_ema
from iddpm_fast.resample import create_named_schedule_sampler


def load_digits_tensor():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("this example needs scikit-learn: pip install 'iddpm_fast[data]'") from exc
    images = load_digits().images  # [1797, 8, 8], grey levels 0..16
    # Map the 17 grey levels onto the 8-bit grid, then to [-1, 1].
    u8 = np.round(images / 16.0 * 255.0)
    return torch.from_numpy(u8 / 127.5 - 1.0).float().unsqueeze(1)


def save_grid(x, path, nrow=8, scale=4):
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()  # [N, 1, H, W]
    n, _, h, w = u8.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = u8[i, 0]
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", default="quickstart_out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    data = load_digits_tensor()
    perm = torch.randperm(len(data))
    train, held_out = data[perm[:-97]], data[perm[-97:]]

    cfg = su.model_and_diffusion_defaults()
    cfg.update(image_size=8, num_channels=32, num_res_blocks=1, attention_resolutions="4", num_heads=1,
               learn_sigma=True, noise_schedule="cosine", diffusion_steps=1000, dropout=0.0)
    model, diffusion = su.create_model_and_diffusion(**cfg, channel_mult="1,2", in_channels=1)
    ema = [p.detach().clone() for p in model.parameters()]
    sampler = create_named_schedule_sampler("uniform", diffusion)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; training {args.steps} steps")

    start = time.time()
    bar = tqdm(range(args.steps), desc="train")
    for step in bar:
        idx = torch.randint(0, len(train), (args.batch_size,))
        x0 = train[idx]
        t, weights = sampler.sample(x0.shape[0], x0.device)
        losses = diffusion.training_losses(model, x0, t)
        loss = (losses["loss"] * weights).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, model.parameters(), rate=0.995)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{losses['mse'].mean().item():.4f}")
    print(f"trained in {time.time() - start:.0f} s")

    with torch.no_grad():
        for p, e in zip(model.parameters(), ema):
            p.copy_(e)
    model.eval()
    _, fast = su.create_model_and_diffusion(**{**cfg, "timestep_respacing": "100"}, channel_mult="1,2", in_channels=1)
    samples = fast.p_sample_loop(model, (64, 1, 8, 8), progress=True)
    path = os.path.join(args.out, "samples.png")
    save_grid(samples, path)
    print(f"wrote {path}")
    _, nll_diffusion = su.create_model_and_diffusion(**{**cfg, "timestep_respacing": "250"},
                                                     channel_mult="1,2", in_channels=1)
    bpd = nll_diffusion.calc_bpd_loop(model, held_out[:32], progress=True)["total_bpd"].mean().item()
    print(f"held-out NLL (250 respaced steps, 32 digits): {bpd:.3f} bits/dim")


if __name__ == "__main__":
    main()
