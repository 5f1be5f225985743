"""The training step of any recipe's generator, by provider, timed on one GPU; every step benchmark's set-up.

The set-up (prepare): the model of a config built through its family (fae_fast/families.py) the way a
provider says (PROVIDERS), its fused AdamW (capturable for a captured step), and a step closure (forward
under bf16 autocast, backward, clipping, AdamW) on random latents and a random condition of the model's kind
(class labels, or caption embeddings at the model's text length). benchmarks/train_step.py times it for a
generator size, also under torchrun.

This program compares, in one run: fae_fast (fused kernels, per-block torch.compile, bf16 autocast, fused
AdamW, what train_gen.py runs on one GPU), the same model on PyTorch ops compiled whole with torch.compile,
and fae_fast with the whole step captured as one CUDA graph (fae_fast.graph, fae_fast/train/cuda_graph.py).
Reports images/s, MFU (3x the family's forward FLOPs over the bf16 matmul rate measured in the run; and
`mfu_conservative`, over the larger of that and the best rate known for the GPU kind), peak
memory and the first step's time.

    python benchmarks/family_step.py --recipe t2i-1b --out results.jsonl
"""
import argparse
import json
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from fae_fast.config import TextGeneratorConfig, TransportConfig, recipe
from fae_fast.families import GeneratorFamily, family_of
from fae_fast.fp8 import use_fp8
from fae_fast.train.cuda_graph import GraphedStep
from fae_fast.train.parallelize import parallelize
from fae_fast.train.runtime import conservative_bf16_peak, init_distributed, measured_bf16_peak

PROVIDERS = {
    "torch": "plain PyTorch reference of the same model (impl='torch'), bf16 autocast, fused AdamW, eager",
    "torch.compile": "the same, each block under torch.compile",
    "torch.compile.whole": "the same, the whole model under one torch.compile (the strongest plain baseline)",
    "torchao.float8": "the plain reference with torchao's float8 training (tensorwise scales) on the same linears "
                      "fae_fast runs in FP8, whole model compiled (needs torchao)",
    "torchao.float8.blocks": "the same, each block under torch.compile (compiles in a fraction of the whole "
                             "model's time, which outlasted every 200 s call on the H200)",
    "fae_fast": "what train_gen.py runs: fused Triton kernels + per-block torch.compile + fused AdamW, with FSDP2 "
                "(bf16 params, fp32 reduce) on several GPUs and bf16 autocast on one (run.fsdp=auto)",
    "fae_fast.fp8": "the same with run.precision=fp8 (fae_fast/fp8.py)",
    "fae_fast.fsdp": "fae_fast with FSDP2 also on one GPU",
    "fae_fast.graph": "fae_fast with the whole step (forward, backward, clipping, AdamW) captured as one CUDA graph "
                      "and replayed (fae_fast/train/cuda_graph.py): no host time between kernels",
    "fae_fast.fp8.graph": "fae_fast.fp8, captured the same way",
    "fae_fast.fp8w.graph": "fae_fast.fp8.graph with the weight-gradient GEMM in FP8 too (run.fp8_weight_gradient); "
                           "the blocks' norms emit qkv's and fc1's FP8 inputs",
    "fae_fast.fp8w.unfused_norms.graph": "fae_fast.fp8w.graph with the norms writing bf16 that qkv and fc1 quantise "
                                         "in their own pass (the A/B of the norms' FP8 outputs)",
}
COMPARED = ("fae_fast", "fae_fast.graph", "torch.compile.whole")
"""The providers this program measures unless --providers names others."""


def providers_help() -> str:
    """The providers and what each runs, for a program's --help."""
    return "providers:\n" + "\n".join(f"  {name:20} {what}" for name, what in PROVIDERS.items())


def graphed(provider: str) -> bool:
    return provider.endswith(".graph")


def random_condition(model_cfg, batch: int, device) -> torch.Tensor:
    """Caption embeddings (B, L, text_dim) for a text model, class labels (B,) otherwise."""
    if isinstance(model_cfg, TextGeneratorConfig):
        return torch.randn(batch, model_cfg.text_length, model_cfg.text_dim, device=device)
    return torch.randint(0, model_cfg.num_classes, (batch,), device=device)


def timed_seconds(fn, repeats: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def torchao_float8(model: torch.nn.Module) -> None:
    """torchao's float8 training (tensorwise, its default recipe) on the linears fae_fast runs in FP8."""
    from torchao.float8 import convert_to_float8_training

    targets = {id(m) for mod in model.fp8_modules() for m in mod.modules()}
    convert_to_float8_training(model, module_filter_fn=lambda module, fqn: id(module) in targets)


def build(model_cfg, provider: str, batch: int, device):
    """(family, model, optimizer, sharded): the model of `model_cfg` built through its family as `provider`
    runs it, its attention backend chosen for `batch` samples per forward (before compiling), and its AdamW.
    sharded: FSDP2 holds the model (fae_fast.fsdp, or fae_fast* on several GPUs)."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    family, fused = family_of(model_cfg), provider.startswith("fae_fast")
    torch.manual_seed(0)
    with device:
        model = family.build(model_cfg, impl="triton" if fused else "torch")
    family.choose_attention(model_cfg, batch, torch.bfloat16, device)
    if provider.startswith("torchao.float8"):
        torchao_float8(model)
    if provider in ("torch.compile", "torchao.float8.blocks"):
        for block in model.blocks:
            block.compile()
    if provider in ("torch.compile.whole", "torchao.float8"):
        model.compile()
    sharded = provider == "fae_fast.fsdp" or (fused and dist.get_world_size() > 1)
    if provider.startswith("fae_fast.fp8"):
        use_fp8(model, device, weight_gradient=provider.startswith("fae_fast.fp8w"))
        if "unfused_norms" in provider:
            for block in model.blocks:
                block.fp8_norms = False
    if fused:
        parallelize(model, model.blocks, precision="bf16", compile=True, shard=sharded)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graphed(provider))
    return family, model, opt, sharded


def make_step(family: GeneratorFamily, model, opt, x, condition, transport: TransportConfig, *, autocast: bool,
              graph: bool) -> Callable[[], torch.Tensor]:
    """One training step on the latents x (B, T, C) and `condition`, returning the loss; graph: captured as
    one CUDA graph on its first call (after 3 eager steps) and replayed from then on."""

    def step():  # random numbers from the default CUDA generator (a captured graph records its offsets)
        # a captured step keeps no autocast cache: a cached cast would be freed outside the graph
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast, cache_enabled=not graph):
            loss = family.loss(model, x, condition, transport, None).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return GraphedStep(step, opt) if graph else step


@dataclass
class PreparedStep:
    family: GeneratorFamily
    model: torch.nn.Module
    step: Callable[[], torch.Tensor]
    """One training step; returns the loss."""
    first_step_s: float
    """Seconds of the first step (with its compilation; a captured step's first call is one eager step)."""


def prepare(model_cfg, transport: TransportConfig, provider: str, batch: int, device) -> PreparedStep:
    """`provider`'s training step of `model_cfg` at `batch` samples per GPU, on random latents and a random
    condition on the device, with its first step run; peak memory counts from that step."""
    family, model, opt, sharded = build(model_cfg, provider, batch, device)
    x = torch.randn(batch, model_cfg.grid ** 2, model_cfg.in_channels, device=device)
    condition = random_condition(model_cfg, batch, device)
    # FSDP2's MixedPrecisionPolicy gives bf16 compute where the model is sharded
    step = make_step(family, model, opt, x, condition, transport, autocast=not sharded, graph=graphed(provider))
    torch.cuda.reset_peak_memory_stats()
    return PreparedStep(family, model, step, first_step_s=timed_seconds(step, 1))


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


def measure(recipe_name: str, provider: str, batch: int, steps: int, profile_path: str = "") -> dict:
    """One provider's row; with profile_path, also the kernel table of a few steps after the timed ones."""
    cfg = recipe(recipe_name)
    device = init_distributed().device
    prepared = prepare(cfg.model, cfg.transport, provider, batch, device)
    timed_seconds(prepared.step, 3)
    per_step = timed_seconds(prepared.step, steps)
    if profile_path:
        profile(prepared.step, profile_path)
    images_per_s = batch / per_step
    flops = 3 * prepared.family.flops_per_sample(cfg.model)
    peak, gpu = measured_bf16_peak(device), torch.cuda.get_device_name()
    return {"recipe": recipe_name, "family": prepared.family.name, "provider": provider, "gpu": gpu,
            "parameters": sum(p.numel() for p in prepared.model.parameters()),
            "batch": batch, "images_per_s": images_per_s, "step_ms": per_step * 1e3,
            "mfu": images_per_s * flops / peak, "peak_tflops": peak / 1e12,
            "mfu_conservative": images_per_s * flops / conservative_bf16_peak(peak, gpu),
            "first_step_s": prepared.first_step_s, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=providers_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="t2i-1b")
    parser.add_argument("--providers", default=",".join(COMPARED), help="comma-separated, of the providers below")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="", help="append each result as a JSON line here")
    parser.add_argument("--profile", default="",
                        help="write each provider's CUDA kernel table to PROFILE.<provider>.txt")
    args = parser.parse_args()
    providers = args.providers.split(",")
    if unknown := [p for p in providers if p not in PROVIDERS]:
        raise SystemExit(f"--providers: {unknown[0]!r} is not one of {', '.join(PROVIDERS)}")
    if not torch.cuda.is_available():
        raise SystemExit("family_step.py measures a GPU; no CUDA device is visible")
    rows = []
    for provider in providers:
        rows.append(measure(args.recipe, provider, args.batch, args.steps,
                            f"{args.profile}.{provider}.txt" if args.profile else ""))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        torch.cuda.empty_cache()
    baseline = next((r for r in rows if r["provider"] == "torch.compile.whole"), None)
    for r in rows:
        if baseline is not None and r is not baseline:
            print(f"{args.recipe} on {r['gpu']}: {r['provider']} {r['images_per_s']:.1f} images/s (MFU {r['mfu']:.3f}; "
                  f"{r['mfu_conservative']:.3f} against the GPU kind's best peak) "
                  f"= {r['images_per_s'] / baseline['images_per_s']:.2f}x whole-model torch.compile "
                  f"({baseline['images_per_s']:.1f})")


if __name__ == "__main__":
    main()
