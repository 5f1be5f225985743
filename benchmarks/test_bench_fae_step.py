"""One FAE feature-stage (Ia) training step at full size on one GPU: DINOv2-g/14 shape with random weights
(frozen, bf16, no_grad, per-block compiled) -> FAE encoder -> reparameterise -> feature decoder, fp32 master
weights under FSDP2 bf16 mixed precision, fused AdamW, EMA, on generated images at batch 128: the very
step train_fae.py runs (its FeatureStage), so the numbers are those of the program.

Reports images/s, MFU (frozen encoder forward + 3x FAE forward, against the bf16 matmul peak measured in
this run), peak memory, and where the time goes: the frozen encoder's forward, and the FAE encoder's
forward + backward (its attention layer + projection + reparameterisation/KL) as a share of the step,
with impl='torch' (PyTorch reference ops) and impl='triton' (the fused reparameterisation kernel; the
encoder's other ops are the same either way, the decoder uses the fused kernels too).
"""
import time

import pytest
import torch

from benchmarks.conftest import _time_ms
from fae_fast.fae import FAEEncoder, reparameterize
from fae_fast.fae_config import fae_recipe
from fae_fast.train.runtime import EMA, init_distributed
from fae_fast.data.fae_images import make_image_source
from training.train_fae import FeatureStage, encode_features, optimizer_step

BATCH = 128


def fae_encoder_ms(cfg, impl: str, x: torch.Tensor) -> float:
    """FAE encoder forward + backward (through z and the KL) alone, bf16 as under FSDP mixed precision,
    its layer compiled as in training."""
    torch.manual_seed(0)
    with x.device:
        enc = FAEEncoder(cfg.fae, impl=impl).to(torch.bfloat16)
    enc.layer.compile()
    x = x.to(torch.bfloat16)

    def fwd_bwd():
        z, _, kl = reparameterize(enc(x), seed=1, impl=enc.ops.impl)
        (z.float().square().mean() + kl.mean()).backward()

    return _time_ms(fwd_bwd, warmup=3, iters=10)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_feature_stage_step(benchmark, report, impl):
    d = init_distributed()
    torch.cuda.empty_cache()
    cfg = fae_recipe("dinov2-g-benchmark", "feature")
    cfg.data.global_batch, cfg.run.impl = BATCH * d.world, impl
    stage = FeatureStage(cfg, d)
    ema = EMA(stage.model, cfg.optim.ema_decay)
    source = make_image_source(cfg, d)
    pixels, encoder_pixels = source.batch(0)  # one batch, reused: the step, not the image synthesis

    def step():
        stage.step(0, pixels, encoder_pixels)
        optimizer_step(stage, ema, cfg)

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_step_s = time.perf_counter() - start

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10, warmup_rounds=3)
    step_ms = benchmark.stats.stats.median * 1e3
    frozen_ms = _time_ms(lambda: encode_features(stage.encoder, encoder_pixels), warmup=2, iters=10)
    x = encode_features(stage.encoder, encoder_pixels)
    enc_ms = fae_encoder_ms(cfg, impl, x)
    report(flops=BATCH * stage.flops, impl=impl, batch=BATCH)
    benchmark.extra_info.update(
        images_per_s=BATCH / benchmark.stats.stats.median, peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
        first_step_s=first_step_s, frozen_encoder_ms=frozen_ms, frozen_encoder_share=frozen_ms / step_ms,
        fae_encoder_fwd_bwd_ms=enc_ms, fae_encoder_share=enc_ms / step_ms)
