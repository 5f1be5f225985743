"""Decoding one image into the ADM centre crop: the PIL reference, its twin in torch, and a header sniffer.

The crop is ADM's `center_crop_arr` (guided-diffusion, image_datasets.py), which the FID reference
batches of ImageNet 256 were made with: halve with a BOX filter while the shorter side is at least
twice the target, resize with BICUBIC so that the shorter side becomes the target (the longer side
rounded), then cut the centre. `adm_plan` holds that geometry once; the PIL path executes it with PIL,
the torchvision path with PIL's own resampling coefficients in torch (so a GPU-decoded image is cropped
as PIL would crop it), and the DALI path with DALI's resize on the same regions.
"""
import functools
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


# ----------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdmPlan:
    """Where ADM's centre crop of an (h, w) image comes from."""

    halvings: tuple[tuple[int, int], ...]
    """(h, w) after each BOX halving, in order (empty for images under 2x the target)."""
    resized: tuple[int, int]
    """(h, w) of the BICUBIC resize whose shorter side is the target size."""
    top_left: tuple[int, int]
    """Offset of the size x size crop inside the resized image."""


def adm_plan(h: int, w: int, size: int) -> AdmPlan:
    halvings = []
    while min(h, w) >= 2 * size:
        h, w = h // 2, w // 2
        halvings.append((h, w))
    scale = size / min(h, w)
    rh, rw = round(h * scale), round(w * scale)  # Python's round, as ADM rounds PIL's (w, h)
    return AdmPlan(tuple(halvings), (rh, rw), ((rh - size) // 2, (rw - size) // 2))


# ----------------------------------------------------------------------------------------------------
# PIL reference
# ----------------------------------------------------------------------------------------------------
def open_rgb(data: bytes) -> Image.Image:
    """Decode fully (a truncated file raises here, not later) and convert to RGB: grayscale, CMYK,
    palette and RGBA images become the RGB image PIL's `convert` gives, as ADM's loader does."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def adm_crop_pil(image: Image.Image, size: int) -> np.ndarray:
    """ADM centre crop of an RGB PIL image: (size, size, 3) uint8."""
    plan = adm_plan(image.height, image.width, size)
    for h, w in plan.halvings:
        image = image.resize((w, h), resample=Image.Resampling.BOX)
    image = image.resize(plan.resized[::-1], resample=Image.Resampling.BICUBIC)
    top, left = plan.top_left
    return np.array(image)[top:top + size, left:left + size]


# ----------------------------------------------------------------------------------------------------
# The same crop in torch, with PIL's resampling coefficients (for images decoded on the GPU)
# ----------------------------------------------------------------------------------------------------
def _box(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)  # PIL's bicubic (Keys, a = -0.5)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


_FILTERS = {"box": (_box, 0.5), "bicubic": (_bicubic, 2.0)}


@functools.lru_cache(maxsize=128)
def _weights(n_in: int, n_out: int, kind: str, first: int, count: int, device: torch.device) -> torch.Tensor:
    """Rows first..first+count of PIL's (n_out, n_in) resampling matrix (precompute_coeffs in
    libImaging/Resample.c): output pixel i averages the inputs whose centres lie within the filter's
    support around (i + 0.5) * scale, the support widened by the scale when shrinking (antialias)."""
    fn, support = _FILTERS[kind]
    scale = n_in / n_out
    widen = max(scale, 1.0)
    centre = (np.arange(first, first + count) + 0.5) * scale  # (count,)
    lo = np.maximum((centre - support * widen + 0.5).astype(np.int64), 0)
    hi = np.minimum((centre + support * widen + 0.5).astype(np.int64), n_in)
    x = np.arange(n_in)
    w = fn((x[None] - centre[:, None] + 0.5) / widen)  # (count, n_in)
    w *= (x[None] >= lo[:, None]) & (x[None] < hi[:, None])
    w /= w.sum(1, keepdims=True)
    return torch.from_numpy(w.astype(np.float32)).to(device)


def _resample(x: torch.Tensor, out: tuple[int, int], kind: str, rows: tuple[int, int], cols: tuple[int, int]):
    """PIL's two-pass resize of x (N, 3, H, W) float holding 0..255, keeping output rows
    rows[0]..rows[0]+rows[1] and columns likewise: horizontal pass first, each pass rounded to
    8 bits as PIL rounds it (round half up, clamp)."""
    H, W = x.shape[-2:]
    wx = _weights(W, out[1], kind, *cols, x.device)  # (cols, W)
    x = (x @ wx.T).add_(0.5).floor_().clamp_(0, 255)  # (N, 3, H, cols)
    wy = _weights(H, out[0], kind, *rows, x.device)  # (rows, H)
    return (wy @ x).add_(0.5).floor_().clamp_(0, 255)  # (N, 3, rows, cols)


def adm_crop_torch(x: torch.Tensor, size: int) -> torch.Tensor:
    """ADM centre crop of images of one shape: (N, 3, H, W) uint8 -> (N, 3, size, size) uint8, on
    x's device, equal to `adm_crop_pil` up to float rounding (at most one level where a sum lands on
    a rounding boundary). Only the cropped rows and columns of the last resize are computed."""
    plan = adm_plan(x.shape[-2], x.shape[-1], size)
    y = x.float()
    for h, w in plan.halvings:
        y = _resample(y, (h, w), "box", (0, h), (0, w))
    top, left = plan.top_left
    y = _resample(y, plan.resized, "bicubic", (top, size), (left, size))
    return y.to(torch.uint8)


# ----------------------------------------------------------------------------------------------------
# Header sniffing: which decoder may take a file
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sniff:
    """What the first bytes of a file say, read without decoding it."""

    kind: str
    """'jpeg', 'png' or 'other'."""
    height: int = 0
    width: int = 0
    channels: int = 0
    """Components of a JPEG (1 gray, 3 YCbCr, 4 CMYK/YCCK); 0 when unknown."""
    complete: bool = True
    """False when a JPEG lacks its end-of-image marker (truncated or with trailing bytes)."""

    @property
    def plain_jpeg(self) -> bool:
        """A complete gray or colour JPEG of known size: what the GPU decoders handle like PIL. CMYK,
        PNG-named-JPEG, other formats and files without an end marker go to PIL instead, whose
        decoder converts them correctly and raises on truncation instead of filling in gray."""
        return self.kind == "jpeg" and self.channels in (1, 3) and self.complete and self.height > 0


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def sniff(data) -> Sniff:
    """Kind, size and components of a file from its bytes (bytes or a uint8 numpy array); never raises."""
    data = memoryview(data).cast("B")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return Sniff("png", int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big"))
    if data[:2] != b"\xff\xd8":
        return Sniff("other")
    # In entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so FFD9 near the end
    # can only be the end-of-image marker.
    complete = b"\xff\xd9" in bytes(data[-64:])
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF and pos + 10 <= len(data):
            h, w = int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
            return Sniff("jpeg", h, w, data[pos + 9], complete)
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        pos += 2 + length
    return Sniff("jpeg", complete=complete)
