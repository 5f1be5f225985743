"""Gated residual h = x + gate * y, alone and fused with the next modulated norm.

In an adaLN block (DiT, SiT, LightningDiT) the attention branch's output y joins the residual stream x
through a gate from the conditioning MLP, and the MLP branch starts with a modulated norm of the result:
    h = x + gate * y,   n = norm(h) [* weight] * (1 + scale) + shift
gated_residual_modulated_norm does both in one pass (reads x, y; writes h, n); its backward reads dh, dn,
h, y and writes dx, dy in one pass too. gate, scale, shift: (B, D) per sample or (B, T, D) per token.

Backward of the residual: dx = dh_total, dy = dh_total * gate, dgate = dh_total * y (summed over the T
tokens of each sample for a per-sample gate), where dh_total = dh + (grad of n through the norm). The
per-sample sums, the backward kernel itself and its deterministic two-stage fp32 reduction are those of
modulated_norm.py (`norm_residual_bwd_kernel`, `norm_residual_bwd`): one backward serves all three ops.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .modulated_norm import modulated_norm_ref
from .norm_rows import (
    SHAPE_INTS, check_modulation, check_norm, lastdim_contiguous, load_row, load_tile, mod_strides, mod_tile,
    modulation, modulation_rows, norm_modulate, norm_residual_bwd, per_token, program_grid, program_span,
    store_norm, store_norm_fp8, token_tile,
)
from .utils import RowLoop, cast_rtne, fit_shared_memory, norm_fwd_launch, row_block, rows_2d, tile_bytes


def gated_residual_ref(x, gate, y, *, upcast: bool = True):
    """PyTorch reference; upcast as in modulated_norm_ref (fp32 compute, or the inputs' dtypes)."""
    dtype = x.dtype
    if upcast:
        x, gate, y = x.float(), gate.float(), y.float()
    if gate.dim() == 2:  # per sample: the same gate for all T tokens
        gate = gate.unsqueeze(1)
    return (x + gate * y).to(dtype)


def gated_residual_modulated_norm_ref(x, gate, y, scale, shift, weight=None, *, norm: str = "layer",
                                      eps: float = 1e-6, upcast: bool = True):
    """PyTorch reference of the fused pair: h is rounded to x.dtype before the norm reads it, as in the kernel."""
    h = gated_residual_ref(x, gate, y, upcast=upcast)
    return h, modulated_norm_ref(h, scale, shift, weight, norm=norm, eps=eps, upcast=upcast)


@triton.jit(do_not_specialize=SHAPE_INTS)
def _gated_residual_fwd_kernel(
    X, GATE, Y, H, SCALE, SHIFT, W, N, N_SCALES, MEAN, RSTD,
    stride_x, stride_y, stride_gb, stride_gt, stride_sb, stride_st, stride_hb, stride_ht,
    T, n_cols, n_chunks, rows_per_program, eps,
    NORM: tl.constexpr, IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, PER_TOKEN: tl.constexpr,
    FP8_OUT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr,
):
    """x, y (B * T, D) -> h (B * T, D); program (b, c) walks its tokens of sample b (modulated_norm.py's
    layout). With NORM, also n (B * T, D) = modulated norm of h as stored (rounded to h's dtype, so the
    backward sees the same h), mean, rstd (B * T,); with FP8_OUT, n quantised rowwise instead (N float8,
    N_SCALES its (B * T,) scales; `store_norm_fp8`)."""
    b, t0, t_end = program_span(T, n_chunks, rows_per_program)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    r0 = b * T  # sample b's first row
    X, Y, H, N = X + r0 * stride_x, Y + r0 * stride_y, H + r0 * n_cols, N + r0 * n_cols
    MEAN, RSTD = MEAN + r0, RSTD + r0
    GATE, SCALE, SHIFT = GATE + b * stride_gb, SCALE + b * stride_sb, SHIFT + b * stride_hb
    g_row = 0.0 if PER_TOKEN else load_row(GATE, cols, col_ok)
    w, a_row, h_row = 1.0, 0.0, 0.0
    if NORM:
        w, a_row, h_row = modulation_rows(W, SCALE, SHIFT, cols, col_ok, HAS_WEIGHT, PER_TOKEN)
    for start in tl.range(t0, t_end, ROWS, num_stages=STAGES):
        toks, tok_ok, mask = token_tile(start, t_end, col_ok, ROWS)
        g = mod_tile(GATE, toks, stride_gt, cols, mask, g_row, PER_TOKEN)
        h = load_tile(X, toks, stride_x, cols, mask) + g * load_tile(Y, toks, stride_y, cols, mask)
        h = cast_rtne(h, H.dtype.element_ty)
        tl.store(H + toks[:, None] * n_cols + cols[None, :], h, mask=mask)
        if NORM:
            a, sh = modulation(SCALE, SHIFT, toks, stride_st, stride_ht, cols, mask, w, a_row, h_row, PER_TOKEN)
            n, mean, rstd = norm_modulate(h.to(tl.float32), a, sh, mask, n_cols, eps, IS_RMS)
            if FP8_OUT:
                store_norm_fp8(N, N_SCALES + r0, MEAN, RSTD, toks, tok_ok, cols, mask, n_cols, n, mean, rstd,
                               tl.bfloat16, IS_RMS)
            else:
                store_norm(N, MEAN, RSTD, toks, tok_ok, cols, mask, n_cols, n, mean, rstd, IS_RMS)


def gated_residual_fwd(x, gate, y, scale=None, shift=None, weight=None, norm: Optional[str] = None,
                       eps: float = 1e-6, *, launch: Optional[RowLoop] = None):
    """x, y (B, T, D), gate (B, D) | (B, 1, D) | (B, T, D) -> h (B, T, D) in x.dtype; with norm also
    n = modulated_norm(h, scale, shift, weight) (B, T, D), mean (R,) fp32 (empty for rms), rstd (R,) fp32.
    launch: None for the default (norm_fwd_launch); either is fitted to the device's shared memory."""
    n = torch.empty(x.shape if norm else (0,), dtype=x.dtype, device=x.device)
    h, mean, rstd = _launch_residual(x, gate, y, scale, shift, weight, norm, eps, n, None, launch)
    return h, n, mean, rstd


def gated_residual_modulated_norm_fp8_fwd(x, gate, y, scale, shift, weight, norm: str, eps: float, *,
                                          launch: Optional[RowLoop] = None):
    """`gated_residual_fwd` with a norm, for an FP8 consumer of n: -> (h, q (R, D) float8_e4m3fn, s (R, 1) fp32,
    mean, rstd), q * s the rowwise quantisation of n rounded to bf16 (for bf16 inputs, of n as the plain op
    stores it, bit for bit); no n written."""
    B, T, D = x.shape
    q = torch.empty((B * T, D), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((B * T, 1), dtype=torch.float32, device=x.device)
    h, mean, rstd = _launch_residual(x, gate, y, scale, shift, weight, norm, eps, q, s, launch)
    return h, q, s, mean, rstd


def _launch_residual(x, gate, y, scale, shift, weight, norm, eps, n, n_scales, launch):
    """Run the forward kernel: h, and with norm n into `n` (x.dtype, or float8 with n_scales) -> (h, mean, rstd)."""
    B, T, D = x.shape
    x2, y2 = rows_2d(x), rows_2d(y)
    gate, scale, shift = (None if m is None else lastdim_contiguous(m) for m in (gate, scale, shift))
    h = torch.empty((B, T, D), dtype=x.dtype, device=x.device)
    rstd = x.new_empty((B * T if norm else 0,), dtype=torch.float32)
    mean = x.new_empty((B * T if norm == "layer" else 0,), dtype=torch.float32)
    if B * T == 0:
        return h, mean, rstd
    tiled = (gate, scale, shift) if per_token(gate) else ()  # per-sample modulations are one row per program
    launch = fit_shared_memory(launch or norm_fwd_launch(D, B, T, x.device), row_block(D), tile_bytes(x, y, *tiled),
                               x.device)
    strides = (*mod_strides(gate), *mod_strides(scale), *mod_strides(shift))
    programs, n_chunks = program_grid(T, B, launch, x2.stride(0), y2.stride(0), D, *strides[1::2])
    ptr = lambda t: h if t is None else t  # noqa: E731  (absent tensors: never touched)
    _gated_residual_fwd_kernel[(programs,)](
        x2, gate, y2, h, ptr(scale), ptr(shift), ptr(weight), n, ptr(n_scales), mean, rstd,
        x2.stride(0), y2.stride(0), *strides, T, D, n_chunks, launch.rows_per_program, eps,
        NORM=norm is not None, IS_RMS=norm == "rms", HAS_WEIGHT=weight is not None, PER_TOKEN=per_token(gate),
        FP8_OUT=n_scales is not None, ROWS=launch.rows, BLOCK=row_block(D), STAGES=launch.num_stages,
        num_warps=launch.num_warps,
    )
    return h, mean, rstd


# --- torch.library registration (custom_op, not triton_op: see modulated_norm.py) -------------------------


@torch.library.custom_op("fae_fast::gated_residual_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return gated_residual_fwd(x, gate, y)[0]


@_fwd_op.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape)


@torch.library.custom_op("fae_fast::gated_residual_bwd", mutates_args=())
def _bwd_op(dh: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dgate like gate, dy like y); dx = dh needs no kernel."""
    _, _, _, _, dgate, dy = norm_residual_bwd(None, None, None, None, None, None, "layer", dh.dtype, dh, gate, y)
    return dgate, dy


@_bwd_op.register_fake
def _(dh, gate, y):
    return gate.new_empty(gate.shape), y.new_empty(y.shape)


def _setup_context(ctx, inputs, output):
    _, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _backward(ctx, dh):
    gate, y = ctx.saved_tensors
    return dh, *_bwd_op(dh, gate, y)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fae_fast::gated_residual_modulated_norm_fwd", mutates_args=())
def _fused_fwd_op(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    weight: Optional[torch.Tensor], norm: str, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_residual_fwd(x, gate, y, scale, shift, weight, norm, eps)


@_fused_fwd_op.register_fake
def _(x, gate, y, scale, shift, weight, norm, eps):
    rows = x.shape[0] * x.shape[1]
    stats = lambda n: x.new_empty((n,), dtype=torch.float32)  # noqa: E731
    return x.new_empty(x.shape), x.new_empty(x.shape), stats(rows if norm == "layer" else 0), stats(rows)


@torch.library.custom_op("fae_fast::gated_residual_modulated_norm_bwd", mutates_args=())
def _fused_bwd_op(
    dh: Optional[torch.Tensor], dn: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor,
    scale: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, norm: str,
    shift_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dgate, dy, dscale, dshift, dweight); dshift empty per token (it is dn), dweight empty without weight."""
    dx, dscale, dshift, dweight, dgate, dy = norm_residual_bwd(dn, h, scale, weight, mean, rstd, norm, shift_dtype,
                                                              dh, gate, y)
    return dx, dgate, dy, dscale, dshift, dweight


@_fused_bwd_op.register_fake
def _(dh, dn, h, gate, y, scale, weight, mean, rstd, norm, shift_dtype):
    dshift = scale.new_empty((0,) if per_token(scale) else scale.shape, dtype=shift_dtype)
    dweight = weight.new_empty(weight.shape) if weight is not None else h.new_empty((0,))
    return h.new_empty(h.shape), gate.new_empty(gate.shape), y.new_empty(y.shape), scale.new_empty(scale.shape), \
        dshift, dweight


def _fused_setup_context(ctx, inputs, output):
    x, gate, y, scale, shift, weight, norm, eps = inputs
    h, _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # an unused h or n arrives as None: its kernel work is skipped
    ctx.save_for_backward(h, gate, y, scale, weight, mean, rstd)
    ctx.norm, ctx.shift_dtype = norm, shift.dtype


def _fused_backward(ctx, dh, dn, _dmean, _drstd):
    h, gate, y, scale, weight, mean, rstd = ctx.saved_tensors
    if dn is None:  # n unused: the plain gated residual backward
        if dh is None:
            return (None,) * 8
        return dh, *_bwd_op(dh, gate, y), None, None, None, None, None
    return (*gated_residual_modulated_norm_backward(dh, dn, h, gate, y, scale, weight, mean, rstd, norm=ctx.norm,
                                                    shift_dtype=ctx.shift_dtype), None, None)


_fused_fwd_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


@torch.library.custom_op("fae_fast::gated_residual_modulated_norm_fp8_fwd", mutates_args=())
def _fused_fp8_fwd_op(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
    weight: Optional[torch.Tensor], norm: str, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gated_residual_modulated_norm_fp8_fwd(x, gate, y, scale, shift, weight, norm, eps)


@_fused_fp8_fwd_op.register_fake
def _(x, gate, y, scale, shift, weight, norm, eps):
    rows = x.shape[0] * x.shape[1]
    stats = lambda n: x.new_empty((n,), dtype=torch.float32)  # noqa: E731
    return (x.new_empty(x.shape), x.new_empty((rows, x.shape[2]), dtype=torch.float8_e4m3fn),
            x.new_empty((rows, 1), dtype=torch.float32), stats(rows if norm == "layer" else 0), stats(rows))


def gated_residual_modulated_norm_fp8_stats(x, gate, y, scale, shift, weight=None, *, norm: str = "layer",
                                            eps: float = 1e-6):
    """The fused pair with n quantised for an FP8 linear, and what the backward needs: (h (B, T, D), q (B * T, D)
    float8_e4m3fn, s (B * T, 1) fp32, mean, rstd). Not differentiable: fae_fast/fp8.py's fused Function runs
    `gated_residual_modulated_norm_backward` itself."""
    _check_residual(x, gate, y)
    check_modulation(x, gate, scale, shift, names=("gate", "scale", "shift"))
    check_norm(x, weight, norm)
    return _fused_fp8_fwd_op(x, gate, y, scale, shift, weight, norm, eps)


def gated_residual_modulated_norm_fp8_ref(x, gate, y, scale, shift, weight=None, *, norm: str = "layer",
                                          eps: float = 1e-6):
    """PyTorch reference of `gated_residual_modulated_norm_fp8_stats`'s (h, q, s)."""
    from .fp8 import quantize_rows_ref

    h, n = gated_residual_modulated_norm_ref(x, gate, y, scale, shift, weight, norm=norm, eps=eps)
    return (h, *quantize_rows_ref(n.bfloat16().reshape(-1, n.shape[-1])))


def gated_residual_modulated_norm_backward(dh, dn, h, gate, y, scale, weight, mean, rstd, *, norm: str,
                                           shift_dtype: torch.dtype):
    """The fused pair's backward as a functional, for a Function that ran the FP8 forward: dh (B, T, D) the
    gradient of h, dn of n -> (dx, dgate, dy, dscale, dshift, dweight or None), dshift per token being dn."""
    dx, dgate, dy, dscale, dshift, dweight = _fused_bwd_op(dh, dn, h, gate, y, scale, weight, mean, rstd, norm,
                                                          shift_dtype)
    if per_token(scale):
        dshift = dn.to(shift_dtype)
    return dx, dgate, dy, dscale, dshift, (dweight if weight is not None else None)


# --- public functionals --------------------------------------------------------------------------------------


def _check_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> None:
    check_modulation(x, gate, names=("gate",))
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}.")


def gated_residual(x, gate, y) -> torch.Tensor:
    """h = x + gate * y. x, y: (B, T, D); gate: (B, D) per sample or (B, T, D) per token. Returns (B, T, D)
    in x.dtype, computed in fp32; gradients in each input's dtype, dgate summed over tokens in fp32."""
    _check_residual(x, gate, y)
    return _fwd_op(x, gate, y)


def gated_residual_modulated_norm(x, gate, y, scale, shift, weight=None, *, norm: str = "layer",
                                  eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, n) with h = x + gate * y and n = modulated_norm(h, scale, shift, weight, norm=norm, eps=eps), in one
    pass. x, y: (B, T, D); gate, scale, shift: all (B, D) per sample or all (B, T, D) per token; weight (D,) or
    None. Both outputs (B, T, D) in x.dtype."""
    _check_residual(x, gate, y)
    check_modulation(x, gate, scale, shift, names=("gate", "scale", "shift"))
    check_norm(x, weight, norm)
    h, n, _, _ = _fused_fwd_op(x, gate, y, scale, shift, weight, norm, eps)
    return h, n
