"""FP8 training pieces: the rowwise quantising kernel bit for bit against its PyTorch reference (every input
dtype, odd widths, strided views, zero rows, huge and tiny rows), the scale's contract, the FP8 linear's
output and gradients against the same GEMMs computed from the dequantised operands, the class swap
(same state dict, eval mode unchanged), torch.compile, and the device check; the transposing requantisation
of the FP8 weight gradient bit for bit against its reference and that gradient against its GEMM. CPU runs go
through TRITON_INTERPRET=1 and an emulated scaled GEMM."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fae_fast.config import generator_config
from fae_fast.fp8 import (Float8Linear, Float8SwiGLU, check_fp8_device, convert_to_fp8, fp8_linear, fp8_swiglu_mlp,
                          use_fp8)
from fae_fast.generators import Generator
from fae_fast.kernels.swiglu import swiglu_packed_ref
from fae_fast.layers import Ops, SwiGLU
from fae_fast.kernels.fp8 import (E4M3_MAX, quantize_rows, quantize_rows_and_sum, quantize_rows_and_sum_ref,
                                  quantize_rows_ref, requantize_transposed, requantize_transposed_ref)

from kernel_testing import COMPILE_BACKEND  # noqa: E402 (tests/ is on sys.path)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rows_of_every_magnitude(n_rows, n_cols, dtype, device, seed=0):
    """Rows scaled from 1e-3 to 1e3 (every binade of the scale), one row all zeros, values with ties."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n_rows, n_cols, generator=g, device=device) * torch.logspace(-3, 3, n_rows, device=device)[:, None]
    x[n_rows // 2] = 0.0
    return x.to(dtype)


def bits(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("shape", [(1, 16), (7, 100), (33, 1152), (5, 3456), (3, 6144), (64, 72)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_rows_matches_reference_bit_for_bit(shape, dtype, device):
    x = rows_of_every_magnitude(*shape, dtype, device)
    q, s = quantize_rows(x)
    q_ref, s_ref = quantize_rows_ref(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape and s.shape == (shape[0], 1)
    assert torch.equal(bits(q), bits(q_ref))
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("shape", [(1, 16), (7, 100), (33, 1152), (1000, 80), (5, 6144)])
def test_quantize_rows_and_sum_quantises_the_same_and_sums_the_columns(shape, device):
    """The bias gradient comes from the quantising pass over dy: q and s bit for bit those of quantize_rows,
    the fp32 column sums as PyTorch's (in another order: to fp32 rounding), the same on every run. Strided rows
    give the same q and s and sums to the same rounding bound, not bit for bit: on the H200 the compiled
    kernel's in-tile reduction order depends on the strides (it differed at (7, 100))."""
    x = rows_of_every_magnitude(*shape, torch.bfloat16, device)
    q, s, sums = quantize_rows_and_sum(x)
    q_ref, s_ref, sums_ref = quantize_rows_and_sum_ref(x)
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)
    assert sums.dtype == torch.float32 and sums.shape == (shape[1],)
    bound = 1e-6 * x.float().abs().sum(0) + 1e-30
    assert torch.all((sums - sums_ref).abs() <= bound)
    assert torch.equal(quantize_rows_and_sum(x)[2], sums)  # deterministic
    q_strided, s_strided, sums_strided = quantize_rows_and_sum(x.t().contiguous().t())
    assert torch.equal(bits(q_strided), bits(q)) and torch.equal(s_strided, s)
    assert torch.all((sums_strided - sums_ref).abs() <= bound)


def test_quantize_rows_of_a_transposed_view(device):
    w = rows_of_every_magnitude(48, 80, torch.bfloat16, device)
    q, s = quantize_rows(w.t())  # the columns of w, read through strides
    q_ref, s_ref = quantize_rows_ref(w.t().contiguous())
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_is_the_smallest_power_of_two_that_fits_the_row(dtype, device):
    x = rows_of_every_magnitude(40, 300, dtype, device)
    q, s = quantize_rows(x)
    amax = x.float().abs().amax(1, keepdim=True)
    nonzero = amax[:, 0] > 0
    mantissa, _ = torch.frexp(s)
    assert torch.all(mantissa == 0.5)  # powers of two
    assert torch.all(amax[nonzero] <= E4M3_MAX * s[nonzero])
    assert torch.all(amax[nonzero] > E4M3_MAX * s[nonzero] / 2)  # the smallest: half of it would overflow
    # the row's largest value lands in e4m3's top binade and every value within half a step (2^-4 relative)
    deq = q.float() * s
    assert q.float().abs().amax(1)[nonzero].min() >= 224
    normal = x.float().abs() >= 2.0**-6 * s  # values in e4m3's normal range after scaling
    err = (deq - x.float()).abs()
    assert torch.all(err[normal] <= x.float().abs()[normal] * 2.0**-4)
    assert torch.all(q[~nonzero].float() == 0)


def test_values_on_a_rounding_tie_go_to_even(device):
    # with scale 1 (amax 448): 216 lies halfway between 208 and 224 -> 224 (even mantissa); 58 -> 56;
    # 127.5 rounds up into the next binade, 128
    x = torch.tensor([[448.0, 216.0, -58.0, 152.0, 127.5, -0.0, 1e-9]], device=device)
    q, s = quantize_rows(x)
    assert s.item() == 1.0
    assert q.float().tolist()[0] == [448.0, 224.0, -56.0, 160.0, 128.0, 0.0, 0.0]
    assert torch.signbit(q.float()[0, 5])  # -0.0 keeps its sign, as the cast does


def dequantized(t):
    q, s = quantize_rows_ref(t)
    return q.float() * s


def assert_gemm_close(got, a, b, bias=None):
    """got ~ a @ b^T (+ bias) with a, b the dequantised operands: within bf16's rounding of the result plus
    2^-10 of sum |a_ik b_jk| (the scale of a dot product's accumulation error: FP8 tensor cores accumulate
    in less than fp32)."""
    want = a @ b.t() + (0 if bias is None else bias)
    bound = 2.0**-8 * want.abs() + 2.0**-10 * (a.abs() @ b.abs().t())
    err = (got.float() - want).abs()
    assert torch.all(err <= bound), f"worst error {(err - bound).max().item():.3g} over the bound"


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_is_the_gemm_of_the_dequantised_operands(bias, device):
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(3, 37, 96, generator=g, device=device).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(80, 96, generator=g, device=device) * 0.1).requires_grad_()  # fp32 master weights
    b = torch.randn(80, generator=g, device=device).requires_grad_() if bias else None
    dy = torch.randn(3, 37, 80, generator=g, device=device).to(torch.bfloat16)
    y = fp8_linear(x, w, b)
    dx, dw, *db = torch.autograd.grad(y, [x, w] + ([b] if bias else []), dy)
    assert y.dtype == torch.bfloat16 and dx.dtype == x.dtype and dw.dtype == w.dtype
    # forward: q(x) s_x @ (q(W) s_W)^T (+ b), accumulated in fp32, rounded once to bf16
    x2, dy2 = x.detach().reshape(-1, 96), dy.reshape(-1, 80)
    assert_gemm_close(y.reshape(-1, 80), dequantized(x2), dequantized(w.detach()),
                      b.detach().to(torch.bfloat16).float() if bias else None)
    # input gradient: q(dy) s_dy @ q(W^T) s_W^T quantised along N; weight gradient in bf16
    assert_gemm_close(dx.reshape(-1, 96), dequantized(dy2), dequantized(w.detach().t()))
    want_dw = (dy2.float().t() @ x2.float())
    torch.testing.assert_close(dw, want_dw, atol=1e-2 * want_dw.abs().max().item(), rtol=2**-8)
    if bias:
        torch.testing.assert_close(db[0], dy2.float().sum(0), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("shape", [(1, 16), (7, 100), (130, 72), (64, 1152), (33, 3456)])
def test_requantize_transposed_matches_reference_bit_for_bit(shape, device):
    q, s = quantize_rows_ref(rows_of_every_magnitude(*shape, torch.bfloat16, device))
    qt, top = requantize_transposed(q, s)
    qt_ref, top_ref = requantize_transposed_ref(q, s)
    assert qt.dtype == torch.float8_e4m3fn and qt.shape == shape[::-1] and top.shape == (1,)
    assert qt.is_contiguous() and torch.equal(bits(qt), bits(qt_ref)) and torch.equal(top, top_ref)


def test_requantize_transposed_keeps_every_value_that_stays_normal(device):
    """Rows from 1e-3 to 1e3: each value moves down by its row's power-of-two distance to the largest scale;
    where it stays in e4m3's normal range it is exact, below that it is off by at most half the smallest
    step (2^-10 of the tensorwise scale), as a tensorwise quantisation of the original would be."""
    q, s = quantize_rows_ref(rows_of_every_magnitude(40, 96, torch.float32, device))
    qt, top = requantize_transposed(q, s)
    assert top.item() == s.max().item()
    before, after = q.float() * s, qt.float().t() * top
    normal = before.abs() >= 2.0**-6 * top
    assert normal.any() and (~normal).any()
    assert torch.equal(after[normal], before[normal])
    assert torch.all((after - before).abs()[~normal] <= 2.0**-10 * top)


def test_fp8_weight_gradient_is_the_gemm_of_the_tensorwise_operands(device):
    """With weight_gradient: the forward and input gradient are those of the default FP8 linear, bit for
    bit, and dW is the GEMM of the transposed, tensorwise-requantised q(dy) and q(x)."""
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(4, 36, 96, generator=g, device=device).to(torch.bfloat16)  # 144 rows: divisible by 16
    w = torch.randn(80, 96, generator=g, device=device) * 0.1
    b = torch.randn(80, generator=g, device=device)
    dy = torch.randn(4, 36, 80, generator=g, device=device).to(torch.bfloat16)
    results = {}
    for weight_gradient in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = fp8_linear(*leaves, weight_gradient=weight_gradient)
        results[weight_gradient] = (y, *torch.autograd.grad(y, leaves, dy))
    (y0, dx0, dw0, db0), (y1, dx1, dw1, db1) = results[False], results[True]
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1) and torch.equal(db0, db1)
    assert dw1.dtype == w.dtype and not torch.equal(dw0, dw1)  # a different GEMM, not the bf16 one
    xt, x_top = requantize_transposed_ref(*quantize_rows_ref(x.reshape(-1, 96)))
    dyt, dy_top = requantize_transposed_ref(*quantize_rows_ref(dy.reshape(-1, 80)))
    assert_gemm_close(dw1, dyt.float() * dy_top, xt.float() * x_top)
    exact = dy.reshape(-1, 80).float().t() @ x.reshape(-1, 96).float()
    assert (dw1 - exact).norm() < 0.1 * exact.norm()  # and near the true gradient


def test_fp8_weight_gradient_takes_bf16_when_the_rows_do_not_divide_by_16(device):
    g = torch.Generator(device=device).manual_seed(4)
    x = torch.randn(3, 37, 96, generator=g, device=device).to(torch.bfloat16)  # 111 rows
    w = torch.randn(80, 96, generator=g, device=device) * 0.1
    dy = torch.randn(3, 37, 80, generator=g, device=device).to(torch.bfloat16)
    grads = []
    for weight_gradient in (False, True):
        w_leaf = w.clone().requires_grad_()
        grads.append(torch.autograd.grad(fp8_linear(x, w_leaf, None, weight_gradient), w_leaf, dy)[0])
    assert torch.equal(grads[0], grads[1])


def test_fp8_weight_gradient_under_torch_compile_matches_eager(device):
    layer = nn.Linear(64, 48).to(device)
    convert_to_fp8(nn.Sequential(layer), weight_gradient=True)
    assert layer.fp8_weight_gradient
    x = torch.randn(4, 8, 64, device=device, dtype=torch.bfloat16)
    eager_out = layer(x)
    eager = torch.autograd.grad(eager_out.float().square().sum(), layer.weight)[0]
    compiled_out = torch.compile(layer, backend=COMPILE_BACKEND, fullgraph=True)(x)
    compiled = torch.autograd.grad(compiled_out.float().square().sum(), layer.weight)[0]
    assert torch.equal(eager_out, compiled_out) and torch.equal(eager, compiled)


def test_fp8_weight_gradient_is_refused_where_it_would_do_nothing():
    from fae_fast.cli import UsageError
    from fae_fast.fae_config import fae_recipe, validate
    from training.train_gen import parse_args

    with pytest.raises(UsageError, match="add --run.precision=fp8"):
        parse_args(["--run.fp8_weight_gradient=true"])
    assert parse_args(["--run.fp8_weight_gradient=true", "--run.precision=fp8"]).run.fp8_weight_gradient
    cfg = fae_recipe("tiny", "feature")
    cfg.run.fp8_weight_gradient = True
    with pytest.raises(ValueError, match="leave them off for train_fae.py"):
        validate(cfg)


def test_fp8_linear_under_torch_compile_matches_eager(device):
    layer = nn.Linear(64, 48).to(device)
    convert_to_fp8(nn.Sequential(layer))
    x = torch.randn(4, 10, 64, device=device, dtype=torch.bfloat16)
    eager = layer(x)
    compiled = torch.compile(layer, backend=COMPILE_BACKEND, fullgraph=True)(x)
    assert torch.equal(eager, compiled)


def swiglu_mlp_leaves(device, rows=(4, 32), seed=5, bias=True):
    """x (*rows, 96) bf16 and fp32 master weights of a SwiGLU MLP 96 -> 2 x 64 -> 96, all requiring grad,
    and an output gradient."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(*rows, 96, generator=g, device=device).to(torch.bfloat16)
    w1, w2 = torch.randn(128, 96, generator=g, device=device) * 0.1, torch.randn(96, 64, generator=g, device=device) * 0.1
    b1, b2 = (torch.randn(n, generator=g, device=device) * 0.1 if bias else None for n in (128, 96))
    dout = torch.randn(*rows, 96, generator=g, device=device).to(torch.bfloat16)
    return [t if t is None else t.requires_grad_() for t in (x, w1, b1, w2, b2)], dout


def mlp_outputs_and_grads(mlp, leaves, dout):
    out = mlp(*leaves)
    inputs = [t for t in leaves if t is not None]
    return [out.float()] + [g.float() for g in torch.autograd.grad(out, inputs, dout)]


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("weight_gradient", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_fp8_swiglu_mlp_is_closer_to_the_three_fp8_modules_than_they_are_to_fp32(weight_gradient, bias, device):
    """The fused MLP quantises the gate's fp32 output (and with the FP8 weight gradient fc1's fp32 output
    gradient) where the three modules in a row quantise their bf16 roundings: the same FP8 products up to
    that one rounding, so the two must agree far better than either agrees with the fp32 MLP."""
    leaves, dout = swiglu_mlp_leaves(device, bias=bias)

    def modules(x, w1, b1, w2, b2):
        return fp8_linear(swiglu_packed_ref(fp8_linear(x, w1, b1, weight_gradient)), w2, b2, weight_gradient)

    def exact(x, w1, b1, w2, b2):
        h = torch.nn.functional.linear(x.float(), w1, b1)
        return torch.nn.functional.linear(swiglu_packed_ref(h), w2, b2)

    fused = mlp_outputs_and_grads(lambda *a: fp8_swiglu_mlp(*a, weight_gradient), leaves, dout)
    unfused = mlp_outputs_and_grads(modules, leaves, dout)
    want = mlp_outputs_and_grads(exact, leaves, dout)
    names = ["out", "dx", "dw1"] + (["db1"] if bias else []) + ["dw2"] + (["db2"] if bias else [])
    for name, got, three, fp32 in zip(names, fused, unfused, want):
        if name == "db2":  # column sums of dout itself, in fp32 either way
            assert torch.equal(got, three) and relative(got, fp32) < 1e-6
            continue
        fp8_error = relative(three, fp32)
        assert 1e-4 < fp8_error < 0.1, (name, fp8_error)  # FP8's rounding, nothing larger
        assert relative(got, three) < 0.5 * fp8_error, (name, relative(got, three), fp8_error)
        assert relative(got, fp32) < 1.2 * fp8_error, (name, relative(got, fp32), fp8_error)


def test_fp8_swiglu_mlp_takes_the_bf16_weight_gradient_when_the_rows_do_not_divide_by_16(device):
    leaves, dout = swiglu_mlp_leaves(device, rows=(3, 37))  # 111 rows
    with_fp8, without = (mlp_outputs_and_grads(lambda *a, w=w: fp8_swiglu_mlp(*a, w), leaves, dout)
                         for w in (True, False))
    assert all(torch.equal(a, b) for a, b in zip(with_fp8, without))


@pytest.mark.parametrize("weight_gradient", [False, True])
def test_fp8_swiglu_mlp_under_torch_compile_matches_eager(weight_gradient, device):
    leaves, dout = swiglu_mlp_leaves(device)
    mlp = lambda *a: fp8_swiglu_mlp(*a, weight_gradient)  # noqa: E731
    eager = mlp_outputs_and_grads(mlp, leaves, dout)
    compiled = mlp_outputs_and_grads(torch.compile(mlp, backend=COMPILE_BACKEND, fullgraph=True), leaves, dout)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


def test_a_converted_swiglu_trains_through_the_fused_mlp_and_evaluates_as_before(device):
    torch.manual_seed(0)
    mlp = SwiGLU(96, 64, ops=Ops("torch")).to(device)
    x = torch.randn(4, 32, 96, device=device).to(torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        plain = mlp.eval()(x)
    convert_to_fp8(mlp, weight_gradient=True)
    assert type(mlp) is Float8SwiGLU and type(mlp.fc1) is Float8Linear and type(mlp.fc2) is Float8Linear
    assert mlp.fc1.fp8_weight_gradient and mlp.fc2.fp8_weight_gradient
    params = [mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert torch.equal(mlp.eval()(x), plain)
        trained = mlp.train()(x)
        want = fp8_swiglu_mlp(x, *params, True)
    # the gradients tell the weight-gradient modes apart (the forward is the same in both)
    got_grads, want_grads = (torch.autograd.grad(out.float().square().sum(), params) for out in (trained, want))
    assert torch.equal(trained, want) and all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))


def test_convert_keeps_the_weights_and_only_touches_attention_and_mlp():
    cfg = generator_config("LightningDiT-tiny/1", width=96, heads=4)  # SwiGLU hidden 256: all dims fit
    torch.manual_seed(0)
    model = Generator(cfg, impl="torch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, cfg.grid ** 2, cfg.in_channels)
    t, y = torch.rand(2), torch.randint(0, cfg.num_classes, (2,))
    model.eval()
    out = model(x, t, y)
    converted = use_fp8(model, torch.device("cpu"))
    assert len(converted) == cfg.depth * 4  # qkv, proj, fc1, fc2 of every block
    assert all(type(m) is Float8Linear for m in converted)
    assert type(model.blocks[0].adaLN[-1]) is nn.Linear and type(model.final.linear) is nn.Linear
    assert all(type(block.mlp) is Float8SwiGLU for block in model.blocks)  # the gate quantises fc2's input
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(x, t, y), out)  # eval mode reads the same weights as a plain linear
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = model(x, t, y)
    assert torch.isfinite(trained).all()


def test_fp8_can_keep_the_end_blocks_in_bf16():
    cfg = generator_config("LightningDiT-tiny/1", width=96, heads=4, depth=4)
    model = Generator(cfg, impl="torch")
    converted = use_fp8(model, torch.device("cpu"), weight_gradient=True, bf16_end_blocks=1)
    assert len(converted) == 2 * 4  # qkv, proj, fc1, fc2 of blocks 1 and 2
    linear_types = [{type(m) for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)} for b in model.blocks]
    assert linear_types == [{nn.Linear}, {Float8Linear}, {Float8Linear}, {nn.Linear}]
    assert [type(b.mlp) for b in model.blocks] == [SwiGLU, Float8SwiGLU, Float8SwiGLU, SwiGLU]
    assert all(m.fp8_weight_gradient for m in converted)
    with pytest.raises(ValueError, match="run.fp8_bf16_end_blocks=2 must leave FP8 blocks .* use 0 to 1"):
        use_fp8(Generator(cfg, impl="torch"), torch.device("cpu"), bf16_end_blocks=2)


def test_end_blocks_in_bf16_need_an_fp8_run():
    from fae_fast.cli import UsageError
    from fae_fast.fae_config import fae_recipe, validate
    from training.train_gen import parse_args

    with pytest.raises(UsageError, match="add --run.precision=fp8"):
        parse_args(["--run.fp8_bf16_end_blocks=1"])
    assert parse_args(["--run.fp8_bf16_end_blocks=1", "--run.precision=fp8"]).run.fp8_bf16_end_blocks == 1
    cfg = fae_recipe("tiny", "feature")
    cfg.run.fp8_bf16_end_blocks = 1
    with pytest.raises(ValueError, match="leave them off for train_fae.py"):
        validate(cfg)


def test_convert_refuses_when_no_linear_fits():
    with pytest.raises(ValueError, match="divisible by 16"):
        convert_to_fp8(nn.Sequential(nn.Linear(24, 40)))


@pytest.mark.gpu
def test_fp8_needs_fp8_tensor_cores():
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) >= (8, 9):
        check_fp8_device(torch.device("cuda"))  # no error on Ada/Hopper/Blackwell
    else:
        with pytest.raises(ValueError, match="run.precision=bf16"):
            check_fp8_device(torch.device("cuda"))


@pytest.mark.slow
def test_fp8_training_follows_bf16_training(tmp_path):
    """train_gen.py from one seed in bf16, in FP8, and in FP8 with the weight gradient in FP8 too (width 96:
    every attention and MLP dim fits; 1,024 rows a step): each FP8 loss curve falls and stays within 1% of
    bf16's at every logged step (seen on CPU: 2.9477 -> 1.9827 in bf16, 2.9478 -> 1.9837 in FP8)."""
    from test_train_gen import history, torchrun  # noqa: E402 (tests/ is on sys.path)

    common = ["--model.depth=2", "--model.width=96", "--model.heads=4", "--data.global_batch=64",
              "--run.eval_samples=0", "--run.log_every=20", "--run.compile=false", "--run.steps=200",
              "--run.ckpt_every=0", "--optim.lr=3e-3"]
    runs = {"bf16": ["--run.precision=bf16"], "fp8": ["--run.precision=fp8"],
            "fp8, weight gradient too": ["--run.precision=fp8", "--run.fp8_weight_gradient=true"]}
    curves = {}
    for name, options in runs.items():
        out = tmp_path / name.replace(", ", "_").replace(" ", "_")
        res = torchrun(1, *common, *options, f"--run.out_dir={out}")
        assert res.returncode == 0, res.stderr[-3000:]
        curves[name] = history(out)
    assert curves["fp8"] != curves["fp8, weight gradient too"]  # the weight-gradient GEMM did change
    for name in ("fp8", "fp8, weight gradient too"):
        assert curves[name][200] < 0.8 * curves[name][20], (name, curves[name])
        for step, loss in curves["bf16"].items():
            assert curves[name][step] == pytest.approx(loss, rel=0.01), (name, step, loss, curves[name][step])


def test_fae_training_refuses_fp8():
    from fae_fast.fae_config import fae_recipe, validate

    cfg = fae_recipe("tiny", "feature")
    cfg.run.precision = "fp8"
    with pytest.raises(ValueError, match="train_gen.py --run.precision=fp8"):
        validate(cfg)


def _write_run(folder, losses: list[float], frechet: float) -> None:
    import json

    folder.mkdir(parents=True)
    (folder / "history.json").write_text(json.dumps([[10 * (i + 1), {"loss": v}] for i, v in enumerate(losses)]))
    (folder / "frechet.json").write_text(json.dumps({"after": {"overall": frechet}}))


def test_the_quality_guard_judges_the_last_tenth_and_the_frechet_gap_against_a_trained_reference(tmp_path):
    from benchmarks.fp8_quality import compare, plot

    bf16 = [5.0] * 18 + [1.00, 1.00]  # 20 logged losses: the last tenth is the last two
    _write_run(tmp_path / "bf16", bf16, 2.00)
    _write_run(tmp_path / "fp8", [9.0] * 18 + [1.005, 1.025], 2.12)  # +1.5% loss, +6% Frechet
    runs = {p: tmp_path / p for p in ("bf16", "fp8")}
    verdict = compare(runs)
    assert verdict["final_loss"] == {"bf16": 1.0, "fp8": pytest.approx(1.015)}
    assert verdict["loss_gap"] == pytest.approx(0.015) and not verdict["loss_within_1_percent"]
    assert verdict["frechet_gap"] == pytest.approx(0.06) and not verdict["frechet_within_5_percent"]
    assert verdict["bf16_learned"] and not verdict["passed"]
    _write_run(tmp_path / "stalled" / "bf16", [3.0] * 18 + [2.5, 2.5], 2.00)  # fell less than half: no reference
    _write_run(tmp_path / "stalled" / "fp8", [3.0] * 18 + [2.5, 2.5], 2.00)
    stalled = compare({p: tmp_path / "stalled" / p for p in ("bf16", "fp8")})
    assert stalled["loss_within_1_percent"] and stalled["frechet_within_5_percent"]
    assert not stalled["bf16_learned"] and not stalled["passed"]
    plot(runs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


TINY_GUARD = ["--width=32", "--depth=2", "--heads=2", "--grid=4", "--channels=4", "--batch=16", "--steps=10",
              "--log_every=5", "--eval_samples=128", "--compile=false"]


def test_the_quality_guard_trains_every_variant_against_one_bf16_run(tmp_path, monkeypatch):
    """Tiny and short (CPU): the bf16 run and both FP8 variants through train_gen.py, their curves on one plot,
    a verdict per variant, and the held-out loss of each run. Ten steps do not halve the loss, so the reference
    bar is lowered here (the bar itself: the test above and the next)."""
    import json

    from benchmarks import fp8_quality

    monkeypatch.setattr(fp8_quality, "REFERENCE_LOSS_DROP", 10.0)
    verdicts = fp8_quality.main(["--out_dir", str(tmp_path), "--variants", "fp8,fp8w", *TINY_GUARD])
    saved = json.loads((tmp_path / "fp8_quality.json").read_text())
    assert saved["verdicts"] == verdicts and set(verdicts) == {"fp8", "fp8w"}
    assert set(verdicts["fp8w"]["final_loss"]) == {"bf16", "fp8w"}
    assert (tmp_path / "fp8_quality.png").is_file() and saved["settings"]["steps"] == 10
    for run, precision, weight_gradient in (("bf16", "bf16", False), ("fp8", "fp8", False), ("fp8w", "fp8", True)):
        config = json.loads(next((tmp_path / run / "checkpoints").glob("step_*/config.json")).read_text())
        assert (config["run"]["precision"], config["run"]["fp8_weight_gradient"]) == (precision, weight_gradient)
    # beside each verdict, the held-out loss of both runs' final weights through the same plain forward
    from safetensors.torch import load_file, save_file

    held_out = verdicts["fp8"]["held_out_loss"]
    assert set(held_out) == {"bf16", "fp8"} and all(0 < v < 10 for v in held_out.values())
    assert verdicts["fp8"]["held_out_gap"] == pytest.approx(held_out["fp8"] / held_out["bf16"] - 1)
    # computed afresh it is the same (fixed data, t and noise); the FP8 run's own precision does not enter it
    # (the bf16 run's weights in its folder score the bf16 run's loss); other weights score otherwise
    (tmp_path / "fp8" / fp8_quality.HELD_OUT).unlink()
    assert fp8_quality.held_out_loss(tmp_path / "fp8", 16) == held_out["fp8"]
    weights = load_file(tmp_path / "bf16" / "ema.safetensors")
    shifted = {**weights, "final.linear.bias": weights["final.linear.bias"] + 1}  # every prediction off by 1
    scores = []
    for candidate in (weights, shifted):
        (tmp_path / "fp8" / fp8_quality.HELD_OUT).unlink()
        save_file(candidate, tmp_path / "fp8" / "ema.safetensors")
        scores.append(fp8_quality.held_out_loss(tmp_path / "fp8", 16))
    assert scores[0] == held_out["bf16"] and scores[1] > 1.1 * held_out["bf16"]


def test_the_quality_guard_takes_runs_finished_with_the_same_settings_and_trains_changed_ones(tmp_path,
                                                                                           monkeypatch):
    """The runs can be spread over several calls: a run finished in --out_dir with the same settings (even
    after the folder moved) is not trained again; one with other settings is."""
    import json
    import shutil

    from benchmarks import fp8_quality

    monkeypatch.setattr(fp8_quality, "REFERENCE_LOSS_DROP", 10.0)
    first = fp8_quality.main(["--out_dir", str(tmp_path / "a"), "--variants", "fp8", *TINY_GUARD])
    shutil.move(tmp_path / "a", tmp_path / "b")
    launched = []

    def train_again(command, **_):
        launched.append(command)
        raise RuntimeError("trained again")

    monkeypatch.setattr(fp8_quality.subprocess, "run", train_again)
    assert fp8_quality.main(["--out_dir", str(tmp_path / "b"), "--variants", "fp8", *TINY_GUARD]) == first
    assert launched == []
    assert json.loads((tmp_path / "b" / "fp8_quality.json").read_text())["verdicts"] == first
    with pytest.raises(RuntimeError, match="trained again"):
        fp8_quality.main(["--out_dir", str(tmp_path / "b"), "--variants", "fp8", *TINY_GUARD, "--lr=1e-3"])
    assert "--optim.lr=0.001" in launched[0] and "--run.precision=bf16" in launched[0]


def test_the_quality_guard_stops_before_the_fp8_runs_when_bf16_did_not_train(tmp_path, capsys):
    from benchmarks.fp8_quality import main

    with pytest.raises(SystemExit, match="no verdict: the bf16 reference did not train"):
        main(["--out_dir", str(tmp_path), *TINY_GUARD])
    assert (tmp_path / "bf16" / "history.json").is_file() and not (tmp_path / "fp8").exists()


def test_the_quality_guard_names_its_variants(capsys):
    from benchmarks.fp8_quality import main

    with pytest.raises(SystemExit):
        main(["--variants", "fp8,fp16"])
    assert "name FP8 runs from fp8, fp8w, fp8w_ends" in capsys.readouterr().err


def test_the_programs_a_benchmark_launches_import_this_checkout_without_an_install():
    """The quality guard's torchrun children found `fae_fast` only through an install (on the H200, without
    one, both runs died on the import): their environment puts the checkout first on PYTHONPATH."""
    import subprocess
    import sys

    from pathlib import Path

    from benchmarks import ROOT, child_env

    where = "import importlib.util as u; print(u.find_spec('fae_fast').origin)"
    found = subprocess.run([sys.executable, "-S", "-c", where], env=child_env(), capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).resolve() == ROOT / "fae_fast" / "__init__.py"


def test_the_fp8_ops_registrations(device):
    """torch.library.opcheck of the quantising ops' fake impls (what torch.compile traces with on the GPU,
    where these ops run) and their dispatch under AOT autograd. (opcheck's schema test multiplies the
    outputs, which float8 tensors do not support on CPU.)"""
    x = rows_of_every_magnitude(40, 96, torch.bfloat16, device)
    checks = ("test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fae_fast.quantize_rows.default, (x,), test_utils=checks)
    torch.library.opcheck(torch.ops.fae_fast.quantize_rows_and_sum.default, (x,), test_utils=checks)
    torch.library.opcheck(torch.ops.fae_fast.requantize_transposed.default, quantize_rows_ref(x), test_utils=checks)


def test_the_quantising_ops_name_a_tensor_that_is_not_2d(device):
    x = torch.randn(2, 3, 16, device=device)
    for op, name in ((quantize_rows, "quantize_rows"), (quantize_rows_and_sum, "quantize_rows_and_sum")):
        with pytest.raises(ValueError, match=f"^{name} needs a 2-D tensor"):
            op(x)


def test_fp8_sampling_linears_are_one_scaled_gemm_of_the_weight_quantised_once(device):
    """use_fp8_sampling: the blocks' attention and MLP linears (no others) quantise their weight once into
    non-persistent buffers; a forward is the scaled GEMM of the rowwise-quantised bf16 input and that weight,
    plus the bias, exactly; the state dict is unchanged; compiled equals eager (through the interpreter; on a GPU
    inductor fuses the bf16 ops around the GEMMs, which moves roundings that FP8 then magnifies, so there both stay
    within FP8's rounding of the bf16 model); the model's output stays within FP8's rounding of the bf16 one."""
    from fae_fast.fp8 import Float8SamplingLinear, scaled_matmul, use_fp8_sampling

    cfg = generator_config("LightningDiT-tiny/1", width=96, heads=4, grid=4, in_channels=8, num_classes=10)
    torch.manual_seed(0)
    model = Generator(cfg, impl="torch").to(device).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # past the zero start: every block contributes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, cfg.grid ** 2, cfg.in_channels, device=device)
    t, y = torch.rand(3, device=device), torch.randint(0, cfg.num_classes, (3,), device=device)
    with torch.no_grad():
        plain = model(x, t, y)
    converted = use_fp8_sampling(model, device)
    assert len(converted) == cfg.depth * 4 and all(type(m) is Float8SamplingLinear for m in converted)
    assert type(model.blocks[0].adaLN[-1]) is torch.nn.Linear and type(model.final.linear) is torch.nn.Linear
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    qkv = model.blocks[0].attn.qkv
    inputs = torch.randn(2, 5, 96, device=device)
    want = scaled_matmul(*quantize_rows_ref(inputs.reshape(10, 96).bfloat16()),
                         *quantize_rows_ref(qkv.weight.bfloat16()), qkv.bias).float().view(2, 5, -1)
    with torch.no_grad():
        assert torch.equal(qkv(inputs), want)
        fp8 = model(x, t, y)
        compiled = torch.compile(model, backend=COMPILE_BACKEND, fullgraph=True)(x, t, y)
    if device.type == "cpu":
        assert torch.equal(compiled, fp8)
    for out in (fp8, compiled):
        error = relative(out, plain)
        assert 1e-4 < error < 0.05, error  # FP8's rounding of the block GEMMs' inputs, nothing larger


@pytest.mark.parametrize("recipe_name", ["t2i-demo", "starflow-demo"])
def test_fp8_sampling_serves_the_other_families(recipe_name):
    """use_fp8_sampling on the text-to-image and STARFlow models (their `fp8_modules`): their block linears go
    FP8, and a few sampling steps land within FP8's rounding of the plain model's latents (measured 0.010 and
    0.019 against latents of std 1.2 and 1.8)."""
    import dataclasses

    from benchmarks.family_step import random_condition
    from fae_fast.config import recipe
    from fae_fast.families import family_of
    from fae_fast.fp8 import Float8SamplingLinear, use_fp8_sampling

    cfg = recipe(recipe_name)
    family = family_of(cfg.model)
    torch.manual_seed(0)
    model = family.build(cfg.model, impl="torch").eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # past the zero start: every block contributes
    condition = random_condition(cfg.model, 4, torch.device("cpu"))
    noise = torch.randn(4, cfg.model.grid ** 2, cfg.model.in_channels)
    sampler = dataclasses.replace(cfg.sampler, steps=4)
    with torch.no_grad():
        plain = family.sample(model, condition, noise, sampler)
        converted = use_fp8_sampling(model, torch.device("cpu"))
        fp8 = family.sample(model, condition, noise, sampler)
    assert converted and all(type(m) is Float8SamplingLinear for m in converted)
    assert 0 < (plain - fp8).abs().max() < 0.05


def test_the_fp8_all_gather_rebuilds_the_weight_the_fp8_gemms_would_use():
    """fae_fast.fp8_fsdp on one weight, without a process group: a rank's rows go out as e4m3 bytes and fp32
    power-of-two scales, and come back as q * s in bf16, exactly; the forward's rowwise quantisation of that gives
    back q * s exactly (as q and s, or 2q and s / 2 for a row whose top value rounded down to 224: the same
    products in the scaled GEMM), and its quantisation along N (the input gradient's) the same values as that of
    the weight itself wherever a value is not in e4m3's subnormal range under its column's scale."""
    from fae_fast.fp8_fsdp import Float8AllGatherWeight

    torch.manual_seed(0)
    weight = torch.randn(96, 160) * torch.logspace(-1, 1, 96)[:, None]  # fp32 master rows of several sizes
    wrapped = Float8AllGatherWeight(weight)
    (q_bytes, scale), metadata = wrapped.fsdp_pre_all_gather(None, weight.shape, weight.stride(), None, None)
    want_q, want_scale = quantize_rows_ref(weight.bfloat16())
    assert q_bytes.dtype == torch.uint8 and torch.equal(q_bytes, want_q.view(torch.uint8))
    assert torch.equal(scale, want_scale)
    rebuilt, inner = wrapped.fsdp_post_all_gather((q_bytes, scale), metadata, torch.bfloat16)
    assert rebuilt.dtype == torch.bfloat16 and inner == (rebuilt,)
    assert torch.equal(rebuilt.float(), want_q.float() * want_scale)  # exact: s is a power of two
    again_q, again_scale = quantize_rows_ref(rebuilt)  # a row whose top value rounded to 224: 2q under s / 2
    assert torch.equal(again_q.float() * again_scale, rebuilt.float())
    along_n, n_scale = quantize_rows_ref(rebuilt.t())
    direct, direct_scale = quantize_rows_ref(weight.bfloat16().t())
    normal = weight.t().abs() >= 2.0 ** -6 * direct_scale  # e4m3's smallest normal, under the column's scale
    assert normal.float().mean() > 0.98
    assert torch.equal((along_n.float() * n_scale)[normal], (direct.float() * direct_scale)[normal])
    out = torch.empty_like(rebuilt)  # a later all-gather refills the same tensor
    assert wrapped.fsdp_post_all_gather((q_bytes, scale), metadata, torch.bfloat16, out=out) is None
    assert torch.equal(out, rebuilt)


def test_fsdp2_all_gathers_the_fp8_weights_in_fp8_and_trains_the_same_numbers(tmp_path):
    """Two CPU ranks (gloo) train the same FP8 model under FSDP2 for four steps with the bf16 and the FP8
    all-gather of the FP8 linears' weights (tests/fp8_all_gather_worker.py): every FP8 linear's shard goes
    over the wire as bytes and scales, forward and backward; the first step's output and every gradient equal
    the bf16 all-gather's, and the losses of all four steps; a DCP checkpoint holds plain tensors, and loading it
    restores every weight and keeps the FP8 all-gather."""
    import json
    import subprocess
    import sys

    from conftest import program_env  # noqa: E402

    result_path = tmp_path / "result.json"
    worker = Path(__file__).with_name("fp8_all_gather_worker.py")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(worker), str(result_path)], env=program_env(2), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert len(result["wrapped"]) == 8 and result["local_types"] == ["Float8AllGatherWeight"]
    assert result["gathers"] == 8 * 4 * 2  # each weight, each step, forward and backward (resharded after forward)
    assert result["gather_dtypes"] == [["torch.uint8", "torch.float32"]]
    assert result["forward_equal"] and result["gradient_relative"] == 0.0
    assert result["losses"] == result["plain_losses"]
    assert result["state_types"] == ["Tensor"] and result["restored"] and result["still_wrapped"]
