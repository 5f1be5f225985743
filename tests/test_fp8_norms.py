"""The norms that emit their FP8 linear's input (FP8 training with the FP8 weight gradient): the modulated norm's
and the fused residual-norm's FP8 kernels bit for bit against quantize_rows of the bf16 norm (every norm kind
and modulation layout, odd widths), their statistics and h equal to the plain kernels', the fused Functions'
outputs and gradients equal to the unfused FP8 modules', eagerly and compiled, and the block path: a converted
LightningDiT trains the same numbers with and without it. CPU runs go through TRITON_INTERPRET=1 and the
emulated scaled GEMM."""
import pytest
import torch

from fae_fast.config import generator_config
from fae_fast.fp8 import fp8_linear, fp8_norm_linear, fp8_residual_norm_swiglu, fp8_swiglu_mlp, use_fp8
from fae_fast.generators import Generator
from fae_fast.kernels.fp8 import quantize_rows_ref
from fae_fast.kernels.gated_residual import (gated_residual_fwd, gated_residual_modulated_norm,
                                             gated_residual_modulated_norm_fp8_ref, gated_residual_modulated_norm_fp8_stats)
from fae_fast.kernels.modulated_norm import (modulated_norm, modulated_norm_fp8_ref, modulated_norm_fp8_stats,
                                             modulated_norm_fwd)

from kernel_testing import COMPILE_BACKEND  # noqa: E402 (tests/ is on sys.path)

LAYOUTS = ["per_sample", "per_token"]


def norm_inputs(B, T, D, dtype, layout, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    mod = (B, D) if layout == "per_sample" else (B, T, D)
    x = (rnd(B, T, D) * torch.logspace(-2, 2, T, device=device)[None, :, None]).to(dtype)  # rows of every size
    return x, rnd(*mod).to(dtype), rnd(*mod).to(dtype), rnd(D).to(dtype)


def bits(q):
    return q.view(torch.uint8)


FP32_ULP = 2.0 ** -23


def assert_within_ulps_of_the_stats(got, want, magnitude):
    """Statistics (mean, rstd) from the FP8-emitting kernel against the plain kernel's: equal through the
    interpreter; compiled for a GPU the two kernels' reductions are scheduled differently, and on an H200
    (2026-12-02) rstd differed by up to 2 ulps of fp32 (relative 2.4e-7 at 32,768 x 1,152). A sum's rounding
    scales with its terms, not with the sum: `magnitude` is the row's typical term (rstd itself for rstd, a sum
    of squares; the mean |x| for the mean, which cancels towards zero: there the H200 differed by 2.3e-10 at a
    mean of 2.7e-4 of a row whose mean |x| is ~1, 2026-12-03)."""
    assert got.shape == want.shape
    if want.numel():  # an RMSNorm has no mean: an empty tensor
        assert (got - want).abs().le(4 * FP32_ULP * magnitude.reshape(want.shape) + 1e-30).all()


def row_magnitude(x):
    """The mean |x| of each row of x (B, T, D): (B * T,) fp32, the scale of a row mean's rounding."""
    return x.float().abs().mean(-1).flatten()


def assert_gradients_agree(name, got, want):
    """Gradients of the fused Function against the modules': computed by the same kernels from statistics up to
    a few fp32 ulps apart (above), so bit-equal through the interpreter and on a GPU within one unit in the last
    place of the gradient's own dtype, relative to its largest element (bf16: 2^-8; fp32 sums: 2^-20), and
    as close in norm."""
    assert got.dtype == want.dtype, name
    if not got.is_cuda:
        assert torch.equal(got, want), name
        return
    unit = 2.0 ** -8 if want.dtype == torch.bfloat16 else 2.0 ** -20
    assert (got.float() - want.float()).abs().le(unit * want.float().abs().max()).all(), name
    assert ((got.float() - want.float()).norm() <= unit * want.float().norm()), name


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 19, 72), (1, 33, 1152), (3, 5, 100)])
def test_the_norm_emits_the_quantised_bf16_norm_bit_for_bit(norm, layout, dtype, shape, device):
    x, scale, shift, weight = norm_inputs(*shape, dtype, layout, device)
    weight = weight if norm == "rms" else None
    q, s, mean, rstd = modulated_norm_fp8_stats(x, scale, shift, weight, norm=norm, eps=1e-6)
    want_q, want_s = quantize_rows_ref(modulated_norm(x, scale, shift, weight, norm=norm).bfloat16().flatten(0, 1))
    assert torch.equal(bits(q), bits(want_q)) and torch.equal(s, want_s)
    ref_q, ref_s = modulated_norm_fp8_ref(x, scale, shift, weight, norm=norm)  # the reference: within a bf16 step
    assert torch.equal(s, ref_s) and (q.float() - ref_q.float()).abs().le(q.float().abs() / 8 + 1e-9).all()
    _, want_mean, want_rstd = modulated_norm_fwd(x, scale, shift, weight, norm, 1e-6)
    assert_within_ulps_of_the_stats(rstd, want_rstd, want_rstd.abs())
    assert_within_ulps_of_the_stats(mean, want_mean, row_magnitude(x))


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 19, 72), (1, 33, 1152)])
def test_the_residual_norm_emits_h_and_the_quantised_norm_bit_for_bit(norm, layout, shape, device):
    x, scale, shift, weight = norm_inputs(*shape, torch.bfloat16, layout, device)
    y, gate, _, _ = norm_inputs(*shape, torch.bfloat16, layout, device, seed=1)
    weight = weight if norm == "rms" else None
    h, q, s, mean, rstd = gated_residual_modulated_norm_fp8_stats(x, gate, y, scale, shift, weight, norm=norm)
    want_h, n, want_mean, want_rstd = gated_residual_fwd(x, gate, y, scale, shift, weight, norm)
    assert_within_ulps_of_the_stats(rstd, want_rstd, want_rstd.abs())
    assert_within_ulps_of_the_stats(mean, want_mean, row_magnitude(want_h))  # h is normed
    want_q, want_s = quantize_rows_ref(n.flatten(0, 1))
    assert torch.equal(h, want_h) and torch.equal(bits(q), bits(want_q)) and torch.equal(s, want_s)
    ref_h, ref_q, ref_s = gated_residual_modulated_norm_fp8_ref(x, gate, y, scale, shift, weight, norm=norm)
    assert torch.equal(h, ref_h) and torch.equal(s, ref_s)


def outputs_and_grads(fn, leaves, grads_out):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in leaves]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grads_out)
    return [*outs] + [t.grad for t in leaves if t is not None]


def block_leaves(device, layout, rows=(4, 16), D=96, hidden=128, norm="rms", seed=0):
    B, T = rows
    x, scale, shift, weight = norm_inputs(B, T, D, torch.bfloat16, layout, device, seed)
    y, gate, _, _ = norm_inputs(B, T, D, torch.bfloat16, layout, device, seed + 1)
    g = torch.Generator(device=device).manual_seed(seed + 2)
    w = lambda *shape: (torch.randn(*shape, generator=g, device=device) / shape[-1] ** 0.5)  # noqa: E731
    weight = weight.float() if norm == "rms" else None
    return x, gate, y, scale, shift, weight, w(2 * hidden, D), w(2 * hidden), w(D, hidden), w(D)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_fused_norm_linear_is_the_norm_then_the_fp8_linear(norm, layout, device):
    """The output equal to the plain norm followed by `fp8_linear` with the FP8 weight gradient, bit for bit, and
    every gradient (x, scale, shift, the norm's weight, the linear's weight and bias) equal up to the statistics'
    ulps (`assert_gradients_agree`)."""
    x, _, _, scale, shift, nw, w1, b1, _, _ = block_leaves(device, layout, norm=norm)
    leaves = [x, scale, shift, nw, w1, b1]
    dy = torch.randn(*x.shape[:2], w1.shape[0], device=device).bfloat16()
    fused = outputs_and_grads(lambda x, s, h, nw, w, b: fp8_norm_linear(x, s, h, nw, w, b, norm=norm, eps=1e-6),
                              leaves, (dy,))
    plain = outputs_and_grads(lambda x, s, h, nw, w, b: fp8_linear(modulated_norm(x, s, h, nw, norm=norm), w, b, True),
                              leaves, (dy,))
    assert torch.equal(fused[0], plain[0])
    for name, a, b in zip(["dx", "dscale", "dshift", "dnorm_weight", "dweight", "dbias"], fused[1:], plain[1:]):
        assert_gradients_agree(name, a, b)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_fused_residual_norm_mlp_is_the_residual_norm_then_the_fp8_mlp(norm, layout, device):
    leaves = list(block_leaves(device, layout, norm=norm))
    x = leaves[0]
    dh, dout = torch.randn_like(x), torch.randn_like(x)

    def fused(x, gate, y, scale, shift, nw, w1, b1, w2, b2):
        return fp8_residual_norm_swiglu(x, gate, y, scale, shift, nw, w1, b1, w2, b2, norm=norm, eps=1e-6)

    def plain(x, gate, y, scale, shift, nw, w1, b1, w2, b2):
        h, n = gated_residual_modulated_norm(x, gate, y, scale, shift, nw, norm=norm)
        return h, fp8_swiglu_mlp(n, w1, b1, w2, b2, True)

    got, want = outputs_and_grads(fused, leaves, (dh, dout)), outputs_and_grads(plain, leaves, (dh, dout))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # h and the MLP's output
    names = ["dx", "dgate", "dy", "dscale", "dshift"] + (["dnorm_weight"] if norm == "rms" else []) + \
        ["dw1", "db1", "dw2", "db2"]
    for name, a, b in zip(names, got[2:], want[2:], strict=True):
        assert_gradients_agree(name, a, b)


def test_the_fused_functions_compile_to_what_they_compute_eagerly(device):
    leaves = list(block_leaves(device, "per_sample"))
    x = leaves[0]
    dh, dout = torch.randn_like(x), torch.randn_like(x)

    def both(x, gate, y, scale, shift, nw, w1, b1, w2, b2):
        qkv = fp8_norm_linear(x, scale, shift, nw, w1, b1, norm="rms", eps=1e-6)
        h, out = fp8_residual_norm_swiglu(x, gate, y, scale, shift, nw, w1, b1, w2, b2, norm="rms", eps=1e-6)
        return h, out + qkv[..., : out.shape[-1]]

    eager = outputs_and_grads(both, leaves, (dh, dout))
    compiled = outputs_and_grads(torch.compile(both, backend=COMPILE_BACKEND, fullgraph=True), leaves, (dh, dout))
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


def test_the_fp8_norm_ops_registrations(device):
    x, scale, shift, weight = norm_inputs(2, 16, 96, torch.bfloat16, "per_sample", device)
    checks = ("test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fae_fast.modulated_norm_fp8_fwd.default, (x, scale, shift, weight, "rms", 1e-6),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.fae_fast.gated_residual_modulated_norm_fp8_fwd.default,
                          (x, scale, x.flip(1), scale, shift, None, "layer", 1e-6), test_utils=checks)


def tiny_lightningdit(impl):
    cfg = generator_config("LightningDiT-tiny/1", width=96, heads=4, depth=3, grid=4, in_channels=8, num_classes=10)
    torch.manual_seed(0)
    return cfg, Generator(cfg, impl=impl)


def test_use_fp8_gives_the_norms_the_fp8_outputs_only_where_the_fused_path_holds():
    """With the FP8 weight gradient on the fused kernels: every FP8 block, not the bf16 end blocks; not with the
    bf16 weight gradient (it reads the bf16 norm output) nor on the PyTorch ops."""
    _, model = tiny_lightningdit("triton")
    use_fp8(model, torch.device("cpu"), weight_gradient=True, bf16_end_blocks=1)
    assert [b.fp8_norms for b in model.blocks] == [False, True, False]
    for impl, weight_gradient in (("triton", False), ("torch", True)):
        _, model = tiny_lightningdit(impl)
        use_fp8(model, torch.device("cpu"), weight_gradient=weight_gradient)
        assert not any(b.fp8_norms for b in model.blocks)


@pytest.mark.parametrize("batch", [4, 3])  # 64 rows, and 48: both multiples of 16
def test_a_converted_lightningdit_trains_the_same_numbers_with_the_norms_emitting_fp8(batch, device):
    """The whole model, under bf16 autocast: the output and every parameter's gradient equal with the fused
    path and with the three modules in a row (fp8_norms off): bit for bit through the interpreter, within the
    statistics' ulps on a GPU (`assert_gradients_agree`)."""
    cfg, model = tiny_lightningdit("triton")
    model = model.to(device)
    use_fp8(model, device, weight_gradient=True)
    assert all(b.fp8_norms for b in model.blocks)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, cfg.grid ** 2, cfg.in_channels, generator=g, device=device)
    t = torch.rand(batch, generator=g, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g, device=device)
    results = []
    for fused in (True, False):
        for block in model.blocks:
            block.fp8_norms = fused
        model.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model.train()(x, t, y)
        out.float().square().mean().backward()
        results.append([out] + [p.grad.clone() for p in model.parameters()])
    (out, *grads), (want_out, *want_grads) = results
    assert_gradients_agree("output", out, want_out)  # the forward too: the blocks' outputs feed the next norm
    for (name, _), a, b in zip(model.named_parameters(), grads, want_grads, strict=True):
        assert_gradients_agree(name, a, b)


def test_fp8_sampling_blocks_take_the_norms_emitting_fp8_and_stay_the_same_fp8_model(device):
    """use_fp8_sampling on the fused kernels: every block's norms and SwiGLU gate emit their FP8 linear's input
    (`fp8_sampling_block`, taken by each block in eval mode). It is the same FP8 model as its linears fed the
    bf16 norm outputs (the flag off), but for the gate, which quantises its fp32 activation rather than that
    rounded to bf16: with the flag off and the MLP's gate quantising fp32 as well, the two are bit for bit
    equal; compiled equals eager (through the interpreter, where compile runs the same kernels); the output
    stays within FP8's rounding of the bf16 model's. Not on the PyTorch ops."""
    import fae_fast.fp8 as fp8
    from fae_fast.kernels.swiglu import swiglu_packed_fp8

    def mlp_with_the_fp32_gate(mlp):
        def forward(x):
            h = mlp.fc1(x)
            aq, a_scale, _ = swiglu_packed_fp8(h.reshape(-1, h.shape[-1]), False)
            return mlp.fc2.from_quantized(aq, a_scale, x.shape[:-1])
        return forward

    cfg, model = tiny_lightningdit("triton")
    model = model.to(device).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # past the zero start: every block contributes
    model = model.bfloat16()
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(3, cfg.grid ** 2, cfg.in_channels, generator=g, device=device)
    t = torch.rand(3, generator=g, device=device)
    y = torch.randint(0, cfg.num_classes, (3,), generator=g, device=device)
    with torch.no_grad():
        plain = model(x, t, y).float()
        fp8.use_fp8_sampling(model, device)
        assert all(b.fp8_sampling for b in model.blocks)
        taken, real = [], fp8.fp8_sampling_block
        fp8.fp8_sampling_block = lambda block, *args: taken.append(block) or real(block, *args)
        try:
            fused = model(x, t, y)
        finally:
            fp8.fp8_sampling_block = real
        assert taken == list(model.blocks)
        if device.type == "cpu":
            compiled = torch.compile(model, backend=COMPILE_BACKEND, fullgraph=True)(x, t, y)
            assert torch.equal(compiled, fused)
        for block in model.blocks:
            block.fp8_sampling = False
            block.mlp.forward = mlp_with_the_fp32_gate(block.mlp)
        assert torch.equal(model(x, t, y), fused)
    error = relative(fused.float(), plain)
    assert 1e-4 < error < 0.05, error  # FP8's rounding of the block GEMMs' inputs, nothing larger
    _, torch_model = tiny_lightningdit("torch")
    fp8.use_fp8_sampling(torch_model.to(device).eval(), device)
    assert not any(b.fp8_sampling for b in torch_model.blocks)


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()
