"""FP8 training of the generator's block linears (`run.precision=fp8`): the forward GEMM and the input-gradient
GEMM run in float8 e4m3 with rowwise scales (`torch._scaled_mm`), the weight-gradient GEMM in bf16.

Each GEMM operand is quantised by one pass of `kernels/fp8.quantize_rows`, which computes the row's scale
from the row it holds (no amax pass, no history to keep), except in the SwiGLU MLP (`Float8SwiGLU`, below),
whose gate kernel quantises fc2's input, and with the FP8 weight gradient fc1's output gradient, itself. The weights are quantised per step from the
master weights (fp32 under autocast, bf16 under FSDP2), along K for the forward and along N for the
input gradient. Master weights, gradients and the optimizer are as in bf16 training; outputs are bf16.

    y  = (q(x) * s_x) @ (q(W) * s_W)^T + b          x (M, K), W (N, K): both quantised along K
    dx = (q(dy) * s_dy) @ (q(W^T) * s_W^T)^T         dy (M, N), W^T (K, N): both along N
    dW = dy^T @ x (bf16, fp32 accumulation),  db = sum of dy over rows (fp32, from the pass quantising dy)

With `weight_gradient=True` (`run.fp8_weight_gradient`) the weight-gradient GEMM runs in FP8 too, with
tensorwise scales: it contracts over the M rows, so each operand needs one scale along M, and
`kernels/fp8.requantize_transposed` makes the transposed, tensorwise-scaled copies of q(x) and q(dy) from
the 1-byte rowwise ones the other two GEMMs already made (no second read of x or dy; the forward then keeps
q(x), 1 byte a value, for the backward instead of bf16 x). Rows need a count divisible by 16 (the GEMM's
contraction); other batches take the bf16 weight gradient.

    dW = (T(q(dy)) * t_dy) @ (T(q(x)) * t_x)^T       T: transposed to (N, M) and (K, M), t: the largest row scale

`convert_to_fp8(modules)` swaps the class of the nn.Linear modules inside (same parameters, same state
dict), so checkpoints move freely between bf16 and FP8 runs, and of each SwiGLU MLP whose two linears went
FP8 (`Float8SwiGLU`: fc1 -> gate -> fc2 as one Function, the gate's kernel quantising fc2's input and, with
the FP8 weight gradient, fc1's output gradient, so no pass reads those again to quantise them).

With the FP8 weight gradient, `use_fp8` also lets LightningDiT blocks (`Block.fp8_norms`) have their two norms
emit the FP8 inputs of qkv and fc1 (`fp8_norm_linear`, `fp8_residual_norm_swiglu`): the norm kernels quantise
their bf16-rounded output rowwise in registers, bit for bit what `quantize_rows` of that output gives.

Under FSDP2, fae_fast/fp8_fsdp.py all-gathers these linears' weights in FP8 (`run.fp8_all_gather`).

`use_fp8_sampling(model)` is the inference counterpart (sample.py --precision=fp8): the same linears with their
weights quantised once (`Float8SamplingLinear`), for sampling only, and in blocks on the fused kernels with a
SwiGLU MLP the norms and the gate emitting the FP8 inputs (`fp8_sampling_block`).
"""
import torch
import torch.nn as nn

from fae_fast.kernels.gated_residual import (gated_residual_modulated_norm_backward,
                                             gated_residual_modulated_norm_fp8_stats)
from fae_fast.kernels.modulated_norm import modulated_norm_backward, modulated_norm_fp8_stats
from fae_fast.kernels.fp8 import (quantize_rows, quantize_rows_and_sum, quantize_rows_and_sum_ref, quantize_rows_ref,
                                  requantize_transposed, requantize_transposed_ref)
from fae_fast.kernels.swiglu import (swiglu_packed_bwd_fp8, swiglu_packed_bwd_fp8_ref, swiglu_packed_fp8,
                                     swiglu_packed_fp8_ref, swiglu_packed_grad, swiglu_packed_grad_ref)
from fae_fast.layers import SwiGLU

COMPUTE_DTYPE = torch.bfloat16


def _quantizer(x: torch.Tensor):
    """The Triton kernel on CUDA, its PyTorch reference elsewhere (bit for bit the same: tests/test_fp8.py)."""
    return quantize_rows if x.is_cuda else quantize_rows_ref


def scaled_matmul(aq: torch.Tensor, a_scale: torch.Tensor, bq: torch.Tensor, b_scale: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """aq (M, C) @ bq (N, C)^T of FP8 operands with their scales, both rowwise ((M, 1) and (N, 1)) or both
    tensorwise ((1,)): one scaled GEMM, bf16 out. Off CUDA it is emulated: the dequantised operands
    multiplied in fp32 (the same products; CPU `torch._scaled_mm` differs by version)."""
    bias = None if bias is None else bias.to(COMPUTE_DTYPE)
    if not aq.is_cuda:
        out = (aq.float() * a_scale) @ (bq.float() * b_scale).t()
        return (out if bias is None else out + bias.float()).to(COMPUTE_DTYPE)
    return torch._scaled_mm(aq, bq.t(), scale_a=a_scale, scale_b=b_scale.t(), bias=bias, out_dtype=COMPUTE_DTYPE)


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T in FP8: both quantised rowwise along K, one scaled GEMM, bf16 out. b may be a
    transposed view (a weight read as W^T): it is made contiguous first, so that the quantising pass reads
    whole rows rather than strided columns (a weight is small to copy; the two ways have not been timed
    against each other)."""
    return _times_weight(*_quantizer(a)(a), b, bias)


def _quantizer_and_sums(x: torch.Tensor):
    """`quantize_rows_and_sum`'s kernel on CUDA, its PyTorch reference elsewhere."""
    return quantize_rows_and_sum if x.is_cuda else quantize_rows_and_sum_ref


def _transposer(x: torch.Tensor):
    """`requantize_transposed`'s kernel on CUDA, its PyTorch reference elsewhere (bit for bit the same)."""
    return requantize_transposed if x.is_cuda else requantize_transposed_ref


def _fp8_weight_gradient_applies(rows: int, weight_gradient: bool) -> bool:
    """Whether a linear's weight-gradient GEMM runs in FP8: asked for, and its contraction (the rows) a
    multiple of 16, as torch._scaled_mm needs; otherwise it runs in bf16."""
    return weight_gradient and rows % 16 == 0


def _times_weight(aq: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, C) quantised rowwise @ weight (N, C)^T (+ bias), the weight quantised along C here (made
    contiguous first: W^T for an input gradient): the forward and input-gradient GEMMs, bf16 out."""
    return scaled_matmul(aq, a_scale, *_quantizer(weight)(weight.contiguous()), bias)


def _fp8_weight_gradient(dyq: torch.Tensor, dy_scale: torch.Tensor, xq: torch.Tensor,
                         x_scale: torch.Tensor) -> torch.Tensor:
    """dW = dy^T @ x (N, K) from the rowwise FP8 copies of dy (M, N) and x (M, K), each requantised
    transposed under one tensorwise scale (the GEMM contracts over the M rows)."""
    transpose = _transposer(dyq)
    return scaled_matmul(*transpose(dyq, dy_scale), *transpose(xq, x_scale))


def _quantized_with_sums(dy: torch.Tensor, sums: bool):
    """(q, scale, column sums or None) of dy (M, N): the sums (a bias gradient) from the same read."""
    if sums:
        return _quantizer_and_sums(dy)(dy)
    return (*_quantizer(dy)(dy), None)


class _Float8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, weight_gradient):
        x2 = x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE)
        xq, x_scale = _quantizer(x2)(x2)
        y = _times_weight(xq, x_scale, weight, bias)
        ctx.fp8_weight_gradient = _fp8_weight_gradient_applies(x2.shape[0], weight_gradient)
        ctx.save_for_backward(weight, *((xq, x_scale) if ctx.fp8_weight_gradient else (x2,)))
        ctx.has_bias, ctx.x_shape, ctx.x_dtype = bias is not None, x.shape, x.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        weight, *saved = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(COMPUTE_DTYPE)
        dyq, dy_scale, dbias = _quantized_with_sums(dy2, ctx.has_bias)
        dx = _times_weight(dyq, dy_scale, weight.t()).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.fp8_weight_gradient:
            dweight = _fp8_weight_gradient(dyq, dy_scale, *saved)
        else:
            dweight = dy2.t() @ saved[0]
        return dx, dweight.to(weight.dtype), None if dbias is None else dbias.to(weight.dtype), None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               weight_gradient: bool = False) -> torch.Tensor:
    """F.linear with the forward and input-gradient GEMMs in FP8 (rowwise scales), and with
    `weight_gradient` the weight-gradient GEMM too (tensorwise scales); bf16 output."""
    return _Float8Linear.apply(x, weight, bias, weight_gradient)


def _swiglu_kernels(h: torch.Tensor) -> dict:
    """The gate's FP8-emitting forward and backward and its bf16 backward, by name: the Triton kernels on
    CUDA, their PyTorch references elsewhere."""
    if h.is_cuda:
        return {"forward_fp8": swiglu_packed_fp8, "backward_fp8": swiglu_packed_bwd_fp8, "backward": swiglu_packed_grad}
    return {"forward_fp8": swiglu_packed_fp8_ref, "backward_fp8": swiglu_packed_bwd_fp8_ref,
            "backward": swiglu_packed_grad_ref}


def _swiglu_mlp_forward(xq, x_scale, x2, w1, b1, w2, b2, fp8_weight_gradient: bool):
    """fc1 -> gate -> fc2 from fc1's FP8 input (xq, x_scale; x2 its bf16 rows, needed only by the bf16 weight
    gradient): -> (out (M, D'), what `_swiglu_mlp_backward` needs)."""
    h = _times_weight(xq, x_scale, w1, b1)  # (M, 2H)
    # fc2's FP8 input; act (M, H) in bf16 as well only for the bf16 weight-gradient GEMM
    aq, a_scale, act = _swiglu_kernels(h)["forward_fp8"](h, not fp8_weight_gradient)
    out = _times_weight(aq, a_scale, w2, b2)  # (M, D')
    return out, ((h, xq, x_scale, aq, a_scale) if fp8_weight_gradient else (h, x2, act))


def _swiglu_mlp_backward(dout2, saved, w1, w2, has_b1: bool, has_b2: bool, fp8_weight_gradient: bool):
    """The backward of `_swiglu_mlp_forward` for dout2 (M, D') bf16: -> (dx (M, D) bf16, dw1, db1, dw2, db2),
    the weights' gradients in fp32 or bf16 as the GEMMs give them, a bias gradient None without the bias."""
    dq, d_scale, db2 = _quantized_with_sums(dout2, has_b2)
    d_act = _times_weight(dq, d_scale, w2.t())  # (M, H)
    if fp8_weight_gradient:
        h, xq, x_scale, aq, a_scale = saved
        dw2 = _fp8_weight_gradient(dq, d_scale, aq, a_scale)
        dhq, dh_scale, db1 = _swiglu_kernels(h)["backward_fp8"](d_act, h)  # dh (M, 2H) quantised, db1
        dw1 = _fp8_weight_gradient(dhq, dh_scale, xq, x_scale)
    else:
        h, x2, act = saved
        dw2 = dout2.t() @ act
        dh = _swiglu_kernels(h)["backward"](d_act, h)  # bf16: the bf16 weight-gradient GEMM reads it
        dhq, dh_scale, db1 = _quantized_with_sums(dh, has_b1)
        dw1 = dh.t() @ x2
    return _times_weight(dhq, dh_scale, w1.t()), dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None


def _as_grads(grads, *params):
    """Parameter gradients in their parameters' dtypes (None stays None)."""
    return tuple(None if g is None else g.to(p.dtype) for g, p in zip(grads, params))


class _Float8SwiGLUMLP(torch.autograd.Function):
    """fc2(swiglu(fc1(x))) with both linears as `_Float8Linear`, where the gate's kernel quantises what it
    computes: fc2's FP8 input in the forward, and (with the FP8 weight gradient, which alone needs no bf16
    dh) fc1's FP8 output gradient and its bias gradient in the backward. Against the three modules in a
    row: with the FP8 weight gradient, a write and a read of the activation (M x H) and of dh (M x 2H) fewer;
    with the bf16 weight gradient, which needs both in bf16, only the forward's re-read of the activation."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, weight_gradient):
        x2 = x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE)  # (M, D)
        fp8_weight_gradient = _fp8_weight_gradient_applies(x2.shape[0], weight_gradient)
        out, saved = _swiglu_mlp_forward(*_quantizer(x2)(x2), x2, w1, b1, w2, b2, fp8_weight_gradient)
        ctx.save_for_backward(w1, w2, *saved)
        ctx.fp8_weight_gradient, ctx.has_bias = fp8_weight_gradient, (b1 is not None, b2 is not None)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return out.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dout):
        w1, w2, *saved = ctx.saved_tensors
        dout2 = dout.reshape(-1, dout.shape[-1]).to(COMPUTE_DTYPE)  # (M, D')
        dx, dw1, db1, dw2, db2 = _swiglu_mlp_backward(dout2, saved, w1, w2, *ctx.has_bias, ctx.fp8_weight_gradient)
        return (dx.view(ctx.x_shape).to(ctx.x_dtype), *_as_grads((dw1, db1, dw2, db2), w1, w1, w2, w2), None)


def fp8_swiglu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                   b2: torch.Tensor | None, weight_gradient: bool = False) -> torch.Tensor:
    """x (..., D) -> fc2(silu(a) * b) with a | b = fc1(x) (w1 (2H, D), w2 (D', H)), both linears in FP8 as
    `fp8_linear`, the gate's kernel emitting fc2's FP8 input (and with `weight_gradient` fc1's FP8 output
    gradient). bf16 out."""
    return _Float8SwiGLUMLP.apply(x, w1, b1, w2, b2, weight_gradient)


class _Float8NormLinear(torch.autograd.Function):
    """linear(modulated_norm(x, scale, shift, norm_weight)) with the FP8 weight gradient, the norm's kernel
    emitting the linear's FP8 input (`modulated_norm_fp8_stats`): no bf16 norm output is written and read back
    to be quantised. The backward is `_Float8Linear`'s (FP8 weight gradient), then the norm's kernel on the
    input gradient. Triton kernels only (CUDA, or the interpreter)."""

    @staticmethod
    def forward(ctx, x, scale, shift, norm_weight, norm, eps, weight, bias):
        nq, n_scale, mean, rstd = modulated_norm_fp8_stats(x, scale, shift, norm_weight, norm=norm, eps=eps)
        y = _times_weight(nq, n_scale, weight, bias)
        ctx.save_for_backward(x, scale, norm_weight, mean, rstd, weight, nq, n_scale)
        ctx.norm, ctx.shift_dtype, ctx.has_bias = norm, shift.dtype, bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, scale, norm_weight, mean, rstd, weight, nq, n_scale = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(COMPUTE_DTYPE)
        dyq, dy_scale, dbias = _quantized_with_sums(dy2, ctx.has_bias)
        dn = _times_weight(dyq, dy_scale, weight.t()).view(x.shape).to(x.dtype)
        dweight = _fp8_weight_gradient(dyq, dy_scale, nq, n_scale)
        dx, dscale, dshift, dnorm_weight = modulated_norm_backward(dn, x, scale, norm_weight, mean, rstd,
                                                                   norm=ctx.norm, shift_dtype=ctx.shift_dtype)
        return (dx, dscale, dshift, dnorm_weight, None, None, *_as_grads((dweight, dbias), weight, weight))


def fp8_norm_linear(x, scale, shift, norm_weight, weight, bias=None, *, norm: str, eps: float) -> torch.Tensor:
    """linear(modulated_norm(x, scale, shift, norm_weight, norm=norm, eps=eps), weight, bias) as `fp8_linear`
    with the FP8 weight gradient computes it, the norm's kernel quantising the linear's input. x (B, T, D) with
    B * T a multiple of 16 (`_fp8_weight_gradient_applies`); bf16 out."""
    return _Float8NormLinear.apply(x, scale, shift, norm_weight, norm, eps, weight, bias)


class _Float8ResidualNormSwiGLU(torch.autograd.Function):
    """(h, swiglu_mlp(n)) of h, n = gated_residual_modulated_norm(x, gate, y, ...), the MLP as
    `_Float8SwiGLUMLP` with the FP8 weight gradient, the residual-norm kernel emitting fc1's FP8 input: no bf16
    n is written and read back to be quantised. The backward runs the MLP's, then the residual-norm kernel on
    its input gradient and h's. Triton kernels only (CUDA, or the interpreter)."""

    @staticmethod
    def forward(ctx, x, gate, y, scale, shift, norm_weight, norm, eps, w1, b1, w2, b2):
        h, nq, n_scale, mean, rstd = gated_residual_modulated_norm_fp8_stats(x, gate, y, scale, shift, norm_weight,
                                                                            norm=norm, eps=eps)
        out, saved = _swiglu_mlp_forward(nq, n_scale, None, w1, b1, w2, b2, True)
        ctx.save_for_backward(h, gate, y, scale, norm_weight, mean, rstd, w1, w2, *saved)
        ctx.norm, ctx.shift_dtype, ctx.has_bias = norm, shift.dtype, (b1 is not None, b2 is not None)
        return h, out.view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dh, dout):
        h, gate, y, scale, norm_weight, mean, rstd, w1, w2, *saved = ctx.saved_tensors
        dout2 = dout.reshape(-1, dout.shape[-1]).to(COMPUTE_DTYPE)
        dn, dw1, db1, dw2, db2 = _swiglu_mlp_backward(dout2, saved, w1, w2, *ctx.has_bias, True)
        dx, dgate, dy, dscale, dshift, dnorm_weight = gated_residual_modulated_norm_backward(
            dh, dn.view(h.shape).to(h.dtype), h, gate, y, scale, norm_weight, mean, rstd, norm=ctx.norm,
            shift_dtype=ctx.shift_dtype)
        return (dx, dgate, dy, dscale, dshift, dnorm_weight, None, None,
                *_as_grads((dw1, db1, dw2, db2), w1, w1, w2, w2))


def fp8_residual_norm_swiglu(x, gate, y, scale, shift, norm_weight, w1, b1, w2, b2, *, norm: str,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, fc2(swiglu(fc1(n)))) with h, n = gated_residual_modulated_norm(x, gate, y, scale, shift, norm_weight),
    the MLP as `fp8_swiglu_mlp` with the FP8 weight gradient and fc1's FP8 input emitted by the residual-norm
    kernel. x, y (B, T, D) with B * T a multiple of 16; h in x.dtype, the MLP's output bf16."""
    return _Float8ResidualNormSwiGLU.apply(x, gate, y, scale, shift, norm_weight, norm, eps, w1, b1, w2, b2)


class Float8Linear(nn.Linear):
    """nn.Linear whose training forward is `fp8_linear`; made by `convert_to_fp8` (class swap, no new
    parameters). In eval mode it is the plain linear, so sampling and evaluation read the same weights
    without the FP8 rounding."""

    fp8_weight_gradient = False
    """The weight-gradient GEMM in FP8 too (`convert_to_fp8(..., weight_gradient=True)`)."""

    def forward(self, x):
        if self.training:
            return fp8_linear(x, self.weight, self.bias, self.fp8_weight_gradient)
        return super().forward(x)


class Float8SwiGLU(SwiGLU):
    """SwiGLU whose training forward is `fp8_swiglu_mlp` (its fc1 and fc2 are Float8Linear); made by
    `convert_to_fp8` (class swap). In eval mode it is the plain SwiGLU, as its linears are."""

    def forward(self, x):
        if self.training:
            return fp8_swiglu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                  self.fc1.fp8_weight_gradient)
        return super().forward(x)


class Float8SamplingLinear(nn.Linear):
    """nn.Linear for sampling with FP8 GEMMs (`use_fp8_sampling`, sample.py --precision=fp8): the weight is
    quantised once, rowwise along K, into two non-persistent buffers (`weight_q` float8 e4m3, `weight_scale`
    fp32 (N, 1)); each forward quantises its input rowwise in one pass and runs one scaled GEMM with the bias.
    Inference only: no gradient reaches the weight, and the buffers do not follow later changes to it (convert
    after the weights are loaded). The state dict is the plain linear's."""

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1]).to(COMPUTE_DTYPE)
        return self.from_quantized(*_quantizer(x2)(x2), x.shape[:-1]).to(x.dtype)

    def from_quantized(self, xq: torch.Tensor, x_scale: torch.Tensor, leading_shape) -> torch.Tensor:
        """The GEMM of an input its producer already quantised rowwise (xq (M, K) float8 e4m3, x_scale (M, 1)):
        -> (*leading_shape, N) bf16, M the product of leading_shape."""
        y = scaled_matmul(xq, x_scale, self.weight_q, self.weight_scale, self.bias)
        return y.view(*leading_shape, self.out_features)


def fp8_sampling_block(block, x, shift1, scale1, gate1, shift2, scale2, gate2) -> torch.Tensor:
    """fae_fast.generators.Block's forward for sampling with `fp8_sampling` (set by `use_fp8_sampling`): the
    norm, the fused residual-norm and the SwiGLU gate emit their FP8 linear's input (`modulated_norm_fp8_stats`,
    `gated_residual_modulated_norm_fp8_stats`, `swiglu_packed_fp8`), so no bf16 activation is written and read
    back to be quantised; attention's output is quantised by its projection as before. The norms' FP8 outputs
    are bit for bit `quantize_rows` of their bf16 outputs; the gate quantises its fp32 activation (the bf16 path
    rounds it to bf16 first)."""
    attn, mlp, leading = block.attn, block.mlp, x.shape[:-1]
    nq, n_scale, _, _ = modulated_norm_fp8_stats(x, scale1, shift1, block.norm1.weight, norm=block.norm_kind,
                                                 eps=block.norm1.eps)
    attended = attn.attend(attn.qkv.from_quantized(nq, n_scale, leading))
    x, hq, h_scale, _, _ = gated_residual_modulated_norm_fp8_stats(
        x, gate1, attended, scale2, shift2, block.norm2.weight, norm=block.norm_kind, eps=block.norm2.eps)
    h = mlp.fc1.from_quantized(hq, h_scale, hq.shape[:1])  # (M, 2H)
    aq, a_scale, _ = _swiglu_kernels(h)["forward_fp8"](h, False)
    return block.ops.gated_residual(x, gate2, mlp.fc2.from_quantized(aq, a_scale, leading))


def sampling_norms_can_emit_fp8(block: nn.Module) -> bool:
    """Whether a block converted by `use_fp8_sampling` can take `fp8_sampling_block`: it has the path
    (`fp8_sampling`, Block), runs the fused kernels, and its qkv and its SwiGLU MLP's two linears went FP8."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    return (_has_fused_path(block, "fp8_sampling")
            and type(getattr(attn, "qkv", None)) is Float8SamplingLinear and type(mlp) is SwiGLU
            and type(mlp.fc1) is Float8SamplingLinear and type(mlp.fc2) is Float8SamplingLinear)


@torch.no_grad()
def use_fp8_sampling(model: nn.Module, device: torch.device) -> list[nn.Linear]:
    """Make the linears of `model.fp8_modules()` (the blocks' attention and MLP: the ones FP8 training runs in
    FP8) Float8SamplingLinear, their weights quantised now; the rest stays as it is. For sampling a loaded model
    faster on GPUs with FP8 tensor cores; what it does to a sample set's FID is the user's to measure against
    the bf16 set (README, FP8)."""
    check_fp8_device(device)
    converted = []
    for linear in (m for mod in model.fp8_modules() for m in mod.modules()):
        if type(linear) not in (nn.Linear, Float8Linear) or not fits_fp8(linear):
            continue
        weight_q, weight_scale = _quantizer(linear.weight)(linear.weight.detach().to(COMPUTE_DTYPE))
        linear.__class__ = Float8SamplingLinear
        linear.register_buffer("weight_q", weight_q, persistent=False)
        linear.register_buffer("weight_scale", weight_scale, persistent=False)
        converted.append(linear)
    for block in model.modules():  # a joint block holds its image Block inside
        if sampling_norms_can_emit_fp8(block):
            block.fp8_sampling = True
    if not converted:
        raise ValueError("--precision=fp8: none of the model's block linears has both dims divisible by 16 "
                         "(torch._scaled_mm needs it); sample with --precision=bf16")
    return converted


def fits_fp8(linear: nn.Linear) -> bool:
    """torch._scaled_mm needs both weight dims divisible by 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def convert_to_fp8(*modules: nn.Module, weight_gradient: bool = False) -> list[nn.Linear]:
    """Make every nn.Linear inside `modules` (a generator's attention and MLP modules: `fp8_modules`) a
    Float8Linear in place (with `weight_gradient`, its weight-gradient GEMM in FP8 too), and every SwiGLU
    whose two linears went FP8 a Float8SwiGLU; returns the converted linears. Linears whose dims are not
    multiples of 16 stay bf16; if none fit, raise."""
    converted, skipped = [], []
    for module in (m for mod in modules for m in mod.modules()):
        if type(module) is not nn.Linear:
            continue
        if fits_fp8(module):
            module.__class__ = Float8Linear
            module.fp8_weight_gradient = weight_gradient
            converted.append(module)
        else:
            skipped.append(module)
    for mlp in (m for mod in modules for m in mod.modules()):
        if type(mlp) is SwiGLU and type(mlp.fc1) is Float8Linear and type(mlp.fc2) is Float8Linear:
            mlp.__class__ = Float8SwiGLU  # the gate quantises fc2's input (and fc1's output gradient)
    if not converted and skipped:
        raise ValueError(f"run.precision=fp8: no linear has both dims divisible by 16 (torch._scaled_mm needs "
                         f"it), e.g. {skipped[0]}; use a width and MLP ratio that are, or run.precision=bf16")
    return converted


def check_fp8_device(device: torch.device) -> None:
    """Raise unless the device runs FP8 GEMMs: CUDA compute capability 8.9 or newer (Ada, Hopper,
    Blackwell), or the CPU (slow; for tests)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"run.precision=fp8 needs FP8 tensor cores (compute capability 8.9 or newer: Ada, "
                             f"Hopper, Blackwell); {torch.cuda.get_device_name(device)} has {major}.{minor}. "
                             f"Use run.precision=bf16")


def use_fp8(model: nn.Module, device: torch.device, weight_gradient: bool = False,
            bf16_end_blocks: int = 0) -> list[nn.Linear]:
    """`convert_to_fp8` on `model.fp8_modules()` (before compile and sharding), but for those in the first
    and the last `bf16_end_blocks` of `model.blocks` (run.fp8_bf16_end_blocks)."""
    check_fp8_device(device)
    blocks = list(model.blocks)
    if bf16_end_blocks < 0 or 2 * bf16_end_blocks >= len(blocks):
        raise ValueError(f"run.fp8_bf16_end_blocks={bf16_end_blocks} must leave FP8 blocks between the bf16 ends: "
                         f"the model has {len(blocks)} blocks, so use 0 to {(len(blocks) - 1) // 2}")
    ends = blocks[:bf16_end_blocks] + blocks[len(blocks) - bf16_end_blocks:]
    kept = {id(m) for block in ends for m in block.modules()}
    converted = convert_to_fp8(*(m for m in model.fp8_modules() if id(m) not in kept), weight_gradient=weight_gradient)
    for block in blocks:
        if norms_can_emit_fp8(block):
            block.fp8_norms = True
    return converted


def norms_can_emit_fp8(block: nn.Module) -> bool:
    """Whether a converted block can take the training path whose norms emit its FP8 linears' inputs: it has
    that path (`fp8_norms`, fae_fast.generators.Block), runs the fused kernels, its qkv is an FP8 linear with
    the FP8 weight gradient (the bf16 weight gradient would need the bf16 norm output after all) and its MLP
    a Float8SwiGLU."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    return (_has_fused_path(block, "fp8_norms")
            and type(getattr(attn, "qkv", None)) is Float8Linear and attn.qkv.fp8_weight_gradient
            and type(mlp) is Float8SwiGLU)


def _has_fused_path(block: nn.Module, flag: str) -> bool:
    """Whether a module has the FP8 block path switched by `flag` (fae_fast.generators.Block) and runs the fused
    kernels that path calls."""
    return hasattr(block, flag) and getattr(getattr(block, "ops", None), "impl", None) == "triton"
