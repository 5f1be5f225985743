"""One generator training step, measured: images/s, MFU against the bf16 peak measured in the same run,
peak memory. Used by benchmarks/test_bench_train_step.py (one GPU, three providers) and runnable under
torchrun for the multi-GPU scaling figure:

    torchrun --standalone --nproc_per_node=N benchmarks/train_step.py --provider fae_fast --size LightningDiT-XL/1

The step is benchmarks/family_step.py's (the model built through its family, each provider's set-up, the
step closure), of flow matching; its PROVIDERS are this program's (`--help` lists what each runs).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.family_step import PROVIDERS, prepare as prepare_step, profile, providers_help  # noqa: E402
from fae_fast.config import TransportConfig, generator_config  # noqa: E402
from fae_fast.generators import forward_flops_per_sample  # noqa: E402
from fae_fast.train.runtime import conservative_bf16_peak, init_distributed, measured_bf16_peak  # noqa: E402


def prepare(provider: str, size: str, batch: int, device):
    """(config, one-step callable, seconds of the first step) of generator size `size`: family_step.py's step
    of flow matching with the default transport (uniform t), its first (compiling) step run."""
    # no label dropout: the step this benchmark has always timed (the same model; dropout adds four tiny kernels)
    cfg = generator_config(size, class_dropout=0.0)
    prepared = prepare_step(cfg, TransportConfig(), provider, batch, device)
    return cfg, prepared.step, prepared.first_step_s


def measure(provider: str, size: str, batch: int, steps: int, warmup: int, profile_path: str = "") -> dict:
    d = init_distributed()
    cfg, step, first = prepare(provider, size, batch, d.device)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    if profile_path and dist.get_rank() == 0:
        profile(step, profile_path)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    images_per_s = batch / seconds
    flops = 3 * forward_flops_per_sample(cfg)
    peak = measured_bf16_peak(d.device)
    return {
        "provider": provider, "size": size, "gpu": torch.cuda.get_device_name(), "world": d.world,
        "batch_per_gpu": batch, "images_per_s_per_gpu": images_per_s, "step_ms": seconds * 1e3,
        "mfu": images_per_s * flops / peak, "peak_tflops": peak / 1e12,
        "mfu_conservative": images_per_s * flops / conservative_bf16_peak(peak, torch.cuda.get_device_name()),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "first_step_s": first,
        "loss": float(loss.detach()),
    }


def main():
    parser = argparse.ArgumentParser(epilog=providers_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provider", default="fae_fast", choices=PROVIDERS)
    parser.add_argument("--size", default="LightningDiT-XL/1")
    parser.add_argument("--batch", type=int, default=128, help="per GPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="")
    parser.add_argument("--profile", default="", help="write a CUDA kernel time table here")
    args = parser.parse_args()
    result = measure(args.provider, args.size, args.batch, args.steps, args.warmup, args.profile)
    if dist.get_rank() == 0:
        print(json.dumps(result))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (shared hosts)
    main()
