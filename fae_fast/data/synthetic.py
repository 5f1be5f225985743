"""Synthetic ImageNet-layout folders for tests and benchmarks: photo-like JPEGs plus the odd files real
ImageNet holds (grayscale and CMYK JPEGs, a PNG named .JPEG) and a truncated one.

Images are smooth random waves plus Gaussian grain; at 500x375 and quality 90, noise=24 gives files of
about 110 kB, the size of an average ImageNet train JPEG.
"""
import io
import os

import numpy as np
from PIL import Image

SHAPES = ((375, 500), (500, 375), (333, 500), (375, 500))  # (h, w) mix of ImageNet's common sizes


def photo(h: int, w: int, rng: np.random.Generator, noise: float = 8.0) -> np.ndarray:
    """(h, w, 3) uint8: six random plane waves per channel mix plus grain of std `noise`."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    image = np.full((h, w, 3), 128.0)
    for _ in range(6):
        fy, fx = rng.uniform(1, 12, 2)
        amp = rng.uniform(20, 60, 3)
        image += amp * np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))[..., None]
    image += rng.normal(0, noise, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_imagenet_like(root: str, *, classes: int = 2, per_class: int = 4, split: str = "train",
                        noise: float = 8.0, quality: int = 90, seed: int = 0) -> list[str]:
    """Write root/split/nXXXXXXXX/*.JPEG with ImageNet-shaped photos; returns the paths written."""
    rng = np.random.default_rng(seed)
    paths = []
    for c in range(classes):
        wnid = f"n{c:08d}"
        os.makedirs(os.path.join(root, split, wnid), exist_ok=True)
        for i in range(per_class):
            h, w = SHAPES[(c * per_class + i) % len(SHAPES)]
            path = os.path.join(root, split, wnid, f"{wnid}_{i}.JPEG")
            with open(path, "wb") as f:
                f.write(jpeg_bytes(Image.fromarray(photo(h, w, rng, noise)), quality))
            paths.append(path)
    return paths


def write_odd_files(folder: str, *, seed: int = 1) -> dict[str, str]:
    """Into `folder`: a grayscale JPEG, a CMYK JPEG, a PNG named .JPEG, a large (one ADM halving) and a
    small (upscaled) JPEG, and a JPEG cut in half. Returns {kind: path}."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    rgb = Image.fromarray(photo(375, 500, rng))
    png = io.BytesIO()
    Image.fromarray(photo(500, 375, rng)).save(png, "PNG")
    whole = jpeg_bytes(Image.fromarray(photo(375, 500, rng)))
    files = {
        "gray": jpeg_bytes(rgb.convert("L")),
        "cmyk": jpeg_bytes(Image.fromarray(photo(400, 300, rng)).convert("CMYK")),
        "png": png.getvalue(),
        "large": jpeg_bytes(Image.fromarray(photo(800, 1100, rng))),
        "small": jpeg_bytes(Image.fromarray(photo(120, 180, rng))),
        "truncated": whole[:len(whole) // 2],
    }
    paths = {}
    for kind, data in files.items():
        paths[kind] = os.path.join(folder, f"odd_{kind}.JPEG")
        with open(paths[kind], "wb") as f:
            f.write(data)
    return paths
