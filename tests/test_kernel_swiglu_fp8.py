"""The SwiGLU gate's FP8 variants against their PyTorch references: the rowwise scales equal, the e4m3 values
equal but for a tiny fraction one step apart (the kernel's sigmoid may round differently from torch's), the
activation kept in h's dtype, the fc1 bias gradient's column sums, registration, torch.compile and bad shapes.
CPU runs go through TRITON_INTERPRET=1."""
import pytest
import torch

from fae_fast.kernels.swiglu import (swiglu_packed_bwd_fp8, swiglu_packed_bwd_fp8_ref, swiglu_packed_fp8,
                                     swiglu_packed_fp8_ref, swiglu_packed_ref)

from kernel_testing import COMPILE_BACKEND, TOL  # noqa: E402 (tests/ is on sys.path)

# (N, H): one row; odd widths; rows that fill several tiles with the last one part empty; hidden widths of the
# models (1152, 1536, and XL's 3072, whose rows pad to 4096 lanes), in every input dtype; and in bf16 2113 rows,
# where each of an H200's 1056 persistent backward programs walks two row tiles, the last one short
SHAPES = [(1, 8), (7, 72), (33, 96), (130, 40), (7, 1152), (20, 1536), (64, 3072)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [(shape, dtype) for shape in SHAPES for dtype in DTYPES] + [pytest.param(
    (2113, 3072), torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's program "
    "count (the interpreter's 32 programs walk several tiles at the small shapes already; this one takes minutes)"))]


def packed_rows(n_rows, H, dtype, device, seed=0):
    """h (N, 2H) and dout (N, H): rows scaled from 1e-3 to 1e1, the b half of each row by a further random
    power of 4 (so that either half of dh may hold the row's amax), one row of h all zeros where N > 1.
    (|a| stays far below 87, where sigmoid(a) turns subnormal and a GPU's fast division flushes it to zero.)"""
    g = torch.Generator(device=device).manual_seed(seed)
    scale = torch.logspace(-3, 1, n_rows, device=device)[:, None]
    b_scale = 4.0 ** torch.randint(-2, 3, (n_rows, 1), generator=g, device=device)
    h = torch.randn(n_rows, 2 * H, generator=g, device=device) * scale
    h[:, H:] *= b_scale
    if n_rows > 1:
        h[n_rows // 2] = 0.0
    dout = torch.randn(n_rows, H, generator=g, device=device) * scale.flip(0)
    return h.to(dtype), dout.to(dtype)


def e4m3_ordinal(q):
    """Position of each e4m3 value on the number line (+-0 -> 0): neighbours differ by one."""
    bits = q.view(torch.uint8).int()
    return torch.where(bits >= 128, -(bits - 128), bits)


def assert_fp8_close(name, q, s, q_ref, s_ref):
    """Scales equal exactly; the e4m3 values equal, but for at most 1 + numel * 2^-12 of them, each exactly
    one e4m3 step from the reference's: an fp32 value within a few ulps of a rounding midpoint (2^20 ulps
    apart) may round the other way when the kernel's sigmoid differs from torch's by an ulp. A double
    rounding through bf16 would differ in a few percent of entries."""
    assert q.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape and s.shape == s_ref.shape
    assert torch.equal(s, s_ref), f"{name}: scales differ in {(s != s_ref).sum().item()} rows"
    differ = q.view(torch.uint8) != q_ref.view(torch.uint8)
    assert differ.sum().item() <= 1 + q.numel() * 2**-12, f"{name}: {differ.sum().item()} of {q.numel()} differ"
    steps = (e4m3_ordinal(q) - e4m3_ordinal(q_ref)).abs()
    assert torch.all(steps[differ] == 1), f"{name}: values {steps.max().item()} e4m3 steps apart"
    assert torch.equal((q.float() * s)[~differ], (q_ref.float() * s_ref)[~differ])


def ulp(x, dtype):
    """One unit in the last place of `dtype` at the magnitude of x (fp32); below the normal range, the
    subnormals' fixed spacing (fp16's start at 6.1e-5, where the smallest rows' activations fall)."""
    _, exponent = torch.frexp(x)  # x = m * 2^exponent, m in [0.5, 1)
    info = torch.finfo(dtype)
    return torch.clamp(info.eps * torch.ldexp(torch.ones_like(x), exponent - 1), min=info.eps * info.smallest_normal)


def assert_activation_close(act, h):
    """act within 1 ulp of the fp32 reference cast to h's dtype (the two fp32 values may round to neighbours);
    fp32 within the kernel tests' tolerance, its atol taken relative to each row's largest value (rows span
    four decades)."""
    want = swiglu_packed_ref(h.float()).to(h.dtype).float()
    assert act.dtype == h.dtype and act.shape == want.shape
    err = (act.float() - want).abs()
    if h.dtype == torch.float32:
        tol = TOL[torch.float32]
        assert torch.all(err <= tol["atol"] * want.abs().amax(1, keepdim=True) + tol["rtol"] * want.abs())
    else:
        assert torch.all(err <= ulp(want, h.dtype))


@pytest.mark.parametrize("shape, dtype", CASES)
def test_swiglu_packed_fp8_matches_reference(shape, dtype, device):
    h, _ = packed_rows(*shape, dtype, device)
    q, s, act = swiglu_packed_fp8(h, True)
    q_ref, s_ref, _ = swiglu_packed_fp8_ref(h, True)
    assert_fp8_close("act", q, s, q_ref, s_ref)
    assert_activation_close(act, h)
    q_only, s_only, nothing = swiglu_packed_fp8(h, False)
    assert nothing.shape == (0,) and nothing.dtype == h.dtype
    assert torch.equal(q_only.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s_only, s)


@pytest.mark.parametrize("shape, dtype", CASES)
def test_swiglu_packed_bwd_fp8_matches_reference(shape, dtype, device):
    """dh quantised with the scale of its whole 2H row; its column sums (fc1's bias gradient) as PyTorch's fp32
    sums to 1e-5 of the sum of the column's magnitudes (their order differs), the same on every run."""
    h, dout = packed_rows(*shape, dtype, device, seed=1)
    q, s, sums = swiglu_packed_bwd_fp8(dout, h)
    q_ref, s_ref, sums_ref = swiglu_packed_bwd_fp8_ref(dout, h)
    assert_fp8_close("dh", q, s, q_ref, s_ref)
    assert sums.dtype == torch.float32 and sums.shape == (2 * shape[1],)
    h32 = h.float().requires_grad_()
    (dh,) = torch.autograd.grad(swiglu_packed_ref(h32), h32, dout.float())  # fp32 dh by autograd
    magnitudes = dh.abs().sum(0)
    assert torch.all((sums - sums_ref).abs() <= 1e-5 * magnitudes + 1e-30)
    assert torch.equal(swiglu_packed_bwd_fp8(dout, h)[2], sums)


def test_fp8_ops_register_and_compile_fullgraph(device):
    """opcheck (schema, fake impls, no aliasing) and torch.compile(fullgraph=True) bit for bit as eager."""
    h, dout = packed_rows(9, 72, torch.bfloat16, device, seed=2)
    torch.library.opcheck(torch.ops.fae_fast.swiglu_packed_fp8.default, (h, True))
    torch.library.opcheck(torch.ops.fae_fast.swiglu_packed_bwd_fp8.default, (dout, h))
    compiled = torch.compile(lambda h, dout: (*swiglu_packed_fp8(h, True), *swiglu_packed_bwd_fp8(dout, h)),
                             fullgraph=True, backend=COMPILE_BACKEND)
    eager = (*swiglu_packed_fp8(h, True), *swiglu_packed_bwd_fp8(dout, h))
    for got, want in zip(compiled(h, dout), eager):
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_fp8_ops_reject_bad_shapes(device):
    for h in (torch.randn(4, 9, device=device), torch.randn(2, 3, 8, device=device)):
        with pytest.raises(ValueError, match=r"swiglu_packed_fp8 needs h \(N, 2H\), 2-D with an even last dim"):
            swiglu_packed_fp8(h, False)
        with pytest.raises(ValueError, match=r"swiglu_packed_bwd_fp8 needs h \(N, 2H\), 2-D with an even last dim"):
            swiglu_packed_bwd_fp8(torch.randn(4, 4, device=device), h)
    with pytest.raises(ValueError, match=r"needs dout \(N, H\) for h \(N, 2H\) = \(4, 8\), got dout \(4, 8\)"):
        swiglu_packed_bwd_fp8(torch.randn(4, 8, device=device), torch.randn(4, 8, device=device))
