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
partials (B, n_chunks, D); a fixed-order torch sum over the chunks finishes (`_finish`). No atomics, so
the same inputs give bit-identical gradients on every run. gated_residual.py reuses these pieces.
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import reduction_grid, row_block, row_loop_num_warps, row_num_warps, rows_2d

NORMS = ("layer", "rms")


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


# --- Triton: row helpers shared with gated_residual.py -------------------------------------------------


@triton.jit
def _normalize(x, mask, n_cols, eps, IS_RMS: tl.constexpr):
    """x: (BLOCK,) fp32, zero past n_cols -> (xhat, mean, rstd); mean is 0 for RMSNorm."""
    if IS_RMS:
        mean = 0.0
        xc = x
    else:
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    return xc * rstd, mean, rstd


@triton.jit
def _modulate(xhat, scale_ptr, shift_ptr, W, cols, mask, HAS_WEIGHT: tl.constexpr):
    """xhat * w * (1 + scale) + shift in fp32 for one row; scale_ptr/shift_ptr point at the row's modulation."""
    s = tl.load(scale_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(shift_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        xhat = xhat * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    return xhat * (1.0 + s) + h


@triton.jit
def _modulated_norm_bwd_row(dy, x, s, w, mean, rstd, mask, n_cols, IS_RMS: tl.constexpr):
    """One row's gradients, all fp32 (BLOCK,): (dx, dscale = dy * xhat * w, dweight = dy * (1 + s) * xhat)."""
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    ds = dy * (1.0 + s)
    g = ds * w  # dL/dxhat
    c1 = tl.sum(g * xhat, axis=0) / n_cols
    if IS_RMS:
        dx = (g - xhat * c1) * rstd
    else:
        dx = (g - tl.sum(g, axis=0) / n_cols - xhat * c1) * rstd
    return dx, dy * xhat * w, ds * xhat


@triton.jit
def _reduce_or_store(acc, val, ptr, mask, PER_TOKEN: tl.constexpr):
    """Per-token modulation: the row gradient is the gradient, store it at ptr. Per sample: add it to the
    program's fp32 accumulator (summed over the program's tokens)."""
    if PER_TOKEN:
        tl.store(ptr, val.to(ptr.dtype.element_ty), mask=mask)
    else:
        acc += val
    return acc


@triton.jit
def _store_partial(acc, P, b, c, n_cols, cols, mask):
    """Write program (b, c)'s fp32 sum into partials P: (B, n_chunks, n_cols)."""
    tl.store(P + (b * tl.num_programs(1) + c) * n_cols + cols, acc, mask=mask)


# --- Triton: kernels ---------------------------------------------------------------------------------


@triton.jit
def _modulated_norm_fwd_kernel(
    X, Y, SCALE, SHIFT, W, MEAN, RSTD,
    stride_x, stride_sb, stride_st, stride_hb, stride_ht, T, n_cols, eps,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row r = b * T + t of x (R, D) and y (R, D, contiguous); the row's scale/shift sit
    at b * stride_b + t * stride_t (stride_t = 0 per sample). Saves mean and rstd (R,) fp32."""
    row = tl.program_id(0).to(tl.int64)
    b, t = row // T, row % T
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    xhat, mean, rstd = _normalize(x, mask, n_cols, eps, IS_RMS)
    y = _modulate(xhat, SCALE + b * stride_sb + t * stride_st, SHIFT + b * stride_hb + t * stride_ht,
                  W, cols, mask, HAS_WEIGHT)
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _modulated_norm_bwd_kernel(
    DY, X, SCALE, W, MEAN, RSTD, DX, DSCALE, DSCALE_P, DSHIFT_P, DW_P,
    stride_dy, stride_x, stride_sb, stride_st, T, n_cols, rows_per_program,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (B, n_chunks): program (b, c) walks tokens [c * rows_per_program, ...) of sample b, writes dx
    (and per-token dscale) rows, and its fp32 partial sums of dscale, dshift (per sample) and dweight."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = 1.0
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    acc_s = tl.zeros([BLOCK], dtype=tl.float32)
    acc_h = tl.zeros([BLOCK], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    t0 = c * rows_per_program
    s = tl.load(SCALE + b * stride_sb + t0 * stride_st + cols, mask=mask, other=0.0).to(tl.float32)
    for t in range(t0, tl.minimum(t0 + rows_per_program, T)):
        row = b * T + t
        if PER_TOKEN:
            s = tl.load(SCALE + b * stride_sb + t * stride_st + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        mean = 0.0
        if not IS_RMS:
            mean = tl.load(MEAN + row)
        dx, ds, dw = _modulated_norm_bwd_row(dy, x, s, w, mean, tl.load(RSTD + row), mask, n_cols, IS_RMS)
        tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
        acc_s = _reduce_or_store(acc_s, ds, DSCALE + row * n_cols + cols, mask, PER_TOKEN)
        if not PER_TOKEN:
            acc_h += dy
        if HAS_WEIGHT:
            acc_w += dw
    if not PER_TOKEN:
        _store_partial(acc_s, DSCALE_P, b, c, n_cols, cols, mask)
        _store_partial(acc_h, DSHIFT_P, b, c, n_cols, cols, mask)
    if HAS_WEIGHT:
        _store_partial(acc_w, DW_P, b, c, n_cols, cols, mask)


# --- launchers -------------------------------------------------------------------------------------------


def _lastdim_contiguous(m: torch.Tensor) -> torch.Tensor:
    return m if m.stride(-1) == 1 else m.contiguous()


def per_token(m: torch.Tensor) -> bool:
    """A modulation (B, T, D) with T > 1 varies per token; (B, D) and (B, 1, D) are per sample."""
    return m.dim() == 3 and m.shape[1] > 1


def mod_strides(m: torch.Tensor) -> tuple[int, int]:
    """(stride per sample, stride per token) of a modulation; a per-sample one repeats, stride 0."""
    return m.stride(0), (m.stride(1) if per_token(m) else 0)


def partials(n_chunks: int, like: torch.Tensor, needed: bool) -> torch.Tensor:
    """fp32 buffer (B, n_chunks, D) for per-program partial sums (B, D from like: (B, T, D)), or an empty
    placeholder when the kernel will not write it."""
    B, _, D = like.shape
    return like.new_empty((B, n_chunks, D) if needed else (0,), dtype=torch.float32)


def _finish(p: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """Sum the partials (B, n_chunks, D) over the chunks in fp32, in a fixed order, then cast once."""
    return p.sum(1).to(dtype).reshape(shape)


def modulated_norm_fwd(x, scale, shift, weight, norm: str, eps: float):
    """x (B, T, D), scale/shift (B, D) | (B, 1, D) | (B, T, D) -> y (B, T, D) in x.dtype, mean (R,) fp32
    (empty for rms), rstd (R,) fp32, with R = B * T."""
    B, T, D = x.shape
    x2 = rows_2d(x)
    scale, shift = _lastdim_contiguous(scale), _lastdim_contiguous(shift)
    y = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    rstd = x.new_empty((B * T,), dtype=torch.float32)
    mean = x.new_empty((B * T if norm == "layer" else 0,), dtype=torch.float32)
    if B * T == 0:
        return y, mean, rstd
    block = row_block(D)
    _modulated_norm_fwd_kernel[(B * T,)](
        x2, y, scale, shift, x2 if weight is None else weight, mean, rstd,
        x2.stride(0), *mod_strides(scale), *mod_strides(shift), T, D, eps,
        IS_RMS=norm == "rms", HAS_WEIGHT=weight is not None, BLOCK=block, num_warps=row_num_warps(block),
    )
    return y, mean, rstd


def modulated_norm_bwd(dy, x, scale, weight, mean, rstd, norm: str, shift_dtype: torch.dtype):
    """-> dx (B, T, D) x.dtype; dscale like scale; dshift like scale in shift_dtype, per sample only (per
    token dshift = dy, returned by the autograd formula, so here an empty placeholder); dweight (D,) or empty."""
    B, T, D = x.shape
    dy2, x2 = rows_2d(dy), rows_2d(x)
    scale = _lastdim_contiguous(scale)
    tok, has_w = per_token(scale), weight is not None
    rows_per_program, n_chunks = reduction_grid(B, T, x.device)
    dx = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    dscale = torch.empty((B, T, D) if tok else (0,), dtype=scale.dtype, device=x.device)
    ds_p, dh_p, dw_p = partials(n_chunks, x, not tok), partials(n_chunks, x, not tok), partials(n_chunks, x, has_w)
    if B * T > 0:
        block = row_block(D)
        _modulated_norm_bwd_kernel[(B, n_chunks)](
            dy2, x2, scale, x2 if weight is None else weight, rstd if norm == "rms" else mean, rstd,
            dx, dscale, ds_p, dh_p, dw_p,
            dy2.stride(0), x2.stride(0), *mod_strides(scale), T, D, rows_per_program,
            IS_RMS=norm == "rms", HAS_WEIGHT=has_w, PER_TOKEN=tok, BLOCK=block,
            num_warps=row_loop_num_warps(block),
        )
    dshift = x.new_empty((0,), dtype=shift_dtype)
    if not tok:
        dscale, dshift = _finish(ds_p, scale.dtype, scale.shape), _finish(dh_p, shift_dtype, scale.shape)
    dweight = _finish(dw_p.view(1, -1, D), weight.dtype, (D,)) if has_w else x.new_empty((0,))
    return dx, dscale, dshift, dweight


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
    ctx.norm, ctx.shift_dtype, ctx.per_token = norm, shift.dtype, per_token(scale)


def _backward(ctx, dy, _dmean, _drstd):
    x, scale, weight, mean, rstd = ctx.saved_tensors
    dx, dscale, dshift, dweight = _bwd_op(dy, x, scale, weight, mean, rstd, ctx.norm, ctx.shift_dtype)
    if ctx.per_token:
        dshift = dy.to(ctx.shift_dtype)
    return dx, dscale, dshift, (dweight if weight is not None else None), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --- public functional -------------------------------------------------------------------------------------


def check_modulation(x: torch.Tensor, *mods: torch.Tensor, names=("scale", "shift")) -> None:
    """Raise one clear ValueError unless x is (B, T, D) and every modulation is (B, D), (B, 1, D) or
    (B, T, D), all of the same shape."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, D), got shape {tuple(x.shape)}; reshape tokens into dim 1.")
    B, T, D = x.shape
    for m, name in zip(mods, names):
        if tuple(m.shape) not in ((B, D), (B, 1, D), (B, T, D)):
            raise ValueError(f"{name} must be (B, D), (B, 1, D) or (B, T, D) = {(B, T, D)}, got {tuple(m.shape)}.")
        if m.shape != mods[0].shape:
            raise ValueError(f"{name} {tuple(m.shape)} must have the same shape as {names[0]} {tuple(mods[0].shape)}.")


def check_norm(x: torch.Tensor, weight: Optional[torch.Tensor], norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight must be (D,) = ({x.shape[-1]},), got {tuple(weight.shape)}.")


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
