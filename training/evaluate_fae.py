"""Reconstruction quality of a whole FAE on held-out images: PSNR and rFID (the paper: rFID 0.68 on ImageNet val).

    torchrun --nproc_per_node=8 training/evaluate_fae.py --fae=runs/fae-dinov2-g-pixel-finetune/fae.safetensors \\
        --data.root=/data/imagenet --data.split=val --data.val_labels=LOC_val_solution.csv

Every image's ADM centre crop (fae.image_size px) goes through the frozen encoder, the FAE encoder (its mean:
no sampling), the feature decoder and the pixel decoder. PSNR compares uint8 images (fae_fast.eval.recon);
rFID is the FID between the Inception features (torch-fidelity's TF-compatible network, as for gFID) of the
reconstructions and of the originals. The protocol: all 50,000 ImageNet val images (`--max_images=0`); a
smaller `--max_images=N` takes the first N / world images each rank reads (the sorted list is cut into
batches across ranks) and is reported as rFID-N. Fewer than 2,048
images cannot give a full-rank covariance and are refused. Writes one JSON file and prints one line.
"""
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path


import torch

from fae_fast.cli import UsageError, parse_command_line, run_program
from fae_fast.config import FAEConfig, encoder_config
from fae_fast.data.images import ImageDataConfig, make_image_loader
from fae_fast.eval.fid import InceptionExtractor
from fae_fast.eval.recon import RFID_MIN_IMAGES, ReconstructionScores, to_uint8
from fae_fast.inference import FAE_PARTS, frozen_encoder, load_fae_parts, resolve_fae_config
from fae_fast.train.runtime import finish_distributed, init_distributed, print0


@dataclass(kw_only=True)
class FAEEvalConfig:
    """What evaluate_fae.py reconstructs and scores; `--field=value` / `--data.field=value` set a field."""

    fae: str = ""
    """The whole-FAE file (fae.safetensors of train_fae.py --stage=pixel-finetune: encoder.*, feature_decoder.*,
    pixel_decoder.*)."""
    fae_config: str = ""
    """Its FAEConfig as JSON; default: the fae_config.json train_fae.py wrote beside it."""
    encoder: str = "DINOv2-g/14"
    """The frozen encoder the FAE was trained on (fae_fast.config.ENCODER_SIZES)."""
    encoder_weights: str = ""
    """A local weights file of the encoder; empty: the timm hub (or its cache)."""
    random_encoder: bool = False
    """Draw the encoder's weights at random (tests and speed runs only; never implied)."""
    data: ImageDataConfig = field(default_factory=lambda: ImageDataConfig(split="val", batch_size=64, workers=8))
    """The held-out images (read once each, in sorted order, no flips)."""
    max_images: int = 0
    """Images to score, the first ones in sorted order; 0: all of them (the protocol: 50,000 val images)."""
    inception_weights: str = ""
    """The Inception weights file (default: torch-fidelity's file in $TORCH_HOME/hub/checkpoints/)."""
    out: str = ""
    """Results JSON (default: <fae>.recon.json)."""
    log_every: float = 30.0
    """Seconds between progress lines."""


def parse_args(argv: list[str]) -> FAEEvalConfig:
    cfg = parse_command_line(argv, prog="evaluate_fae.py", summary=__doc__.split("\n")[0], choices={},
                             build=lambda picked: FAEEvalConfig())
    if not cfg.fae or not Path(cfg.fae).is_file():
        raise FileNotFoundError(f"--fae={cfg.fae!r} does not exist; pass the fae.safetensors that train_fae.py "
                                f"--stage=pixel-finetune wrote")
    if not cfg.data.root or not Path(cfg.data.root, cfg.data.split).is_dir():
        raise FileNotFoundError(f"--data.root={cfg.data.root!r} has no {cfg.data.split!r} folder; pass the data root "
                                f"(and --data.split) of the held-out images")
    if 0 < cfg.max_images < RFID_MIN_IMAGES:
        raise UsageError(f"--max_images={cfg.max_images} is under {RFID_MIN_IMAGES}: a 2048-d covariance needs "
                         f"more images; pass at least {RFID_MIN_IMAGES}, or 0 for all")
    return cfg


def build_models(cfg: FAEEvalConfig, fcfg: FAEConfig, device: torch.device):
    """Frozen encoder (bf16 on CUDA) and the FAE's three parts, in eval mode, on `device`."""
    enc_cfg = encoder_config(cfg.encoder, weights_path=cfg.encoder_weights)
    if cfg.random_encoder:
        enc_cfg.pretrained = False
    encoder = frozen_encoder(enc_cfg, fcfg.grid, device)
    parts = load_fae_parts(cfg.fae, fcfg, FAE_PARTS, "pass the --fae_config it was trained with")
    return encoder, [part.to(device) for part in parts]


@torch.no_grad()
def reconstruct(encoder, parts, encoder_pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, s, s) encoder crops in [0, 1] -> reconstructions (B, 3, S, S) in [-1, 1], bf16 autocast on CUDA."""
    fae, feature_decoder, pixel_decoder = parts
    features = encoder(encoder_pixels)  # (B, T, F)
    with torch.autocast(features.device.type, dtype=torch.bfloat16, enabled=features.device.type == "cuda"):
        _, mu, _ = fae.encode(features, sample=False)
        return pixel_decoder(feature_decoder(mu)).float()


def score_rank(loader, encoder, parts, extractor, limit: int, log_every: float) -> ReconstructionScores:
    """This rank's share of the reconstructions scored, at most `limit` images."""
    scores, t0, last = ReconstructionScores(extractor), time.perf_counter(), time.perf_counter()
    for batch in loader:
        keep = min(len(batch["pixels"]), limit - len(scores))
        scores.add(to_uint8(batch["pixels"][:keep], (0.0, 1.0)),
                   to_uint8(reconstruct(encoder, parts, batch["encoder_pixels"][:keep])))
        if time.perf_counter() - last > log_every:
            last = time.perf_counter()
            print0(f"reconstructed {len(scores):,} of {limit:,} images on rank 0 "
                   f"({len(scores) / (last - t0):.1f} images/s)")
        if len(scores) >= limit:
            break
    return scores


def main(argv: list[str], extractor=None) -> dict:
    """Score and report; `extractor` replaces the Inception network (tests pass a random one)."""
    cfg = parse_args(argv)
    fcfg = resolve_fae_config(cfg.fae, cfg.fae_config, fae_size=None)
    d = init_distributed()
    extractor = extractor or InceptionExtractor(d.device, cfg.inception_weights or None)  # fails before any work
    encoder, parts = build_models(cfg, fcfg, d.device)
    data = dataclasses.replace(cfg.data, shuffle=False, flip_twins=False, random_flip=False,
                               image_size=fcfg.image_size, encoder_size=encoder.cfg.image_size)
    loader = make_image_loader(data, rank=d.rank, world=d.world, device=d.device)
    total = min(cfg.max_images or loader.num_images, loader.num_images)
    if total < RFID_MIN_IMAGES:
        raise ValueError(f"{cfg.data.root}/{cfg.data.split} holds {loader.num_images} images, under the "
                         f"{RFID_MIN_IMAGES} rFID needs; point --data.root at a larger held-out set")
    share = total // d.world + (d.rank < total % d.world)  # this rank's first images, the ranks' sum: total
    record = {**score_rank(loader, encoder, parts, extractor, share, cfg.log_every).scores(), "fae": cfg.fae,
              "images": str(Path(cfg.data.root, cfg.data.split)), "extractor": extractor.name}
    if d.is_main:
        out = Path(cfg.out or f"{cfg.fae}.recon.json")
        out.write_text(json.dumps(record, indent=1))
        images = record["num_images"]
        name = "rFID" if images == loader.num_images else f"rFID-{images}"
        print(f"{name} {record['rfid']:.3f} | PSNR {record['psnr']:.2f} dB | {images:,} images of "
              f"{record['images']} ({extractor.name}) | wrote {out}", flush=True)
    finish_distributed()
    return record


if __name__ == "__main__":
    run_program(main)
