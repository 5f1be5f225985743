"""Score a sample set: FID, Inception Score, precision and recall against reference statistics.

    python training/evaluate.py --samples=runs/samples-cfg/samples_50000x256x256x3.npz \\
        --ref=VIRTUAL_imagenet256_labeled.npz
    python training/evaluate.py --samples=runs/samples-cfg/png --ref=/data/imagenet/val   # folders work too

The reference is an ADM reference batch (guided-diffusion's evaluation files: its mu/sigma for FID, its
10k images for precision/recall) or an image folder (center-cropped as ADM does; statistics cached in
<ref>.inception-v3-compat.stats.npz, or --ref_cache). Features come from torch-fidelity's TF-compatible
Inception (`pip install -e .[eval]`); its weights file must be downloadable or already in place, and
without it the program stops with the path to put it at. Prints one line and writes a JSON file.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path


import torch

from fae_fast.cli import parse_command_line, run_program
from fae_fast.eval.fid import (FeatureProgress, InceptionExtractor, count_images, extract_features,
                               iter_images, load_reference, score)
from fae_fast.eval.npz import npz_array_shape


@dataclass(kw_only=True)
class EvalConfig:
    """What evaluate.py scores against what; `--field=value` sets a field."""

    samples: str = ""
    """The sample set: an ADM .npz (arr_0 uint8 N x H x W x 3) or an image folder."""
    ref: str = ""
    """Reference: an ADM reference batch .npz (mu, sigma, arr_0) or an image folder."""
    ref_cache: str = ""
    """Where statistics computed from reference images are cached (default: beside the reference)."""
    out: str = ""
    """Results JSON (default: <samples>.metrics.json)."""
    inception_weights: str = ""
    """The Inception weights file (default: torch-fidelity's file in $TORCH_HOME/hub/checkpoints/)."""
    batch: int = 200
    """Images per extractor forward."""
    image_size: int = 256
    """Side of the center crop applied to images read from folders."""
    workers: int = 8
    """Processes decoding folder images."""
    log_every: float = 30.0
    """Seconds between progress lines of the sample pass."""
    isc: bool = True
    """Compute the Inception Score."""
    prc: bool = True
    """Compute precision and recall (k = 3) against the reference images' features."""


def parse_args(argv: list[str]) -> EvalConfig:
    cfg = parse_command_line(argv, prog="evaluate.py", summary=__doc__.split("\n")[0], choices={},
                             build=lambda picked: EvalConfig())
    for name in ("samples", "ref"):
        if not getattr(cfg, name) or not Path(getattr(cfg, name)).exists():
            raise FileNotFoundError(f"--{name}={getattr(cfg, name)!r} does not exist; pass an .npz file or an "
                                    f"image folder")
    shape = npz_array_shape(cfg.samples) if cfg.samples.endswith(".npz") else (0, 0, 0, 3)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{cfg.samples} holds arr_0 of shape {tuple(shape)}, not images (N, H, W, 3); latents "
                         f"from sample.py without --fae cannot be scored: sample with --fae and --stats")
    return cfg


def results_line(metrics: dict, cfg: EvalConfig, extractor_name: str) -> str:
    parts = [f"FID {metrics['fid']:.3f}"]
    if "inception_score" in metrics:
        parts.append(f"IS {metrics['inception_score']:.2f} +- {metrics['inception_score_std']:.2f}")
    if "precision" in metrics:
        parts.append(f"precision {metrics['precision']:.4f} | recall {metrics['recall']:.4f}")
    parts.append(f"{metrics['num_samples']:,} samples of {cfg.samples} vs {cfg.ref} ({extractor_name})")
    return " | ".join(parts)


def main(argv: list[str], extractor=None) -> dict:
    """Score and report; `extractor` replaces the Inception network (tests pass a random one)."""
    cfg = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = extractor or InceptionExtractor(device, cfg.inception_weights or None)  # fails before any work
    t0 = time.perf_counter()
    ref = load_reference(cfg.ref, extractor, batch=cfg.batch, cache=cfg.ref_cache or None, size=cfg.image_size,
                         workers=cfg.workers)
    samples = extract_features(iter_images(cfg.samples, cfg.batch, cfg.image_size, cfg.workers), extractor,
                               progress=FeatureProgress("samples", count_images(cfg.samples), cfg.log_every))
    metrics = score(samples, ref, isc=cfg.isc, prc=cfg.prc)
    record = {**metrics, "samples": cfg.samples, "reference": ref.source, "extractor": extractor.name,
              "seconds": time.perf_counter() - t0}
    out = Path(cfg.out or f"{cfg.samples.rstrip('/')}.metrics.json")
    out.write_text(json.dumps(record, indent=1))
    print(results_line(metrics, cfg, extractor.name), flush=True)
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    run_program(main)
