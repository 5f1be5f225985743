"""RoPE (+ QK-norm) on the packed qkv projection against its PyTorch reference: the three outputs and every
gradient (d(qkv), the two norm weights), every dtype, odd head dims and token counts, with and without the
rotation; `rope(q, k)` (the wrapper for separate q, k); deterministic weight gradients; registration and
torch.compile; the joint attention's `joint_rope_qkv` against rope_qkv followed by a concatenation. CPU runs
go through TRITON_INTERPRET=1."""
import pytest
import torch

from fae_fast.kernels.rope import (joint_rope_qkv, joint_rope_qkv_ref, rope, rope_qkv, rope_qkv_ref,
                                   rope_ref)

from kernel_testing import COMPILE_BACKEND, TOL  # noqa: E402 (tests/ is on sys.path)
NAMES = ("q_out", "k_out", "v_out", "dqkv", "dq_weight", "dk_weight")


def assert_matches(name, out, ref32, ref_lowp):
    """out within TOL of the fp32 reference; in bf16/fp16 also at most 2x the error of PyTorch in that dtype."""
    torch.testing.assert_close(out.float(), ref32, **TOL[out.dtype], msg=lambda m: f"{name}: {m}")
    if out.dtype != torch.float32:
        err, err_torch = (out.float() - ref32).abs().max().item(), (ref_lowp.float() - ref32).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, f"{name}: kernel error {err:.3g} > 2 x torch {out.dtype} error {err_torch:.3g}"


def make_inputs(B, T, H, Dh, dtype, device, norm, rotate=True, seed=0):
    """qkv (B, T, 3, H, Dh), angles (T, Dh/2) fp32 or None, norm weights (2, Dh) or None, upstream grads
    (3, B, H, T, Dh)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, Dh, generator=g).to(device, dtype) * 2
    angles = (torch.rand(T, Dh // 2, generator=g) * 20 - 10).to(device) if rotate else None
    weights = (torch.randn(2, Dh, generator=g) * 0.5 + 1).to(device, dtype) if norm else None
    grads = torch.randn(3, B, H, T, Dh, generator=g).to(device, dtype)
    return qkv, angles, weights, grads


def run(fn, qkv, angles, weights, grads, cast=None):
    """fn(qkv, angles, *weights) -> (q_out, k_out, v_out, dqkv[, dq_weight, dk_weight]); `cast` upcasts first."""
    cast = cast or (lambda t: t)
    qkv = cast(qkv).detach().requires_grad_()
    ws = [cast(w).detach().requires_grad_() for w in weights] if weights is not None else [None, None]
    outs = fn(qkv, angles, *ws)
    leaves = [qkv] + [w for w in ws if w is not None]
    return (*outs, *torch.autograd.grad(outs, leaves, [cast(g) for g in grads]))


def in_attention_layout(t: torch.Tensor) -> bool:
    """(B, H, T, Dh) laid out (B, T, H, Dh) in memory, as the attention kernels work."""
    return t.transpose(1, 2).is_contiguous()


def check_against_reference(qkv, angles, weights, grads, fn=rope_qkv, ref=rope_qkv_ref):
    got = run(fn, qkv, angles, weights, grads)
    ref32 = run(ref, qkv, angles, weights, grads, cast=lambda t: t.float())
    ref_lowp = run(ref, qkv, angles, weights, grads)
    assert all(o.shape == ref32[0].shape and in_attention_layout(o) for o in got[:3])  # (B, H, T, Dh) for SDPA
    assert got[3].shape == qkv.shape and got[3].is_contiguous()
    assert torch.count_nonzero(got[3][..., 0]) > 0  # the gradient really reached qkv
    for name, g, r, rl in zip(NAMES, got, ref32, ref_lowp):
        assert_matches(name, g, r, rl)


SHAPES = [(1, 1, 1, 8), (2, 7, 3, 72), (1, 256, 2, 72), (2, 9, 24, 64), (3, 5, 16, 40)]  # (B, T, H, Dh)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-H{}-Dh{}".format(*s))
@pytest.mark.parametrize("norm, rotate", [(False, True), (True, True), (True, False)],
                         ids=["rope", "rope+qknorm", "qknorm"])
@pytest.mark.parametrize("dtype", list(TOL))
def test_rope_qkv_matches_reference(shape, norm, rotate, dtype, device):
    check_against_reference(*make_inputs(*shape, dtype, device, norm, rotate))


def _rope_as_qkv(fn):
    """`rope(q, k)` seen through the rope_qkv test harness: q, k as strided views of qkv; v passed through."""
    def wrapped(qkv, angles, *ws):
        q, k, v = qkv.unbind(2)
        return (*fn(q, k, angles, *ws), v.contiguous().transpose(1, 2))  # v in the attention layout too
    return wrapped


@pytest.mark.parametrize("shape", [(2, 7, 3, 72), (1, 9, 2, 64)], ids=lambda s: "B{}-T{}-H{}-Dh{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_wrapper_matches_reference(shape, dtype, device):
    """rope(q, k) for separate (here: strided) q, k goes through the same op and matches rope_ref."""
    check_against_reference(*make_inputs(*shape, dtype, device, norm=True), fn=_rope_as_qkv(rope),
                            ref=_rope_as_qkv(rope_ref))


def test_rope_qkv_fp32_weights_with_bf16_activations(device):
    """Norm weights kept in fp32 (no mixed-precision cast) with bf16 qkv: the weight grads stay fp32."""
    qkv, angles, weights, grads = make_inputs(2, 5, 2, 72, torch.bfloat16, device, norm=True)
    weights = weights.float()
    got = run(rope_qkv, qkv, angles, weights, grads)
    ref32 = run(rope_qkv_ref, qkv, angles, weights, grads, cast=lambda t: t.float())
    assert got[4].dtype == got[5].dtype == torch.float32
    for name, g, r in zip(NAMES, got, ref32):
        torch.testing.assert_close(g.float(), r, **TOL[torch.bfloat16], msg=lambda m: f"{name}: {m}")


def test_rope_qkv_strided_upstream_grads(device):
    """Upstream grads in (B, T, H, Dh) memory order (transposed strides), or with strides no multiple of the
    kernel's vector width, give the same gradients as contiguous ones."""
    qkv, angles, weights, grads = make_inputs(2, 6, 3, 72, torch.float32, device, norm=True)
    transposed = grads.transpose(2, 3).contiguous().transpose(2, 3)  # same values, (B, T, H, Dh) order
    odd = torch.zeros(*grads.shape[:-1], 73, device=device)[..., :72].copy_(grads)  # row stride 73
    want = run(rope_qkv, qkv, angles, weights, grads)
    for strided in (transposed, odd):
        for name, a, b in zip(NAMES, want, run(rope_qkv, qkv, angles, weights, strided)):
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


def test_rope_qkv_weight_grads_are_deterministic(device):
    """Weight grads are two-stage fp32 sums in a fixed order: bit-identical run to run. 4 x 33 x 9 rows at
    Dh 8: 3 programs of 512 rows (the last one partly masked), each with its partial row."""
    inputs = make_inputs(4, 33, 9, 8, torch.float32, device, norm=True)
    first, second = run(rope_qkv, *inputs), run(rope_qkv, *inputs)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_rope_rejects_bad_arguments(device):
    q = torch.randn(1, 4, 2, 8, device=device)
    with pytest.raises(ValueError, match="both q_norm_weight and k_norm_weight"):
        rope(q, q, torch.zeros(4, 4, device=device), torch.ones(8, device=device))
    with pytest.raises(ValueError, match=r"angles of shape \(T, Dh/2\)"):
        rope(q, q, torch.zeros(4, 8, device=device))
    with pytest.raises(ValueError, match=r"qkv of shape \(B, T, 3, H, Dh\)"):
        rope_qkv(torch.randn(1, 4, 2, 2, 8, device=device), None)


@pytest.mark.parametrize("norm, rotate", [(False, True), (True, True), (True, False)],
                         ids=["rope", "rope+qknorm", "qknorm"])
def test_rope_qkv_registration(norm, rotate, device):
    """torch.library.opcheck: schema (new outputs, no aliasing), fake impl, autograd registration."""
    qkv, angles, weights, _ = make_inputs(2, 5, 2, 8, torch.float32, device, norm, rotate)
    cos_sin = torch.stack((angles.cos(), angles.sin())) if rotate else None
    ws = (weights[0].requires_grad_(), weights[1]) if norm else (None, None)
    torch.library.opcheck(torch.ops.fae_fast.rope_qkv_fwd.default, (qkv.requires_grad_(), cos_sin, *ws, 1e-6))


def test_rope_qkv_compiles_fullgraph(device):
    inputs = make_inputs(2, 7, 3, 72, torch.float32, device, norm=True)
    compiled = torch.compile(rope_qkv, fullgraph=True, backend=COMPILE_BACKEND)
    for name, a, b in zip(NAMES, run(compiled, *inputs), run(rope_qkv, *inputs)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("heads, head_dim", [(16, 72), (24, 64)])  # generator XL, FAE feature decoder
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "rope+qknorm"])
def test_rope_qkv_real_size_bf16(heads, head_dim, norm):
    inputs = make_inputs(256, 256, heads, head_dim, torch.bfloat16, "cuda", norm)
    check_against_reference(*inputs)
    if norm:
        first, second = run(rope_qkv, *inputs), run(rope_qkv, *inputs)
        assert all(torch.equal(a, b) for a, b in zip(first, second)), "weight grads differ run to run"


def joint_inputs(dtype, device, norm, rotate=True, L=5):
    """make_inputs' latent qkv, angles and weights for T = 7 tokens, the caption's text_qkv (B, L, 3, H, Dh),
    and upstream gradients of the joint q, k, v (3, B, H, T + L, Dh)."""
    qkv, angles, weights, _ = make_inputs(2, 7, 3, 72, dtype, device, norm, rotate)
    g = torch.Generator(device="cpu").manual_seed(7)
    text_qkv = torch.randn(2, L, 3, 3, 72, generator=g).to(device, dtype)
    grads = torch.randn(3, 2, 3, 7 + L, 72, generator=g).to(device, dtype)
    return qkv, text_qkv, angles, weights, grads


def run_joint(fn, qkv, text_qkv, angles, weights, grads):
    """fn(qkv, text_qkv, angles, *weights) -> (q, k, v, dqkv, dtext[, dq_weight, dk_weight])."""
    leaves = [qkv.detach().requires_grad_(), text_qkv.detach().requires_grad_()]
    ws = [w.detach().requires_grad_() for w in weights] if weights is not None else [None, None]
    outs = fn(*leaves, angles, *ws)
    return (*outs, *torch.autograd.grad(outs, leaves + [w for w in ws if w is not None], list(grads)))


def rope_then_concatenate(qkv, text_qkv, angles, *weights):
    caption = text_qkv.permute(2, 0, 3, 1, 4)
    return tuple(torch.cat([x, t], dim=2) for x, t in zip(rope_qkv(qkv, angles, *weights), caption))


@pytest.mark.parametrize("norm, rotate", [(False, True), (True, True), (True, False)],
                         ids=["rope", "rope+qknorm", "qknorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_rope_qkv_is_rope_qkv_then_the_caption_bit_for_bit(norm, rotate, dtype, device):
    """The same kernels on the same values: outputs and every gradient equal, not merely close."""
    inputs = joint_inputs(dtype, device, norm, rotate)
    joint, concatenated = run_joint(joint_rope_qkv, *inputs), run_joint(rope_then_concatenate, *inputs)
    names = ("q", "k", "v", "dqkv", "dtext", "dq_weight", "dk_weight")
    assert joint[0].shape == (2, 3, 12, 72) and all(in_attention_layout(t) for t in joint[:3])
    for name, a, b in zip(names, joint, concatenated):
        assert torch.equal(a, b), name


def test_joint_rope_qkv_matches_its_reference(device):
    inputs = joint_inputs(torch.float32, device, norm=True)
    for a, b in zip(run_joint(joint_rope_qkv, *inputs), run_joint(joint_rope_qkv_ref, *inputs)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_joint_rope_qkv_compiles_fullgraph_and_checks_its_arguments(device):
    inputs = joint_inputs(torch.float32, device, norm=True)
    compiled = torch.compile(joint_rope_qkv, fullgraph=True, backend=COMPILE_BACKEND)
    for a, b in zip(run_joint(compiled, *inputs), run_joint(joint_rope_qkv, *inputs)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    qkv, text_qkv, angles, weights, _ = inputs
    with pytest.raises(ValueError, match="caption's"):
        joint_rope_qkv(qkv, text_qkv.to(torch.bfloat16), angles, *weights)
    with pytest.raises(ValueError, match="caption's"):
        joint_rope_qkv(qkv, text_qkv[:, :, :, :2], angles, *weights)


def test_joint_rope_qkv_registration(device):
    """torch.library.opcheck: schema (new outputs, no aliasing), fake impl, autograd registration."""
    qkv, text_qkv, angles, weights, _ = joint_inputs(torch.float32, device, norm=True)
    cos_sin = torch.stack((angles.cos(), angles.sin()))
    torch.library.opcheck(torch.ops.fae_fast.joint_rope_qkv_fwd.default,
                          (qkv.requires_grad_(), text_qkv.requires_grad_(), cos_sin, weights[0].requires_grad_(),
                           weights[1], 1e-6))
