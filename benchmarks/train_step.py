"""One generator training step, measured: images/s, MFU against the bf16 peak measured in the same run,
peak memory. Used by benchmarks/test_bench_train_step.py (one GPU, three providers) and runnable under
torchrun for the multi-GPU scaling figure:

    torchrun --standalone --nproc_per_node=N benchmarks/train_step.py --provider fae_fast --size LightningDiT-XL/1

Providers:
  torch                plain PyTorch reference of the same model (impl='torch'), bf16 autocast, fused AdamW, eager
  torch.compile        the same, each block under torch.compile
  torch.compile.whole  the same, the whole model under one torch.compile (the strongest plain baseline)
  torchao.float8       the plain reference with torchao's float8 training (tensorwise scales) on the same
                       linears fae_fast runs in FP8, whole model compiled (needs torchao)
  fae_fast             what train_gen.py runs: fused Triton kernels + per-block torch.compile + fused AdamW, with
                       FSDP2 (bf16 params, fp32 reduce) on several GPUs and bf16 autocast on one (run.fsdp=auto)
  fae_fast.fp8         the same with run.precision=fp8 (fae_fast/fp8.py)
  fae_fast.fsdp        fae_fast with FSDP2 also on one GPU
  fae_fast.graph       fae_fast with the whole step (forward, backward, clipping, AdamW) captured as one CUDA graph
                       and replayed (fae_fast/train/cuda_graph.py): no host time between kernels
  fae_fast.fp8.graph   fae_fast.fp8, captured the same way
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

from fae_fast.config import generator_config  # noqa: E402
from fae_fast.fp8 import use_fp8  # noqa: E402
from fae_fast.generators import Generator, choose_attention_backend, forward_flops_per_sample  # noqa: E402
from fae_fast.transport import flow_matching_loss, sample_t  # noqa: E402
from fae_fast.train.cuda_graph import GraphedStep  # noqa: E402
from fae_fast.train.parallelize import parallelize  # noqa: E402
from fae_fast.train.runtime import init_distributed, measured_bf16_peak  # noqa: E402


PROVIDERS = ("torch", "torch.compile", "torch.compile.whole", "torchao.float8", "fae_fast", "fae_fast.fp8",
             "fae_fast.fsdp", "fae_fast.graph", "fae_fast.fp8.graph")


def torchao_float8(model: Generator) -> None:
    """torchao's float8 training (tensorwise, its default recipe) on the linears fae_fast runs in FP8."""
    from torchao.float8 import convert_to_float8_training

    targets = {id(m) for mod in model.fp8_modules() for m in mod.modules()}
    convert_to_float8_training(model, module_filter_fn=lambda module, fqn: id(module) in targets)


def build(provider: str, size: str, device):
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    cfg = generator_config(size)
    torch.manual_seed(0)
    with device:
        model = Generator(cfg, impl="triton" if provider.startswith("fae_fast") else "torch")
    if provider == "torch.compile":
        for block in model.blocks:
            block.compile()
    if provider == "torchao.float8":
        torchao_float8(model)
    if provider in ("torch.compile.whole", "torchao.float8"):
        model.compile()
    sharded = provider == "fae_fast.fsdp" or (provider.startswith("fae_fast") and dist.get_world_size() > 1)
    if provider.startswith("fae_fast.fp8"):
        use_fp8(model, device)
    if provider.startswith("fae_fast"):
        parallelize(model, model.blocks, precision="bf16", compile=True, shard=sharded)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graphed(provider))
    return cfg, model, opt, sharded


def graphed(provider: str) -> bool:
    return provider.endswith(".graph")


def make_step(sharded: bool, model, opt, x1, y, graph: bool = False):
    autocast = not sharded  # FSDP2's MixedPrecisionPolicy gives bf16 compute there

    def step():
        t = sample_t(x1.shape[0], device=x1.device)
        # a captured step keeps no autocast cache: a cached cast would be freed outside the graph
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast, cache_enabled=not graph):
            loss = flow_matching_loss(lambda xt, tt: model(xt, tt, y), x1, t).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def profile(step, path: str, steps: int = 3) -> None:
    """Write the CUDA kernels of a few steps, by total time, to `path` (a text table)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    averages = prof.key_averages()
    kernel_ms = sum(e.self_device_time_total for e in averages if e.device_type.name == "CUDA") / 1e3 / steps
    with open(path, "w") as f:
        # kernel time below wall time: the GPU waits (on the host, or between launches)
        f.write(f"per step (under the profiler): wall {wall_ms:.1f} ms, CUDA kernels {kernel_ms:.1f} ms\n")
        kernels = sorted((e for e in averages if e.device_type.name == "CUDA"), key=lambda e: -e.self_device_time_total)
        for e in kernels:  # every kernel: ms and launches per step
            f.write(f"{e.self_device_time_total / 1e3 / steps:8.3f} ms {e.count / steps:6.1f}x  {e.key[:110]}\n")
        f.write(averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90))
        f.write(averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90))


def prepare(provider: str, size: str, batch: int, device):
    """(config, one-step callable, seconds of the first step): the model built, the attention backend
    chosen for the shape, random latents and labels on the device, and the first (compiling) step run."""
    cfg, model, opt, sharded = build(provider, size, device)
    T = cfg.grid * cfg.grid
    choose_attention_backend(cfg, batch, torch.bfloat16, device)
    x1 = torch.randn(batch, T, cfg.in_channels, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    step = make_step(sharded, model, opt, x1, y, graphed(provider))
    if graphed(provider):  # the first call warms up (3 eager steps), captures and replays
        step = GraphedStep(step, opt)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return cfg, step, time.perf_counter() - t0


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
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "first_step_s": first,
        "loss": float(loss.detach()),
    }


def main():
    parser = argparse.ArgumentParser()
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
