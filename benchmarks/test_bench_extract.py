"""Latent extraction at the full DINOv2-g/14 shape (timm vit_giant_patch14_reg4_dinov2, random weights:
speed only), img 224, bf16, 256 rows per forward:

- encoder forward (eager, torch.compile): ms, TFLOP/s and the fraction of the bf16 peak measured in the
  same run (target >= 0.60 for the compiled forward);
- the extraction step of training/extract_latents.py (encoder + FAE-DINOv2-g encoder mean) on 128
  images and their flipped twins: images/s, MFU, and the FAE encoder's share of the step;
- end to end from JPEG files (decode, ADM crop, resize, both models, float16 shards on disk): images/s.

FLOPs per row (one image or one twin): encoder 2 x params x tokens + attention 4 x T^2 x D x depth with
T = 256 patches + 5 prefix tokens; the FAE encoder likewise with its params, 256 tokens and one layer of
width heads x head_dim.
"""
import argparse
import time

import pytest
import torch

from benchmarks.conftest import _time_ms
from fae_fast.data.synthetic import write_imagenet_like
from training import extract_latents as ex
from fae_fast.train.runtime import init_distributed

ROWS = 256  # rows per forward: 128 images + their twins (extract_latents --batch 128), or 256 images
ENCODER = "DINOv2-g/14"


def encoder_flops_per_row(encoder) -> float:
    m = encoder.model
    T = m.patch_embed.num_patches + m.num_prefix_tokens
    params = sum(p.numel() for p in m.parameters())
    return 2 * params * T + 4 * T * T * m.embed_dim * len(m.blocks)


def fae_flops_per_row(fae) -> float:
    cfg = fae.cfg
    T = cfg.grid ** 2
    return 2 * sum(p.numel() for p in fae.parameters()) * T + 4 * T * T * cfg.enc_heads * cfg.enc_head_dim


def _args(extra: list[str]) -> list[str]:
    return ["--images", "unused", "--out", "unused", "--encoder", ENCODER, "--random-weights", *extra]


@pytest.fixture(scope="module")
def models():
    """(compiled encoder, compiled FAE, eager encoder) on the GPU, built as extract_latents builds them."""
    d = init_distributed()
    args, cfgs = ex.parse_args(_args(["--batch", str(ROWS // 2)]))
    encoder, fae = ex.build_models(args, cfgs, d.device)
    eager_args = argparse.Namespace(**{**vars(args), "compile": False})
    eager, _ = ex.build_models(eager_args, ex.parse_args(_args([]))[1], d.device)
    return encoder, fae, eager


def _pixels() -> torch.Tensor:
    return torch.rand(ROWS, 3, 224, 224, device="cuda")  # what the loader hands over: float in [0, 1]


@pytest.mark.parametrize("provider", ["eager", "torch.compile"])
def test_encoder_forward(benchmark, report, models, provider):
    compiled, _, eager = models
    encoder, x = (compiled if provider == "torch.compile" else eager), _pixels()

    def run():
        with torch.no_grad():
            encoder(x)
        torch.cuda.synchronize()

    for _ in range(3):  # compile and autotune outside the timing
        run()
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    info = report(flops=ROWS * encoder_flops_per_row(encoder), provider=provider, rows=ROWS,
                  target_fraction_of_bf16_peak=0.60)
    benchmark.extra_info["rows_per_s"] = ROWS / benchmark.stats.stats.median
    print(f"\nencoder forward ({provider}): {info['ms']:.1f} ms for {ROWS} rows, {info['TFLOP/s']:.0f} TFLOP/s, "
          f"MFU {info['fraction_of_bf16_peak']:.2f} (target 0.60) on {info['gpu']}")


def test_extraction_step(benchmark, report, models):
    encoder, fae, _ = models
    x = _pixels()

    def run():
        ex.latent_means(encoder, fae, x)
        torch.cuda.synchronize()

    for _ in range(3):
        run()
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    features = encoder(x)

    def fae_only():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            fae.encode(features, sample=False)

    fae_ms = _time_ms(fae_only)
    step_s = benchmark.stats.stats.median
    flops = ROWS * (encoder_flops_per_row(encoder) + fae_flops_per_row(fae))
    info = report(flops=flops, rows=ROWS, images_per_s=ROWS / 2 / step_s, fae_ms=fae_ms,
                  fae_share=fae_ms * 1e-3 / step_s)
    print(f"\nextraction step: {ROWS // 2} images + twins in {info['ms']:.1f} ms = {ROWS / 2 / step_s:,.0f} images/s, "
          f"MFU {info['fraction_of_bf16_peak']:.2f}; FAE encoder {fae_ms:.2f} ms = "
          f"{100 * info['fae_share']:.1f}% of the step")


def test_extraction_end_to_end(benchmark, report, models, tmp_path_factory):
    """The program's loop on 2560 ImageNet-sized JPEGs (10 batches of 128 images + twins), compiled models
    reused; each round writes a fresh cache."""
    encoder, fae, _ = models
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet_like(str(root), classes=10, per_class=256, noise=24.0)
    rounds = iter(range(100))
    argv = _args(["--batch", str(ROWS // 2), "--shard-size", str(ROWS * 10), "--workers", "16"])
    argv[1] = str(root / "train")

    def run():
        out = root / f"cache_{next(rounds)}"
        assert ex.main([*argv[:2], "--out", str(out), *argv[4:]], built=(encoder, fae))

    start = time.perf_counter()
    run()  # the first run pays for the decoders' set-up
    first = time.perf_counter() - start
    benchmark.pedantic(run, rounds=3, warmup_rounds=0)
    seconds = benchmark.stats.stats.median
    info = report(flops=2560 * 2 * (encoder_flops_per_row(encoder) + fae_flops_per_row(fae)),
                  images_per_s=2560 / seconds, first_run_s=first)
    print(f"\nextraction end to end: {2560 / seconds:,.0f} images/s (with twins, shards written), "
          f"MFU {info['fraction_of_bf16_peak']:.2f}")
