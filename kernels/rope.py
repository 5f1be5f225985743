"""Attention inputs from the packed qkv projection: rotary position embedding on q and k (optionally after a
QK RMSNorm over the head dim), and q, k, v written in one pass as (B, H, T, Dh) tensors laid out (B, T, H,
Dh) in memory. That is the layout the attention kernels work in: the attention output comes back (B, T, H,
Dh) in memory too, so the projection reads it as (B, T, H * Dh) without a copy, and its gradient arrives in
the output's own layout (cuDNN's backward misread a gradient of another layout: fae_fast/attention.py).
The backward takes dq, dk, dv (B, H, T, Dh), any strides, and writes d(qkv) (B, T, 3, H, Dh) in one pass
too: no stack of dq, dk, dv and no separate transpose of v, either way.

Convention "rotate half": for j < Dh/2 the pair (x[j], x[j + Dh/2]) turns by angles[t, j]:
    out[j]        = x[j] * cos - x[j + Dh/2] * sin
    out[j + Dh/2] = x[j + Dh/2] * cos + x[j] * sin
The caller builds the (T, Dh/2) angle table (2-D RoPE: rows then columns, see layers.rope_angles_2d); the
functional turns it into a (2, T, Dh/2) fp32 cos | sin table (tiny, stays in L1/L2) before the op, since
libdevice's accurate sinf/cosf cost more issue slots than this memory-bound kernel can spare.

Tiling: a program owns BLOCK_R consecutive rows r = (b * T + t) * H + h of one (B, T, C, H, Dh) qkv, i.e.
a few whole tokens (all heads): its reads of qkv and writes of d(qkv) are one contiguous span, and so are
its writes of q, k, v ((B, T, H, Dh) in memory). q and k are handled as two
(BLOCK_R, Dh/2) halves (the rotation pairs them), v as whole rows.

One core op serves two functionals: `rope_qkv(qkv)` (C = 3, the model's path) and `rope(q, k)`, which
stacks q, k into a (B, T, 2, H, Dh) tensor first (C = 2, no v). `joint_rope_qkv(qkv, text_qkv)`, the
joint (MMDiT-style) attention's inputs, runs the same kernels with outputs T + L tokens long: the forward
writes the latent tokens in place and the caption's are copied after them; the backward reads the latent
tokens' gradients in place (strided).

Registration: custom_op + register_fake (see swiglu.py for why not triton_op).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import cast_rtne, cdiv, next_power_of_2, pow2_divisor, tile_rows


def _rope_ref_one(x, w, cos, sin, eps):
    """x (B, T, H, Dh) -> (B, H, T, Dh) contiguous in x's dtype; cos, sin (T, 1, Dh/2) fp32 or None (no rotation)."""
    dtype = x.dtype
    if w is not None:  # QK-norm: RMSNorm over Dh with a weight, in x's dtype
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.to(dtype)
    if cos is not None:
        x1, x2 = x.chunk(2, dim=-1)
        x = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return x.to(dtype).transpose(1, 2)  # (B, H, T, Dh), (B, T, H, Dh) in memory as the kernel writes it


def rope_ref(q: torch.Tensor, k: torch.Tensor, angles: Optional[torch.Tensor],
             q_norm_weight: Optional[torch.Tensor] = None, k_norm_weight: Optional[torch.Tensor] = None, *,
             eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of `rope` (same signature and output layout)."""
    cos = sin = None
    if angles is not None:
        cos, sin = angles.float().cos()[:, None, :], angles.float().sin()[:, None, :]  # (T, 1, Dh/2): all heads
    return _rope_ref_one(q, q_norm_weight, cos, sin, eps), _rope_ref_one(k, k_norm_weight, cos, sin, eps)


def rope_qkv_ref(qkv: torch.Tensor, angles: Optional[torch.Tensor], q_norm_weight: Optional[torch.Tensor] = None,
                 k_norm_weight: Optional[torch.Tensor] = None, *, eps: float = 1e-6):
    """PyTorch reference of `rope_qkv` (same signature and output layout)."""
    q, k, v = qkv.unbind(2)
    return (*rope_ref(q, k, angles, q_norm_weight, k_norm_weight, eps=eps), v.transpose(1, 2).contiguous())


def joint_rope_qkv_ref(qkv: torch.Tensor, text_qkv: torch.Tensor, angles: Optional[torch.Tensor],
                       q_norm_weight: Optional[torch.Tensor] = None, k_norm_weight: Optional[torch.Tensor] = None, *,
                       eps: float = 1e-6):
    """PyTorch reference of `joint_rope_qkv`: rope_qkv_ref, then a concatenation with the caption's q, k, v."""
    latent = rope_qkv_ref(qkv, angles, q_norm_weight, k_norm_weight, eps=eps)
    return tuple(torch.cat([x, t], dim=2) for x, t in zip(latent, text_qkv.permute(2, 0, 3, 1, 4)))


# --------------------------------------------------------------------------- Triton kernels
# A program owns BLOCK_R consecutive rows r = (b * T + t) * H + h (a row: one head vector of q, k or v).
# q and k rows are two (BLOCK_R, BLOCK_HALF) tiles, the halves paired by the rotation, carried as a tuple
# (x1, x2); v rows are copied whole. At Dh 72 a half fills 36 of a tile's 64 lanes; cutting it into 32 + 4
# column slabs would idle no lane but mixes two register layouts (shared-memory conversions in every row
# reduction) and compiled to about as many instructions.
# Vector width: the second halves start Dh/2 in, so at Dh 72 they are only 4-element aligned. All q and k
# offsets are built as VEC * (runtime units), VEC the power of two dividing Dh/2 (4 at Dh 72), so that the
# compiler sees one alignment on every q, k tile (first halves and the fp32 cos | sin table too) and gives
# them all one register layout: no shared-memory layout conversion between loads, arithmetic and stores.
# (A tl.multiple_of hint would do the same, but the compiler drops it when it rematerialises the offsets
# in another layout.) The v rows of qkv and d(qkv) keep 16-byte vectors.


@triton.jit
def _rope_rows(T, n_rows, H: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's rows: bt = b * T + t, b, t, h as (BLOCK_R, 1) int64, and the row mask."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]  # int32: B * T * H < 2^31
    bt = r // H
    b = bt // T
    return bt.to(tl.int64), b.to(tl.int64), (bt - b * T).to(tl.int64), (r % H).to(tl.int64), r < n_rows


@triton.jit
def _rope_load(ptr, off, second, j, mask):
    """(x1, x2) fp32: the halves at ptr + off + j and `second` elements further; off (BLOCK_R, 1)."""
    return (tl.load(ptr + off + j, mask=mask, other=0.0).to(tl.float32),
            tl.load(ptr + off + second + j, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _rope_store(ptr, off, y, j, mask, HALF: tl.constexpr):
    tl.store(ptr + off + j, cast_rtne(y[0], ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + off + HALF + j, cast_rtne(y[1], ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_rotate(x, cs, SIGN: tl.constexpr):
    """Turn each pair by +angle (SIGN 1, the forward) or by -angle (SIGN -1, the backward's transpose):
    y1 = x1 cos - SIGN x2 sin,  y2 = x2 cos + SIGN x1 sin;  cs = (cos, sin)."""
    sin = SIGN * cs[1]
    return x[0] * cs[0] - x[1] * sin, x[1] * cs[0] + x[0] * sin


@triton.jit
def _rope_row_mean(x, y, HALF: tl.constexpr):
    """Mean over each row's Dh of x * y, (BLOCK_R, 1)."""
    return (tl.sum(x[0] * y[0] + x[1] * y[1], 1) / (2 * HALF))[:, None]


@triton.jit
def _rope_mul_weight(x, w_ptr, j, HALF: tl.constexpr):
    """x * w, w (Dh,) the norm weight."""
    w1 = tl.load(w_ptr + j, mask=j < HALF, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    return x[0] * w1, x[1] * w2


@triton.jit
def _rope_fwd_one(x, w_ptr, out_ptr, o_off, j, mask, cs, eps,
                  HALF: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_NORM: tl.constexpr):
    """Rows x = (x1, x2) of q or k -> out_ptr + o_off (q_out or k_out rows)."""
    if HAS_NORM:
        rstd = tl.rsqrt(_rope_row_mean(x, x, HALF) + eps)
        x = _rope_mul_weight((x[0] * rstd, x[1] * rstd), w_ptr, j, HALF)
    if HAS_ROPE:
        x = _rope_rotate(x, cs, 1)
    _rope_store(out_ptr, o_off, x, j, mask, HALF)


@triton.jit
def _rope_fwd_kernel(qkv_ptr, cs_ptr, qw_ptr, kw_ptr, qo_ptr, ko_ptr, vo_ptr, T, T_out, n_rows, dh_vecs, eps,
                     H: tl.constexpr, HALF: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, VEC: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_NORM: tl.constexpr):
    """qkv (B, T, C, H, Dh) contiguous -> tokens 0..T-1 of q_out, k_out (and v_out when C = 3), each
    (B, H, T_out, Dh) laid out (B, T_out, H, Dh) with T_out >= T (the joint attention's tensors hold the
    caption after).
    dh_vecs = Dh / VEC, a runtime value so that the compiler learns no more alignment than VEC from it."""
    DH: tl.constexpr = 2 * HALF
    bt, b, t, h, row_ok = _rope_rows(T, n_rows, H, BLOCK_R)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = row_ok & (j < HALF)
    x_off = VEC * ((bt * (C * H) + h) * dh_vecs)  # q of each row; k and v follow H * Dh apart
    q = _rope_load(qkv_ptr, x_off, HALF, j, mask)  # every load before the first store (they may alias)
    k = _rope_load(qkv_ptr, x_off + VEC * (H * dh_vecs), HALF, j, mask)
    if C == 3:
        d = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        v = tl.load(qkv_ptr + ((bt * C + 2) * H + h) * DH + d, mask=row_ok & (d < DH))
    cs = (None, None)
    if HAS_ROPE:  # the (2, T, Dh/2) fp32 table: cos, then sin
        cs = _rope_load(cs_ptr, t * HALF, T * HALF, j, mask)
    o_row = (b * T_out + t) * H + h  # outputs laid out (B, T_out, H, Dh)
    _rope_fwd_one(q, qw_ptr, qo_ptr, VEC * (o_row * dh_vecs), j, mask, cs, eps, HALF, HAS_ROPE, HAS_NORM)
    _rope_fwd_one(k, kw_ptr, ko_ptr, VEC * (o_row * dh_vecs), j, mask, cs, eps, HALF, HAS_ROPE, HAS_NORM)
    if C == 3:
        tl.store(vo_ptr + o_row * DH + d, v, mask=row_ok & (d < DH))


@triton.jit
def _rope_bwd_one(g_ptr, g_off, x_ptr, w_ptr, dx_ptr, x_off, dw_ptr, j, mask, cs, eps,
                  HALF: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_NORM: tl.constexpr):
    """Gradient of q or k for this program's rows: upstream g at g_ptr + g_off, the forward input x (read only
    with the norm) at x_ptr + x_off, the result at dx_ptr + x_off; with the norm also the program's
    weight-gradient partial row dw_ptr (Dh,) fp32. (q and k go one after the other: holding both in
    registers at once costs more occupancy than the overlap gains.)

    Rotation back (the transpose of the forward rotation, i.e. by -angle), then RMSNorm back, with
    xh = x * rstd and y = xh * w (means over the Dh of one head):
        dw = sum over rows of dy * xh,  dx = rstd * (dy * w - xh * mean(dy * w * xh))
    """
    g = _rope_load(g_ptr, g_off, HALF, j, mask)
    if HAS_ROPE:
        g = _rope_rotate(g, cs, -1)
    if HAS_NORM:
        x = _rope_load(x_ptr, x_off, HALF, j, mask)
        rstd = tl.rsqrt(_rope_row_mean(x, x, HALF) + eps)
        xh = (x[0] * rstd, x[1] * rstd)  # masked rows: x = 0 -> xh = 0, no contribution
        jj = tl.arange(0, j.shape[1])
        tl.store(dw_ptr + jj, tl.sum(g[0] * xh[0], 0), mask=jj < HALF)
        tl.store(dw_ptr + HALF + jj, tl.sum(g[1] * xh[1], 0), mask=jj < HALF)
        g = _rope_mul_weight(g, w_ptr, j, HALF)
        c = _rope_row_mean(g, xh, HALF)
        g = (rstd * (g[0] - xh[0] * c), rstd * (g[1] - xh[1] * c))
    _rope_store(dx_ptr, x_off, g, j, mask, HALF)


@triton.jit
def _rope_bwd_kernel(gq_ptr, gk_ptr, gv_ptr, cs_ptr, qkv_ptr, qw_ptr, kw_ptr, dqkv_ptr, dw_part_ptr, T, n_rows, dh_vecs,
                     eps, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                     H: tl.constexpr, HALF: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, VEC: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_NORM: tl.constexpr):
    """dq_out, dk_out (and dv_out when C = 3) (B, H, T, Dh), strides given in units of VEC elements ->
    d(qkv) (B, T, C, H, Dh); with the norm, one fp32 partial row per program, dw_part[pid, {q, k}, :]
    (summed afterwards in a fixed order: deterministic)."""
    DH: tl.constexpr = 2 * HALF
    bt, b, t, h, row_ok = _rope_rows(T, n_rows, H, BLOCK_R)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = row_ok & (j < HALF)
    x_off = VEC * ((bt * (C * H) + h) * dh_vecs)  # q of each row in qkv and d(qkv); k and v follow H * Dh apart
    if C == 3:  # dv: whole rows, a plain transpose
        d = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        gv = tl.load(gv_ptr + VEC * (b * sv_b + h * sv_h + t * sv_t) + d, mask=row_ok & (d < DH))
        tl.store(dqkv_ptr + ((bt * C + 2) * H + h) * DH + d, gv, mask=row_ok & (d < DH))
    cs = (None, None)
    if HAS_ROPE:
        cs = _rope_load(cs_ptr, t * HALF, T * HALF, j, mask)
    dw_row = dw_part_ptr + tl.program_id(0).to(tl.int64) * (2 * DH)
    gq_off = VEC * (b * sq_b + h * sq_h + t * sq_t)
    gk_off = VEC * (b * sk_b + h * sk_h + t * sk_t)
    _rope_bwd_one(gq_ptr, gq_off, qkv_ptr, qw_ptr, dqkv_ptr, x_off, dw_row, j, mask, cs, eps, HALF, HAS_ROPE, HAS_NORM)
    _rope_bwd_one(gk_ptr, gk_off, qkv_ptr, kw_ptr, dqkv_ptr, x_off + VEC * (H * dh_vecs), dw_row + DH, j, mask, cs,
                  eps, HALF, HAS_ROPE, HAS_NORM)


# --------------------------------------------------------------------------- launchers


def _check(qkv, cos_sin, q_norm_weight, k_norm_weight):
    if qkv.dim() != 5 or qkv.shape[2] not in (2, 3) or qkv.shape[-1] % 2:
        raise ValueError(f"rope_qkv needs qkv of shape (B, T, 3, H, Dh) with an even Dh, got {tuple(qkv.shape)}")
    B, T, C, H, Dh = qkv.shape
    if cos_sin is not None and tuple(cos_sin.shape) != (2, T, Dh // 2):
        raise ValueError(f"rope needs angles of shape (T, Dh/2) = ({T}, {Dh // 2}), got {tuple(cos_sin.shape[1:])}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("rope applies QK-norm to both q and k: pass both q_norm_weight and k_norm_weight, or neither")
    for w in (q_norm_weight, k_norm_weight):
        if w is not None and tuple(w.shape) != (Dh,):
            raise ValueError(f"rope norm weights must have shape (Dh,) = ({Dh},), got {tuple(w.shape)}")
    return B, T, C, H, Dh


def _table(cos_sin: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if cos_sin is None else cos_sin.to(torch.float32).contiguous()


def _blocks(n_rows: int, H: int, Dh: int, C: int, has_rope: bool, has_norm: bool) -> dict:
    """BLOCK_HALF holds Dh/2; BLOCK_R rows make 2048 elements per half tile (Dh 72: 32 rows, Dh 64: 64)."""
    block_half = next_power_of_2(Dh // 2)
    block_r = tile_rows(block_half, n_rows, elements=2048)
    return dict(H=H, HALF=Dh // 2, C=C, BLOCK_R=block_r, BLOCK_HALF=block_half, VEC=pow2_divisor(Dh // 2, cap=8),
                HAS_ROPE=has_rope, HAS_NORM=has_norm, num_warps=4)


def rope_fwd(qkv: torch.Tensor, cos_sin: Optional[torch.Tensor], q_norm_weight: Optional[torch.Tensor],
             k_norm_weight: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, T, C, H, Dh), C = 2 or 3 -> q_out, k_out, v_out, each (B, H, T, Dh) laid out (B, T, H, Dh)
    (v_out empty if C = 2).
    cos_sin: (2, T, Dh/2) fp32 cos | sin table, or None (no rotation)."""
    return _rope_fwd_into(qkv, cos_sin, q_norm_weight, k_norm_weight, eps, qkv.shape[1])


def _rope_fwd_into(qkv, cos_sin, q_norm_weight, k_norm_weight, eps,
                   tokens_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q_out, k_out, v_out (B, H, tokens_out, Dh) laid out (B, tokens_out, H, Dh) (v_out empty if C = 2),
    their first T tokens written by the kernel."""
    B, T, C, H, Dh = _check(qkv, cos_sin, q_norm_weight, k_norm_weight)
    qkv, cos_sin = qkv.contiguous(), _table(cos_sin)
    outs = [_attention_layout(qkv, B, H, tokens_out, Dh) for _ in range(C)]
    q_out, k_out, v_out = (*outs, qkv.new_empty(0)) if C == 2 else outs
    n_rows = B * T * H
    if n_rows:
        blocks = _blocks(n_rows, H, Dh, C, cos_sin is not None, q_norm_weight is not None)
        _rope_fwd_kernel[(cdiv(n_rows, blocks["BLOCK_R"]),)](
            qkv, cos_sin, q_norm_weight, k_norm_weight, q_out, k_out, v_out, T, tokens_out, n_rows,
            Dh // blocks["VEC"], eps, **blocks)
    return q_out, k_out, v_out


def _attention_layout(like: torch.Tensor, B: int, H: int, T: int, Dh: int) -> torch.Tensor:
    """An empty (B, H, T, Dh) tensor laid out (B, T, H, Dh) in memory, like's dtype and device."""
    return like.new_empty((B, T, H, Dh)).transpose(1, 2)


def _check_text(qkv: torch.Tensor, text_qkv: torch.Tensor) -> int:
    B, _, C, H, Dh = qkv.shape
    if C != 3 or text_qkv.dim() != 5 or (text_qkv.shape[0], *text_qkv.shape[2:]) != (B, 3, H, Dh) \
            or text_qkv.dtype != qkv.dtype:
        raise ValueError(f"joint_rope_qkv needs the latent qkv (B, T, 3, H, Dh) and the caption's (B, L, 3, H, Dh) "
                         f"of one dtype, got {tuple(qkv.shape)} {qkv.dtype} and {tuple(text_qkv.shape)} "
                         f"{text_qkv.dtype}")
    return text_qkv.shape[1]


def joint_rope_fwd(qkv: torch.Tensor, text_qkv: torch.Tensor, cos_sin: Optional[torch.Tensor],
                   q_norm_weight: Optional[torch.Tensor], k_norm_weight: Optional[torch.Tensor],
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, T + L, Dh) laid out (B, T + L, H, Dh): the latent tokens as rope_fwd writes them (in place, no
    concatenation pass over them), then the caption's L tokens copied unchanged."""
    T, L = qkv.shape[1], _check_text(qkv, text_qkv)
    outs = _rope_fwd_into(qkv, cos_sin, q_norm_weight, k_norm_weight, eps, T + L)
    for i, out in enumerate(outs):
        out[:, :, T:].copy_(text_qkv[:, :, i].transpose(1, 2))
    return outs


def rope_bwd(dq_out: torch.Tensor, dk_out: torch.Tensor, dv_out: Optional[torch.Tensor],
             cos_sin: Optional[torch.Tensor], qkv: Optional[torch.Tensor], q_norm_weight: Optional[torch.Tensor],
             k_norm_weight: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq_out, dk_out, dv_out (B, H, T, Dh), any strides (dv_out None when C = 2) -> d(qkv) (B, T, C, H, Dh)
    contiguous, dq_w, dk_w (Dh,) in the weights' dtype (empty without the norm). qkv (the forward input) is
    needed only with the norm."""
    B, H, T, Dh = dq_out.shape
    C = 2 if dv_out is None else 3
    has_norm, cos_sin = q_norm_weight is not None, _table(cos_sin)
    blocks = _blocks(B * T * H, H, Dh, C, cos_sin is not None, has_norm)
    grads = [g if g.stride(-1) == 1 and pow2_divisor(*g.stride()[:3]) >= blocks["VEC"] else g.contiguous()
             for g in (dq_out, dk_out, dv_out if C == 3 else dq_out)]  # strides the kernel may call multiples of VEC
    dqkv = torch.empty((B, T, C, H, Dh), dtype=dq_out.dtype, device=dq_out.device)
    n_prog = cdiv(B * T * H, blocks["BLOCK_R"])
    if has_norm:  # fp32 partials (n_prog, {q, k}, Dh): 1.6% of the bytes the kernel moves at Dh 72
        qkv, dw_part = qkv.contiguous(), torch.empty((n_prog, 2, Dh), dtype=torch.float32, device=dq_out.device)
    else:  # the kernel then reads no x and writes no partials: any pointer will do
        qkv = dw_part = dqkv
    if n_prog:
        vec = blocks["VEC"]
        _rope_bwd_kernel[(n_prog,)](*grads, cos_sin, qkv, q_norm_weight, k_norm_weight, dqkv, dw_part, T, B * T * H,
                                    Dh // vec, eps, *[s // vec for g in grads for s in g.stride()[:3]], **blocks)
    if not has_norm:
        return dqkv, dq_out.new_empty(0), dq_out.new_empty(0)
    # second stage: a fixed-order sum over the programs' partials; two sums, so the outputs do not alias
    return dqkv, dw_part[:, 0].sum(0).to(q_norm_weight.dtype), dw_part[:, 1].sum(0).to(k_norm_weight.dtype)


# --------------------------------------------------------------------------- registration

_rope_fwd_op = torch.library.custom_op("fae_fast::rope_qkv_fwd", rope_fwd, mutates_args=())
_rope_bwd_op = torch.library.custom_op("fae_fast::rope_qkv_bwd", rope_bwd, mutates_args=())


@_rope_fwd_op.register_fake
def _(qkv, cos_sin, q_norm_weight, k_norm_weight, eps):
    B, T, C, H, Dh = _check(qkv, cos_sin, q_norm_weight, k_norm_weight)
    outs = [_attention_layout(qkv, B, H, T, Dh) for _ in range(C)]
    return (*outs, qkv.new_empty(0)) if C == 2 else tuple(outs)


@_rope_bwd_op.register_fake
def _(dq_out, dk_out, dv_out, cos_sin, qkv, q_norm_weight, k_norm_weight, eps):
    B, H, T, Dh = dq_out.shape
    dqkv = dq_out.new_empty((B, T, 2 if dv_out is None else 3, H, Dh))
    if q_norm_weight is None:
        return dqkv, dq_out.new_empty(0), dq_out.new_empty(0)
    return dqkv, q_norm_weight.new_empty((Dh,)), k_norm_weight.new_empty((Dh,))


def _setup_context(ctx, inputs, output):
    qkv, cos_sin, q_norm_weight, k_norm_weight, eps = inputs
    ctx.eps, ctx.packs = eps, qkv.shape[2]
    if q_norm_weight is None:  # the rotation alone needs only the table: keep qkv unsaved
        qkv = None
    ctx.save_for_backward(cos_sin, qkv, q_norm_weight, k_norm_weight)


def _backward(ctx, dq_out, dk_out, dv_out):
    cos_sin, qkv, q_norm_weight, k_norm_weight = ctx.saved_tensors
    dv_out = dv_out if ctx.packs == 3 else None
    dqkv, dq_w, dk_w = _rope_bwd_op(dq_out, dk_out, dv_out, cos_sin, qkv, q_norm_weight, k_norm_weight, ctx.eps)
    if q_norm_weight is None:
        dq_w = dk_w = None
    return dqkv, None, dq_w, dk_w, None  # no gradient for the angles


torch.library.register_autograd("fae_fast::rope_qkv_fwd", _backward, setup_context=_setup_context)


_joint_rope_fwd_op = torch.library.custom_op("fae_fast::joint_rope_qkv_fwd", joint_rope_fwd, mutates_args=())


@_joint_rope_fwd_op.register_fake
def _(qkv, text_qkv, cos_sin, q_norm_weight, k_norm_weight, eps):
    B, T, _, H, Dh = _check(qkv, cos_sin, q_norm_weight, k_norm_weight)
    L = _check_text(qkv, text_qkv)
    return tuple(_attention_layout(qkv, B, H, T + L, Dh) for _ in range(3))


def _joint_setup_context(ctx, inputs, output):
    qkv, text_qkv, cos_sin, q_norm_weight, k_norm_weight, eps = inputs
    ctx.eps, ctx.tokens = eps, qkv.shape[1]
    ctx.save_for_backward(cos_sin, None if q_norm_weight is None else qkv, q_norm_weight, k_norm_weight)


def _joint_backward(ctx, dq_out, dk_out, dv_out):
    """The latent tokens' gradient through rope_bwd, read in place from the joint gradients (strided), and
    the caption's gathered back into its (B, L, 3, H, Dh) layout."""
    cos_sin, qkv, q_norm_weight, k_norm_weight = ctx.saved_tensors
    T = ctx.tokens
    dqkv, dq_w, dk_w = _rope_bwd_op(dq_out[:, :, :T], dk_out[:, :, :T], dv_out[:, :, :T], cos_sin, qkv,
                                    q_norm_weight, k_norm_weight, ctx.eps)
    dtext = torch.stack([g[:, :, T:].transpose(1, 2) for g in (dq_out, dk_out, dv_out)], dim=2)
    if q_norm_weight is None:
        dq_w = dk_w = None
    return dqkv, dtext, None, dq_w, dk_w, None


torch.library.register_autograd("fae_fast::joint_rope_qkv_fwd", _joint_backward, setup_context=_joint_setup_context)


# --------------------------------------------------------------------------- public functionals


def _cos_sin(angles: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(T, Dh/2) angles -> (2, T, Dh/2) fp32 cos | sin table (no gradient to the angles)."""
    if angles is None:
        return None
    if angles.dim() != 2:
        raise ValueError(f"rope needs angles of shape (T, Dh/2), got {tuple(angles.shape)}")
    angles = angles.detach().float()
    return torch.stack((angles.cos(), angles.sin()))


def rope_qkv(qkv: torch.Tensor, angles: Optional[torch.Tensor], q_norm_weight: Optional[torch.Tensor] = None,
             k_norm_weight: Optional[torch.Tensor] = None, *, eps: float = 1e-6):
    """q, k, v for SDPA from the packed qkv projection: rotary embedding ("rotate half") of q and k, after a QK
    RMSNorm over Dh when norm weights are given; v transposed alike.

    qkv: (B, T, 3, H, Dh) (fp32, bf16, fp16), typically `qkv_linear(x).view(B, T, 3, H, Dh)`; copied if not contiguous.
    angles: (T, Dh/2) rotation angles (fp32); pair j of token t turns by angles[t, j]. None: no rotation
        (QK-norm alone). No gradient.
    q_norm_weight, k_norm_weight: (Dh,) RMSNorm weights, both or neither; eps is the norm's epsilon.
    Returns (q, k, v), each (B, H, T, Dh) in qkv's dtype, laid out (B, T, H, Dh) in memory (the attention
    kernels' own layout: module docstring). The backward writes d(qkv) in one pass;
    the weight gradients are reduced over all (B, T, H) rows deterministically (fp32 partials, no atomics).
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"rope_qkv needs qkv of shape (B, T, 3, H, Dh), got {tuple(qkv.shape)}")
    return _rope_fwd_op(qkv, _cos_sin(angles), q_norm_weight, k_norm_weight, eps)


def rope(q: torch.Tensor, k: torch.Tensor, angles: Optional[torch.Tensor], q_norm_weight: Optional[torch.Tensor] = None,
         k_norm_weight: Optional[torch.Tensor] = None, *, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_qkv` for separate q, k (B, T, H, Dh) of one shape and dtype, any strides: stacked into one
    (B, T, 2, H, Dh) tensor first (a copy; the model calls rope_qkv on its packed projection instead).
    Returns (q_out, k_out), each (B, H, T, Dh) laid out (B, T, H, Dh)."""
    if q.dim() != 4 or k.shape != q.shape or k.dtype != q.dtype:
        raise ValueError(f"rope needs q and k of one (B, T, H, Dh) shape and dtype, got {tuple(q.shape)} "
                         f"{q.dtype} and {tuple(k.shape)} {k.dtype}")
    q_out, k_out, _ = _rope_fwd_op(torch.stack((q, k), dim=2), _cos_sin(angles), q_norm_weight, k_norm_weight, eps)
    return q_out, k_out


def joint_rope_qkv(qkv: torch.Tensor, text_qkv: torch.Tensor, angles: Optional[torch.Tensor],
                   q_norm_weight: Optional[torch.Tensor] = None, k_norm_weight: Optional[torch.Tensor] = None, *,
                   eps: float = 1e-6):
    """The joint (MMDiT-style) attention's q, k, v: `rope_qkv` of the latent tokens' packed projection qkv
    (B, T, 3, H, Dh), followed along the token axis by the caption's text_qkv (B, L, 3, H, Dh) unchanged.
    Returns (q, k, v), each (B, H, T + L, Dh) laid out (B, T + L, H, Dh): the same as concatenating
    rope_qkv's outputs with the caption's, without the pass that concatenation makes over the latent tokens."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"joint_rope_qkv needs qkv of shape (B, T, 3, H, Dh), got {tuple(qkv.shape)}")
    return _joint_rope_fwd_op(qkv, text_qkv, _cos_sin(angles), q_norm_weight, k_norm_weight, eps)
