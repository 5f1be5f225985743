"""The training step of any recipe's generator on one GPU: fae_fast (fused kernels, per-block torch.compile,
bf16 autocast, fused AdamW, what train_gen.py runs on one GPU) against the same model on PyTorch ops compiled
whole with torch.compile, in the same run, and fae_fast with the whole step captured as one CUDA graph
(fae_fast.graph, fae_fast/train/cuda_graph.py), on random latents and a random condition of the model's kind
(class labels, or caption embeddings at the model's text length). Reports images/s, MFU (3x the family's
forward FLOPs over the bf16 matmul rate measured in the run), peak memory and the first step's time.

    python benchmarks/family_step.py --recipe t2i-1b --out results.jsonl
"""
import argparse
import json
import time

import torch

from fae_fast.config import TextGeneratorConfig, recipe
from fae_fast.families import family_of
from fae_fast.train.cuda_graph import GraphedStep
from fae_fast.train.parallelize import parallelize
from fae_fast.train.runtime import init_distributed, measured_bf16_peak

PROVIDERS = ("fae_fast", "fae_fast.graph", "torch.compile.whole")


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


def measure(recipe_name: str, provider: str, batch: int, steps: int) -> dict:
    cfg = recipe(recipe_name)
    family = family_of(cfg.model)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = family.build(cfg.model, impl="torch" if provider == "torch.compile.whole" else "auto")
    family.choose_attention(cfg.model, batch, torch.bfloat16, torch.device("cuda"))
    if provider == "torch.compile.whole":
        model.compile()
    else:
        parallelize(model, model.blocks, precision="bf16", compile=True, shard=False)
    graph = provider == "fae_fast.graph"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graph)
    x = torch.randn(batch, cfg.model.grid ** 2, cfg.model.in_channels, device="cuda")
    condition = random_condition(cfg.model, batch, "cuda")

    def step():  # random numbers from the default CUDA generator (a captured graph records its offsets)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graph):
            loss = family.loss(model, x, condition, cfg.transport, None).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if graph:
        step = GraphedStep(step, opt)
    torch.cuda.reset_peak_memory_stats()
    first = timed_seconds(step, 1)
    timed_seconds(step, 3)
    per_step = timed_seconds(step, steps)
    images_per_s = batch / per_step
    flops = 3 * family.flops_per_sample(cfg.model)
    return {"recipe": recipe_name, "family": family.name, "provider": provider, "gpu": torch.cuda.get_device_name(),
            "parameters": sum(p.numel() for p in model.parameters()), "batch": batch,
            "images_per_s": images_per_s, "step_ms": per_step * 1e3,
            "mfu": images_per_s * flops / measured_bf16_peak(torch.device("cuda")), "first_step_s": first,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="t2i-1b")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated, of: {', '.join(PROVIDERS)}")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="", help="append each result as a JSON line here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("family_step.py measures a GPU; no CUDA device is visible")
    init_distributed()
    rows = []
    for provider in args.providers.split(","):
        if provider not in PROVIDERS:
            raise SystemExit(f"--providers: {provider!r} is not one of {', '.join(PROVIDERS)}")
        rows.append(measure(args.recipe, provider, args.batch, args.steps))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        torch.cuda.empty_cache()
    baseline = next((r for r in rows if r["provider"] == "torch.compile.whole"), None)
    for r in rows:
        if baseline is not None and r is not baseline:
            print(f"{args.recipe} on {r['gpu']}: {r['provider']} {r['images_per_s']:.1f} images/s (MFU {r['mfu']:.3f}) "
                  f"= {r['images_per_s'] / baseline['images_per_s']:.2f}x whole-model torch.compile "
                  f"({baseline['images_per_s']:.1f})")


if __name__ == "__main__":
    main()
