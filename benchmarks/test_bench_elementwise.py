"""Elementwise kernels (SwiGLU, RoPE + QK-norm, FAE reparameterisation) in bf16 at the generator's and the
FAE's shapes: providers torch (eager reference), torch.compile (of the reference) and fae_fast, modes
fwd, bwd (the backward alone, from one saved forward) and full. Each result reports ms, GB/s over the
minimal bytes the op must move, and the fraction of this GPU's copy bandwidth (benchmarks/conftest.py).
SwiGLU and RoPE are measured in their packed forms, as the model calls them: every provider takes the
Linear's output (h, qkv) as the leaf, so each backward has to produce d(h), d(qkv) as one tensor.

    pytest benchmarks/test_bench_elementwise.py --benchmark-json=elementwise.json
"""
import pytest
import torch

from fae_fast.kernels.reparameterize import reparameterize, reparameterize_ref
from fae_fast.kernels.rope import rope_qkv, rope_qkv_ref
from fae_fast.kernels.swiglu import swiglu_packed, swiglu_packed_ref

BF16 = torch.bfloat16
B, T = 256, 256  # batch 256 of 16 x 16 latent tokens


def _randn(*shape, grad=False):
    return torch.randn(*shape, device="cuda", dtype=BF16, requires_grad=grad)


def swiglu_case(hidden: int) -> dict:
    """h (B*T, 2H), the fc1 output. Bytes: fwd reads h, writes out (H wide); bwd reads dout, h, writes dh."""
    h = _randn(B * T, 2 * hidden, grad=True)
    one = B * T * hidden * 2
    return dict(impls={"torch": swiglu_packed_ref, "fae_fast": swiglu_packed}, args=(h,), leaves=(h,),
                grads=(_randn(B * T, hidden),), bytes={"fwd": 3 * one, "bwd": 5 * one})


def rope_case(heads: int, head_dim: int, norm: bool) -> dict:
    """qkv (B, T, 3, H, Dh) -> q, k, v (B, H, T, Dh). Bytes (one = one of q, k, v): fwd reads qkv, writes
    q, k, v; bwd reads dq, dk, dv (and q, k with the norm), writes d(qkv). Angles and weights are noise."""
    qkv = _randn(B, T, 3, heads, head_dim, grad=True)
    angles = torch.rand(T, head_dim // 2, device="cuda") * 16
    weights = tuple(_randn(head_dim, grad=True) for _ in range(2)) if norm else (None, None)
    one = B * T * heads * head_dim * 2
    grads = tuple(_randn(B, heads, T, head_dim) for _ in range(3))
    return dict(impls={"torch": rope_qkv_ref, "fae_fast": rope_qkv}, args=(qkv, angles, *weights),
                leaves=(qkv, *weights) if norm else (qkv,), grads=grads,
                bytes={"fwd": 6 * one, "bwd": (8 if norm else 6) * one})


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
    "swiglu_packed-H3072": lambda: swiglu_case(3072),  # LightningDiT-XL SwiGLU hidden
    "swiglu_packed-H4096": lambda: swiglu_case(4096),  # FAE feature decoder
    "rope_qkv-H16-Dh72": lambda: rope_case(16, 72, norm=False),  # generator XL
    "rope_qkv+qknorm-H16-Dh72": lambda: rope_case(16, 72, norm=True),  # LightningDiT-XL
    "rope_qkv-H24-Dh64": lambda: rope_case(24, 64, norm=False),  # FAE feature decoder
    "rope_qkv+qknorm-H24-Dh64": lambda: rope_case(24, 64, norm=True),  # FAE feature decoder with QK-norm
    "reparameterize-C32": lambda: reparameterize_case(32),  # FAE encoder, 64 = mu | logvar
}


LAUNCHES_PER_CALL = 10  # report() divides the measured time by this


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

    def timed():  # back-to-back launches, one sync: the GPU time, not the host's per-call sync latency
        for _ in range(LAUNCHES_PER_CALL):
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
    report(bytes_moved=moved, launches_per_call=LAUNCHES_PER_CALL, op=op, provider=provider, mode=mode)
