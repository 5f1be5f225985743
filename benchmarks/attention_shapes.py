"""Attention at the generator's shape (B=128, 16 heads, 256 tokens, head dim 72, bf16), forward + backward,
per SDPA backend: with the head dim as it is and zero-padded to 80 / 96 / 128 (the same attention: zero
columns add nothing to q.k, and v's zero columns give zero outputs that are cut off), and with q, k, v in
the (B, H, T, Dh) layout or as (B, T, H, Dh) memory seen through a transpose (then the output can come
back in the token-major layout the projection reads, with no copy).

    python benchmarks/attention_shapes.py

Seen on an H200 (2026-12-01), ms forward + backward, q, k, v (B, H, T, Dh) / token-major memory:
cuDNN 1.123 / 1.163 at Dh 72, 0.987 / 1.092 padded to 80, 1.163 / 1.129 at 96, 1.352 / 1.393 at 128;
flash 1.554 / 1.373 at 72 (1.309 token-major at 96); memory-efficient 2.337 / 1.981 at 72. So cuDNN stays the
choice, and padding to 80 would save 12% of its time, before the cost of writing and reading wider q, k, v.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.conftest import _time_ms  # noqa: E402 (the suite's CUDA-event median timer)

B, H, T, DH = 128, 16, 256, 72
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def case(backend, padded: int, token_major: bool):
    shape = (B, T, H, padded) if token_major else (B, H, T, padded)
    qkv = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    for t in qkv:
        t[..., DH:] = 0
    qkv = [t.transpose(1, 2) if token_major else t for t in qkv]
    leaves = [t.detach().requires_grad_() for t in qkv]
    dout = torch.randn_like(qkv[0])

    def step():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(*leaves)
        out.backward(dout)
        return out

    try:
        out = step()
    except RuntimeError as err:
        return f"n/a ({str(err).splitlines()[0][:40]})", ""
    layout = "token-major" if out.transpose(1, 2).is_contiguous() else "head-major"
    return f"{_time_ms(step, warmup=3):.3f}", layout


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_shapes.py times the SDPA backends' CUDA kernels; this machine has no CUDA GPU")
    flops = 3.5 * 4 * B * H * T * T * DH  # fwd 4 B H T^2 Dh; bwd 2.5x that
    print(f"GPU {torch.cuda.get_device_name()}; fwd+bwd useful TFLOP at Dh {DH}: {flops / 1e12:.3f}")
    print("| backend | Dh padded | q,k,v memory | ms fwd+bwd | output layout |")
    print("|---|---|---|---|---|")
    for name, backend in BACKENDS.items():
        for padded in (72, 80, 96, 128):
            for token_major in (False, True):
                ms, layout = case(backend, padded, token_major)
                print(f"| {name} | {padded} | {'B,T,H,Dh' if token_major else 'B,H,T,Dh'} | {ms} | {layout} |")


if __name__ == "__main__":
    main()
