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


def plot_toy_projection(path: str | Path, true: tuple[torch.Tensor, torch.Tensor],
                        panels: dict[str, tuple[torch.Tensor, torch.Tensor]], class_means: torch.Tensor) -> None:
    """Generated latents next to true ones, per class, in 2-D: each panel shows `true` (x (N, ...), labels (N,))
    as faint dots and one generated set as crosses, both projected on the top two principal directions of the
    class means (where the classes differ most). One panel per entry of `panels` (e.g. before / after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = class_means.double().flatten(1)
    centre = means.mean(0)
    basis = torch.linalg.svd(means - centre, full_matrices=False).Vh[:2].T  # (d, 2)
    project = lambda x: ((x.double().flatten(1) - centre) @ basis).numpy()  # noqa: E731
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), sharex=True, sharey=True, squeeze=False)
    tx, ty = project(true[0]), true[1].numpy()
    for ax, (title, (x, y)) in zip(axes[0], panels.items()):
        gx, gy = project(x), y.numpy()
        for k in range(len(means)):
            ax.scatter(*tx[ty == k].T, s=6, alpha=0.25, color=colours(k % 10))
            ax.scatter(*gx[gy == k].T, s=14, marker="x", color=colours(k % 10), label=f"class {k}")
        ax.set_title(f"{title}: generated (x) vs true (dots)")
        ax.set_xlabel("principal direction 1 of the class means")
    axes[0][0].set_ylabel("principal direction 2")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
