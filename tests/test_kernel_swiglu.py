"""SwiGLU kernel against its PyTorch reference: output and the gradient of the packed input (both halves),
every dtype, odd widths; `swiglu(a, b)` (the wrapper for separate halves); registration and torch.compile.
CPU runs go through TRITON_INTERPRET=1."""
import pytest
import torch

from fae_fast.kernels.swiglu import swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref

from kernel_testing import COMPILE_BACKEND, TOL  # noqa: E402 (tests/ is on sys.path)


def assert_matches(name, out, ref32, ref_lowp):
    """out within TOL of the fp32 reference; in bf16/fp16 also at most 2x the error of PyTorch in that dtype."""
    torch.testing.assert_close(out.float(), ref32, **TOL[out.dtype], msg=lambda m: f"{name}: {m}")
    if out.dtype != torch.float32:
        err, err_torch = (out.float() - ref32).abs().max().item(), (ref_lowp.float() - ref32).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, f"{name}: kernel error {err:.3g} > 2 x torch {out.dtype} error {err_torch:.3g}"


def run(fn, h, dout):
    """fn(h) for h (..., 2H) -> out, da, db (the halves of dh, which must be one contiguous tensor)."""
    h = h.detach().clone().requires_grad_()
    out = fn(h)
    (dh,) = torch.autograd.grad(out, h, dout)
    assert dh.shape == h.shape and dh.is_contiguous()
    return (out, *dh.chunk(2, dim=-1))


def check_against_reference(h, dout, fn=swiglu_packed, ref=swiglu_packed_ref):
    got = run(fn, h, dout)
    ref32 = run(ref, h.float(), dout.float())
    ref_lowp = run(ref, h, dout)
    for name, g, r, rl in zip(("out", "da", "db"), got, ref32, ref_lowp):
        assert_matches(name, g, r, rl)


def make_inputs(shape, dtype, device, seed=0):
    """h (..., 2H) and dout (..., H) for shape (..., H), fresh random values."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, device=device).to(dtype) * 2
    return h, torch.randn(*shape, generator=g, device=device).to(dtype)


@pytest.mark.parametrize("shape", [(1, 72), (2, 7, 100), (2, 300, 72), (4, 1152), (2, 3, 1536), (40, 1100), (3, 8)])
@pytest.mark.parametrize("dtype", list(TOL))
def test_swiglu_packed_matches_reference(shape, dtype, device):
    check_against_reference(*make_inputs(shape, dtype, device))


def _as_packed(fn):
    return lambda h: fn(*h.chunk(2, dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_wrapper_matches_reference(dtype, device):
    """swiglu(a, b) for separate halves goes through the same op and matches swiglu_ref."""
    check_against_reference(*make_inputs((2, 7, 100), dtype, device), fn=_as_packed(swiglu), ref=_as_packed(swiglu_ref))


def test_swiglu_noncontiguous_inputs(device):
    """h whose rows are not contiguous (a transposed view), and a, b as separate tensors."""
    h, dout = make_inputs((7, 3, 40), torch.float32, device, seed=1)
    h_t, dout_t = h.transpose(0, 1), dout.transpose(0, 1)  # (3, 7, 80): leading dims do not collapse
    for got, want in zip(run(swiglu_packed, h_t, dout_t), run(swiglu_packed_ref, h_t, dout_t)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
    a, b = torch.randn(2, 2, 9, 40, device=device).unbind(0)
    torch.testing.assert_close(swiglu(a, b), swiglu_ref(a, b), **TOL[torch.float32])


def test_swiglu_rejects_bad_inputs(device):
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(2, 8, device=device), torch.randn(2, 9, device=device))
    with pytest.raises(ValueError, match="even last dim"):
        swiglu_packed(torch.randn(2, 9, device=device))


def test_swiglu_registration(device):
    """torch.library.opcheck: schema (new outputs, no aliasing), fake impl, autograd registration."""
    h = torch.randn(3, 5, 2 * 24, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fae_fast.swiglu_packed_fwd.default, (h,))


def test_swiglu_compiles_fullgraph(device):
    h, dout = make_inputs((2, 7, 72), torch.float32, device, seed=2)
    compiled = torch.compile(swiglu_packed, fullgraph=True, backend=COMPILE_BACKEND)
    for got, want in zip(run(compiled, h, dout), run(swiglu_packed, h, dout)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [3072, 4096])  # LightningDiT-XL SwiGLU hidden, FAE feature decoder
def test_swiglu_packed_real_size_bf16(hidden):
    check_against_reference(*make_inputs((256, 256, hidden), torch.bfloat16, "cuda", seed=3))
