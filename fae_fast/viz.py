"""Images people look at: grids of latents (channels shown as colour) or decoded images, as PNG."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def latents_to_images(latents: torch.Tensor, grid: int, *, pixels_per_token: int = 8) -> torch.Tensor:
    """(N, T, C) latents -> (N, 3, H, W) images in [0, 1]: the first three channels as RGB, each
    standardised over the batch, nearest-upscaled so that a token is a visible square."""
    x = latents.float()[..., :3]
    if x.shape[-1] < 3:
        x = torch.cat([x, x[..., :1].expand(*x.shape[:-1], 3 - x.shape[-1])], dim=-1)
    x = (x - x.mean(dim=(0, 1))) / (x.std(dim=(0, 1)) + 1e-6)
    x = (x / 4 + 0.5).clamp(0, 1)  # +-2 std -> [0, 1]
    img = x.transpose(1, 2).reshape(-1, 3, grid, grid)
    return img.repeat_interleave(pixels_per_token, 2).repeat_interleave(pixels_per_token, 3)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, pad: int = 2) -> None:
    """Write (N, 3, H, W) images in [0, 1] as one PNG grid of `nrow` images per row."""
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), dtype=np.uint8) * 255
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = pixels[i]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
