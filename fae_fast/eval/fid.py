"""FID, Inception Score and precision/recall of generated images, as ADM's evaluator defines them.

    images uint8 --extractor--> features (N, d) [+ logits (N, K)]
    FID        Frechet distance between the Gaussians (mean, covariance) of sample and reference features
    IS         exp E KL(p(y|x) || p(y)) over 10 splits, from the logits (torch-fidelity's formula)
    P / R      k-NN manifolds (k = 3, Kynkaenniemi et al. 2019) of sample vs reference features

The extractor is pluggable: anything with a `name` that maps uint8 images (B, 3, H, W) to
(features (B, d), logits (B, K) or None). The default is torch-fidelity's 'inception-v3-compat': the
TF Inception of 2015-12-05 behind every published FID (pool features 2048, unbiased logits 1008,
TF-exact resize to 299), which also makes the mu/sigma of ADM's reference batches usable as they are.
Its weights are one file; without it (no network) `InceptionExtractor` raises an error saying where to
put it. Nothing here ever substitutes another network under the name FID.

References: ADM batch .npz (`mu`, `sigma` from the full training set, `arr_0` reference images for
precision/recall), an .npz of images only, or an image folder (center-cropped like ADM); statistics
computed from images are cached to a file keyed by the extractor's name.
"""
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from fae_fast.eval.frechet import frechet_distance, moments
from fae_fast.eval.npz import iter_npz_array, npz_array_shape, npz_keys

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
PR_REFERENCE_SIZE = 10_000
"""Reference images whose features are kept for precision/recall (ADM's reference batches hold 10k)."""
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class Extractor(Protocol):
    name: str
    """Identifies the features in caches and results; 'inception-v3-compat' for real FID numbers."""

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """uint8 (B, 3, H, W) -> features (B, d), logits (B, K) or None."""


def _fidelity():
    try:
        import torch_fidelity
    except ImportError:
        raise ImportError("FID/IS/precision/recall need torch-fidelity; install it with "
                          "`pip install -e .[eval]` (or `pip install torch-fidelity`)") from None
    return torch_fidelity


# ----------------------------------------------------------------------------------------------------
# The Inception extractor and its weights file
# ----------------------------------------------------------------------------------------------------
def inception_weights_path(path: str | None = None) -> Path:
    """The Inception weights file: `path`, or torch-fidelity's download location in the torch hub cache
    ($TORCH_HOME/hub/checkpoints/, by default ~/.cache/torch/hub/checkpoints/), downloaded if missing."""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Inception weights file {path} does not exist; download {INCEPTION_URL} "
                                    f"and pass its path")
        return Path(path)
    target = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
    if target.is_file():
        return target
    previous = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(60)  # a firewall that drops packets must not hang the run
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(target), progress=False)
    except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
        raise FileNotFoundError(
            f"the Inception weights for FID/IS are not at {target} and could not be downloaded "
            f"({type(err).__name__}: {err}); on a machine with network download {INCEPTION_URL} and place it "
            f"at {target} (or pass --inception_weights=PATH)") from None
    finally:
        socket.setdefaulttimeout(previous)
    return target


class InceptionExtractor:
    """torch-fidelity's TF-compatible Inception-v3: pool features (2048) and unbiased logits (1008)."""

    name = INCEPTION_NAME
    reads_adm_stats = True  # ADM's reference mu/sigma are this network's pool features

    def __init__(self, device: torch.device, weights_path: str | None = None):
        _fidelity()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = inception_weights_path(weights_path)
        try:
            net = FeatureExtractorInceptionV3(self.name, ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=str(path))
        except Exception as err:  # noqa: BLE001 - a truncated download, an HTML page, a wrong file
            raise RuntimeError(f"Inception weights file {path} could not be loaded ({type(err).__name__}: {err}); "
                               f"delete it and download {INCEPTION_URL} again") from None
        self.net, self.device = net.to(device), device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features, logits = self.net(images.to(self.device))
        return features, logits


# ----------------------------------------------------------------------------------------------------
# Images in, features out
# ----------------------------------------------------------------------------------------------------
@dataclass
class Features:
    features: Tensor
    """(N, d) float64 pool features."""
    logits: Tensor | None
    """(N, K) float64 classifier logits (for IS), or None when the extractor has none."""


class FeatureProgress:
    """Progress lines of a long feature pass (50k samples, a 1.28M-image reference): images done, images/s
    and ETA, at most one line per `every` seconds, plus the last."""

    def __init__(self, what: str, total: int | None, every: float = 30.0):
        self.what, self.total, self.every = what, total, every
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def add(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            print(self.line(now), flush=True)

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        eta = ""
        if self.total:
            left = max(self.total - self.done, 0) / max(rate, 1e-9)
            eta = f" | ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        return f"{self.what}: {self.done:,}{of} images | {rate:,.0f} img/s{eta}"


def extract_features(batches: Iterable[np.ndarray], extractor: Extractor, *,
                     progress: FeatureProgress | None = None) -> Features:
    """Run the extractor over batches of uint8 images (B, H, W, 3); features kept on CPU in float64.
    `progress`: reported to after each batch."""
    feats, logits = [], []
    for images in batches:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}; "
                             f"save samples as ADM does: ((x + 1) * 127.5).round().clip(0, 255) as uint8")
        f, lg = extractor(torch.tensor(images).permute(0, 3, 1, 2))  # a copy: stream reads are read-only
        feats.append(f.double().cpu())
        if lg is not None:
            logits.append(lg.double().cpu())
        if progress is not None:
            progress.add(len(images))
    if not feats:
        raise ValueError("no images to score; check the samples path")
    return Features(torch.cat(feats), torch.cat(logits) if logits else None)


def center_crop(image, size: int) -> np.ndarray:
    """ADM's preprocessing (guided-diffusion center_crop_arr): halve with a box filter while the short
    side is >= 2*size, resize the short side to `size` (bicubic), crop the centre. PIL in, uint8 out."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


class _Folder(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                return center_crop(im.convert("RGB"), self.size)
        except OSError as err:
            raise OSError(f"image {self.files[i]} cannot be read ({err}); remove or replace it") from None


def image_files(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted; an error if there are none."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}; check the path")
    return files


def iter_folder_images(files: list[Path], batch: int, size: int = 256, workers: int = 8) -> Iterator[np.ndarray]:
    """Batches (B, size, size, 3) uint8 of image files, decoded by `workers` processes."""
    loader = torch.utils.data.DataLoader(_Folder(files, size), batch_size=batch, num_workers=workers,
                                         collate_fn=np.stack)
    yield from loader


def count_images(path: str | Path) -> int:
    """How many images iter_images(path) yields."""
    path = Path(path)
    return len(image_files(path)) if path.is_dir() else int(npz_array_shape(path)[0])


def iter_images(path: str | Path, batch: int, size: int = 256, workers: int = 8) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of an ADM .npz (arr_0) or of an image folder."""
    path = Path(path)
    if path.is_dir():
        yield from iter_folder_images(image_files(path), batch, size, workers)
    elif path.suffix == ".npz":
        yield from iter_npz_array(path, "arr_0", batch)
    else:
        raise FileNotFoundError(f"{path} is neither an image folder nor an .npz file; pass one of those")


# ----------------------------------------------------------------------------------------------------
# Reference statistics
# ----------------------------------------------------------------------------------------------------
@dataclass
class Reference:
    mu: Tensor
    """(d,) mean of the reference features."""
    sigma: Tensor
    """(d, d) covariance of the reference features."""
    features: Tensor | None
    """(M, d) features of up to 10k reference images for precision/recall, or None."""
    source: str
    """Where the statistics came from (for the results file)."""


def _subset(features: Tensor, k: int = PR_REFERENCE_SIZE) -> Tensor:
    """A fixed random subset of k rows (all when there are fewer)."""
    if len(features) <= k:
        return features
    return features[torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:k]]


def _from_images(batches: Iterable[np.ndarray], extractor: Extractor, source: str, total: int) -> Reference:
    feats = extract_features(batches, extractor, progress=FeatureProgress(f"reference {source}", total)).features
    mu, sigma = moments(feats)
    return Reference(mu, sigma, _subset(feats), source)


def _save_cache(ref: Reference, path: Path, extractor: Extractor, count: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, mu=ref.mu.numpy(), sigma=ref.sigma.numpy(), features=ref.features.numpy(),
                 extractor=np.array(extractor.name), count=np.array(count), source=np.array(ref.source))
    os.replace(tmp, path)


def _load_cache(path: Path, extractor: Extractor, count: int) -> Reference | None:
    """The cached reference, or None when it was made by another extractor or from another image count."""
    with np.load(path) as f:
        if str(f["extractor"]) != extractor.name or int(f["count"]) != count:
            print(f"ignoring reference cache {path}: made with {f['extractor']} from {int(f['count'])} images, "
                  f"not {extractor.name} from {count}; recomputing")
            return None
        return Reference(*(torch.from_numpy(f[k]) for k in ("mu", "sigma", "features")), str(f["source"]))


def cached(path: Path, extractor: Extractor, count: int, compute) -> Reference:
    """compute() once per (extractor, image count); later calls read `path`."""
    if path.is_file() and (ref := _load_cache(path, extractor, count)) is not None:
        return ref
    ref = compute()
    try:
        _save_cache(ref, path, extractor, count)
    except OSError as err:
        print(f"could not write the reference cache {path} ({err}); pass --ref_cache=PATH to keep it")
    return ref


def default_cache_path(ref: str | Path, extractor: Extractor) -> Path:
    return Path(f"{str(ref).rstrip('/')}.{extractor.name}.stats.npz")


def files_reference(files: list[Path], extractor: Extractor, *, cache: Path, source: str, batch: int = 200,
                    size: int = 256, workers: int = 8) -> Reference:
    """Reference statistics of image files, each center-cropped to `size` as ADM does, cached at `cache`."""
    return cached(cache, extractor, len(files),
                  lambda: _from_images(iter_folder_images(files, batch, size, workers), extractor, source, len(files)))


def load_reference(ref: str | Path, extractor: Extractor, *, batch: int = 200, cache: str | Path | None = None,
                   size: int = 256, workers: int = 8) -> Reference:
    """Reference statistics from an ADM batch .npz (its mu/sigma when the extractor reads them, features
    of arr_0 for precision/recall) or from an image folder; statistics computed from images are cached."""
    ref = Path(ref)
    cache = Path(cache) if cache else default_cache_path(ref, extractor)
    if ref.is_dir():
        return files_reference(image_files(ref), extractor, cache=cache, source=str(ref), batch=batch, size=size,
                               workers=workers)
    if ref.suffix != ".npz" or not ref.is_file():
        raise FileNotFoundError(f"reference {ref} is neither an image folder nor an .npz file; pass an ADM "
                                f"reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) or a folder")
    keys = npz_keys(ref)
    images = None
    if "arr_0" in keys:
        count = npz_array_shape(ref)[0]
        images = cached(cache, extractor, count,
                        lambda: _from_images(iter_npz_array(ref, "arr_0", batch), extractor, str(ref), count))
    if {"mu", "sigma"} <= set(keys) and getattr(extractor, "reads_adm_stats", False):
        with np.load(ref) as f:
            mu, sigma = torch.from_numpy(f["mu"]).double(), torch.from_numpy(f["sigma"]).double()
        return Reference(mu, sigma, None if images is None else images.features, f"{ref} (mu, sigma)")
    if images is None:
        raise ValueError(f"reference {ref} holds neither images (arr_0) nor, for {extractor.name}, mu and sigma; "
                         f"use ADM's reference batch or an image folder")
    return images


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------
def inception_score(logits: Tensor, splits: int = 10) -> dict[str, float]:
    """torch-fidelity's IS (its shuffle and seed) from logits (N, K)."""
    _fidelity()
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(logits, splits=splits)
    return {"inception_score": out["inception_score_mean"], "inception_score_std": out["inception_score_std"]}


def precision_recall(samples: Tensor, reference: Tensor, k: int = 3) -> dict[str, float]:
    """torch-fidelity's k-NN precision and recall of sample features against reference features."""
    _fidelity()
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    p, r = calculate_precision_recall_part(samples.float().to(device), reference.float().to(device), k)
    return {"precision": p, "recall": r}


def score(samples: Features, ref: Reference, *, isc: bool = True, prc: bool = True) -> dict[str, float]:
    """FID (always), IS (when the extractor gives logits) and precision/recall (when the reference kept
    features) of sample features against a reference."""
    if samples.features.shape[1] != ref.mu.shape[0]:
        raise ValueError(f"reference statistics ({ref.source}) have dimension {ref.mu.shape[0]} but the "
                         f"extractor gives {samples.features.shape[1]}; use a reference for this extractor")
    out = {"fid": frechet_distance(*moments(samples.features), ref.mu, ref.sigma), "num_samples": len(samples.features)}
    if isc and samples.logits is not None:
        out.update(inception_score(samples.logits))
    if prc and ref.features is not None:
        out.update(precision_recall(samples.features, ref.features))
    return out
