"""Host (CPU) time per call of the fused ops' forward, with every Triton kernel launch replaced by a
no-op: what remains is the launcher's Python (shapes, strides, launch configuration, output allocation)
plus torch.library dispatch. Runs anywhere, GPU or not (tensors on the CPU; nothing is computed).

    python benchmarks/host_overhead.py [--calls 2000]

In a training step this time overlaps the GPU's work unless the host falls behind (small batches,
short kernels); in a single-op GPU timing it is part of what is measured. Compare two checkouts by
running this file from each (PYTHONPATH=CHECKOUT) on the same machine, alternately.
"""
import argparse
import time

import torch

import fae_fast.kernels.gated_residual as gated_residual
import fae_fast.kernels.modulated_norm as modulated_norm
import fae_fast.kernels.reparameterize as reparameterize
import fae_fast.kernels.rope as rope
import fae_fast.kernels.swiglu as swiglu


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_launches() -> None:
    for module in (modulated_norm, gated_residual, swiglu, rope, reparameterize):
        for name in dir(module):
            if name.endswith("_kernel") and hasattr(getattr(module, name), "run"):
                setattr(module, name, _NoLaunch())


def microseconds_per_call(fn, calls: int) -> float:
    for _ in range(50):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    calls = p.parse_args().calls
    stub_launches()
    B, T, D, heads = 8, 256, 1152, 16
    x, y = torch.randn(B, T, D), torch.randn(B, T, D)
    scale, shift, gate, weight = torch.randn(B, D), torch.randn(B, D), torch.randn(B, D), torch.randn(D)
    qkv = torch.randn(B, T, 3, heads, D // heads)
    angles = torch.randn(T, D // heads // 2)
    packed = torch.randn(B * T, 2 * 3072)
    moments = torch.randn(B, T, 64)
    ops = {
        "modulated_norm (layer)": lambda: modulated_norm.modulated_norm(x, scale, shift),
        "modulated_norm (rms + weight)": lambda: modulated_norm.modulated_norm(x, scale, shift, weight, norm="rms"),
        "gated_residual": lambda: gated_residual.gated_residual(x, gate, y),
        "gated_residual_modulated_norm": lambda: gated_residual.gated_residual_modulated_norm(x, gate, y, scale, shift),
        "rope_qkv": lambda: rope.rope_qkv(qkv, angles),
        "swiglu_packed": lambda: swiglu.swiglu_packed(packed),
        "reparameterize": lambda: reparameterize.reparameterize(moments, seed=0),
    }
    print(f"host microseconds per forward call, kernel launches stubbed ({calls} calls each)")
    for name, fn in ops.items():
        print(f"  {name:32s} {microseconds_per_call(fn, calls):8.1f}")


if __name__ == "__main__":
    main()
