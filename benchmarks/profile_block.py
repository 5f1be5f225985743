"""Per-kernel CUDA time of one XL block's forward + backward (batch 128, bf16 autocast, fp32 weights), for the
providers of benchmarks/test_bench_block.py: where a fused block gains or loses against the compiled one.

    python benchmarks/profile_block.py --size SiT-XL/1 --providers torch.compile fae_fast
"""
import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.conftest import profiled  # noqa: E402
from benchmarks.test_bench_block import block_step, make_block  # noqa: E402

ITERS = 10


def kernel_table(size: str, provider: str) -> list[tuple[float, float, str]]:
    """(ms per iteration, launches per iteration, kernel name), largest first."""
    prof = profiled(block_step(*make_block(size, provider)), warmup=3, iters=ITERS)
    rows = [(e.self_device_time_total / 1e3 / ITERS, e.count / ITERS, e.key) for e in prof.key_averages()
            if e.device_type.name == "CUDA"]
    return sorted(rows, reverse=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="SiT-XL/1")
    parser.add_argument("--providers", nargs="+", default=["torch.compile", "fae_fast"])
    args = parser.parse_args()
    for provider in args.providers:
        rows = kernel_table(args.size, provider)
        print(f"\n{args.size} block, {provider}: {sum(r[0] for r in rows):.3f} ms of kernels per fwd+bwd")
        for ms, launches, name in rows:
            print(f"{ms:8.3f} ms {launches:5.1f}x  {name[:100]}")


if __name__ == "__main__":
    main()
