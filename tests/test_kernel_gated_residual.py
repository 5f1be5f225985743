"""gated_residual and gated_residual_modulated_norm kernels against their PyTorch references: every output
and gradient, per-sample and per-token gates, every dtype, odd shapes; an unused output (None gradient);
determinism; mixed dtypes; registration and torch.compile. CPU runs go through TRITON_INTERPRET=1."""
import pytest
import torch
from test_kernel_modulated_norm import (
    COMPILE_BACKEND, LAUNCHES, SHAPES, TOL, assert_deterministic, assert_launches_agree, check_against_reference,
    launch_id, modulation, norm_inputs, norm_matrix, run, upcast,
)

from fae_fast.kernels.gated_residual import (
    gated_residual, gated_residual_fwd, gated_residual_modulated_norm, gated_residual_modulated_norm_ref,
    gated_residual_ref,
)
from fae_fast.kernels.modulated_norm import modulated_norm, modulated_norm_ref
from fae_fast.kernels.norm_rows import norm_residual_bwd
from fae_fast.kernels.utils import RowLoop, fit_to_budget, pipelined_bytes

FUSED_NAMES = ("h", "n", "dx", "dgate", "dy", "dscale", "dshift")


def fused_ref(h_dtype):
    """The fused pair's reference with h rounded to h_dtype (the kernel's x.dtype) before the norm reads it,
    as the op defines n = modulated_norm(h) of the h it returns. Without this, an fp64 reference would
    normalise an h the op never had, and bf16 dscale would differ by h's rounding, not by kernel error."""

    def ref(x, gate, y, scale, shift, weight=None, **kwargs):
        h = gated_residual_ref(x, gate, y, upcast=kwargs.get("upcast", True))
        h = h + (h.to(h_dtype).to(h.dtype) - h).detach()  # rounded value, gradient untouched (not rounded)
        return h, modulated_norm_ref(h, scale, shift, weight, **kwargs)

    return ref


def residual_inputs(B, T, D, per_token, device, dtype):
    """x, gate, y and dh: random, never zero."""
    x, y, dh = (torch.randn(B, T, D, device=device, dtype=dtype) for _ in range(3))
    (gate,) = modulation(B, T, D, per_token, device, dtype, n=1)
    return [x, gate, y], [dh]


def fused_inputs(B, T, D, with_weight, per_token, device, dtype):
    """x, gate, y, scale, shift, weight or None; dh, dn."""
    (x, gate, y), (dh,) = residual_inputs(B, T, D, per_token, device, dtype)
    (_, scale, shift, weight), (dn,) = norm_inputs(B, T, D, with_weight, per_token, device, dtype)
    return [x, gate, y, scale, shift, weight], [dh, dn]


@pytest.mark.parametrize("shape", SHAPES + [(2, 256, 1152)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_gated_residual_matches_reference(shape, per_token, dtype, device):
    torch.manual_seed(0)
    inputs, douts = residual_inputs(*shape, per_token, device, dtype)
    check_against_reference(gated_residual, gated_residual_ref, ("h", "dx", "dgate", "dy"), inputs, douts)


@norm_matrix
def test_gated_residual_modulated_norm_matches_reference(shape, per_token, norm, with_weight, dtype, device):
    torch.manual_seed(1)
    inputs, douts = fused_inputs(*shape, with_weight, per_token, device, dtype)
    names = FUSED_NAMES + (("dweight",) if with_weight else ())
    check_against_reference(gated_residual_modulated_norm, fused_ref(dtype), names, inputs, douts, norm=norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_gated_residual_modulated_norm_long_rows(per_token, dtype, device):
    """256 tokens of width 1152: dgate, dscale, dshift summed over a whole sample, dweight over all rows."""
    torch.manual_seed(2)
    inputs, douts = fused_inputs(2, 256, 1152, True, per_token, device, dtype)
    check_against_reference(gated_residual_modulated_norm, fused_ref(dtype), FUSED_NAMES + ("dweight",), inputs, douts,
                            norm="rms")


def grads_of_one_output(fn, inputs, dout, which, **kwargs):
    """Gradients of every input when only output `which` (0: h, 1: n) of the fused pair is used; an input
    the used output does not depend on gets zeros."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, **kwargs)[which]
    return torch.autograd.grad(out, leaves, dout, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("which", [0, 1], ids=["h_only", "n_only"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_gated_residual_modulated_norm_one_output_used(which, per_token, device):
    """An unused h or n reaches the backward as None (no gradient) and counts as zero."""
    torch.manual_seed(3)
    inputs, douts = fused_inputs(3, 37, 72, True, per_token, device, torch.float32)
    got = grads_of_one_output(gated_residual_modulated_norm, inputs, douts[which], which, norm="rms")
    want = grads_of_one_output(gated_residual_modulated_norm_ref, upcast(inputs), douts[which].double(), which,
                               norm="rms", upcast=False)
    for name, g, w in zip(("dx", "dgate", "dy", "dscale", "dshift", "dweight"), got, want):
        torch.testing.assert_close(g.double(), w, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


def test_gated_residual_modulated_norm_mixed_dtypes(device):
    """fp32 residual stream x with bf16 gate, y (attention output), scale, shift under autocast: h and n in
    fp32, each gradient in its input's dtype."""
    torch.manual_seed(4)
    inputs, douts = fused_inputs(2, 37, 72, True, False, device, torch.float32)
    for i in (1, 2, 3, 4):
        inputs[i] = inputs[i].bfloat16()
    got = run(gated_residual_modulated_norm, inputs, douts, norm="rms")
    want = run(gated_residual_modulated_norm_ref, upcast(inputs), upcast(douts), norm="rms", upcast=False)
    f32, bf16 = torch.float32, torch.bfloat16
    for name, g, w, dt in zip(FUSED_NAMES + ("dweight",), got, want, (f32, f32, f32, bf16, bf16, bf16, bf16, f32)):
        assert g.dtype == dt, f"{name}: dtype {g.dtype}, want {dt}"
        torch.testing.assert_close(g.double(), w, **TOL[dt], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_gated_residual_modulated_norm_deterministic(per_token, device):
    """fp32 partial sums in a fixed order, no atomics."""
    torch.manual_seed(5)
    assert_deterministic(gated_residual_modulated_norm, fused_inputs, FUSED_NAMES + ("dweight",), per_token, device)


@pytest.mark.parametrize("launch", LAUNCHES, ids=launch_id)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_gated_residual_launches_agree(per_token, launch, device):
    """The fused pair and the plain gated residual, forward and backward, under another launch configuration:
    the same results as the default launch's (up to fp32 rounding of the sums over tokens)."""
    torch.manual_seed(9)
    (x, gate, y, scale, shift, weight), (dh, dn) = fused_inputs(3, 37, 72, True, per_token, device, torch.float32)
    want = gated_residual_fwd(x, gate, y, scale, shift, weight, "rms", 1e-6)
    assert_launches_agree(gated_residual_fwd(x, gate, y, scale, shift, weight, "rms", 1e-6, launch=launch), want)
    h, _, mean, rstd = want

    def bwd(dn, h, scale, weight, mean, rstd, **launch):
        return norm_residual_bwd(dn, h, scale, weight, mean, rstd, "rms", shift.dtype, dh, gate, y, **launch)

    fused = (dn, h, scale, weight, mean, rstd)
    assert_launches_agree(bwd(*fused, launch=launch), bwd(*fused))
    assert_launches_agree(gated_residual_fwd(x, gate, y, launch=launch), gated_residual_fwd(x, gate, y))
    plain = (None,) * 6  # no norm: the gated residual's own backward
    assert_launches_agree(bwd(*plain, launch=launch), bwd(*plain))

def test_gated_residual_rejects_bad_inputs(device):
    x = torch.randn(2, 7, 72, device=device)
    g = torch.randn(2, 72, device=device)
    with pytest.raises(ValueError, match="gate must be"):
        gated_residual(x, torch.randn(3, 72, device=device), x)
    with pytest.raises(ValueError, match="y must have"):
        gated_residual(x, g, x[:, :3])
    with pytest.raises(ValueError, match="same shape"):  # per-sample gate, per-token scale
        gated_residual_modulated_norm(x, g, x, torch.randn_like(x), torch.randn_like(x))


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_gated_residual_registration(per_token, device):
    """torch.library.opcheck: schema (fresh outputs, no aliasing), fake impl, autograd registration."""
    torch.manual_seed(6)
    inputs, _ = fused_inputs(2, 7, 72, True, per_token, device, torch.float32)
    x, gate, y, scale, shift, weight = (t.requires_grad_() for t in inputs)
    torch.library.opcheck(torch.ops.fae_fast.gated_residual_fwd.default, (x, gate, y))
    torch.library.opcheck(torch.ops.fae_fast.gated_residual_modulated_norm_fwd.default,
                          (x, gate, y, scale, shift, weight, "rms", 1e-6))
    torch.library.opcheck(torch.ops.fae_fast.gated_residual_modulated_norm_fwd.default,
                          (x, gate, y, scale, shift, None, "layer", 1e-6))


def test_gated_residual_compiles_fullgraph(device):
    """torch.compile(fullgraph=True) of a block-shaped function (fused pair, then a gated residual): same
    outputs and gradients as eager."""
    torch.manual_seed(7)
    inputs, douts = fused_inputs(2, 7, 72, True, False, device, torch.float32)

    def block(x, gate, y, scale, shift, weight):
        h, n = gated_residual_modulated_norm(x, gate, y, scale, shift, weight, norm="rms")
        return gated_residual(h, gate, torch.tanh(n))

    compiled = torch.compile(block, fullgraph=True, backend=COMPILE_BACKEND)
    for got, want in zip(run(compiled, inputs, douts[:1]), run(block, inputs, douts[:1])):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [1152, 1536])
@pytest.mark.parametrize("norm, with_weight", [("layer", False), ("rms", True)], ids=["layer", "rms_w"])
def test_gated_residual_real_size_bf16(D, norm, with_weight):
    torch.manual_seed(8)
    inputs, douts = fused_inputs(256, 256, D, with_weight, False, torch.device("cuda"), torch.bfloat16)
    names = FUSED_NAMES + (("dweight",) if with_weight else ())
    check_against_reference(gated_residual_modulated_norm, fused_ref(torch.bfloat16), names, inputs, douts, norm=norm)
    check_against_reference(gated_residual, gated_residual_ref, ("h", "dx", "dgate", "dy"), inputs[:3], douts[:1])


def test_launch_fits_shared_memory_budget():
    """The default forward launch of an fp32 per-token fused pair (five tensors streamed in 4096-value tiles,
    four stages) needs 240 KiB of pipelined tiles, over an H100/H200's 227 KiB: fitted, it keeps as many
    stages as fit; a launch that already fits is unchanged; one that cannot pipeline a single tile loses
    its pipeline, never its correctness."""
    launch = RowLoop(rows=4, num_warps=8, rows_per_program=64, num_stages=4)
    budget = 232448 - 8192
    assert pipelined_bytes(launch, 1024, 5 * 4) > budget
    fitted = fit_to_budget(launch, 1024, 5 * 4, budget)
    assert (fitted.rows, fitted.num_stages, fitted.rows_per_program) == (4, 3, 64)
    assert pipelined_bytes(fitted, 1024, 5 * 4) <= budget
    assert fit_to_budget(launch, 1024, 5 * 2, budget) == launch  # bf16: 120 KiB
    wide = fit_to_budget(RowLoop(rows=1, num_warps=16, rows_per_program=16, num_stages=4), 16384, 5 * 4, budget)
    assert wide.num_stages == 1 and wide.check() == wide


@pytest.mark.gpu
@pytest.mark.parametrize("D", [1152, 8192, 16384])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_every_norm_op_fits_the_device(D, dtype, per_token):
    """Every dtype and modulation mode of the three row-loop ops, forward and backward, at widths up to 16384,
    on the GPU at hand: launches sized from its shared memory run and match the references."""
    torch.manual_seed(10)
    cuda = torch.device("cuda")
    inputs, douts = fused_inputs(2, 40, D, True, per_token, cuda, dtype)
    names = FUSED_NAMES + ("dweight",)
    check_against_reference(gated_residual_modulated_norm, fused_ref(dtype), names, inputs, douts, norm="layer")
    check_against_reference(gated_residual, gated_residual_ref, ("h", "dx", "dgate", "dy"), inputs[:3], douts[:1])
    x, _, _, scale, shift, weight = inputs
    check_against_reference(modulated_norm, modulated_norm_ref, ("y", "dx", "dscale", "dshift", "dweight"),
                            [x, scale, shift, weight], douts[1:], norm="rms")
