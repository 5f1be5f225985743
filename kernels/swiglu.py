"""SwiGLU gate on the packed output of the MLP's first Linear: out = silu(a) * b with a, b the two halves of
h (..., 2H), forward and backward in one pass each. The backward writes dh (..., 2H) itself, so autograd has
no da, db to concatenate.

`swiglu(a, b)` for separate halves is a thin wrapper: it packs them with torch.cat (a copy) and calls the
same op; the model calls `swiglu_packed` on its fc1 output instead.

The FP8 MLP (fc1 -> swiglu -> fc2 in float8 e4m3 with rowwise scales, fp8.py) takes the gate's FP8 variants,
whose programs hold whole rows so that they quantise what they compute with the row's scale (that of
`quantize_rows`, from the fp32 values: one rounding, no bf16 in between): `swiglu_packed_fp8` gives fc2's
quantised input (and the activation in h's dtype on request), `swiglu_packed_bwd_fp8` fc1's quantised output
gradient and its column sums (fc1's bias gradient). No separate quantising pass reads either tensor again.

Registration (the same in every kernel file): `torch.library.custom_op` + `register_fake`, not
`triton_op` + `wrap_triton`. On CPU under TRITON_INTERPRET=1 the custom op runs eagerly and under
`torch.compile(fullgraph=True)`, while a triton_op fails under compile there (fake tensors reach
the interpreter). Custom ops must not return views of their inputs: every output is a new tensor.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .fp8 import quantize_rows_ref, row_scales, to_e4m3
from .utils import (RowLoop, cast_rtne, cdiv, fit_shared_memory, persistent_row_runs, row_block, row_num_warps, rows_2d,
                    tile_bytes, tile_rows)


def swiglu_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PyTorch reference, computed in the inputs' dtype: silu(a) * b."""
    return F.silu(a) * b


def swiglu_packed_ref(h: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of `swiglu_packed`: silu(h[..., :H]) * h[..., H:]."""
    a, b = h.chunk(2, dim=-1)
    return swiglu_ref(a, b)


def swiglu_packed_fp8_ref(h: torch.Tensor, keep_bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference of `swiglu_packed_fp8`: the activation in fp32, quantised by `quantize_rows_ref`."""
    a, b = h.float().chunk(2, dim=-1)
    act = F.silu(a) * b
    return (*quantize_rows_ref(act), act.to(h.dtype) if keep_bf16 else h.new_empty((0,)))


def swiglu_packed_grad_ref(dout: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of `swiglu_packed_grad`, computed in fp32 and cast to h's dtype."""
    return _packed_grad_fp32(dout, h).to(h.dtype)


def _packed_grad_fp32(dout: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dh = da | db in fp32 for dout (..., H), h (..., 2H)."""
    a, b = h.float().chunk(2, dim=-1)
    dout, sig = dout.float(), torch.sigmoid(a)
    return torch.cat((dout * b * sig * (1 + a * (1 - sig)), dout * a * sig), dim=-1)


def swiglu_packed_bwd_fp8_ref(dout: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference of `swiglu_packed_bwd_fp8`: dh = da | db in fp32, quantised by `quantize_rows_ref`,
    and its column sums."""
    dh = _packed_grad_fp32(dout, h)
    return (*quantize_rows_ref(dh), dh.sum(0))


# --------------------------------------------------------------------------- Triton kernels
# h viewed as (n_rows, 2H) contiguous. Each program owns a (BLOCK_M rows, BLOCK_N columns) tile of the
# (n_rows, H) problem: the same columns of both halves. Tiles are numbered with the column block fastest,
# so that programs running side by side cover whole rows of h and dh (one contiguous span of memory).


@triton.jit
def _swiglu_tile(n_rows, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices (BLOCK_M, 1) as int64 (row * 2H may pass 2^31), columns (1, BLOCK_N), mask."""
    n_col_blocks = tl.cdiv(H, BLOCK_N)
    rows = (tl.program_id(0) // n_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = (tl.program_id(0) % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    return rows.to(tl.int64), cols, (rows < n_rows) & (cols < H)


@triton.jit
def _load_halves(h_ptr, rows, cols, mask, H):
    """a, b (R, C) fp32 of h at rows (R, 1) int64, columns (1, C) of the first half (zeros where masked)."""
    a_ptrs = h_ptr + rows * (2 * H) + cols
    a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
    return a, tl.load(a_ptrs + H, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _swiglu_fwd_kernel(h_ptr, out_ptr, n_rows, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = _swiglu_tile(n_rows, H, BLOCK_M, BLOCK_N)
    a, b = _load_halves(h_ptr, rows, cols, mask, H)
    tl.store(out_ptr + rows * H + cols, cast_rtne(a * tl.sigmoid(a) * b, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_grads(dout_ptr, h_ptr, rows, cols, mask, H):
    """da, db (R, C) fp32 at rows (R, 1) int64, columns (1, C) of the first half.
    silu'(a) = sig(a) * (1 + a * (1 - sig(a)));  da = dout * b * silu'(a),  db = dout * silu(a)"""
    dout = tl.load(dout_ptr + rows * H + cols, mask=mask, other=0.0).to(tl.float32)
    a, b = _load_halves(h_ptr, rows, cols, mask, H)
    sig = tl.sigmoid(a)
    return dout * b * sig * (1.0 + a * (1.0 - sig)), dout * a * sig


@triton.jit
def _swiglu_bwd_kernel(dout_ptr, h_ptr, dh_ptr, n_rows, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = _swiglu_tile(n_rows, H, BLOCK_M, BLOCK_N)
    da, db = _swiglu_grads(dout_ptr, h_ptr, rows, cols, mask, H)
    a_off = rows * (2 * H) + cols  # in dh
    tl.store(dh_ptr + a_off, cast_rtne(da, dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + a_off + H, cast_rtne(db, dh_ptr.dtype.element_ty), mask=mask)


# FP8 variants: program tiles of (ROWS, BLOCK) over whole rows (BLOCK = row_block(H), both halves), so that a
# row's amax, and so its scale, is known where its values are quantised. Masked lanes read zeros, which
# give zero activations and gradients: no effect on amax or sums.


@triton.jit
def _row_tile(rows, n_rows, H, BLOCK: tl.constexpr):
    """Rows (ROWS, 1) as int64, columns (1, BLOCK) of the first half, mask of the (rows, H) problem."""
    cols = tl.arange(0, BLOCK)[None, :]
    return rows.to(tl.int64)[:, None], cols, (rows < n_rows)[:, None] & (cols < H)


@triton.jit
def _swiglu_fp8_fwd_kernel(h_ptr, q_ptr, s_ptr, act_ptr, n_rows, H, KEEP_ACT: tl.constexpr, ROWS: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Program i: rows [i * ROWS, ...) of act = silu(a) * b (n_rows, H) -> q, s (and act in h's dtype)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rows64, cols, mask = _row_tile(rows, n_rows, H, BLOCK)
    a, b = _load_halves(h_ptr, rows64, cols, mask, H)
    act = a * tl.sigmoid(a) * b
    scale, inverse = row_scales(tl.max(tl.abs(act), axis=1))
    tl.store(q_ptr + rows64 * H + cols, to_e4m3(act, inverse, q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows, scale, mask=rows < n_rows)
    if KEEP_ACT:
        tl.store(act_ptr + rows64 * H + cols, cast_rtne(act, act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_fp8_bwd_tile(dout_ptr, h_ptr, q_ptr, s_ptr, rows, n_rows, H, BLOCK: tl.constexpr):
    """dh = da | db of the whole rows `rows` (those below n_rows) -> q, s with the scale of the 2H-wide row;
    returns da, db (ROWS, BLOCK) fp32."""
    rows64, cols, mask = _row_tile(rows, n_rows, H, BLOCK)
    da, db = _swiglu_grads(dout_ptr, h_ptr, rows64, cols, mask, H)
    a_off = rows64 * (2 * H) + cols  # in dh
    scale, inverse = row_scales(tl.max(tl.maximum(tl.abs(da), tl.abs(db)), axis=1))  # one reduction
    tl.store(q_ptr + a_off, to_e4m3(da, inverse, q_ptr.dtype.element_ty), mask=mask)
    tl.store(q_ptr + a_off + H, to_e4m3(db, inverse, q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows, scale, mask=rows < n_rows)
    return da, db


@triton.jit
def _swiglu_fp8_bwd_kernel(dout_ptr, h_ptr, q_ptr, s_ptr, part_ptr, n_rows, H, rows_per_program,
                           ROWS: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Program i: rows [i * rows_per_program, ...), ROWS at a time, the next STAGES - 1 tiles' loads in flight
    while one is worked on; the column sums of its dh (fp32) to part[i, :] (2H)."""
    first = tl.program_id(0) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    da_sums = tl.zeros((BLOCK,), dtype=tl.float32)
    db_sums = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in tl.range(first, last, ROWS, num_stages=STAGES):
        da, db = _swiglu_fp8_bwd_tile(dout_ptr, h_ptr, q_ptr, s_ptr, start + tl.arange(0, ROWS), last, H, BLOCK)
        da_sums += tl.sum(da, axis=0)
        db_sums += tl.sum(db, axis=0)
    cols = tl.arange(0, BLOCK)
    part = part_ptr + tl.program_id(0).to(tl.int64) * (2 * H) + cols
    tl.store(part, da_sums, mask=cols < H)
    tl.store(part + H, db_sums, mask=cols < H)


# --------------------------------------------------------------------------- launchers


def _launch(kernel, n_rows: int, H: int, *args):
    """Tiles of (BLOCK_M, BLOCK_N), ~4096 elements each; columns split in blocks of <= 1024 (H = 3072 and
    4096 split evenly, so no lane is masked off at the real sizes)."""
    if n_rows == 0 or H == 0:
        return
    block_n = min(row_block(H), 1024)
    block_m = tile_rows(block_n, n_rows)
    grid = (cdiv(n_rows, block_m) * cdiv(H, block_n),)
    kernel[grid](*args, n_rows, H, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=row_num_warps(block_m * block_n))


def _check(h: torch.Tensor):
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(f"swiglu_packed needs h (..., 2H) with an even last dim, got {tuple(h.shape)}")


def _check_rows(h: torch.Tensor, op: str):
    if h.dim() != 2 or h.shape[-1] % 2:
        raise ValueError(f"{op} needs h (N, 2H), 2-D with an even last dim (flatten the leading dims), "
                         f"got shape {tuple(h.shape)}")


def swiglu_fwd(h: torch.Tensor) -> torch.Tensor:
    """h (..., 2H) -> silu(h[..., :H]) * h[..., H:], (..., H) contiguous."""
    _check(h)
    h2 = rows_2d(h).contiguous()  # (N, 2H); a copy only if h is not laid out as rows
    out = torch.empty((*h.shape[:-1], h.shape[-1] // 2), dtype=h.dtype, device=h.device)
    _launch(_swiglu_fwd_kernel, h2.shape[0], h2.shape[1] // 2, h2, out)
    return out


def swiglu_bwd(dout: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dout (..., H), h (..., 2H) -> dh (..., 2H) contiguous in h's dtype: da | db."""
    d2, h2 = rows_2d(dout).contiguous(), rows_2d(h).contiguous()
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    _launch(_swiglu_bwd_kernel, h2.shape[0], h2.shape[1] // 2, d2, h2, dh)
    return dh


def _fp8_tile(N: int, H: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps): BLOCK holds a half row; ROWS whole rows of h, about 4096 values, per tile."""
    block = row_block(H)
    rows = tile_rows(2 * block, N)
    return rows, block, row_num_warps(2 * rows * block)


def _fp8_bwd_launch(N: int, H: int, dout: torch.Tensor, h: torch.Tensor) -> RowLoop:
    """The backward's persistent row loop: two programs an SM (its fp32 column sums of both halves hold some
    130 registers a thread at 8 warps, so no more fit), each walking its run of rows three tiles deep (the
    loads of dout and both halves of h for the next two tiles in flight), fitted to the shared memory."""
    rows, block, warps = _fp8_tile(N, H)
    rows_per_program, _ = persistent_row_runs(N, rows, h.device, per_sm=2)
    launch = RowLoop(rows=rows, num_warps=warps, rows_per_program=rows_per_program, num_stages=3)
    return fit_shared_memory(launch, block, tile_bytes(dout, h, h), h.device)  # dout and h's two halves


def _fp8_fwd_outputs(h: torch.Tensor, keep_bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty q (N, H) float8_e4m3fn, s (N, 1) fp32, act (N, H) in h's dtype or (0,), for h (N, 2H)."""
    _check_rows(h, "swiglu_packed_fp8")
    N, H = h.shape[0], h.shape[1] // 2
    return (h.new_empty((N, H), dtype=torch.float8_e4m3fn), h.new_empty((N, 1), dtype=torch.float32),
            h.new_empty((N, H) if keep_bf16 else (0,)))


def swiglu_fp8_fwd(h: torch.Tensor, keep_bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, s, act = _fp8_fwd_outputs(h, keep_bf16)
    N, H = q.shape
    if N:  # H == 0 too: the rows get the all-zero scale
        rows, block, warps = _fp8_tile(N, H)
        _swiglu_fp8_fwd_kernel[(cdiv(N, rows),)](h.contiguous(), q, s, act, N, H, KEEP_ACT=keep_bf16, ROWS=rows,
                                                 BLOCK=block, num_warps=warps)
    return q, s, act


def _fp8_bwd_outputs(dout: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty dh_q (N, 2H) float8_e4m3fn, dh_s (N, 1) fp32, dh_sums (2H,) fp32, for dout (N, H), h (N, 2H)."""
    _check_rows(h, "swiglu_packed_bwd_fp8")
    N, H2 = h.shape
    if dout.shape != (N, H2 // 2):
        raise ValueError(f"swiglu_packed_bwd_fp8 needs dout (N, H) for h (N, 2H) = {tuple(h.shape)}, "
                         f"got dout {tuple(dout.shape)}")
    return (h.new_empty((N, H2), dtype=torch.float8_e4m3fn), h.new_empty((N, 1), dtype=torch.float32),
            h.new_empty((H2,), dtype=torch.float32))


def swiglu_fp8_bwd(dout: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, s, sums = _fp8_bwd_outputs(dout, h)
    N, H = h.shape[0], h.shape[1] // 2
    if N == 0:
        return q, s, sums.zero_()
    launch = _fp8_bwd_launch(N, H, dout, h)
    programs = cdiv(N, launch.rows_per_program)
    part = torch.empty((programs, 2 * H), dtype=torch.float32, device=h.device)  # summed in a fixed order
    _swiglu_fp8_bwd_kernel[(programs,)](dout.contiguous(), h.contiguous(), q, s, part, N, H, launch.rows_per_program,
                                        ROWS=launch.rows, BLOCK=row_block(H), STAGES=launch.num_stages,
                                        num_warps=launch.num_warps)
    return q, s, part.sum(0)


# --------------------------------------------------------------------------- registration

_swiglu_fwd_op = torch.library.custom_op("fae_fast::swiglu_packed_fwd", swiglu_fwd, mutates_args=())
_swiglu_bwd_op = torch.library.custom_op("fae_fast::swiglu_packed_bwd", swiglu_bwd, mutates_args=())


@_swiglu_fwd_op.register_fake
def _(h):
    _check(h)
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@_swiglu_bwd_op.register_fake
def _(dout, h):
    return torch.empty(h.shape, dtype=h.dtype, device=h.device)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])  # h, the fc1 output (fc1's own backward needs only its input)


def _backward(ctx, dout):
    (h,) = ctx.saved_tensors
    return _swiglu_bwd_op(dout, h)


torch.library.register_autograd("fae_fast::swiglu_packed_fwd", _backward, setup_context=_setup_context)

# not differentiable: the FP8 MLP's autograd Function calls both explicitly
_swiglu_fp8_fwd_op = torch.library.custom_op("fae_fast::swiglu_packed_fp8", swiglu_fp8_fwd, mutates_args=())
_swiglu_fp8_bwd_op = torch.library.custom_op("fae_fast::swiglu_packed_bwd_fp8", swiglu_fp8_bwd, mutates_args=())
_swiglu_fp8_fwd_op.register_fake(_fp8_fwd_outputs)
_swiglu_fp8_bwd_op.register_fake(_fp8_bwd_outputs)


# --------------------------------------------------------------------------- public functionals


def swiglu_packed(h: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for the two halves a, b of h's last dim, in one pass, fp32 inside.

    h: (..., 2H) (fp32, bf16, fp16), typically the fc1 output of a SwiGLU MLP; copied if its rows are not
    contiguous. Returns (..., H) contiguous in h's dtype. The backward writes dh (..., 2H) in one pass.
    """
    return _swiglu_fwd_op(h)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for separate a, b (..., H) of one shape and dtype: packed with torch.cat (a copy), then
    `swiglu_packed`. Returns (..., H) contiguous."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"swiglu needs a and b of one shape and dtype, got {tuple(a.shape)} {a.dtype} "
                         f"and {tuple(b.shape)} {b.dtype}")
    return _swiglu_fwd_op(torch.cat((a, b), dim=-1))


def swiglu_packed_grad(dout: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The gate's backward as a function: dout (..., H), h (..., 2H) -> dh (..., 2H) in h's dtype, one pass
    (what `swiglu_packed`'s autograd calls; for autograd Functions that hold h themselves)."""
    return _swiglu_bwd_op(dout, h)


def swiglu_packed_fp8(h: torch.Tensor, keep_bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """act = silu(a) * b in fp32 for h (N, 2H) = a | b (fp32, bf16, fp16), quantised rowwise in the same pass:
    (q (N, H) float8_e4m3fn, s (N, 1) fp32, act) with act ~ q * s exactly as `quantize_rows` of the fp32 act
    gives them; act is (N, H) in h's dtype when keep_bf16, else an empty (0,) tensor. Not differentiable."""
    return _swiglu_fp8_fwd_op(h, keep_bf16)


def swiglu_packed_bwd_fp8(dout: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate's backward for dout (N, H), h (N, 2H), quantised rowwise in the same pass: (dh_q (N, 2H)
    float8_e4m3fn, dh_s (N, 1) fp32, dh_sums (2H,) fp32) with dh = da | db ~ dh_q * dh_s, the scale of the
    whole 2H row, and dh_sums the fp32 column sums of dh (fc1's bias gradient), reduced per program, then
    over the programs in a fixed order (deterministic)."""
    return _swiglu_fp8_bwd_op(dout, h)
