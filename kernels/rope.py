"""Rotary position embedding on q and k, with optional QK RMSNorm, in one pass; the output is written
in the (B, H, T, Dh) layout SDPA wants, so the head transpose costs nothing.

Convention "rotate half": for j < Dh/2 the pair (x[j], x[j + Dh/2]) turns by angles[t, j]:
    out[j]        = x[j] * cos - x[j + Dh/2] * sin
    out[j + Dh/2] = x[j + Dh/2] * cos + x[j] * sin
The caller builds the (T, Dh/2) angle table (2-D RoPE: rows then columns, see layers.rope_angles_2d);
the kernels compute cos and sin from it in fp32 (the table is small and stays in L2; no cos/sin tables
are materialised).

Registration: custom_op + register_fake (see swiglu.py for why not triton_op).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import cast_rtne, persistent_programs, row_loop_num_warps, row_num_warps, tile_rows


def _rope_ref_one(x, w, cos, sin, eps):
    """x (B, T, H, Dh) -> (B, H, T, Dh) contiguous in x's dtype; cos, sin (T, 1, Dh/2) fp32."""
    dtype = x.dtype
    if w is not None:  # QK-norm: RMSNorm over Dh with a weight, in x's dtype
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.to(dtype)
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(dtype).transpose(1, 2).contiguous()


def rope_ref(q: torch.Tensor, k: torch.Tensor, angles: torch.Tensor, q_norm_weight: Optional[torch.Tensor] = None,
             k_norm_weight: Optional[torch.Tensor] = None, *, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of `rope` (same signature and output layout)."""
    cos, sin = angles.float().cos()[:, None, :], angles.float().sin()[:, None, :]  # (T, 1, Dh/2): all heads
    return _rope_ref_one(q, q_norm_weight, cos, sin, eps), _rope_ref_one(k, k_norm_weight, cos, sin, eps)


# --------------------------------------------------------------------------- Triton kernels
# A tile is BLOCK_T tokens of one (b, h), seen as two (BLOCK_T, BLOCK_HALF) halves of each head vector.
# Tiles are numbered with the token block fastest: tile = (b * H + h) * cdiv(T, BLOCK_T) + t_block.


@triton.jit
def _rope_tile(tile, T, H, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, HALF: tl.constexpr):
    """tile -> b, h (int64 scalars), t (BLOCK_T, 1), j (1, BLOCK_HALF), mask."""
    n_tb = tl.cdiv(T, BLOCK_T)
    bh = tile // n_tb
    t = (tile % n_tb) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64), t, j, (t < T) & (j < HALF)


@triton.jit
def _rope_cos_sin(ang_ptr, t, j, mask, HALF: tl.constexpr):
    ang = tl.load(ang_ptr + t * HALF + j, mask=mask, other=0.0)  # (T, Dh/2) fp32 contiguous
    return tl.cos(ang), tl.sin(ang)


@triton.jit
def _rope_rstd(x1, x2, eps, HALF: tl.constexpr):
    """1 / rms over the head (both halves), (BLOCK_T, 1)."""
    return tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]


@triton.jit
def _rope_load_halves(ptr, mask, HALF: tl.constexpr):
    return (tl.load(ptr, mask=mask, other=0.0).to(tl.float32),
            tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _rope_fwd_rows(x_ptr, stride_t, w_ptr, out_ptr, t, j, mask, cos, sin, eps,
                   HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    """x_ptr -> x[b, 0, h, 0] (rows stride_t apart), out_ptr -> out[b, h, 0, 0] (rows Dh apart)."""
    x1, x2 = _rope_load_halves(x_ptr + t.to(tl.int64) * stride_t + j, mask, HALF)
    if HAS_NORM:
        rstd = _rope_rstd(x1, x2, eps, HALF)
        w1, w2 = _rope_load_halves(w_ptr + j, j < HALF, HALF)
        x1, x2 = x1 * rstd * w1, x2 * rstd * w2
    out = out_ptr + t * (2 * HALF) + j
    tl.store(out, cast_rtne(x1 * cos - x2 * sin, out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, cast_rtne(x2 * cos + x1 * sin, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_fwd_kernel(q_ptr, k_ptr, ang_ptr, qw_ptr, kw_ptr, qo_ptr, ko_ptr, T, H,
                     sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, eps,
                     HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    b, h, t, j, mask = _rope_tile(tl.program_id(0), T, H, BLOCK_T, BLOCK_HALF, HALF)
    cos, sin = _rope_cos_sin(ang_ptr, t, j, mask, HALF)
    out_off = (b * H + h) * T * (2 * HALF)  # outputs (B, H, T, Dh) contiguous
    _rope_fwd_rows(q_ptr + b * sq_b + h * sq_h, sq_t, qw_ptr, qo_ptr + out_off, t, j, mask, cos, sin, eps,
                   HALF, HAS_NORM)
    _rope_fwd_rows(k_ptr + b * sk_b + h * sk_h, sk_t, kw_ptr, ko_ptr + out_off, t, j, mask, cos, sin, eps,
                   HALF, HAS_NORM)


@triton.jit
def _rope_bwd_rows(g_ptr, stride_gt, x_ptr, x_off, stride_xt, w_ptr, dx_ptr, stride_dxt, t, j, mask, cos, sin, eps,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    """Gradient for one tile of q or k; returns this tile's (dw1, dw2) sums over its rows (zeros if no norm).

    Rotation back (the transpose of the forward rotation, i.e. by -angle):
        dy1 = g1 cos + g2 sin,  dy2 = g2 cos - g1 sin
    RMSNorm back, with xh = x * rstd and y = xh * w (means over the Dh of one head):
        dw += dy * xh (summed over rows),  dx = rstd * (dy * w - xh * mean(dy * w * xh))
    """
    t64 = t.to(tl.int64)
    g1, g2 = _rope_load_halves(g_ptr + t64 * stride_gt + j, mask, HALF)
    dy1, dy2 = g1 * cos + g2 * sin, g2 * cos - g1 * sin
    dw1 = tl.zeros((BLOCK_HALF,), tl.float32)
    dw2 = tl.zeros((BLOCK_HALF,), tl.float32)
    if HAS_NORM:
        x1, x2 = _rope_load_halves(x_ptr + x_off + t64 * stride_xt + j, mask, HALF)
        rstd = _rope_rstd(x1, x2, eps, HALF)
        xh1, xh2 = x1 * rstd, x2 * rstd  # masked rows: x = 0 -> xh = 0, no contribution
        w1, w2 = _rope_load_halves(w_ptr + j, j < HALF, HALF)
        dw1, dw2 = tl.sum(dy1 * xh1, 0), tl.sum(dy2 * xh2, 0)
        dxh1, dxh2 = dy1 * w1, dy2 * w2
        c = ((tl.sum(dxh1 * xh1, 1) + tl.sum(dxh2 * xh2, 1)) / (2 * HALF))[:, None]
        dy1, dy2 = rstd * (dxh1 - xh1 * c), rstd * (dxh2 - xh2 * c)
    dx = dx_ptr + t64 * stride_dxt + j
    tl.store(dx, cast_rtne(dy1, dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx + HALF, cast_rtne(dy2, dx_ptr.dtype.element_ty), mask=mask)
    return dw1, dw2


@triton.jit
def _rope_bwd_kernel(gq_ptr, gk_ptr, ang_ptr, q_ptr, k_ptr, qw_ptr, kw_ptr, dq_ptr, dk_ptr, dw_part_ptr,
                     T, H, n_tiles, sgq_b, sgq_h, sgq_t, sgk_b, sgk_h, sgk_t, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, eps,
                     HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    # Grid-stride loop over tiles; with the norm each program keeps its dweight sums in registers and
    # writes one fp32 partial row dw_part[{q,k}, pid, :] at the end: a fixed order, no atomics.
    pid = tl.program_id(0)
    acc_q1 = tl.zeros((BLOCK_HALF,), tl.float32)
    acc_q2 = tl.zeros((BLOCK_HALF,), tl.float32)
    acc_k1 = tl.zeros((BLOCK_HALF,), tl.float32)
    acc_k2 = tl.zeros((BLOCK_HALF,), tl.float32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        b, h, t, j, mask = _rope_tile(tile, T, H, BLOCK_T, BLOCK_HALF, HALF)
        cos, sin = _rope_cos_sin(ang_ptr, t, j, mask, HALF)
        d_off = (b * T * H + h) * (2 * HALF)  # dq, dk (B, T, H, Dh) contiguous; rows H * Dh apart
        dw1, dw2 = _rope_bwd_rows(gq_ptr + b * sgq_b + h * sgq_h, sgq_t, q_ptr, b * sq_b + h * sq_h, sq_t, qw_ptr,
                                  dq_ptr + d_off, H * 2 * HALF, t, j, mask, cos, sin, eps, HALF, BLOCK_HALF, HAS_NORM)
        acc_q1, acc_q2 = acc_q1 + dw1, acc_q2 + dw2
        dw1, dw2 = _rope_bwd_rows(gk_ptr + b * sgk_b + h * sgk_h, sgk_t, k_ptr, b * sk_b + h * sk_h, sk_t, kw_ptr,
                                  dk_ptr + d_off, H * 2 * HALF, t, j, mask, cos, sin, eps, HALF, BLOCK_HALF, HAS_NORM)
        acc_k1, acc_k2 = acc_k1 + dw1, acc_k2 + dw2
    if HAS_NORM:
        jj = tl.arange(0, BLOCK_HALF)
        row_q = dw_part_ptr + pid * (2 * HALF) + jj
        row_k = row_q + tl.num_programs(0) * (2 * HALF)
        tl.store(row_q, acc_q1, mask=jj < HALF)
        tl.store(row_q + HALF, acc_q2, mask=jj < HALF)
        tl.store(row_k, acc_k1, mask=jj < HALF)
        tl.store(row_k + HALF, acc_k2, mask=jj < HALF)


# --------------------------------------------------------------------------- launchers


def _check(q, k, angles, q_norm_weight, k_norm_weight):
    if q.dim() != 4 or k.shape != q.shape or k.dtype != q.dtype:
        raise ValueError(f"rope needs q and k of one (B, T, H, Dh) shape and dtype, got {tuple(q.shape)} "
                         f"{q.dtype} and {tuple(k.shape)} {k.dtype}")
    B, T, H, Dh = q.shape
    if Dh % 2 or tuple(angles.shape) != (T, Dh // 2):
        raise ValueError(f"rope needs an even head dim and angles of shape (T, Dh/2) = ({T}, {Dh // 2}), "
                         f"got Dh={Dh} and angles {tuple(angles.shape)}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("rope applies QK-norm to both q and k: pass both q_norm_weight and k_norm_weight, or neither")
    for w in (q_norm_weight, k_norm_weight):
        if w is not None and tuple(w.shape) != (Dh,):
            raise ValueError(f"rope norm weights must have shape (Dh,) = ({Dh},), got {tuple(w.shape)}")
    return B, T, H, Dh


def _blocks(T: int, Dh: int) -> dict:
    """Tile sizes: BLOCK_HALF holds Dh/2, BLOCK_T tokens make ~1024 elements per half-tile."""
    block_half = triton.next_power_of_2(Dh // 2)
    block_t = tile_rows(block_half, T, elements=1024)
    return dict(HALF=Dh // 2, BLOCK_T=block_t, BLOCK_HALF=block_half, num_warps=row_num_warps(block_t * block_half))


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rope_fwd(q: torch.Tensor, k: torch.Tensor, angles: torch.Tensor, q_norm_weight: Optional[torch.Tensor],
             k_norm_weight: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, T, H, Dh) any strides -> rotated (and normed) q, k, each (B, H, T, Dh) contiguous."""
    B, T, H, Dh = _check(q, k, angles, q_norm_weight, k_norm_weight)
    q, k = _inner_contiguous(q), _inner_contiguous(k)
    angles = angles.to(torch.float32).contiguous()
    qo = torch.empty((B, H, T, Dh), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, H, T, Dh), dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return qo, ko
    blocks = _blocks(T, Dh)
    grid = (B * H * triton.cdiv(T, blocks["BLOCK_T"]),)
    _rope_fwd_kernel[grid](q, k, angles, q_norm_weight, k_norm_weight, qo, ko, T, H,
                           q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), eps,
                           HAS_NORM=q_norm_weight is not None, **blocks)
    return qo, ko


def rope_bwd(dq_out: torch.Tensor, dk_out: torch.Tensor, angles: torch.Tensor, q: Optional[torch.Tensor],
             k: Optional[torch.Tensor], q_norm_weight: Optional[torch.Tensor], k_norm_weight: Optional[torch.Tensor],
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq_out, dk_out (B, H, T, Dh) -> dq, dk (B, T, H, Dh) contiguous and dq_w, dk_w (Dh,) in the weights'
    dtype. q, k (the forward inputs) are needed only with the norm; without it dq_w, dk_w are empty."""
    B, H, T, Dh = dq_out.shape
    gq, gk = _inner_contiguous(dq_out), _inner_contiguous(dk_out)
    angles = angles.to(torch.float32).contiguous()
    dq = torch.empty((B, T, H, Dh), dtype=gq.dtype, device=gq.device)
    dk = torch.empty((B, T, H, Dh), dtype=gq.dtype, device=gq.device)
    has_norm = q_norm_weight is not None
    blocks = _blocks(T, Dh)
    n_tiles = B * H * triton.cdiv(T, blocks["BLOCK_T"])
    n_prog = persistent_programs(n_tiles, gq.device) if has_norm else n_tiles
    dw_part, xs = None, (0,) * 6
    if has_norm:
        q, k = _inner_contiguous(q), _inner_contiguous(k)
        xs = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
        dw_part = (torch.empty if n_tiles else torch.zeros)((2, n_prog, Dh), dtype=torch.float32, device=gq.device)
        # the norm's backward holds ~2x the live fp32 tiles: more warps, fewer registers per thread
        blocks["num_warps"] = row_loop_num_warps(blocks["BLOCK_T"] * blocks["BLOCK_HALF"])
    if n_tiles > 0:
        _rope_bwd_kernel[(n_prog,)](gq, gk, angles, q, k, q_norm_weight, k_norm_weight, dq, dk, dw_part, T, H, n_tiles,
                                    gq.stride(0), gq.stride(1), gq.stride(2), gk.stride(0), gk.stride(1), gk.stride(2),
                                    *xs, eps, HAS_NORM=has_norm, **blocks)
    if not has_norm:
        return dq, dk, gq.new_empty(0), gq.new_empty(0)
    # second stage: a fixed-order reduction over the programs' partials; two sums, so the outputs do not alias
    return dq, dk, dw_part[0].sum(0).to(q_norm_weight.dtype), dw_part[1].sum(0).to(k_norm_weight.dtype)


# --------------------------------------------------------------------------- registration

_rope_fwd_op = torch.library.custom_op("fae_fast::rope_fwd", rope_fwd, mutates_args=())
_rope_bwd_op = torch.library.custom_op("fae_fast::rope_bwd", rope_bwd, mutates_args=())


@_rope_fwd_op.register_fake
def _(q, k, angles, q_norm_weight, k_norm_weight, eps):
    B, T, H, Dh = _check(q, k, angles, q_norm_weight, k_norm_weight)
    return (q.new_empty((B, H, T, Dh)), q.new_empty((B, H, T, Dh)))


@_rope_bwd_op.register_fake
def _(dq_out, dk_out, angles, q, k, q_norm_weight, k_norm_weight, eps):
    B, H, T, Dh = dq_out.shape
    dq, dk = dq_out.new_empty((B, T, H, Dh)), dq_out.new_empty((B, T, H, Dh))
    if q_norm_weight is None:
        return dq, dk, dq_out.new_empty(0), dq_out.new_empty(0)
    return dq, dk, q_norm_weight.new_empty((Dh,)), k_norm_weight.new_empty((Dh,))


def _setup_context(ctx, inputs, output):
    q, k, angles, q_norm_weight, k_norm_weight, eps = inputs
    ctx.eps = eps
    if q_norm_weight is None:  # the rotation alone needs only the angles: keep q, k (and qkv) unsaved
        q = k = None
    ctx.save_for_backward(angles, q, k, q_norm_weight, k_norm_weight)


def _backward(ctx, dq_out, dk_out):
    angles, q, k, q_norm_weight, k_norm_weight = ctx.saved_tensors
    dq, dk, dq_w, dk_w = _rope_bwd_op(dq_out, dk_out, angles, q, k, q_norm_weight, k_norm_weight, ctx.eps)
    if q_norm_weight is None:
        dq_w = dk_w = None
    return dq, dk, None, dq_w, dk_w, None  # no gradient for the angles


torch.library.register_autograd("fae_fast::rope_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public functional


def rope(q: torch.Tensor, k: torch.Tensor, angles: torch.Tensor, q_norm_weight: Optional[torch.Tensor] = None,
         k_norm_weight: Optional[torch.Tensor] = None, *, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k ("rotate half"), after QK RMSNorm when norm weights are given.

    q, k: (B, T, H, Dh), one shape and dtype (fp32, bf16, fp16), last dim contiguous, any other strides
        (typically `qkv.view(B, T, 3, H, Dh).unbind(2)`, read in place).
    angles: (T, Dh/2) rotation angles (fp32); pair j of token t turns by angles[t, j]. No gradient.
    q_norm_weight, k_norm_weight: (Dh,) RMSNorm weights, both or neither; eps is the norm's epsilon.
    Returns (q_out, k_out), each (B, H, T, Dh) contiguous in q's dtype: the layout SDPA takes.
    The weight gradients are reduced over all (B, T, H) rows deterministically (fp32 partials, no atomics).
    """
    return _rope_fwd_op(q, k, angles, q_norm_weight, k_norm_weight, eps)
