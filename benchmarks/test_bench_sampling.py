"""Sampling throughput of LightningDiT-XL/1 with classifier-free guidance, as training/sample.py runs it:
batch 256 per GPU, the conditional and unconditional passes in one forward of 512 rows, bf16 weights,
random weights (speed does not depend on them), a few Euler steps of the sampler timed.

Providers: eager, compiled, compiled with CUDA graphs, and that with the blocks' GEMMs in FP8 (sample.py
--precision=fp8: the norms and the SwiGLU gate emitting the FP8 inputs), and, for the A/B, with each FP8
linear quantising its bf16 input itself (fp8.unfused_norms). Reports images/s at 250 steps, MFU (FLOPs of the 2B-row forwards over the bf16 peak
measured in the same run) and the estimated hours of the paper's 50k x 250-step protocol on one GPU, every step guided (an
upper bound: the paper-cfg preset guides the low-noise 70% of the steps; the other 30% run B rows).

    pytest benchmarks/test_bench_sampling.py -s --benchmark-json=sampling.json
"""
import pytest
import torch

from fae_fast.config import SamplerConfig, generator_config
from fae_fast.eval.protocol import index_labels, index_normal
from fae_fast.generators import Generator, forward_flops_per_sample
from fae_fast.sampling import sample_latents
from fae_fast.fp8 import use_fp8_sampling
from fae_fast.inference import cast_params
from training.sample import SampleConfig, prepare_for_speed

BATCH, STEPS, PROTOCOL_IMAGES, PROTOCOL_STEPS = 256, 5, 50_000, 250


@pytest.mark.parametrize("provider", ["eager", "torch.compile", "torch.compile+cuda_graphs",
                                      "torch.compile+cuda_graphs+fp8", "torch.compile+cuda_graphs+fp8.unfused_norms"])
def test_sampling_xl_with_cfg(benchmark, report, provider):
    device = torch.device("cuda")
    cfg = generator_config("LightningDiT-XL/1")
    torch.manual_seed(0)
    model = cast_params(Generator(cfg).to(device).eval().requires_grad_(False), torch.bfloat16)
    if "fp8" in provider:  # sample.py --precision=fp8: the block GEMMs in FP8
        use_fp8_sampling(model, device)
        for block in model.blocks:  # unfused_norms: each FP8 linear quantises its bf16 input (the A/B)
            block.fp8_sampling = not provider.endswith("unfused_norms")
    run_cfg = SampleConfig(batch=BATCH, compile=provider != "eager", cuda_graphs="cuda_graphs" in provider,
                           sampler=SamplerConfig(method="euler", steps=STEPS, time_shift=0.4, cfg=[(0.0, 1.0, 1.5)]))
    prepare_for_speed(model, run_cfg, device, torch.bfloat16)
    indices = torch.arange(BATCH, device=device)
    noise = index_normal(0, indices, (cfg.grid ** 2, cfg.in_channels))
    labels = index_labels(0, indices, cfg.num_classes)

    def run():
        sample_latents(model, labels, noise, run_cfg.sampler)
        torch.cuda.synchronize()

    run()  # compilation and autotuning happen here, outside the timing
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    info = report(flops=STEPS * 2 * BATCH * forward_flops_per_sample(cfg), provider=provider, batch=BATCH)
    seconds_per_step = benchmark.stats.stats.median / STEPS
    images_per_s = BATCH / (seconds_per_step * PROTOCOL_STEPS)
    hours = PROTOCOL_IMAGES / images_per_s / 3600
    benchmark.extra_info.update(images_per_s_at_250_steps=images_per_s, hours_50k_one_gpu=hours,
                                peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
    print(f"\n{provider}: {images_per_s:.2f} img/s at {PROTOCOL_STEPS} guided steps, MFU "
          f"{info['fraction_of_bf16_peak']:.2f} ({info['TFLOP/s']:.0f} TFLOP/s on {info['gpu']}); "
          f"{PROTOCOL_IMAGES:,} samples x {PROTOCOL_STEPS} steps: {hours:.1f} h on one GPU")
