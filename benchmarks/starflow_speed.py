"""STARFlow at the ImageNet-256 size (recipe starflow-imagenet256: 16x16x32 FAE latents, width 1152, one deep
block of 24 layers and five shallow blocks of 2) on one GPU, all in one run:

- the training step at batch 128: fae_fast (fused kernels, per-layer torch.compile, bf16 autocast) against
  the same flow on PyTorch ops compiled whole with torch.compile; images/s and MFU (3x the forward FLOPs
  over the bf16 matmul rate measured in the run);
- sampling at batch 256 (no guidance, no denoising step, so that the three do the same work): the KV-cached
  inverse replaying CUDA graphs, the same run eagerly, and the uncached inverse (every prefix run again).

    python -m benchmarks.starflow_speed --out results.json     (from the repository root)

The training step is benchmarks/family_step.py's measurement of the recipe.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/starflow_speed.py` works too

import torch  # noqa: E402

from benchmarks.family_step import measure as train_step_rate, timed_seconds  # noqa: E402
from fae_fast.config import StarFlowConfig, recipe  # noqa: E402
from fae_fast.starflow import StarFlow, flops_per_sample  # noqa: E402
from fae_fast.train.runtime import init_distributed  # noqa: E402

RECIPE = "starflow-imagenet256"


@torch.no_grad()
def sampling_rates(cfg: StarFlowConfig, batch: int) -> dict:
    torch.manual_seed(0)
    model = StarFlow(cfg).cuda().eval()
    for p in model.parameters():  # a flow whose maps depend on the tokens (a fresh one is the identity)
        p.normal_(0, 0.02)
    z = torch.randn(batch, cfg.grid ** 2, cfg.in_channels, device="cuda")
    y = torch.randint(0, cfg.num_classes, (batch,), device="cuda")
    out = {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for name, options in (("cached, CUDA graphs", dict(graphs=True)), ("cached, eager", {}),
                              ("uncached", dict(cached=False))):
            model.inverse(z[:8], y[:8], **options) if name != "uncached" else None  # warm-up of kernels
            s = timed_seconds(lambda: model.inverse(z, y, **options), 1)
            out[name] = {"seconds_per_batch": s, "images_per_s": batch / s}
            print(f"  sampling {name}: {batch / s:.2f} images/s ({s:.2f} s per batch of {batch})", flush=True)
        first = model.inverse(z, y, graphs=True).float()
        second = model.inverse(z, y).float()
    out["graphs_vs_eager_max_abs_diff"] = (first - second).abs().max().item()
    out["cached_over_uncached"] = out["cached, CUDA graphs"]["images_per_s"] / out["uncached"]["images_per_s"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--train_batch", type=int, default=128)
    parser.add_argument("--sample_batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: train,sample")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("starflow_speed.py measures a GPU; no CUDA device is visible")
    init_distributed()  # one process group of one rank (parallelize asks for the world size)
    cfg = recipe(RECIPE).model
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "config": vars(cfg),
               "forward_gflops_per_sample": flops_per_sample(cfg) / 1e9}
    skip = set(filter(None, args.skip.split(",")))
    if "train" not in skip:
        rows = []
        for provider in ("fae_fast", "torch.compile.whole"):
            rows.append(train_step_rate(RECIPE, provider, args.train_batch, args.steps))
            r = rows[-1]
            print(f"  train {provider}: {r['images_per_s']:.1f} images/s, MFU {r['mfu']:.3f}, "
                  f"{r['peak_mem_gib']:.1f} GiB, first step {r['first_step_s']:.1f} s", flush=True)
        results["train"] = rows
        results["train_speedup_vs_whole_compile"] = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    if "sample" not in skip:
        results["sampling"] = sampling_rates(cfg, args.sample_batch)
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
