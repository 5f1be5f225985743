"""Where a guided sampling forward's GPU time goes: LightningDiT-XL/1, 512 rows (256 images with CFG), random bf16
weights, compiled without CUDA graphs (so the profiler sees each kernel), three forwards under torch.profiler.

    python benchmarks/profile_sampling.py bf16 fp8 fp8.unfused_norms

Variants: bf16; fp8 (sample.py --precision=fp8: the norms and the SwiGLU gate emitting the FP8 inputs);
fp8.unfused_norms (each FP8 linear quantising its bf16 input). Prints, per variant, the kernel time of one
forward and the kernels by total time; writes profile_<variant>.txt to $OUT (or the working folder).
"""
import argparse
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fae_fast.config import generator_config  # noqa: E402
from fae_fast.fp8 import use_fp8_sampling  # noqa: E402
from fae_fast.generators import Generator  # noqa: E402
from fae_fast.inference import cast_params  # noqa: E402

VARIANTS = ("bf16", "fp8", "fp8.unfused_norms")
FORWARDS = 3


def profile_variant(variant: str, rows: int = 512) -> str:
    device = torch.device("cuda")
    cfg = generator_config("LightningDiT-XL/1")
    torch.manual_seed(0)
    model = cast_params(Generator(cfg).to(device).eval().requires_grad_(False), torch.bfloat16)
    if variant.startswith("fp8"):
        use_fp8_sampling(model, device)
        for block in model.blocks:
            block.fp8_sampling = variant == "fp8"
    model.compile(dynamic=False)
    x = torch.randn(rows, cfg.grid ** 2, cfg.in_channels, device=device, dtype=torch.bfloat16)
    t, y = torch.rand(rows, device=device), torch.randint(0, cfg.num_classes, (rows,), device=device)
    with torch.no_grad():
        for _ in range(3):  # compilation and autotuning
            model(x, t, y)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(FORWARDS):
                model(x, t, y)
            torch.cuda.synchronize()
    events = prof.key_averages()
    total_ms = sum(e.device_time_total for e in events) / FORWARDS / 1000
    table = events.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
    return f"== {variant}: kernel time per forward {total_ms:.1f} ms ({FORWARDS} forwards below)\n{table}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", choices=VARIANTS)
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "."))
    for variant in args.variants:
        text = profile_variant(variant)
        print(text)
        (out / f"profile_{variant}.txt").write_text(text)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
