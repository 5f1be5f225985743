"""Elementwise kernels (SwiGLU, RoPE + QK-norm, FAE reparameterisation) in bf16 at the generator's and the
FAE's shapes: providers torch (eager reference), torch.compile (of the reference) and fae_fast, modes
fwd, bwd (the backward alone, from one saved forward) and full. Each result reports ms, GB/s over the
minimal bytes the op must move, and the fraction of this GPU's copy bandwidth (benchmarks/conftest.py).

    pytest benchmarks/test_bench_elementwise.py --benchmark-json=elementwise.json
"""
import pytest
import torch

from fae_fast.kernels.reparameterize import reparameterize, reparameterize_ref
from fae_fast.kernels.rope import rope, rope_ref
from fae_fast.kernels.swiglu import swiglu, swiglu_ref

BF16 = torch.bfloat16
B, T = 256, 256  # batch 256 of 16 x 16 latent tokens


def _randn(*shape, grad=False):
    return torch.randn(*shape, device="cuda", dtype=BF16, requires_grad=grad)


def swiglu_case(hidden: int) -> dict:
    """a, b: halves of one (B*T, 2H) tensor. Bytes: fwd reads a, b, writes out; bwd reads dout, a, b, writes da, db."""
    a, b = _randn(B * T, 2 * hidden, grad=True).chunk(2, dim=-1)
    one = B * T * hidden * 2
    return dict(impls={"torch": swiglu_ref, "fae_fast": swiglu}, args=(a, b), leaves=(a, b),
                grads=(_randn(B * T, hidden),), bytes={"fwd": 3 * one, "bwd": 5 * one})


def rope_case(heads: int, head_dim: int, norm: bool) -> dict:
    """q, k: views of qkv (B, T, 3, H, Dh). Bytes: fwd reads q, k, writes both outputs; bwd reads both
    upstream grads (and q, k with the norm), writes dq, dk. Angles and weights are noise."""
    q, k, _ = _randn(B, T, 3, heads, head_dim, grad=True).unbind(2)
    angles = torch.rand(T, head_dim // 2, device="cuda") * 16
    weights = tuple(_randn(head_dim, grad=True) for _ in range(2)) if norm else (None, None)
    one = B * T * heads * head_dim * 2
    return dict(impls={"torch": rope_ref, "fae_fast": rope}, args=(q, k, angles, *weights),
                leaves=(q, k, *weights) if norm else (q, k), grads=(_randn(B, heads, T, head_dim),) * 2,
                bytes={"fwd": 4 * one, "bwd": (6 if norm else 4) * one})


def _reparameterize_eager(moments):
    """What an eager pipeline does: draw eps with torch (saved by autograd), then the reference."""
    return reparameterize_ref(moments, torch.randn_like(moments[..., : moments.shape[-1] // 2]))


def reparameterize_case(channels: int) -> dict:
    """moments (B, T, 2C). Bytes: fwd reads moments, writes z and kl; bwd reads moments, dz, dkl, writes dmoments."""
    moments = _randn(B, T, 2 * channels, grad=True)
    one = B * T * channels * 2
    return dict(impls={"torch": _reparameterize_eager, "fae_fast": lambda m: reparameterize(m, 0)},
                args=(moments,), leaves=(moments,), grads=(_randn(B, T, channels), torch.randn(B, device="cuda")),
                bytes={"fwd": 3 * one + 4 * B, "bwd": 5 * one + 4 * B})


CASES = {
    "swiglu-H3072": lambda: swiglu_case(3072),  # LightningDiT-XL SwiGLU hidden
    "swiglu-H4096": lambda: swiglu_case(4096),  # FAE feature decoder
    "rope-H16-Dh72": lambda: rope_case(16, 72, norm=False),  # generator XL
    "rope+qknorm-H16-Dh72": lambda: rope_case(16, 72, norm=True),  # LightningDiT-XL
    "rope-H24-Dh64": lambda: rope_case(24, 64, norm=False),  # FAE feature decoder
    "reparameterize-C32": lambda: reparameterize_case(32),  # FAE encoder, 64 = mu | logvar
}


def _timed(fn, case: dict, mode: str):
    """The function to time for a mode; each call ends with a device sync."""
    args, leaves, grads = case["args"], case["leaves"], case["grads"]

    def forward():
        out = fn(*args)
        return out if isinstance(out, tuple) else (out,)

    if mode == "fwd":
        step = forward
    elif mode == "bwd":  # forward once, outside the timing; the backward alone inside
        saved = forward()
        step = lambda: torch.autograd.grad(saved, leaves, grads, retain_graph=True)  # noqa: E731
    else:
        step = lambda: torch.autograd.grad(forward(), leaves, grads)  # noqa: E731

    def timed():
        step()
        torch.cuda.synchronize()

    return timed


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("provider", ["torch", "torch.compile", "fae_fast"])
@pytest.mark.parametrize("op", list(CASES))
def test_elementwise(benchmark, report, op, provider, mode):
    case = CASES[op]()
    fn = case["impls"]["fae_fast" if provider == "fae_fast" else "torch"]
    if provider == "torch.compile":
        torch._dynamo.reset()  # a fresh compile per shape and mode, never the recompile-limit eager fallback
        fn = torch.compile(fn, dynamic=False)
    timed = _timed(fn, case, mode)
    timed()  # compile / autotune outside the timing
    benchmark.group = f"{op} {mode}"
    benchmark.pedantic(timed, rounds=20, iterations=5, warmup_rounds=2)
    moved = case["bytes"]["fwd"] + case["bytes"]["bwd"] if mode == "full" else case["bytes"][mode]
    report(bytes_moved=moved, op=op, provider=provider, mode=mode)
