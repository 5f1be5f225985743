"""Modulated norm and gated residual kernels in bf16 at the generator's width (1152) and the FAE's (1536),
batch 256 of 256 tokens, per-sample modulation taken as chunks of one adaLN output (as in the blocks):
providers torch (eager reference), torch.compile (of the reference) and fae_fast, modes fwd, bwd (the
backward alone, from one saved forward) and full. Each result reports ms, GB/s over the minimal bytes the
op must move, and the fraction of this GPU's copy bandwidth (benchmarks/conftest.py).

    pytest benchmarks/test_bench_norms.py --benchmark-json=norms.json
"""
import pytest
import torch

from benchmarks.test_bench_elementwise import LAUNCHES_PER_CALL, _timed  # the one timing recipe
from fae_fast.kernels.gated_residual import (
    gated_residual, gated_residual_modulated_norm, gated_residual_modulated_norm_ref, gated_residual_ref,
)
from fae_fast.kernels.modulated_norm import modulated_norm, modulated_norm_ref

BF16 = torch.bfloat16
B, T = 256, 256  # batch 256 of 16 x 16 latent tokens
WIDTHS = [1152, 1536]  # generator XL, FAE features
NORMS = {"layer": ("layer", False), "rms_w": ("rms", True)}  # SiT: LayerNorm; LightningDiT / decoders: RMSNorm + weight


def _randn(*shape, grad=False):
    return torch.randn(*shape, device="cuda", dtype=BF16, requires_grad=grad)


def _sizes(D: int) -> tuple[int, int, int]:
    """Bytes of one (B, T, D) tensor, one (B, D) modulation, one (D,) weight, all bf16."""
    return B * T * D * 2, B * D * 2, D * 2


def _with_norm(fn, norm: str):
    return lambda *args: fn(*args, norm=norm)


def modulated_norm_case(D: int, norm: str, with_weight: bool) -> dict:
    """Bytes: fwd reads x, scale, shift, weight, writes y; bwd reads dy, x, scale, weight, writes dx, dscale,
    dshift, dweight (the saved row statistics are not counted: a minimal op could recompute them)."""
    x = _randn(B, T, D, grad=True)
    scale, shift = _randn(B, 2 * D, grad=True).chunk(2, dim=-1)
    weight = _randn(D, grad=True) if with_weight else None
    n, m, w = _sizes(D)
    w = w if with_weight else 0
    return dict(impls={"torch": _with_norm(modulated_norm_ref, norm), "fae_fast": _with_norm(modulated_norm, norm)},
                args=(x, scale, shift, weight), leaves=tuple(t for t in (x, scale, shift, weight) if t is not None),
                grads=(_randn(B, T, D),), bytes={"fwd": 2 * n + 2 * m + w, "bwd": 3 * n + 3 * m + 2 * w})


def gated_residual_case(D: int) -> dict:
    """Bytes: fwd reads x, gate, y, writes h; bwd reads dh, y, gate, writes dy, dgate (dx is dh itself)."""
    x, y = _randn(B, T, D, grad=True), _randn(B, T, D, grad=True)
    gate = _randn(B, 3 * D, grad=True)[:, :D]
    n, m, _ = _sizes(D)
    return dict(impls={"torch": gated_residual_ref, "fae_fast": gated_residual}, args=(x, gate, y),
                leaves=(x, gate, y), grads=(_randn(B, T, D),), bytes={"fwd": 3 * n + m, "bwd": 3 * n + 2 * m})


def fused_case(D: int, norm: str, with_weight: bool) -> dict:
    """h = x + gate * y, n = modulated_norm(h). Bytes: fwd reads x, y, gate, scale, shift, weight, writes h, n;
    bwd reads dh, dn, h, y, gate, scale, weight, writes dx, dy, dgate, dscale, dshift, dweight."""
    x, y = _randn(B, T, D, grad=True), _randn(B, T, D, grad=True)
    gate, scale, shift = _randn(B, 3 * D, grad=True).chunk(3, dim=-1)
    weight = _randn(D, grad=True) if with_weight else None
    n, m, w = _sizes(D)
    w = w if with_weight else 0
    leaves = tuple(t for t in (x, gate, y, scale, shift, weight) if t is not None)
    impls = {"torch": _with_norm(gated_residual_modulated_norm_ref, norm),
             "fae_fast": _with_norm(gated_residual_modulated_norm, norm)}
    return dict(impls=impls,
                args=(x, gate, y, scale, shift, weight), leaves=leaves, grads=(_randn(B, T, D), _randn(B, T, D)),
                bytes={"fwd": 4 * n + 3 * m + w, "bwd": 6 * n + 5 * m + 2 * w})


def _bench(benchmark, report, name: str, case: dict, provider: str, mode: str):
    fn = case["impls"]["fae_fast" if provider == "fae_fast" else "torch"]
    if provider == "torch.compile":
        torch._dynamo.reset()  # a fresh compile per shape and mode, never the recompile-limit eager fallback
        fn = torch.compile(fn, dynamic=False)
    timed = _timed(fn, case, mode)
    timed()  # compile outside the timing
    benchmark.group = f"{name} {mode}"
    benchmark.pedantic(timed, rounds=20, iterations=5, warmup_rounds=2)
    moved = case["bytes"]["fwd"] + case["bytes"]["bwd"] if mode == "full" else case["bytes"][mode]
    report(bytes_moved=moved, launches_per_call=LAUNCHES_PER_CALL, op=name, provider=provider, mode=mode)


def _grid(test):
    """Parametrise a benchmark over provider, mode and width; ids read `<norm>-<provider>-<mode>-<D>`."""
    for name, values in (("provider", ["torch", "torch.compile", "fae_fast"]), ("mode", ["fwd", "bwd", "full"]),
                         ("D", WIDTHS)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


@_grid
@pytest.mark.parametrize("norm", list(NORMS))
def test_modulated_norm(benchmark, report, norm, provider, mode, D):
    _bench(benchmark, report, f"modulated_norm-{norm}-{D}", modulated_norm_case(D, *NORMS[norm]), provider, mode)


@_grid
def test_gated_residual(benchmark, report, provider, mode, D):
    _bench(benchmark, report, f"gated_residual-{D}", gated_residual_case(D), provider, mode)


@_grid
@pytest.mark.parametrize("norm", list(NORMS))
def test_gated_residual_modulated_norm(benchmark, report, norm, provider, mode, D):
    _bench(benchmark, report, f"gated_residual_modulated_norm-{norm}-{D}", fused_case(D, *NORMS[norm]), provider, mode)
