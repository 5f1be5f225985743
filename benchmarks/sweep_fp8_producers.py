"""Launch-configuration sweep of the kernels that emit an FP8 linear's input (the modulated norm, the fused
residual-norm and the SwiGLU gate with FP8 outputs), beside the plain kernels they replace, on one GPU.

    python benchmarks/sweep_fp8_producers.py [--batches 512 128] [--width 1152] [--hidden 3072]

bf16 inputs (B, 256, D), RMSNorm with a weight and per-sample modulation (LightningDiT's blocks); B = 512 is a
guided sampling forward of 256 images, 128 a training step's. Each configuration's outputs are checked bit for
bit against the default launch's before it is timed (triton.testing.do_bench medians). Prints one line per
timing and, per kernel and batch, the best configurations against the default, the plain kernel and a
device-to-device copy of the same bytes; writes every number to $OUT/sweep_fp8_producers.json when OUT is set.
"""
import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fae_fast.kernels.gated_residual import gated_residual_fwd, gated_residual_modulated_norm_fp8_fwd  # noqa: E402
from fae_fast.kernels.modulated_norm import modulated_norm_fp8_fwd, modulated_norm_fwd  # noqa: E402
from fae_fast.kernels.swiglu import _swiglu_fp8_fwd_kernel, swiglu_fp8_fwd, swiglu_fwd  # noqa: E402
from fae_fast.kernels.utils import RowLoop, cdiv, row_block  # noqa: E402

T = 256


def bench(fn) -> float:
    return do_bench(fn, warmup=5, rep=25)


def same(a, b) -> bool:
    return all(torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                           y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y) for x, y in zip(a, b))


def norm_cases(B, D):
    dev, bf = "cuda", torch.bfloat16
    x, y = torch.randn(B, T, D, device=dev, dtype=bf), torch.randn(B, T, D, device=dev, dtype=bf)
    mod = torch.randn(B, 3 * D, device=dev, dtype=bf)
    scale, shift, gate = mod.chunk(3, dim=-1)
    w = torch.randn(D, device=dev, dtype=bf)
    norm = ("norm_fp8", lambda L: modulated_norm_fp8_fwd(x, scale, shift, w, "rms", 1e-6, launch=L)[:2],
            lambda: modulated_norm_fwd(x, scale, shift, w, "rms", 1e-6), 2 * x.numel() + x.numel() * 1)
    pair = ("residual_norm_fp8",
            lambda L: gated_residual_modulated_norm_fp8_fwd(x, gate, y, scale, shift, w, "rms", 1e-6, launch=L)[:3],
            lambda: gated_residual_fwd(x, gate, y, scale, shift, w, "rms", 1e-6), x.numel() * (2 + 2 + 2 + 1))
    return [norm, pair]


def launches():
    for rows, warps, per, stages in itertools.product((1, 2, 4), (1, 2, 4, 8), (1, 4, 16), (1, 2, 3, 4)):
        yield RowLoop(rows=rows, num_warps=warps, rows_per_program=rows * per, num_stages=stages)


def label(L) -> str:
    return "default" if L is None else f"r{L.rows}w{L.num_warps}p{L.rows_per_program}s{L.num_stages}"


def swiglu_variant(h, rows, warps):
    N, H = h.shape[0], h.shape[1] // 2
    q = torch.empty((N, H), device=h.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((N, 1), device=h.device, dtype=torch.float32)

    def run():
        _swiglu_fp8_fwd_kernel[(cdiv(N, rows),)](h, q, s, q, N, H, KEEP_ACT=False, ROWS=rows, BLOCK=row_block(H),
                                                 num_warps=warps)
        return q, s
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[512, 128])
    parser.add_argument("--width", type=int, default=1152)
    parser.add_argument("--hidden", type=int, default=3072)
    args = parser.parse_args()
    results = []
    copy_rate = None

    def record(kernel, B, config, ms, nbytes, note=""):
        results.append(dict(kernel=kernel, batch=B, config=config, ms=ms, gbps=nbytes / ms / 1e6, note=note))
        print(f"{kernel:18s} B={B:4d} {config:14s} {ms:8.4f} ms {nbytes / ms / 1e6:7.0f} GB/s {note}", flush=True)

    for B in args.batches:
        src = torch.empty(B * T * args.width * 3, device="cuda", dtype=torch.uint8)
        dst = torch.empty_like(src)
        copy_rate = 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e6  # GB/s, read + write
        print(f"copy B={B}: {copy_rate:.0f} GB/s")
        for kernel, run, plain, nbytes in norm_cases(B, args.width):
            record(kernel.replace("_fp8", "_plain"), B, "default", bench(plain), nbytes + B * T * args.width)
            want = run(None)
            record(kernel, B, "default", bench(lambda: run(None)), nbytes)
            for L in launches():
                try:
                    got = run(L)
                except Exception as error:  # e.g. out of shared memory or registers
                    print(f"{kernel} {label(L)}: {type(error).__name__}")
                    continue
                record(kernel, B, label(L), bench(lambda: run(L)), nbytes, "" if same(got, want) else "DIFFERS")
        h = torch.randn(B * T, 2 * args.hidden, device="cuda", dtype=torch.bfloat16)
        nbytes = h.numel() * 2 + h.numel() // 2
        record("swiglu_plain", B, "default", bench(lambda: swiglu_fwd(h)), h.numel() * 2 + h.numel())
        want = swiglu_fp8_fwd(h, False)[:2]
        record("swiglu_fp8", B, "default", bench(lambda: swiglu_fp8_fwd(h, False)), nbytes)
        for rows, warps in itertools.product((1, 2, 4, 8), (2, 4, 8, 16, 32)):
            run = swiglu_variant(h, rows, warps)
            got = run()
            record("swiglu_fp8", B, f"r{rows}w{warps}", bench(run), nbytes, "" if same(got, want) else "DIFFERS")
        print(f"\n== best of B={B} (copy {copy_rate:.0f} GB/s)")
        for kernel in sorted({r["kernel"] for r in results if r["batch"] == B}):
            rows = sorted((r for r in results if r["batch"] == B and r["kernel"] == kernel), key=lambda r: r["ms"])
            default = next(r for r in rows if r["config"] == "default")
            print(f"{kernel:18s} default {default['ms']:.4f} ms; best: " + ", ".join(
                f"{r['config']} {r['ms']:.4f} ({default['ms'] / r['ms']:.2f}x, {r['gbps'] / copy_rate:.2f} of copy"
                f"{', ' + r['note'] if r['note'] else ''})" for r in rows[:6]))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "sweep_fp8_producers.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
