"""SwiGLU kernel against its PyTorch reference: output and both gradients, every dtype, odd widths,
strided halves of one tensor; registration and torch.compile. CPU runs go through TRITON_INTERPRET=1."""
import pytest
import torch

from fae_fast.kernels.swiglu import swiglu, swiglu_ref

TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}
# The CPU test compiles with aot_eager: it traces forward and backward through AOTAutograd and the fake
# impls (what fullgraph needs), without Inductor's C++ build, which adds nothing around an opaque op.
COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"


def assert_matches(name, out, ref32, ref_lowp):
    """out within TOL of the fp32 reference; in bf16/fp16 also at most 2x the error of PyTorch in that dtype."""
    torch.testing.assert_close(out.float(), ref32, **TOL[out.dtype], msg=lambda m: f"{name}: {m}")
    if out.dtype != torch.float32:
        err, err_torch = (out.float() - ref32).abs().max().item(), (ref_lowp.float() - ref32).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, f"{name}: kernel error {err:.3g} > 2 x torch {out.dtype} error {err_torch:.3g}"


def run(fn, x, dout):
    """fn on the strided halves of x (..., 2H) -> out, da, db (the halves of dx)."""
    x = x.detach().clone().requires_grad_()
    out = fn(*x.chunk(2, dim=-1))
    (dx,) = torch.autograd.grad(out, x, dout)
    return (out, *dx.chunk(2, dim=-1))


def check_against_reference(x, dout):
    got = run(swiglu, x, dout)
    ref32 = run(swiglu_ref, x.float(), dout.float())
    ref_lowp = run(swiglu_ref, x, dout)
    for name, g, r, rl in zip(("out", "da", "db"), got, ref32, ref_lowp):
        assert_matches(name, g, r, rl)


@pytest.mark.parametrize("shape", [(1, 72), (2, 7, 100), (3, 5, 72), (4, 1152), (2, 3, 1536)])
@pytest.mark.parametrize("dtype", list(TOL))
def test_swiglu_matches_reference(shape, dtype, device):
    torch.manual_seed(0)
    x = torch.randn(*shape[:-1], 2 * shape[-1], device=device, dtype=dtype) * 2  # a, b: strided halves
    dout = torch.randn(*shape, device=device, dtype=dtype)
    check_against_reference(x, dout)


def test_swiglu_separate_and_uncollapsible_inputs(device):
    """a, b as separate tensors, and as transposed halves whose leading dims do not collapse (copied)."""
    torch.manual_seed(1)
    a, b = torch.randn(2, 2, 9, 40, device=device).unbind(0)
    torch.testing.assert_close(swiglu(a, b), swiglu_ref(a, b), **TOL[torch.float32])
    x = torch.randn(7, 3, 80, device=device).transpose(0, 1)  # (3, 7, 80), rows not a single stride
    a, b = x.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(a, b), swiglu_ref(a, b), **TOL[torch.float32])


def test_swiglu_rejects_mismatched_inputs(device):
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(2, 8, device=device), torch.randn(2, 9, device=device))


def test_swiglu_registration(device):
    """torch.library.opcheck: schema (new outputs, no aliasing), fake impl, autograd registration."""
    x = torch.randn(3, 5, 2 * 24, device=device, requires_grad=True)
    a, b = x.chunk(2, dim=-1)
    torch.library.opcheck(torch.ops.fae_fast.swiglu_fwd.default, (a, b))


def test_swiglu_compiles_fullgraph(device):
    torch.manual_seed(2)
    x = torch.randn(2, 7, 2 * 72, device=device)
    dout = torch.randn(2, 7, 72, device=device)
    compiled = torch.compile(swiglu, fullgraph=True, backend=COMPILE_BACKEND)
    for got, want in zip(run(compiled, x, dout), run(swiglu, x, dout)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [3072, 4096])  # LightningDiT-XL SwiGLU hidden, FAE feature decoder
def test_swiglu_real_size_bf16(hidden):
    torch.manual_seed(3)
    x = torch.randn(256, 256, 2 * hidden, device="cuda", dtype=torch.bfloat16) * 2
    dout = torch.randn(256, 256, hidden, device="cuda", dtype=torch.bfloat16)
    check_against_reference(x, dout)
