"""The row-loop pieces the modulated norm and the gated residual (alone and fused with the next norm) share:
Triton tile helpers, the one backward kernel of all three ops with its launcher, and the host-side checks
and stride helpers. modulated_norm.py and gated_residual.py hold each op's forward, registration and
public functional; the backward's formulas are in modulated_norm.py's docstring.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .fp8 import row_scales, to_e4m3
from .utils import RowLoop, cast_rtne, cdiv, fit_shared_memory, norm_bwd_launch, row_block, rows_2d, tile_bytes

NORMS = ("layer", "rms")

# --- Triton: tile helpers ---------------------------------------------------------------------------------
# Program i = b * n_chunks + c walks tokens [c * rows_per_program, ...) of sample b, a tile of ROWS rows x
# BLOCK columns at a time (BLOCK = next pow2 of D, masked past D); row statistics are (ROWS,) vectors and
# reductions run along axis 1. The kernels move each base pointer to sample b once (int64, scalar), so tile
# offsets within a sample stay int32. A per-sample modulation is one (1, BLOCK) row loaded once per program
# and broadcast over the tile; a per-token one is a (ROWS, BLOCK) tile at row stride stride_t.


@triton.jit
def program_span(T, n_chunks, rows_per_program):
    """(b, t0, t_end) of this program: sample b (int64), tokens [t0, t_end)."""
    i = tl.program_id(0)
    t0 = (i % n_chunks) * rows_per_program
    return (i // n_chunks).to(tl.int64), t0, tl.minimum(t0 + rows_per_program, T)


@triton.jit
def token_tile(start, t_end, col_ok, ROWS: tl.constexpr):
    """(toks, tok_ok, mask) of the tile of ROWS tokens from `start`, masked from t_end and past D."""
    toks = start + tl.arange(0, ROWS)
    tok_ok = toks < t_end
    return toks, tok_ok, tok_ok[:, None] & col_ok[None, :]


@triton.jit
def load_tile(PTR, toks, stride, cols, mask):
    """(ROWS, BLOCK) fp32 tile of rows `toks` of a row-major tensor with row stride `stride`."""
    return tl.load(PTR + toks[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_row(PTR, cols, col_ok):
    """One (1, BLOCK) fp32 row at PTR: a weight, or a per-sample modulation."""
    return tl.load(PTR + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def mod_tile(PTR, toks, stride_t, cols, mask, row, PER_TOKEN: tl.constexpr):
    """fp32 modulation of tokens `toks`: their (ROWS, BLOCK) tile per token, else the sample's row."""
    m = row
    if PER_TOKEN:
        m = load_tile(PTR, toks, stride_t, cols, mask)
    return m


@triton.jit
def weight_and_scale(W, SCALE, cols, col_ok, HAS_WEIGHT: tl.constexpr, PER_TOKEN: tl.constexpr):
    """(w, a_row), loaded once per program: the weight as a (1, BLOCK) row (1.0 without one) and, for a
    per-sample scale, a = w * (1 + scale) as a row (0.0 per token: its tiles come with each tile)."""
    w, a_row = 1.0, 0.0
    if HAS_WEIGHT:
        w = load_row(W, cols, col_ok)
    if not PER_TOKEN:
        a_row = w * (1.0 + load_row(SCALE, cols, col_ok))
    return w, a_row


@triton.jit
def modulation_rows(W, SCALE, SHIFT, cols, col_ok, HAS_WEIGHT: tl.constexpr, PER_TOKEN: tl.constexpr):
    """(w, a_row, h_row) of a forward, loaded once per program: weight_and_scale's rows and, for a per-sample
    modulation, the shift row."""
    w, a_row = weight_and_scale(W, SCALE, cols, col_ok, HAS_WEIGHT, PER_TOKEN)
    h_row = 0.0 if PER_TOKEN else load_row(SHIFT, cols, col_ok)
    return w, a_row, h_row


@triton.jit
def modulation(SCALE, SHIFT, toks, stride_st, stride_ht, cols, mask, w, a_row, h_row, PER_TOKEN: tl.constexpr):
    """(a = w * (1 + scale), shift) of tokens `toks`: per sample the rows computed once, per token their tiles."""
    a, h = a_row, h_row
    if PER_TOKEN:
        a = w * (1.0 + load_tile(SCALE, toks, stride_st, cols, mask))
        h = load_tile(SHIFT, toks, stride_ht, cols, mask)
    return a, h


@triton.jit
def norm_modulate(x, a, h, mask, n_cols, eps, IS_RMS: tl.constexpr):
    """Forward of a tile x (ROWS, BLOCK) fp32, zero where masked: (y = xhat * a + h, mean, rstd) with
    a = w * (1 + scale); mean and rstd (ROWS,) (mean 0.0 for RMSNorm)."""
    mean = 0.0
    xc = x
    if not IS_RMS:
        mean = tl.sum(x, axis=1) / n_cols
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    return xc * rstd[:, None] * a + h, mean, rstd


@triton.jit
def store_norm(Y, MEAN, RSTD, toks, tok_ok, cols, mask, n_cols, y, mean, rstd, IS_RMS: tl.constexpr):
    """Store y into rows `toks` of Y (rows of n_cols, contiguous) and the row statistics."""
    tl.store(Y + toks[:, None] * n_cols + cols[None, :], cast_rtne(y, Y.dtype.element_ty), mask=mask)
    if not IS_RMS:
        tl.store(MEAN + toks, mean, mask=tok_ok)
    tl.store(RSTD + toks, rstd, mask=tok_ok)


@triton.jit
def store_norm_fp8(Q, S, MEAN, RSTD, toks, tok_ok, cols, mask, n_cols, y, mean, rstd, ROUND: tl.constexpr,
                   IS_RMS: tl.constexpr):
    """`store_norm` for a consumer that reads y in FP8 (an FP8 linear): y is rounded to ROUND (bf16, the FP8
    linear's compute dtype) and quantised rowwise as kernels/fp8.quantize_rows does, the row's power-of-two
    scale from the row in registers; q goes into rows `toks` of Q and the scales into S (one fp32 a row). The
    result equals quantize_rows of y stored in bf16, bit for bit, without writing y and reading it back."""
    y = tl.where(mask, cast_rtne(y, ROUND).to(tl.float32), 0.0)
    scale, inverse = row_scales(tl.max(tl.abs(y), axis=1))
    tl.store(Q + toks[:, None] * n_cols + cols[None, :], to_e4m3(y, inverse, Q.dtype.element_ty), mask=mask)
    tl.store(S + toks, scale, mask=tok_ok)
    if not IS_RMS:
        tl.store(MEAN + toks, mean, mask=tok_ok)
    tl.store(RSTD + toks, rstd, mask=tok_ok)


@triton.jit
def norm_bwd_tile(dy, x, a, mean, rstd, mask, n_cols, IS_RMS: tl.constexpr):
    """(dx, xhat) of a tile, fp32 (ROWS, BLOCK), with a = w * (1 + scale). mean, rstd: (ROWS, 1) columns (mean
    0.0 for RMSNorm); masked entries of dy and x are zero."""
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    g = dy * a  # dL/dxhat
    c1 = tl.sum(g * xhat, axis=1)[:, None] / n_cols
    if IS_RMS:
        dx = (g - xhat * c1) * rstd
    else:
        dx = (g - tl.sum(g, axis=1)[:, None] / n_cols - xhat * c1) * rstd
    return dx, xhat


@triton.jit
def store_partial(row, P, cols, n_cols):
    """Store a (1, BLOCK) or (BLOCK,) fp32 row into row i (this program) of partials P (B * n_chunks, D)."""
    ptrs = P + tl.program_id(0).to(tl.int64) * n_cols + cols
    tl.store(ptrs, tl.reshape(row, cols.shape), mask=cols < n_cols)


# Shape ints the kernels gain nothing from knowing the divisibility of (offsets are built from specialised
# strides): one compiled kernel serves every T and chunking.
SHAPE_INTS = ["T", "n_chunks", "rows_per_program"]


@triton.jit(do_not_specialize=SHAPE_INTS)
def norm_residual_bwd_kernel(
    DN, X, SCALE, W, MEAN, RSTD, DH, GATE, Y,
    DX, DSCALE, DY, DGATE, DSCALE_P, DSHIFT_P, DW_P, DGATE_P,
    stride_dn, stride_x, stride_dh, stride_y, stride_sb, stride_st, stride_gb, stride_gt,
    T, n_cols, n_chunks, rows_per_program,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_DN: tl.constexpr,
    HAS_DH: tl.constexpr, GATED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr,
):
    """The one backward of modulated_norm, gated_residual and the fused pair.

    Program (b, c) walks its tokens of sample b, ROWS at a time. HAS_DN: dn (grad of norm(x) * (1 + scale)
    + shift) gives the norm gradients. HAS_DH: dh, the grad reaching x directly (the fused pair's residual
    output), adds to dx. GATED: x = x0 + gate * y, so dy = dx * gate and dgate = dx * y. Row outputs dx (with
    HAS_DN), dy, and per-token dscale/dgate are stored; per-sample dscale, dshift, dgate and dweight leave as
    fp32 partial sums, one row per program (B * n_chunks, D).
    """
    b, t0, t_end = program_span(T, n_chunks, rows_per_program)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    r0 = b * T  # sample b's first row
    DN, X, DH, Y = DN + r0 * stride_dn, X + r0 * stride_x, DH + r0 * stride_dh, Y + r0 * stride_y
    DX, DY, DSCALE, DGATE = DX + r0 * n_cols, DY + r0 * n_cols, DSCALE + r0 * n_cols, DGATE + r0 * n_cols
    MEAN, RSTD, SCALE, GATE = MEAN + r0, RSTD + r0, SCALE + b * stride_sb, GATE + b * stride_gb
    w, a_row, g_row = 1.0, 0.0, 0.0
    if HAS_DN:
        w, a_row = weight_and_scale(W, SCALE, cols, col_ok, HAS_WEIGHT, PER_TOKEN)
    if GATED and not PER_TOKEN:
        g_row = load_row(GATE, cols, col_ok)
    # per sample, one sum serves dscale and dweight: sum_t dy * xhat, times w (dscale) or (1 + scale) (dweight)
    acc_a = tl.zeros([ROWS, BLOCK], dtype=tl.float32)  # per sample: sum dy * xhat; per token: dweight
    acc_h = tl.zeros([ROWS, BLOCK], dtype=tl.float32)  # dshift
    acc_g = tl.zeros([ROWS, BLOCK], dtype=tl.float32)  # dgate
    for start in tl.range(t0, t_end, ROWS, num_stages=STAGES):
        toks, tok_ok, mask = token_tile(start, t_end, col_ok, ROWS)
        out = toks[:, None] * n_cols + cols[None, :]  # row outputs are contiguous (B * T, D)
        d = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        if HAS_DN:
            dn = load_tile(DN, toks, stride_dn, cols, mask)
            a = a_row
            if PER_TOKEN:
                s = load_tile(SCALE, toks, stride_st, cols, mask)
                a = w * (1.0 + s)
            mean = 0.0
            if not IS_RMS:
                mean = tl.load(MEAN + toks, mask=tok_ok, other=0.0)[:, None]
            rstd = tl.load(RSTD + toks, mask=tok_ok, other=0.0)[:, None]
            d, xhat = norm_bwd_tile(dn, load_tile(X, toks, stride_x, cols, mask), a, mean, rstd, mask, n_cols,
                                     IS_RMS)
            if PER_TOKEN:
                tl.store(DSCALE + out, cast_rtne(dn * xhat * w, DSCALE.dtype.element_ty), mask=mask)
                if HAS_WEIGHT:
                    acc_a += dn * (1.0 + s) * xhat
            else:
                acc_a += dn * xhat
                acc_h += dn
        if HAS_DH:  # loaded after the norm's math: fewer registers live across its reductions
            d += load_tile(DH, toks, stride_dh, cols, mask)
        if HAS_DN:
            tl.store(DX + out, cast_rtne(d, DX.dtype.element_ty), mask=mask)
        if GATED:
            g = mod_tile(GATE, toks, stride_gt, cols, mask, g_row, PER_TOKEN)
            tl.store(DY + out, cast_rtne(d * g, DY.dtype.element_ty), mask=mask)
            dg = d * load_tile(Y, toks, stride_y, cols, mask)
            if PER_TOKEN:
                tl.store(DGATE + out, cast_rtne(dg, DGATE.dtype.element_ty), mask=mask)
            else:
                acc_g += dg
    if HAS_DN and not PER_TOKEN:  # w and scale reloaded: not kept live through the loop
        sums = tl.sum(acc_a, axis=0)[None, :]
        w = 1.0
        if HAS_WEIGHT:
            w = load_row(W, cols, col_ok)
            store_partial(sums * (1.0 + load_row(SCALE, cols, col_ok)), DW_P, cols, n_cols)
        store_partial(sums * w, DSCALE_P, cols, n_cols)
        store_partial(tl.sum(acc_h, axis=0), DSHIFT_P, cols, n_cols)
    if HAS_DN and HAS_WEIGHT and PER_TOKEN:
        store_partial(tl.sum(acc_a, axis=0), DW_P, cols, n_cols)
    if GATED and not PER_TOKEN:
        store_partial(tl.sum(acc_g, axis=0), DGATE_P, cols, n_cols)

# --- host side ---------------------------------------------------------------------------------------------


def lastdim_contiguous(m: torch.Tensor) -> torch.Tensor:
    return m if m.stride(-1) == 1 else m.contiguous()


def per_token(m: torch.Tensor) -> bool:
    """A modulation (B, T, D) with T > 1 varies per token; (B, D) and (B, 1, D) are per sample."""
    return m.dim() == 3 and m.shape[1] > 1


def mod_strides(m: Optional[torch.Tensor]) -> tuple[int, int]:
    """(stride per sample, stride per token) of a modulation; a per-sample one repeats, stride 0."""
    if m is None:
        return 0, 0
    return m.stride(0), (m.stride(1) if per_token(m) else 0)


def program_grid(T: int, n_samples: int, launch: RowLoop, *row_strides: int) -> tuple[int, int]:
    """(programs, n_chunks) of a RowLoop launch: each sample's T tokens cut into n_chunks runs of
    launch.rows_per_program. Checks that offsets within one sample fit the kernels' int32 arithmetic."""
    launch.check()
    if T * max(row_strides, default=0) >= 2**31:
        raise ValueError(f"a sample of {T} rows at row strides {row_strides} spans 2^31 elements or more; "
                         "the kernels index within a sample in int32: split the tokens into more samples.")
    n_chunks = cdiv(T, launch.rows_per_program)
    return n_samples * n_chunks, n_chunks

def rows_or_empty(like: torch.Tensor, dtype: torch.dtype, needed: bool) -> torch.Tensor:
    """A fresh (B, T, D) row output, or an empty placeholder for a pointer the kernel will not touch."""
    return torch.empty(like.shape if needed else (0,), dtype=dtype, device=like.device)


def partial_sums(like: torch.Tensor, n_chunks: int, names: list[str]):
    """fp32 partial sums of the per-sample grads and dweight: one (B, n_chunks, D) slab per name, all in one
    buffer so that one fixed-order sum over the chunks finishes them. -> (buffer, slab(name) -> its slab or
    an empty placeholder)."""
    B, _, D = like.shape
    parts = like.new_empty((len(names), B, n_chunks, D), dtype=torch.float32)
    none = like.new_empty((0,), dtype=torch.float32)
    return parts, lambda name: parts[names.index(name)] if name in names else none


def norm_residual_bwd(dn, x, scale, weight, mean, rstd, norm: str, shift_dtype: torch.dtype,
                      dh=None, gate=None, y=None, *, launch: Optional[RowLoop] = None):
    """Launch norm_residual_bwd_kernel. dn: grad of the modulated norm's output, or None (then x, scale,
    weight, mean, rstd are unused); dh: grad reaching x directly, or None; gate, y: given when x came from
    the gated residual x0 + gate * y. Tensors (B, T, D) but modulations (B, D) | (B, 1, D) | (B, T, D).
    launch: None for the default (norm_bwd_launch); either is fitted to the device's shared memory.

    Returns (dx, dscale, dshift, dweight, dgate, dy): dx only with dn (without it dx is dh itself);
    dshift per sample only (per token it is dn itself); per-sample grads and dweight reduced over tokens
    deterministically. What is not computed comes back as an empty tensor.
    """
    like = dn if dn is not None else dh
    B, T, D = like.shape
    has_dn, gated = dn is not None, gate is not None
    tok = per_token(scale if has_dn else gate)
    has_w = has_dn and weight is not None
    dn2, x2, dh2, y2 = (None if t is None else rows_2d(t) for t in (dn, x, dh, y))
    scale, gate = (None if m is None else lastdim_contiguous(m) for m in (scale, gate))
    tiled = (dn2, x2, scale if tok else None) if has_dn else ()
    tiled += (dh2, gate if tok else None, y2) if gated else (dh2,)
    launch = fit_shared_memory(launch or norm_bwd_launch(D, B, T, like.device), row_block(D), tile_bytes(*tiled),
                               like.device)
    row_stride = lambda t: 0 if t is None else t.stride(0)  # noqa: E731
    strides = (*(row_stride(t) for t in (dn2, x2, dh2, y2)), *mod_strides(scale), *mod_strides(gate))
    programs, n_chunks = program_grid(T, B, launch, D, *strides[:4], strides[5], strides[7])
    dtype_of = lambda t: like.dtype if t is None else t.dtype  # noqa: E731
    dx, dy = rows_or_empty(like, dtype_of(x), has_dn), rows_or_empty(like, dtype_of(y), gated)
    dscale = rows_or_empty(like, dtype_of(scale), has_dn and tok)
    dgate = rows_or_empty(like, dtype_of(gate), gated and tok)
    names = ["dscale", "dshift"] * (has_dn and not tok) + ["dweight"] * has_w + ["dgate"] * (gated and not tok)
    parts, slab = partial_sums(like, n_chunks, names)
    if B * T > 0:
        none = like.new_empty((0,))  # stands in for absent tensors; the kernel never touches them
        ptr = lambda t: none if t is None else t  # noqa: E731
        norm_residual_bwd_kernel[(programs,)](
            ptr(dn2), ptr(x2), ptr(scale), ptr(weight), ptr(mean if norm == "layer" else None), ptr(rstd),
            ptr(dh2), ptr(gate), ptr(y2), dx, dscale, dy, dgate, *map(slab, ("dscale", "dshift", "dweight", "dgate")),
            *strides, T, D, n_chunks, launch.rows_per_program,
            IS_RMS=norm == "rms", HAS_WEIGHT=has_w, PER_TOKEN=tok, HAS_DN=has_dn, HAS_DH=dh is not None,
            GATED=gated, ROWS=launch.rows, BLOCK=row_block(D), STAGES=launch.num_stages, num_warps=launch.num_warps,
        )
    sums = dict(zip(names, parts.sum(2)))  # (B, D) fp32 each, summed over the chunks in a fixed order
    done = lambda name, dtype, shape: sums[name].to(dtype, copy=True).reshape(shape)  # noqa: E731
    dshift = like.new_empty((0,), dtype=shift_dtype)
    if has_dn and not tok:
        dscale, dshift = done("dscale", scale.dtype, scale.shape), done("dshift", shift_dtype, scale.shape)
    if gated and not tok:
        dgate = done("dgate", gate.dtype, gate.shape)
    dweight = sums["dweight"].sum(0).to(weight.dtype) if has_w else like.new_empty((0,))
    return dx, dscale, dshift, dweight, dgate, dy

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
