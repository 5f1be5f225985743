"""modulated_norm kernel against its PyTorch reference: output and every gradient (dx, dscale, dshift,
dweight), LayerNorm and RMSNorm, with and without weight, per-sample and per-token modulation, every dtype,
odd widths and token counts; determinism of the reduced gradients; mixed dtypes; registration and
torch.compile. CPU runs go through TRITON_INTERPRET=1."""
import pytest
import torch

from fae_fast.kernels.modulated_norm import modulated_norm, modulated_norm_bwd, modulated_norm_fwd, modulated_norm_ref
from fae_fast.kernels.utils import RowLoop

from kernel_testing import COMPILE_BACKEND, TOL  # noqa: E402 (tests/ is on sys.path)
NORMS = [("layer", False), ("layer", True), ("rms", False), ("rms", True)]  # (norm, with weight)
# (B, T, D): tokens 1, 7, 37 (a last chunk shorter than the others), 256; widths 72, 1152, 1536. 256 tokens
# at width 1152 run in test_modulated_norm_long_rows only: the interpreter is slow there.
SHAPES = [(2, 1, 72), (2, 7, 1152), (3, 37, 72), (2, 7, 1536), (2, 256, 72)]


# Launches other than the default (kernels/utils.py): one row per program; tiles of 4 walking runs of 12
# tokens (a run ends inside a tile) with pipelined loads; tiles of 8 walking 64 tokens (one run per sample
# at T = 37).
LAUNCHES = [RowLoop(rows=1, num_warps=4, rows_per_program=1),
            RowLoop(rows=4, num_warps=4, rows_per_program=12, num_stages=3),
            RowLoop(rows=8, num_warps=8, rows_per_program=64, num_stages=2)]


def launch_id(launch):
    return f"rows{launch.rows}-run{launch.rows_per_program}-stages{launch.num_stages}"


def assert_launches_agree(got, want):
    """Outputs of one op under two launches: every row's math is the same, sums over tokens are cut into other
    chunks; so equal up to fp32 rounding. Empty placeholders must match too."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"output {i}: {g.shape} {g.dtype} != {w.shape} {w.dtype}"
        torch.testing.assert_close(g, w, **TOL[torch.float32], msg=lambda m: f"output {i}: {m}")


def assert_matches(name, out, ref, ref_lowp):
    """out within TOL of the high-precision reference; in bf16/fp16 also at most 2x the error of PyTorch
    computing in that dtype, both measured against that reference."""
    torch.testing.assert_close(out.to(ref.dtype), ref, **TOL[out.dtype], msg=lambda m: f"{name}: {m}")
    if out.dtype != torch.float32:
        err, err_torch = ((t.to(ref.dtype) - ref).abs().max().item() for t in (out, ref_lowp))
        assert err <= 2 * err_torch + 1e-6, f"{name}: kernel error {err:.3g} > 2 x torch {out.dtype} error {err_torch:.3g}"


def run(fn, inputs, douts, **kwargs):
    """fn(*inputs, **kwargs) on fresh leaves -> (outputs..., grads of every non-None input...)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, [t for t in leaves if t is not None], douts)
    return (*outs, *grads)


def upcast(tensors, dtype=torch.float64):
    return [None if t is None else t.to(dtype) for t in tensors]


def check_against_reference(fn, ref, names, inputs, douts, **kwargs):
    """Kernel on `inputs` vs the reference computing in fp64 on their upcasts (the exact answer, so that an
    fp32 kernel is not judged against fp32 rounding of a differently ordered sum), and vs the reference
    computing in the inputs' dtypes."""
    got = run(fn, inputs, douts, **kwargs)
    ref64 = run(ref, upcast(inputs), upcast(douts), upcast=False, **kwargs)
    ref_lowp = run(ref, inputs, douts, upcast=False, **kwargs)
    assert len(got) == len(ref64) == len(names)
    for name, g, r, rl in zip(names, got, ref64, ref_lowp):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert_matches(name, g, r, rl)


def modulation(B, T, D, per_token, device, dtype, n=2):
    """n random modulation tensors (B, D) or (B, T, D) (scale, shift, gate), never zero."""
    shape = (B, T, D) if per_token else (B, D)
    return [torch.randn(shape, device=device, dtype=dtype) * 0.5 + 0.1 * (i + 1) for i in range(n)]


def norm_inputs(B, T, D, with_weight, per_token, device, dtype):
    """x (offset so LayerNorm's mean matters), scale, shift, weight or None, and dy."""
    x = torch.randn(B, T, D, device=device, dtype=dtype) * 2 + 0.5
    scale, shift = modulation(B, T, D, per_token, device, dtype)
    weight = torch.rand(D, device=device, dtype=dtype) + 0.5 if with_weight else None
    return [x, scale, shift, weight], [torch.randn(B, T, D, device=device, dtype=dtype)]


def grad_names(with_weight):
    return ("y", "dx", "dscale", "dshift") + (("dweight",) if with_weight else ())


def norm_matrix(test):
    """Parametrise a test over dtype x (norm, with_weight) x per-sample / per-token x SHAPES."""
    for mark in (pytest.mark.parametrize("dtype", list(TOL), ids=str),
                 pytest.mark.parametrize("norm, with_weight", NORMS, ids=["layer", "layer_w", "rms", "rms_w"]),
                 pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"]),
                 pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))):
        test = mark(test)
    return test


@norm_matrix
def test_modulated_norm_matches_reference(shape, per_token, norm, with_weight, dtype, device):
    torch.manual_seed(0)
    inputs, douts = norm_inputs(*shape, with_weight, per_token, device, dtype)
    check_against_reference(modulated_norm, modulated_norm_ref, grad_names(with_weight), inputs, douts, norm=norm)


@pytest.mark.parametrize("norm, with_weight, per_token", [("layer", False, False), ("rms", True, True)],
                         ids=["layer-per_sample", "rms_w-per_token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_modulated_norm_long_rows(norm, with_weight, per_token, dtype, device):
    """256 tokens of width 1152: reductions over a whole sample (dscale, dshift) and over all rows (dweight)."""
    torch.manual_seed(7)
    inputs, douts = norm_inputs(2, 256, 1152, with_weight, per_token, device, dtype)
    check_against_reference(modulated_norm, modulated_norm_ref, grad_names(with_weight), inputs, douts, norm=norm)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_modulated_norm_mixed_dtypes(norm, device):
    """fp32 residual stream with bf16 scale/shift (autocast): fp32 output, each gradient in its input's dtype."""
    torch.manual_seed(1)
    inputs, douts = norm_inputs(2, 37, 72, norm == "rms", False, device, torch.float32)
    inputs[1], inputs[2] = inputs[1].bfloat16(), inputs[2].bfloat16()
    got = run(modulated_norm, inputs, douts, norm=norm)
    ref32 = run(modulated_norm_ref, [None if t is None else t.float() for t in inputs], douts, norm=norm)
    want_dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float32][: len(got)]
    for name, g, r, dt in zip(grad_names(norm == "rms"), got, ref32, want_dtypes):
        assert g.dtype == dt, f"{name}: dtype {g.dtype}, want {dt}"
        torch.testing.assert_close(g.float(), r, **TOL[dt], msg=lambda m: f"{name}: {m}")


def test_modulated_norm_strided_inputs(device):
    """scale/shift as chunks of one adaLN output (row stride 6D), per token too, and an x whose leading
    dims do not collapse (copied): the kernel reads strides, results match contiguous inputs."""
    torch.manual_seed(2)
    B, T, D = 3, 7, 72
    x = torch.randn(T, B, D, device=device).transpose(0, 1)  # (B, T, D), rows not a single stride
    for ada in (torch.randn(B, 6 * D, device=device), torch.randn(B, T, 6 * D, device=device)):
        shift, scale = ada.chunk(6, dim=-1)[:2]
        weight = torch.rand(D, device=device) + 0.5
        inputs, dy = [x, scale, shift, weight], [torch.randn(B, T, D, device=device)]
        got = run(modulated_norm, inputs, dy, norm="rms")
        want = run(modulated_norm, [t.contiguous() for t in inputs], dy, norm="rms")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
        check_against_reference(modulated_norm, modulated_norm_ref, grad_names(True), inputs, dy, norm="rms")


def assert_deterministic(fn, make_inputs, names, per_token, device):
    """Forward and backward twice on the same bf16 inputs (RMSNorm with weight, so every reduction runs):
    bit-identical outputs and gradients. Large on a GPU, where programs really run concurrently."""
    shape = (64, 256, 1152) if device.type == "cuda" else (3, 37, 1152)
    inputs, douts = make_inputs(*shape, True, per_token, device, torch.bfloat16)
    first, second = (run(fn, inputs, douts, norm="rms") for _ in range(2))
    for name, a, b in zip(names, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_modulated_norm_deterministic(per_token, device):
    """fp32 partial sums in a fixed order, no atomics."""
    torch.manual_seed(3)
    assert_deterministic(modulated_norm, norm_inputs, grad_names(True), per_token, device)


@pytest.mark.parametrize("launch", LAUNCHES, ids=launch_id)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("norm, with_weight", [("layer", False), ("rms", True)], ids=["layer", "rms_w"])
def test_modulated_norm_launches_agree(norm, with_weight, per_token, launch, device):
    """The launch configuration (an explicit launcher argument, swept by benchmarks/sweep_norms.py) changes how
    the work is cut, never the result: forward and backward match the default launch's."""
    torch.manual_seed(9)
    (x, scale, shift, weight), (dy,) = norm_inputs(3, 37, 72, with_weight, per_token, device, torch.float32)
    want = modulated_norm_fwd(x, scale, shift, weight, norm, 1e-6)
    assert_launches_agree(modulated_norm_fwd(x, scale, shift, weight, norm, 1e-6, launch=launch), want)
    stats = want[1:]
    assert_launches_agree(modulated_norm_bwd(dy, x, scale, weight, *stats, norm, shift.dtype, launch=launch),
                          modulated_norm_bwd(dy, x, scale, weight, *stats, norm, shift.dtype))


def test_modulated_norm_rejects_bad_launch(device):
    x, s = torch.randn(2, 7, 72, device=device), torch.randn(2, 72, device=device)
    with pytest.raises(ValueError, match="power of two"):
        modulated_norm_fwd(x, s, s, None, "layer", 1e-6, launch=RowLoop(rows=3, num_warps=4, rows_per_program=3))
    with pytest.raises(ValueError, match="rows_per_program at least rows"):
        modulated_norm_fwd(x, s, s, None, "layer", 1e-6, launch=RowLoop(rows=4, num_warps=4, rows_per_program=2))


def test_modulated_norm_rejects_bad_inputs(device):
    x = torch.randn(2, 7, 72, device=device)
    s = torch.randn(2, 72, device=device)
    with pytest.raises(ValueError, match="scale must be"):
        modulated_norm(x, torch.randn(2, 3, 72, device=device), s)
    with pytest.raises(ValueError, match="same shape"):
        modulated_norm(x, s, torch.randn(2, 7, 72, device=device))
    with pytest.raises(ValueError, match="norm must be"):
        modulated_norm(x, s, s, norm="batch")
    with pytest.raises(ValueError, match="weight must be"):
        modulated_norm(x, s, s, torch.ones(71, device=device), norm="rms")
    with pytest.raises(ValueError, match=r"x must be \(B, T, D\)"):
        modulated_norm(x[0], s, s)


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_modulated_norm_registration(per_token, device):
    """torch.library.opcheck: schema (fresh outputs, no aliasing), fake impl, autograd registration."""
    torch.manual_seed(4)
    (x, scale, shift, weight), _ = norm_inputs(2, 7, 72, True, per_token, device, torch.float32)
    args = [t.requires_grad_() for t in (x, scale, shift, weight)]
    torch.library.opcheck(torch.ops.fae_fast.modulated_norm_fwd.default, (*args, "rms", 1e-6))
    torch.library.opcheck(torch.ops.fae_fast.modulated_norm_fwd.default, (*args[:3], None, "layer", 1e-6))


def test_modulated_norm_compiles_fullgraph(device):
    """torch.compile(fullgraph=True) of a function around the op: same output and gradients as eager."""
    torch.manual_seed(5)
    inputs, douts = norm_inputs(2, 7, 72, True, False, device, torch.float32)

    def fn(x, scale, shift, weight):
        return modulated_norm(x * 2, scale, shift, weight, norm="rms") + 1

    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
    for got, want in zip(run(compiled, inputs, douts), run(fn, inputs, douts)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [1152, 1536])  # generator width, FAE feature width
@pytest.mark.parametrize("norm, with_weight", [("layer", False), ("rms", True)], ids=["layer", "rms_w"])
def test_modulated_norm_real_size_bf16(D, norm, with_weight):
    torch.manual_seed(6)
    inputs, douts = norm_inputs(256, 256, D, with_weight, False, torch.device("cuda"), torch.bfloat16)
    check_against_reference(modulated_norm, modulated_norm_ref, grad_names(with_weight), inputs, douts, norm=norm)


def test_host_integer_helpers_equal_tritons():
    """The launchers' plain-Python cdiv / next_power_of_2 (cheaper per call than Triton's constexpr
    functions) give Triton's answers on every size a launcher passes (n >= 1)."""
    import triton

    from fae_fast.kernels.utils import cdiv, next_power_of_2

    for n in [*range(1, 70), 72, 1023, 1024, 1025, 1152, 1536, 4096, 4097, 1 << 20]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 8, 64, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert cdiv(0, 8) == 0
