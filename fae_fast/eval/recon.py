"""Reconstruction metrics of an autoencoder: PSNR and rFID.

PSNR is measured as image codecs and the tokenizer papers do: both images rounded to uint8 in [0, 255]
first (what a saved PNG holds), then 10 log10(255^2 / MSE) per image, averaged over images; identical
images give inf.

rFID is the FID (fae_fast.eval.fid: torch-fidelity's TF-Inception by default, any Extractor pluggable)
between the features of the reconstructions and those of the original images; the paper reports
0.68 on ImageNet 256 val (50k images). It needs at least as many images as feature dimensions
(2048) for a full-rank covariance; fewer give a number that is mostly estimator noise.
"""
from collections.abc import Iterable

import torch

from fae_fast.eval.fid import Extractor, extract_features
from fae_fast.eval.frechet import frechet_distance, moments
from fae_fast.train.runtime import gather_objects

RFID_MIN_IMAGES = 2048
"""Fewest images rFID is computed on: the Inception feature dimension (fewer give a rank-deficient covariance)."""


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """(B, 3, H, W) floats in `value_range` -> uint8 in [0, 255], rounded and clamped as a saved PNG."""
    lo, hi = value_range
    return ((images.float() - lo) * (255.0 / (hi - lo))).round().clamp(0, 255).to(torch.uint8)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two uint8 batches (B, ...) -> (B,) float64; inf where they are equal."""
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise TypeError(f"psnr takes uint8 images, got {a.dtype} and {b.dtype}; convert with to_uint8 first")
    if a.shape != b.shape:
        raise ValueError(f"psnr needs images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(255.0**2 / mse)  # mse = 0 -> inf


def mean_psnr(per_image: torch.Tensor) -> float:
    """Mean PSNR over images, with equal pairs (inf) counted at 100 dB so one of them cannot make it inf."""
    return float(per_image.clamp(max=100.0).mean())


def _hwc(images: torch.Tensor):
    """(B, 3, H, W) -> numpy (B, H, W, 3), the layout fid.extract_features reads."""
    return images.permute(0, 2, 3, 1).cpu().numpy()


def reconstruction_features(original: torch.Tensor, recon: torch.Tensor,
                            extractor: Extractor) -> tuple[torch.Tensor, torch.Tensor]:
    """Extractor features (float64, CPU) of uint8 originals and reconstructions (B, 3, H, W): what rFID
    keeps of a batch, so that 50k images never sit in memory at once."""
    return (extract_features([_hwc(original)], extractor).features,
            extract_features([_hwc(recon)], extractor).features)


def rfid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID of reconstruction features (N, d) against original-image features (N, d)."""
    return frechet_distance(*moments(fake), *moments(real))


def rfid(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], extractor: Extractor | None = None,
         device: torch.device | str = "cpu") -> float:
    """FID between reconstructions and originals. `pairs` yields (original, reconstruction) uint8 batches
    (B, 3, H, W); `extractor` defaults to the TF-Inception of fae_fast.eval.fid (its weights file must be
    in the torch hub cache or downloadable, else a FileNotFoundError says where to put it)."""
    if extractor is None:
        from fae_fast.eval.fid import InceptionExtractor
        extractor = InceptionExtractor(torch.device(device))
    feats = [reconstruction_features(original, recon, extractor) for original, recon in pairs]
    if not feats:
        raise ValueError("rfid got no images; check the loader that feeds it")
    return rfid_from_features(torch.cat([r for r, _ in feats]), torch.cat([f for _, f in feats]))


class ReconstructionScores:
    """PSNR and, with an extractor, rFID of (original, reconstruction) uint8 batches (B, 3, H, W), added a
    batch at a time on each rank and scored over every rank's images (a collective: all ranks call
    `scores`)."""

    def __init__(self, extractor: Extractor | None = None):
        self.extractor, self.values, self.features = extractor, [], []

    def __len__(self) -> int:
        return len(self.values)

    def add(self, original: torch.Tensor, recon: torch.Tensor) -> None:
        self.values += psnr(original, recon).tolist()
        if self.extractor is not None:
            self.features.append(reconstruction_features(original, recon, self.extractor))

    def scores(self) -> dict:
        """{'psnr', 'num_images'} over all ranks, and 'rfid' with an extractor."""
        values = sum(gather_objects(self.values), [])
        out = {"psnr": mean_psnr(torch.tensor(values)), "num_images": len(values)}
        if self.extractor is not None:
            features = sum(gather_objects(self.features), [])
            out["rfid"] = rfid_from_features(torch.cat([r for r, _ in features]), torch.cat([f for _, f in features]))
        return out

