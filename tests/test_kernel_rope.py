"""RoPE (+ QK-norm) kernel against its PyTorch reference: both outputs and every gradient (dq, dk and the
two norm weights), every dtype, odd head dims, q and k as strided views of one qkv tensor; deterministic
weight gradients; registration and torch.compile. CPU runs go through TRITON_INTERPRET=1."""
import pytest
import torch

from fae_fast.kernels.rope import rope, rope_ref

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}
# The CPU test compiles with aot_eager: it traces forward and backward through AOTAutograd and the fake
# impls (what fullgraph needs), without Inductor's C++ build, which adds nothing around an opaque op.
COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"
NAMES = ("q_out", "k_out", "dq", "dk", "dq_weight", "dk_weight")


def assert_matches(name, out, ref32, ref_lowp):
    """out within TOL of the fp32 reference; in bf16/fp16 also at most 2x the error of PyTorch in that dtype."""
    torch.testing.assert_close(out.float(), ref32, **TOL[out.dtype], msg=lambda m: f"{name}: {m}")
    if out.dtype != torch.float32:
        err, err_torch = (out.float() - ref32).abs().max().item(), (ref_lowp.float() - ref32).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, f"{name}: kernel error {err:.3g} > 2 x torch {out.dtype} error {err_torch:.3g}"


def make_inputs(B, T, H, Dh, dtype, device, norm, seed=0):
    """qkv (B, T, 3, H, Dh), angles (T, Dh/2) fp32, norm weights (2, Dh) or None, upstream grads (2, B, H, T, Dh)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, Dh, generator=g).to(device, dtype) * 2
    angles = (torch.rand(T, Dh // 2, generator=g) * 20 - 10).to(device)
    weights = (torch.randn(2, Dh, generator=g) * 0.5 + 1).to(device, dtype) if norm else None
    grads = torch.randn(2, B, H, T, Dh, generator=g).to(device, dtype)
    return qkv, angles, weights, grads


def run(fn, qkv, angles, weights, grads, cast=None):
    """fn on q, k = views of qkv -> (q_out, k_out, dq, dk[, dq_weight, dk_weight]); `cast` upcasts first."""
    cast = cast or (lambda t: t)
    qkv = cast(qkv).detach().requires_grad_()
    ws = [cast(w).detach().requires_grad_() for w in weights] if weights is not None else [None, None]
    q, k, _ = qkv.unbind(2)
    outs = fn(q, k, angles, *ws)
    leaves = [qkv] + [w for w in ws if w is not None]
    dqkv, *dws = torch.autograd.grad(outs, leaves, [cast(g) for g in grads])
    return (*outs, dqkv[:, :, 0], dqkv[:, :, 1], *dws)


def check_against_reference(qkv, angles, weights, grads):
    got = run(rope, qkv, angles, weights, grads)
    ref32 = run(rope_ref, qkv, angles, weights, grads, cast=lambda t: t.float())
    ref_lowp = run(rope_ref, qkv, angles, weights, grads)
    assert got[0].shape == got[1].shape == ref32[0].shape and got[0].is_contiguous()  # (B, H, T, Dh)
    assert torch.count_nonzero(got[3][:, :, :, 0]) > 0  # the gradient really reached q and k
    for name, g, r, rl in zip(NAMES, got, ref32, ref_lowp):
        assert_matches(name, g, r, rl)


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 7, 3, 40), (2, 16, 2, 72), (1, 9, 2, 64)])
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "rope+qknorm"])
@pytest.mark.parametrize("dtype", list(TOL))
def test_rope_matches_reference(shape, norm, dtype, device):
    check_against_reference(*make_inputs(*shape, dtype, device, norm))


def test_rope_fp32_weights_with_bf16_activations(device):
    """Norm weights kept in fp32 (no mixed-precision cast) with bf16 q, k: the weight grads stay fp32."""
    qkv, angles, weights, grads = make_inputs(2, 5, 2, 72, torch.bfloat16, device, norm=True)
    weights = weights.float()
    got = run(rope, qkv, angles, weights, grads)
    ref32 = run(rope_ref, qkv, angles, weights, grads, cast=lambda t: t.float())
    assert got[4].dtype == got[5].dtype == torch.float32
    for name, g, r in zip(NAMES, got, ref32):
        torch.testing.assert_close(g.float(), r, **TOL[torch.bfloat16], msg=lambda m: f"{name}: {m}")


def test_rope_noncontiguous_upstream_grad(device):
    """Upstream grads with transposed strides give the same gradients as contiguous ones."""
    qkv, angles, weights, grads = make_inputs(2, 6, 3, 40, torch.float32, device, norm=True)
    strided = grads.transpose(2, 3).contiguous().transpose(2, 3)  # same values, (B, T, H, Dh) memory order
    for a, b in zip(run(rope, qkv, angles, weights, grads), run(rope, qkv, angles, weights, strided)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_rope_weight_grads_are_deterministic(device):
    """Weight grads are two-stage fp32 sums in a fixed order: bit-identical run to run. 36 tiles of 4 tokens:
    more than the interpreter's 32 programs, so some programs accumulate two tiles."""
    qkv, angles, weights, grads = make_inputs(4, 3, 9, 8, torch.float32, device, norm=True)
    first, second = run(rope, qkv, angles, weights, grads), run(rope, qkv, angles, weights, grads)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_rope_rejects_bad_arguments(device):
    q = torch.randn(1, 4, 2, 8, device=device)
    with pytest.raises(ValueError, match="both q_norm_weight and k_norm_weight"):
        rope(q, q, torch.zeros(4, 4, device=device), torch.ones(8, device=device))
    with pytest.raises(ValueError, match=r"angles of shape \(T, Dh/2\)"):
        rope(q, q, torch.zeros(4, 8, device=device))


@pytest.mark.parametrize("norm", [False, True], ids=["rope", "rope+qknorm"])
def test_rope_registration(norm, device):
    """torch.library.opcheck: schema (new outputs, no aliasing), fake impl, autograd registration."""
    qkv, angles, weights, _ = make_inputs(2, 5, 2, 8, torch.float32, device, norm)
    q, k, _ = qkv.requires_grad_().unbind(2)
    ws = (weights[0].requires_grad_(), weights[1]) if norm else (None, None)
    torch.library.opcheck(torch.ops.fae_fast.rope_fwd.default, (q, k, angles, *ws, 1e-6))


def test_rope_compiles_fullgraph(device):
    qkv, angles, weights, grads = make_inputs(2, 7, 3, 40, torch.float32, device, norm=True)
    compiled = torch.compile(rope, fullgraph=True, backend=COMPILE_BACKEND)
    for name, a, b in zip(NAMES, run(compiled, qkv, angles, weights, grads), run(rope, qkv, angles, weights, grads)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("heads, head_dim", [(16, 72), (24, 64)])  # generator XL, FAE feature decoder
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "rope+qknorm"])
def test_rope_real_size_bf16(heads, head_dim, norm):
    inputs = make_inputs(256, 256, heads, head_dim, torch.bfloat16, "cuda", norm)
    check_against_reference(*inputs)
    if norm:
        first, second = run(rope, *inputs), run(rope, *inputs)
        assert all(torch.equal(a, b) for a, b in zip(first, second)), "weight grads differ run to run"
