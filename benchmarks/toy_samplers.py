"""Samplers side by side on a finished toy run (the demo): Frechet distance to the true distribution, model
evaluations and seconds for each, from the same noise and labels. CPU is fine.

    torchrun --standalone --nproc_per_node=1 training/train_gen.py      # the demo, writes runs/demo
    python benchmarks/toy_samplers.py --run runs/demo [--samples 2048]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fae_fast.config import SamplerConfig
from fae_fast.data.toy import ToyLatents
from fae_fast.eval.frechet import frechet_distance, moments
from fae_fast.generators import Generator
from fae_fast.inference import generator_config_path, load_generator
from fae_fast.sampling import sample_latents

SAMPLERS = {
    "euler 250 (shift 1)": SamplerConfig(method="euler", steps=250),
    "euler 32": SamplerConfig(method="euler", steps=32),
    "heun 32 (the demo's)": SamplerConfig(method="heun", steps=32),
    "dopri5 (rtol 1e-3, atol 1e-6)": SamplerConfig(method="dopri5"),
    "dopri5 (rtol 1e-5, atol 1e-7)": SamplerConfig(method="dopri5", rtol=1e-5, atol=1e-7),
    "euler_maruyama 250": SamplerConfig(method="euler_maruyama", steps=250),
}


class Counting(torch.nn.Module):
    """The generator, counting forward calls (one per velocity evaluation: no guidance here)."""

    def __init__(self, model: Generator):
        super().__init__()
        self.model, self.calls, self.conditioning = model, 0, model.conditioning

    def forward(self, x, t, y):
        self.calls += 1
        return self.model(x, t, y)


def load_run(folder: Path) -> tuple[Generator, dict]:
    """The run's EMA generator in fp32 and the run config it was trained with (its newest checkpoint's)."""
    weights = folder / "ema.safetensors"
    config_path = generator_config_path(weights)
    return load_generator(weights, "cpu", torch.float32, impl="torch"), json.loads(config_path.read_text())


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/demo", help="a finished train_gen.py run folder on the toy source")
    p.add_argument("--samples", type=int, default=2048, help="samples per sampler")
    args = p.parse_args(argv)
    model, saved = load_run(Path(args.run))
    cfg = model.cfg
    toy = ToyLatents(cfg.num_classes, cfg.grid ** 2, cfg.in_channels, seed=saved["data"]["seed"])
    labels = torch.arange(args.samples) % cfg.num_classes
    noise = torch.randn(args.samples, cfg.grid ** 2, cfg.in_channels, generator=torch.Generator().manual_seed(0))
    truth = toy.mixture_moments()
    print(f"{'sampler':32s} {'Frechet':>9s} {'evaluations':>12s} {'seconds':>8s}")
    for name, sampler in SAMPLERS.items():
        counting = Counting(model)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sample_latents(counting, labels, noise, sampler, generator=torch.Generator().manual_seed(1))
        fd = frechet_distance(*moments(x.flatten(1).double()), *truth)
        print(f"{name:32s} {fd:9.3f} {counting.calls:12d} {time.perf_counter() - t0:8.1f}", flush=True)
    x = toy.sample(labels, torch.Generator().manual_seed(2))
    print(f"{'true samples (the floor)':32s} {frechet_distance(*moments(x.flatten(1).double()), *truth):9.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
