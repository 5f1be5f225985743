"""The FP8 linear's parts at the LightningDiT-XL/1 block shapes (M = 128 x 256 tokens), each timed alone
(triton's do_bench, CUDA events): the bf16 GEMMs (forward, input gradient, weight gradient), the FP8 scaled
GEMMs that replace the first two (rowwise scales, with and without bias, and tensorwise for comparison), each
quantising pass (x, dy alone and with its column sums, the weight along K and along N, contiguous or
strided), and the whole fp8_linear forward + backward against bf16 F.linear, eager and compiled. One JSON
line per linear, and a file.

Then the SwiGLU gate of the FP8 MLP at the XL shape (M x 2H = 32,768 x 6,144): the FP8-emitting gate kernels
against the pairs they replace (the bf16 gate, then the quantising pass), forward and backward, each with its
byte floor, and the whole MLP (`fp8_swiglu_mlp` against the three FP8 modules in a row, forward + backward).

    python benchmarks/fp8_parts.py --out fp8_parts.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.conftest import _git_revision as revision  # noqa: E402 (the suite's stamp of the commit)
from fae_fast.fp8 import fp8_linear, fp8_swiglu_mlp  # noqa: E402
from fae_fast.kernels.fp8 import quantize_rows, quantize_rows_and_sum  # noqa: E402
from fae_fast.kernels.swiglu import (swiglu_packed, swiglu_packed_bwd_fp8, swiglu_packed_fp8,  # noqa: E402
                                     swiglu_packed_grad)

TOKENS = 128 * 256
LINEARS = [("qkv", 1152, 3456), ("proj", 1152, 1152), ("fc1", 1152, 6144), ("fc2", 3072, 1152)]
"""(name, in_features K, out_features N) of a LightningDiT-XL/1 block (SwiGLU fc1 packs both halves)."""
COPY_BYTES_PER_S = 4.3e12
"""The H200's copy bandwidth (BASELINES.md): the floor of a quantising pass is 3 bytes an element / this."""


def parts(K: int, N: int) -> dict:
    x = torch.randn(TOKENS, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K, device="cuda", requires_grad=True)
    b = torch.randn(N, device="cuda", requires_grad=True)
    dy = torch.randn(TOKENS, N, device="cuda", dtype=torch.bfloat16)
    xd, wd, wb, bb = x.detach(), w.detach(), w.detach().bfloat16(), b.detach().bfloat16()
    (xq, xs), (wq, ws) = quantize_rows(xd), quantize_rows(wd)
    (dyq, dys), (wtq, wts) = quantize_rows(dy), quantize_rows(wd.t().contiguous())
    one = torch.ones((), device="cuda")
    scaled = lambda a, s_a, b_, s_b, **kw: torch._scaled_mm(a, b_.t(), scale_a=s_a, scale_b=s_b.t(),  # noqa: E731
                                                             out_dtype=torch.bfloat16, **kw)

    def bf16_linear():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = F.linear(x, w, b)
        y.backward(dy)

    def fp8():
        fp8_linear(x, w, b).backward(dy)

    timings = {
        "gemm_forward_bf16": lambda: xd @ wb.t(),
        "gemm_input_grad_bf16": lambda: dy @ wb,
        "gemm_weight_grad_bf16": lambda: dy.t() @ xd,
        "gemm_forward_fp8_rowwise_bias": lambda: scaled(xq, xs, wq, ws, bias=bb),
        "gemm_forward_fp8_rowwise": lambda: scaled(xq, xs, wq, ws),
        "gemm_forward_fp8_tensorwise": lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                                                out_dtype=torch.bfloat16),
        "gemm_input_grad_fp8_rowwise": lambda: scaled(dyq, dys, wtq, wts),
        "quantize_x": lambda: quantize_rows(xd),
        "quantize_dy": lambda: quantize_rows(dy),
        "quantize_dy_and_sum": lambda: quantize_rows_and_sum(dy),  # with the bias gradient, as the backward runs it
        "quantize_weight_fp32": lambda: quantize_rows(wd),
        "quantize_weight_t_contiguous": lambda: quantize_rows(wd.t().contiguous()),
        "quantize_weight_t_strided": lambda: quantize_rows(wd.t()),
        "linear_bf16": bf16_linear,
        "linear_fp8": fp8,
        "linear_bf16_compiled": torch.compile(bf16_linear),
        "linear_fp8_compiled": torch.compile(fp8),
    }
    result = {name + "_ms": do_bench(fn, warmup=10, rep=40) for name, fn in timings.items()}
    result["quantize_x_floor_ms"] = TOKENS * K * 3 / COPY_BYTES_PER_S * 1e3
    return result


def gate_parts(D: int = 1152, H: int = 3072, weight_gradient: bool = True) -> dict:
    """The FP8 MLP's gate kernels against the bf16 gate + quantising pass, and the fused MLP against the three
    FP8 modules (forward + backward, `weight_gradient` as run.fp8_weight_gradient)."""
    h = torch.randn(TOKENS, 2 * H, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(TOKENS, H, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(TOKENS, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1, w2 = (torch.randn(*shape, device="cuda", requires_grad=True) for shape in ((2 * H, D), (D, H)))
    b1, b2 = (torch.randn(n, device="cuda", requires_grad=True) for n in (2 * H, D))
    dy = torch.randn(TOKENS, D, device="cuda", dtype=torch.bfloat16)

    def three_modules():
        act = swiglu_packed(fp8_linear(x, w1, b1, weight_gradient))
        fp8_linear(act, w2, b2, weight_gradient).backward(dy)

    timings = {
        "gate_forward_bf16_then_quantize": lambda: quantize_rows(swiglu_packed(h).view(TOKENS, H)),
        "gate_forward_fp8": lambda: swiglu_packed_fp8(h, False),
        "gate_backward_bf16_then_quantize_and_sum": lambda: quantize_rows_and_sum(swiglu_packed_grad(dout, h)),
        "gate_backward_fp8": lambda: swiglu_packed_bwd_fp8(dout, h),
        "mlp_three_modules": three_modules,
        "mlp_fused": lambda: fp8_swiglu_mlp(x, w1, b1, w2, b2, weight_gradient).backward(dy),
    }
    result = {name + "_ms": do_bench(fn, warmup=10, rep=40) for name, fn in timings.items()}
    result["gate_forward_fp8_floor_ms"] = TOKENS * H * (4 + 1) / COPY_BYTES_PER_S * 1e3  # read h, write q
    result["gate_backward_fp8_floor_ms"] = TOKENS * H * (2 + 4 + 2) / COPY_BYTES_PER_S * 1e3  # dout, h; q (2H)
    for way in ("forward", "backward"):  # the fraction of copy bandwidth each gate kernel reaches
        result[f"gate_{way}_fp8_of_floor"] = result[f"gate_{way}_fp8_floor_ms"] / result[f"gate_{way}_fp8_ms"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_parts.py measures a GPU; no CUDA device is visible")
    rows = []

    def add(**row):
        rows.append({"gpu": torch.cuda.get_device_name(), "revision": revision(), **row})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)

    for name, K, N in LINEARS:
        add(linear=name, K=K, N=N, **parts(K, N))
    add(linear="swiglu_gate_and_mlp", **gate_parts())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
