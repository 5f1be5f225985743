"""Reparameterisation kernel against its PyTorch reference with the kernel's own noise: z, kl and the
moments' gradient, every dtype, odd channel counts, strided moments; the clamp; the noise itself
(standard normal, reproducible from (seed, offset)); deterministic KL; registration and torch.compile.
CPU runs go through TRITON_INTERPRET=1."""
import pytest
import torch

from fae_fast.kernels.reparameterize import reparameterize, reparameterize_noise, reparameterize_ref

from kernel_testing import COMPILE_BACKEND, TOL  # noqa: E402 (tests/ is on sys.path)
SEED, OFFSET = 1234, 77


def assert_matches(name, out, ref32, ref_lowp, dtype):
    """out within TOL[dtype] of the fp32 reference; in bf16/fp16 also at most 2x the error of PyTorch in that dtype."""
    torch.testing.assert_close(out.float(), ref32, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    if dtype != torch.float32:
        err, err_torch = (out.float() - ref32).abs().max().item(), (ref_lowp.float() - ref32).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, f"{name}: kernel error {err:.3g} > 2 x torch {dtype} error {err_torch:.3g}"


def make_inputs(B, T, C, dtype, device, layout="contiguous", seed=0):
    """moments (B, T, 2C) with logvar in about [-6, 6] (inside the clamp), upstream grads dz (B, T, C), dkl (B,)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if layout == "contiguous":
        moments = torch.randn(B, T, 2 * C, generator=g)
    elif layout == "slice":  # a column slice of a wider tensor: row stride 2C + 3
        moments = torch.randn(B, T, 2 * C + 3, generator=g)[..., 1:1 + 2 * C]
    else:  # "transposed": (T, B, 2C) memory, B stride < T stride
        moments = torch.randn(T, B, 2 * C, generator=g).transpose(0, 1)
    moments = (moments * 2).to(device, dtype)
    return moments, torch.randn(B, T, C, generator=g).to(device, dtype), torch.randn(B, generator=g).to(device)


def run(fn, moments, dz, dkl, cast=None):
    """fn(moments) -> (z, kl, dmoments); `cast` upcasts the inputs first."""
    cast = cast or (lambda t: t)
    m = cast(moments).detach().requires_grad_()
    z, kl = fn(m)
    (dm,) = torch.autograd.grad((z, kl), m, (cast(dz), dkl))
    return z, kl, dm


def check_against_reference(moments, dz, dkl):
    B, T, C2 = moments.shape
    eps = reparameterize_noise((B, T, C2 // 2), SEED, offset=OFFSET, device=moments.device)
    got = run(lambda m: reparameterize(m, SEED, offset=OFFSET), moments, dz, dkl)
    ref32 = run(lambda m: reparameterize_ref(m, eps), moments, dz, dkl, cast=lambda t: t.float())
    ref_lowp = run(lambda m: reparameterize_ref(m, eps), moments, dz, dkl)
    assert got[0].dtype == moments.dtype and got[1].dtype == torch.float32
    for name, g, r, rl in zip(("z", "kl", "dmoments"), got, ref32, ref_lowp):
        assert_matches(name, g, r, rl, moments.dtype)


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 7, 5), (3, 16, 32), (2, 40, 1)])
@pytest.mark.parametrize("dtype", list(TOL))
def test_reparameterize_matches_reference(shape, dtype, device):
    check_against_reference(*make_inputs(*shape, dtype, device))


@pytest.mark.parametrize("layout", ["slice", "transposed"])
def test_reparameterize_strided_moments(layout, device):
    check_against_reference(*make_inputs(3, 9, 5, torch.float32, device, layout))


def test_reparameterize_clamps_logvar(device):
    """logvar outside [-30, 20] is clamped in z and kl, and gets no gradient; inside it does."""
    mu = torch.randn(2, 3, 4, device=device)
    logvar = torch.tensor([-40.0, -31.0, 21.0, 25.0], device=device).expand(2, 3, 4).clone()
    logvar[:, :, 0] = 1.5
    moments = torch.cat([mu, logvar], dim=-1)
    eps = reparameterize_noise((2, 3, 4), SEED, device=device)
    dz, dkl = torch.randn(2, 3, 4, device=device), torch.randn(2, device=device)
    got = run(lambda m: reparameterize(m, SEED), moments, dz, dkl)
    want = run(lambda m: reparameterize_ref(m, eps), moments, dz, dkl)
    for name, g, w in zip(("z", "kl", "dmoments"), got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")
    dlogvar = got[2][..., 4:]
    assert torch.all(dlogvar[..., 1:] == 0) and torch.all(dlogvar[..., 0] != 0)


def test_noise_is_standard_normal_and_reproducible(device):
    eps = reparameterize_noise((4, 256, 256), SEED, device=device).double()  # 262,144 draws
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / n**0.5  # 5 standard errors
    assert abs(eps.std().item() - 1) < 5 / (2 * n) ** 0.5
    assert abs((eps**4).mean().item() - 3) < 0.1  # kurtosis of a normal (std error about 0.01)
    assert torch.equal(eps, reparameterize_noise((4, 256, 256), SEED, device=device).double())


def test_noise_depends_on_seed_and_offset(device):
    shape = (2, 16, 8)
    base = reparameterize_noise(shape, SEED, device=device).flatten()
    other_seed = reparameterize_noise(shape, SEED + 1, device=device).flatten()
    shifted = reparameterize_noise(shape, SEED, offset=5, device=device).flatten()
    assert (base == other_seed).float().mean() < 0.01
    assert (base == shifted).float().mean() < 0.01
    assert torch.equal(shifted[:-5], base[5:])  # offset advances the Philox counter by exactly that much


def test_reparameterize_uses_the_seed(device):
    moments = make_inputs(2, 8, 4, torch.float32, device)[0]
    z1, kl1 = reparameterize(moments, SEED)
    z2, _ = reparameterize(moments, SEED)
    z3, kl3 = reparameterize(moments, SEED + 1)
    assert torch.equal(z1, z2) and not torch.allclose(z1, z3)
    assert torch.equal(kl1, kl3)  # the KL does not depend on the noise


def test_reparameterize_is_deterministic(device):
    """kl is one program's fixed-order fp32 sum per sample, and the backward regenerates the same eps."""
    inputs = make_inputs(3, 300, 32, torch.float32, device)
    fn = lambda m: reparameterize(m, SEED, offset=OFFSET)  # noqa: E731
    for name, a, b in zip(("z", "kl", "dmoments"), run(fn, *inputs), run(fn, *inputs)):
        assert torch.equal(a, b), name


def test_reparameterize_rejects_bad_arguments(device):
    with pytest.raises(ValueError, match=r"\(B, T, 2C\)"):
        reparameterize(torch.randn(2, 3, 5, device=device), SEED)
    with pytest.raises(ValueError, match="int32"):
        reparameterize(torch.randn(2, 3, 4, device=device), SEED, offset=2**31 - 5)


def test_reparameterize_registration(device):
    """torch.library.opcheck: schema (new outputs, no aliasing), fake impl, autograd registration."""
    moments = make_inputs(2, 5, 3, torch.float32, device)[0].requires_grad_()
    torch.library.opcheck(torch.ops.fae_fast.reparameterize_fwd.default, (moments, SEED, OFFSET))


def test_reparameterize_compiles_fullgraph(device):
    inputs = make_inputs(2, 7, 5, torch.float32, device)
    compiled = torch.compile(reparameterize, fullgraph=True, backend=COMPILE_BACKEND)
    got = run(lambda m: compiled(m, SEED, offset=OFFSET), *inputs)
    want = run(lambda m: reparameterize(m, SEED, offset=OFFSET), *inputs)
    for name, a, b in zip(("z", "kl", "dmoments"), got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
def test_reparameterize_real_size_bf16():
    inputs = make_inputs(256, 256, 32, torch.bfloat16, "cuda")
    check_against_reference(*inputs)
    fn = lambda m: reparameterize(m, SEED, offset=OFFSET)  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(run(fn, *inputs), run(fn, *inputs))), "not deterministic"
