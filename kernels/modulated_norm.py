"""Norm + adaLN modulation, fused: y = norm(x) * (1 + scale) + shift, one pass forward, one pass backward.

norm="layer" is LayerNorm over D without affine (DiT, SiT); norm="rms" is RMSNorm (LightningDiT, the FAE
decoders). An optional weight (D,) multiplies the normalised x before the modulation. scale and shift
come per sample (B, D) from the conditioning MLP, or per token (B, T, D).

Backward: with xhat the normalised x, w the weight (1 without one) and g = dy * (1 + scale) * w the
gradient reaching xhat,
    dx      = rstd * (g - mean(g) - xhat * mean(g * xhat))   (LayerNorm; RMSNorm drops mean(g))
    dscale  = dy * xhat * w,   dshift = dy,   dweight = sum over rows of dy * (1 + scale) * xhat
Per-sample dscale/dshift sum over the T tokens of each sample, and dweight over all rows, in fp32 and
deterministically: programs over (sample, chunk of tokens) sum their rows in registers and write fp32
partials (B, n_chunks, D), all in one buffer; one fixed-order torch sum over the chunks finishes them. With a
per-sample scale, dscale and dweight come from one sum, A = sum over the sample's tokens of dy * xhat:
dscale = w * A and the sample's share of dweight = (1 + scale) * A. No atomics, so the same inputs give
bit-identical gradients on every run. That backward kernel, the tile helpers and the checks live in
norm_rows.py, shared with gated_residual.py.

Launch (kernels/utils.py, RowLoop): programs walk runs of one sample's tokens a (rows, BLOCK) tile at a
time; the row loop's num_stages software-pipelines the loads through shared memory, which keeps more bytes
in flight per SM than registers allow (these kernels are bound by memory bandwidth).
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .norm_rows import (
    SHAPE_INTS, check_modulation, check_norm, lastdim_contiguous, load_tile, mod_strides, modulation,
    modulation_rows, norm_modulate, norm_residual_bwd, per_token, program_grid, program_span, store_norm,
    store_norm_fp8, token_tile,
)
from .utils import RowLoop, fit_shared_memory, norm_fwd_launch, row_block, rows_2d, tile_bytes


def modulated_norm_ref(x, scale, shift, weight=None, *, norm: str = "layer", eps: float = 1e-6, upcast: bool = True):
    """PyTorch reference. upcast=True computes in fp32 and casts to x.dtype (the numerics the kernel aims
    for); upcast=False computes in the inputs' dtypes, as unfused eager model code does (the tests'
    low-precision baseline)."""
    dtype = x.dtype
    if upcast:
        x, scale, shift = x.float(), scale.float(), shift.float()
        weight = None if weight is None else weight.float()
    if scale.dim() == 2:  # per sample: the same modulation for all T tokens
        scale, shift = scale.unsqueeze(1), shift.unsqueeze(1)
    norm_fn = F.layer_norm if norm == "layer" else F.rms_norm
    return (norm_fn(x, x.shape[-1:], weight, eps=eps) * (1 + scale) + shift).to(dtype)


# --- Triton: kernels ---------------------------------------------------------------------------------



@triton.jit(do_not_specialize=SHAPE_INTS)
def _modulated_norm_fwd_kernel(
    X, Y, S, SCALE, SHIFT, W, MEAN, RSTD,
    stride_x, stride_sb, stride_st, stride_hb, stride_ht, T, n_cols, n_chunks, rows_per_program, eps,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, PER_TOKEN: tl.constexpr, FP8_OUT: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr,
):
    """x (B * T, D) -> y (B * T, D), mean and rstd (B * T,) fp32; program (b, c) walks its tokens of sample b.
    With FP8_OUT, y is stored quantised rowwise (Y float8, S its (B * T,) scales; `store_norm_fp8`)."""
    b, t0, t_end = program_span(T, n_chunks, rows_per_program)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    X, Y, MEAN, RSTD = X + b * T * stride_x, Y + b * T * n_cols, MEAN + b * T, RSTD + b * T
    SCALE, SHIFT = SCALE + b * stride_sb, SHIFT + b * stride_hb
    w, a_row, h_row = modulation_rows(W, SCALE, SHIFT, cols, col_ok, HAS_WEIGHT, PER_TOKEN)
    for start in tl.range(t0, t_end, ROWS, num_stages=STAGES):
        toks, tok_ok, mask = token_tile(start, t_end, col_ok, ROWS)
        x = load_tile(X, toks, stride_x, cols, mask)
        a, h = modulation(SCALE, SHIFT, toks, stride_st, stride_ht, cols, mask, w, a_row, h_row, PER_TOKEN)
        y, mean, rstd = norm_modulate(x, a, h, mask, n_cols, eps, IS_RMS)
        if FP8_OUT:
            store_norm_fp8(Y, S + b * T, MEAN, RSTD, toks, tok_ok, cols, mask, n_cols, y, mean, rstd,
                           tl.bfloat16, IS_RMS)
        else:
            store_norm(Y, MEAN, RSTD, toks, tok_ok, cols, mask, n_cols, y, mean, rstd, IS_RMS)


# --- launchers -------------------------------------------------------------------------------------------


def modulated_norm_fwd(x, scale, shift, weight, norm: str, eps: float, *, launch: Optional[RowLoop] = None):
    """x (B, T, D), scale/shift (B, D) | (B, 1, D) | (B, T, D) -> y (B, T, D) in x.dtype, mean (R,) fp32
    (empty for rms), rstd (R,) fp32, with R = B * T. launch: None for the default (norm_fwd_launch); either is fitted to the
    device's shared memory."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return (y, *_launch_norm(x, scale, shift, weight, norm, eps, y, None, launch))


def modulated_norm_fp8_fwd(x, scale, shift, weight, norm: str, eps: float, *, launch: Optional[RowLoop] = None):
    """`modulated_norm_fwd` for an FP8 consumer: -> (q (R, D) float8_e4m3fn, s (R, 1) fp32, mean, rstd), q * s
    the rowwise quantisation of y rounded to bf16 (for a bf16 x, `quantize_rows(modulated_norm_fwd(...)[0])`
    bit for bit), with no y written."""
    B, T, D = x.shape
    q = torch.empty((B * T, D), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((B * T, 1), dtype=torch.float32, device=x.device)
    return (q, s, *_launch_norm(x, scale, shift, weight, norm, eps, q, s, launch))


def _launch_norm(x, scale, shift, weight, norm, eps, y, y_scales, launch):
    """Run the forward kernel into y (bf16 etc., or float8 with y_scales): -> (mean, rstd)."""
    B, T, D = x.shape
    x2 = rows_2d(x)
    scale, shift = lastdim_contiguous(scale), lastdim_contiguous(shift)
    rstd = x.new_empty((B * T,), dtype=torch.float32)
    mean = x.new_empty((B * T if norm == "layer" else 0,), dtype=torch.float32)
    if B * T == 0:
        return mean, rstd
    tiled = (scale, shift) if per_token(scale) else ()
    launch = fit_shared_memory(launch or norm_fwd_launch(D, B, T, x.device), row_block(D), tile_bytes(x, *tiled),
                               x.device)
    (s_b, s_t), (h_b, h_t) = mod_strides(scale), mod_strides(shift)
    programs, n_chunks = program_grid(T, B, launch, x2.stride(0), D, s_t, h_t)
    _modulated_norm_fwd_kernel[(programs,)](
        x2, y, rstd if y_scales is None else y_scales, scale, shift, x2 if weight is None else weight, mean, rstd,
        x2.stride(0), s_b, s_t, h_b, h_t, T, D, n_chunks, launch.rows_per_program, eps,
        IS_RMS=norm == "rms", HAS_WEIGHT=weight is not None, PER_TOKEN=per_token(scale), FP8_OUT=y_scales is not None,
        ROWS=launch.rows, BLOCK=row_block(D), STAGES=launch.num_stages, num_warps=launch.num_warps,
    )
    return mean, rstd


def modulated_norm_bwd(dy, x, scale, weight, mean, rstd, norm: str, shift_dtype: torch.dtype, *,
                       launch: Optional[RowLoop] = None):
    """-> dx (B, T, D) in x.dtype; dscale like scale; dshift like scale in shift_dtype, per sample only (per
    token dshift = dy, returned by the autograd formula; here an empty placeholder); dweight (D,) or empty."""
    return norm_residual_bwd(dy, x, scale, weight, mean, rstd, norm, shift_dtype, launch=launch)[:4]


# --- torch.library registration ---------------------------------------------------------------------------
# custom_op + register_fake rather than triton_op + wrap_triton: on CPU under TRITON_INTERPRET (CI), a
# custom_op runs eagerly and under torch.compile(fullgraph=True), while triton_op there hands fake tensors
# to the interpreter and fails. The cost: Inductor treats the op as opaque (it cannot fuse into it).


@torch.library.custom_op("fae_fast::modulated_norm_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: Optional[torch.Tensor], norm: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return modulated_norm_fwd(x, scale, shift, weight, norm, eps)


@_fwd_op.register_fake
def _(x, scale, shift, weight, norm, eps):
    rows = x.shape[0] * x.shape[1]
    stats = lambda n: x.new_empty((n,), dtype=torch.float32)  # noqa: E731
    return x.new_empty(x.shape), stats(rows if norm == "layer" else 0), stats(rows)


@torch.library.custom_op("fae_fast::modulated_norm_bwd", mutates_args=())
def _bwd_op(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, weight: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, norm: str, shift_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return modulated_norm_bwd(dy, x, scale, weight, mean, rstd, norm, shift_dtype)


@_bwd_op.register_fake
def _(dy, x, scale, weight, mean, rstd, norm, shift_dtype):
    tok = per_token(scale)
    dscale = scale.new_empty(scale.shape)
    dshift = scale.new_empty((0,) if tok else scale.shape, dtype=shift_dtype)
    dweight = weight.new_empty(weight.shape) if weight is not None else x.new_empty((0,))
    return x.new_empty(x.shape), dscale, dshift, dweight


def _setup_context(ctx, inputs, output):
    x, scale, shift, weight, norm, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale, weight, mean, rstd)
    ctx.norm, ctx.shift_dtype = norm, shift.dtype


def _backward(ctx, dy, _dmean, _drstd):
    x, scale, weight, mean, rstd = ctx.saved_tensors
    return (*modulated_norm_backward(dy, x, scale, weight, mean, rstd, norm=ctx.norm, shift_dtype=ctx.shift_dtype),
            None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fae_fast::modulated_norm_fp8_fwd", mutates_args=())
def _fp8_fwd_op(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: Optional[torch.Tensor], norm: str, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return modulated_norm_fp8_fwd(x, scale, shift, weight, norm, eps)


@_fp8_fwd_op.register_fake
def _(x, scale, shift, weight, norm, eps):
    rows = x.shape[0] * x.shape[1]
    stats = lambda n: x.new_empty((n,), dtype=torch.float32)  # noqa: E731
    return (x.new_empty((rows, x.shape[2]), dtype=torch.float8_e4m3fn), x.new_empty((rows, 1), dtype=torch.float32),
            stats(rows if norm == "layer" else 0), stats(rows))


def modulated_norm_fp8_stats(x, scale, shift, weight=None, *, norm: str = "layer", eps: float = 1e-6):
    """The modulated norm quantised for an FP8 linear, with what its backward needs: (q (B * T, D)
    float8_e4m3fn, s (B * T, 1) fp32, mean, rstd). Not differentiable: fae_fast/fp8.py's fused norm-linear
    Function runs `modulated_norm_bwd` itself on the gradient its GEMM gives."""
    check_modulation(x, scale, shift)
    check_norm(x, weight, norm)
    return _fp8_fwd_op(x, scale, shift, weight, norm, eps)


def modulated_norm_fp8_ref(x, scale, shift, weight=None, *, norm: str = "layer", eps: float = 1e-6):
    """PyTorch reference of `modulated_norm_fp8_stats`'s (q, s): the reference norm rounded to bf16, then
    quantised rowwise."""
    from .fp8 import quantize_rows_ref

    y = modulated_norm_ref(x, scale, shift, weight, norm=norm, eps=eps).bfloat16()
    return quantize_rows_ref(y.reshape(-1, y.shape[-1]))


def modulated_norm_backward(dy, x, scale, weight, mean, rstd, *, norm: str, shift_dtype: torch.dtype):
    """The modulated norm's backward as a functional, for a fused Function that ran `modulated_norm_fp8_stats`:
    -> (dx, dscale, dshift, dweight or None), dshift per token being dy itself."""
    dx, dscale, dshift, dweight = _bwd_op(dy, x, scale, weight, mean, rstd, norm, shift_dtype)
    if per_token(scale):
        dshift = dy.to(shift_dtype)
    return dx, dscale, dshift, (dweight if weight is not None else None)


# --- public functional -------------------------------------------------------------------------------------


def modulated_norm(x, scale, shift, weight=None, *, norm: str = "layer", eps: float = 1e-6) -> torch.Tensor:
    """y = norm(x) [* weight] * (1 + scale) + shift, fused forward and backward.

    x: (B, T, D); scale, shift: (B, D) per sample or (B, T, D) per token (both the same); weight: (D,) or
    None; norm: "layer" (LayerNorm without affine) or "rms". Returns (B, T, D) in x.dtype; computes in fp32,
    so inputs may mix dtypes (fp32 x with bf16 scale/shift under autocast). Gradients come back in each
    input's dtype.
    """
    check_modulation(x, scale, shift)
    check_norm(x, weight, norm)
    return _fwd_op(x, scale, shift, weight, norm, eps)[0]
