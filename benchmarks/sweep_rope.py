"""Launch-configuration sweep of the rope_qkv kernels at the LightningDiT-XL shape (qkv (128, 256, 3, 16, 72)
bf16, with QK-norm and 2-D RoPE, as one training step calls them), on one GPU.

    python benchmarks/sweep_rope.py

For each (elements per half tile, num_warps) it times the raw launchers (forward; backward from cuDNN-shaped
gradients) with triton.testing.do_bench, after checking d(qkv) within one bf16 rounding (a
row's sums may run in another order) and the weight gradients against the default configuration. Reports ms, GB/s over the minimal bytes and the fraction of
the bandwidth of a device-to-device copy measured here (bytes read + written). Then, at the default, the
kernels with and without each part (rotation, QK-norm), to show what each costs.

Seen on an H200 (2026-12-01, copy 4.15 TB/s): the default (2048, 4) is best or within noise (fwd 0.135 ms,
0.81 of copy BW; bwd 0.307 ms, 0.47). Without the QK-norm the backward takes 0.124 ms (as long as the
forward); the norm's backward costs the other 0.18 ms, of which reading x is only 0.04. Walking several tiles
per program and reducing the weight-gradient terms over rows once per program (instead of once per tile)
gave 0.43 / 0.30 / 0.29 / 0.28 ms for 1 / 4 / 16 / 64 tiles: the cross-warp column sums are not the cost.
"""
import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fae_fast.kernels import rope  # noqa: E402
from fae_fast.layers import rope_angles_2d  # noqa: E402

B, T, H, DH = 128, 256, 16, 72
CONFIGS = [(e, w) for e in (1024, 2048, 4096) for w in (4, 8)]


def with_config(elements: int, warps: int):
    default = rope._blocks

    def blocks(n_rows, H, Dh, C, has_rope, has_norm):
        out = default(n_rows, H, Dh, C, has_rope, has_norm)
        out["BLOCK_R"] = rope.tile_rows(out["BLOCK_HALF"], n_rows, elements=elements)
        out["num_warps"] = warps
        return out

    return blocks


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_rope.py times the rope kernels on a CUDA GPU; this machine has no CUDA GPU")
    torch.manual_seed(0)
    src = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() * 2 / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    del src, dst
    qkv = torch.randn(B, T, 3, H, DH, device="cuda", dtype=torch.bfloat16)
    cos_sin = rope._cos_sin(rope_angles_2d(16, DH).cuda())
    wq, wk = (torch.rand(DH, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2))
    grads = [torch.randn(B, H, T, DH, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    one = qkv.numel() // 3 * 2  # bytes of one of q, k, v
    moved = {"fwd": 6 * one, "bwd": 8 * one}
    default = rope._blocks
    want = rope.rope_bwd(*grads, cos_sin, qkv, wq, wk, 1e-6)
    print(f"GPU {torch.cuda.get_device_name()}; copy {copy_bw / 1e12:.2f} TB/s; default "
          f"{default(B * T * H, H, DH, 3, True, True)}")
    print("| elements | warps | fwd ms | fwd of copy BW | bwd ms | bwd of copy BW |")
    print("|---|---|---|---|---|---|")
    for elements, warps in CONFIGS:
        rope._blocks = with_config(elements, warps)
        try:
            got = rope.rope_bwd(*grads, cos_sin, qkv, wq, wk, 1e-6)
            # another tiling may sum a row's statistics in another order: one bf16 rounding apart at most
            torch.testing.assert_close(got[0], want[0], rtol=2 ** -7, atol=2 ** -7)
            for g, w in zip(got[1:], want[1:]):
                torch.testing.assert_close(g.float(), w.float(), rtol=1e-3, atol=1e-2)
            fwd = do_bench(lambda: rope.rope_fwd(qkv, cos_sin, wq, wk, 1e-6), return_mode="median")
            bwd = do_bench(lambda: rope.rope_bwd(*grads, cos_sin, qkv, wq, wk, 1e-6), return_mode="median")
        finally:
            rope._blocks = default
        print(f"| {elements} | {warps} | {fwd:.3f} | {moved['fwd'] / fwd / 1e-3 / copy_bw:.2f} | {bwd:.3f} | "
              f"{moved['bwd'] / bwd / 1e-3 / copy_bw:.2f} |")

    print("\n| default config, parts | fwd ms | bwd ms |\n|---|---|---|")
    for name, table, norm in (("rope + QK-norm", cos_sin, True), ("rope only", cos_sin, False),
                              ("QK-norm only", None, True), ("neither (layout only)", None, False)):
        w = (wq, wk) if norm else (None, None)
        fwd = do_bench(lambda: rope.rope_fwd(qkv, table, *w, 1e-6), return_mode="median")
        bwd = do_bench(lambda: rope.rope_bwd(*grads, table, qkv, *w, 1e-6), return_mode="median")
        print(f"| {name} | {fwd:.3f} | {bwd:.3f} |")


if __name__ == "__main__":
    main()
