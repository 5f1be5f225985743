"""Rowwise FP8 quantisation in one pass: q = x / s rounded to float8 e4m3, s per row the smallest power of two
with amax(|row|) <= 448 * s, so that each row's largest value lands in e4m3's top binade. The scale is
computed inside the kernel from the row it holds in registers (no amax pass, no history), and comes out
as the fp32 column (rows, 1) that `torch._scaled_mm` takes with rowwise scaling: x ~ q * s.

A power-of-two scale makes x / s exact, so the one rounding is the cast (to nearest even), the same on
every device and in the PyTorch reference, bit for bit; against amax / 448 it gives up at most the top
binade's headroom, not precision (e4m3's relative step is the same in every normal binade).

x may be any 2-D strided view, so the transposed weight (its columns quantised) needs no copy.
fp32, bf16 and fp16 inputs; an all-zero row gets zeros and the scale of amax 1e-12.

`requantize_transposed` turns such a rowwise result into the transposed copy under one tensorwise scale
(the largest row scale) that a GEMM contracting over the rows takes (the FP8 weight gradient): a power-of-two
shift per row, read from the 1-byte values, exact while a value stays in e4m3's normal range.
"""
import torch
import triton
import triton.language as tl

from .utils import RowLoop, cast_rtne, cdiv, fit_shared_memory, persistent_row_runs, row_block, row_num_warps, tile_rows

E4M3_MAX = 448.0  # largest finite float8_e4m3fn: 1.75 * 2^8
AMAX_FLOOR = 1e-12  # an all-zero row still gets a finite scale
_E4M3_MAX, _AMAX_FLOOR = tl.constexpr(E4M3_MAX), tl.constexpr(AMAX_FLOOR)  # the same, readable inside kernels


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference: (q (M, K) float8_e4m3fn, s (M, 1) fp32) with x ~ q * s, the same arithmetic as
    the kernel."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR)
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2^exponent, mantissa in [0.5, 1)
    scale = torch.ldexp(torch.ones_like(amax), exponent - 9 + (mantissa > 0.875).int())  # amax <= 448 * scale
    q = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


@triton.jit
def _power_of_two_scale(amax):
    """(s, 1 / s) with s the smallest power of two such that amax <= 448 * s, from amax's bits: amax =
    m * 2^E with m in [1, 2), and 448 = 1.75 * 2^8, so s = 2^(E - 8), or 2^(E - 7) when m > 1.75."""
    bits = amax.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    return ((e + 127) << 23).to(tl.float32, bitcast=True), ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def row_scales(amax):
    """(s, 1 / s), each (ROWS,): the power-of-two scales of rows whose largest |value| is amax (ROWS,), an
    all-zero row's from AMAX_FLOOR."""
    return _power_of_two_scale(tl.maximum(amax, _AMAX_FLOOR))


@triton.jit
def to_e4m3(x, inverse, dtype: tl.constexpr):
    """fp32 tile x (ROWS, BLOCK) over its row scales (inverse (ROWS,) = 1 / s) as `dtype` (float8 e4m3): the
    division is exact (a power of two), the clamped cast the one rounding."""
    return cast_rtne(tl.minimum(tl.maximum(x * inverse[:, None], -_E4M3_MAX), _E4M3_MAX), dtype)


@triton.jit
def _quantize_tile(X, Q, S, rows, cols, row_end, n_cols, stride_r, stride_c):
    """Quantise the whole rows `rows` (those below row_end) of x into Q and their scales into S; returns the
    tile x (ROWS, BLOCK) fp32 as read (zeros where masked)."""
    mask = (rows < row_end)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)
    scale, inverse = row_scales(tl.max(tl.abs(x), axis=1))
    tl.store(Q + rows64 * n_cols + cols[None, :], to_e4m3(x, inverse, Q.dtype.element_ty), mask=mask)
    tl.store(S + rows, scale, mask=rows < row_end)
    return x


@triton.jit
def _quantize_rows_kernel(X, Q, S, n_rows, n_cols, stride_r, stride_c, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Program i quantises rows [i * ROWS, ...) of x (n_rows, n_cols), whole rows at a time."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    _quantize_tile(X, Q, S, rows, tl.arange(0, BLOCK), n_rows, n_cols, stride_r, stride_c)


def _quantized_outputs(x: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (M, K) float8 values and (M, 1) fp32 scales a quantising op writes for x (M, K)."""
    if x.dim() != 2:
        raise ValueError(f"{op} needs a 2-D tensor (rows, cols), got shape {tuple(x.shape)}")
    return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device))


def quantize_rows_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = _quantized_outputs(x, "quantize_rows")
    M, K = x.shape
    if M == 0 or K == 0:
        return q, s
    block = row_block(K)
    rows = tile_rows(block, M)
    _quantize_rows_kernel[(cdiv(M, rows),)](x, q, s, M, K, x.stride(0), x.stride(1), ROWS=rows, BLOCK=block,
                                            num_warps=row_num_warps(rows * block))
    return q, s


_quantize_rows_op = torch.library.custom_op("fae_fast::quantize_rows", quantize_rows_fwd, mutates_args=())


@_quantize_rows_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), any strides, fp32/bf16/fp16 -> (q (M, K) float8_e4m3fn contiguous, s (M, 1) fp32) with
    x ~ q * s, s the row's power-of-two scale. Not differentiable (the FP8 linear's backward is explicit)."""
    return _quantize_rows_op(x)


def quantize_rows_and_sum_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference of `quantize_rows_and_sum`."""
    return (*quantize_rows_ref(x), x.float().sum(0))


@triton.jit
def _quantize_rows_and_sum_kernel(X, Q, S, PART, n_rows, n_cols, stride_r, stride_c, rows_per_program,
                                  ROWS: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    """Program i quantises rows [i * rows_per_program, ...) as `_quantize_rows_kernel` does, ROWS at a time with
    the next STAGES - 1 tiles' loads in flight, and writes their column sums (fp32, from the values it read) to
    PART[i, :]."""
    cols = tl.arange(0, BLOCK)
    first = tl.program_id(0) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    sums = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in tl.range(first, last, ROWS, num_stages=STAGES):
        sums += tl.sum(_quantize_tile(X, Q, S, start + tl.arange(0, ROWS), cols, last, n_cols, stride_r, stride_c),
                       axis=0)
    tl.store(PART + tl.program_id(0).to(tl.int64) * n_cols + cols, sums, mask=cols < n_cols)


_SUM_PROGRAMS_PER_SM, _SUM_STAGES = 4, 3


def quantize_and_sum_launch(x: torch.Tensor) -> RowLoop:
    """The default launch of `quantize_rows_and_sum`: one row a tile, 4 persistent programs an SM, each walking
    its run of rows 3 tiles deep (the loads of the next tiles in flight through shared memory), fitted to the
    device's shared memory. One row, because a tile of two rows, which `tile_rows` gives 1,152 columns, sums
    its columns across warps: on an H200 (2026-12-02, M = 32,768) that took 0.60-0.62 ms at 1,152 columns with
    any program count or depth, against 0.052-0.126 ms with one row a tile (0.064 with this launch; the
    plain quantising pass takes 0.041-0.048), and 1.2-2.4 ms at 3,456 and 6,144 columns where the warps were
    doubled. The XL fp8w step went from 205.3 to 181.5 ms in the same call."""
    M, K = x.shape
    block = row_block(K)
    rows_per_program, _ = persistent_row_runs(M, 1, x.device, per_sm=_SUM_PROGRAMS_PER_SM)
    launch = RowLoop(rows=1, num_warps=row_num_warps(block), rows_per_program=rows_per_program,
                     num_stages=_SUM_STAGES)
    return fit_shared_memory(launch, block, x.element_size(), x.device)


def quantize_rows_and_sum_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return quantize_rows_and_sum_launched(x)


def quantize_rows_and_sum_launched(x: torch.Tensor, launch: RowLoop | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                             torch.Tensor]:
    """`quantize_rows_and_sum` outside the op registry, with an explicit launch (rows, warps, rows_per_program,
    stages) for a sweep (benchmarks/fp8_parts.py), else `quantize_and_sum_launch(x)`."""
    q, s = _quantized_outputs(x, "quantize_rows_and_sum")
    M, K = x.shape
    if M == 0 or K == 0:
        return q, s, torch.zeros(K, dtype=torch.float32, device=x.device)
    launch = (launch or quantize_and_sum_launch(x)).check()
    programs = cdiv(M, launch.rows_per_program)
    part = torch.empty((programs, K), dtype=torch.float32, device=x.device)  # summed in a fixed order
    _quantize_rows_and_sum_kernel[(programs,)](x, q, s, part, M, K, x.stride(0), x.stride(1), launch.rows_per_program,
                                               ROWS=launch.rows, BLOCK=row_block(K), STAGES=launch.num_stages,
                                               num_warps=launch.num_warps)
    return q, s, part.sum(0)


_quantize_rows_and_sum_op = torch.library.custom_op("fae_fast::quantize_rows_and_sum", quantize_rows_and_sum_fwd,
                                                    mutates_args=())


@_quantize_rows_and_sum_op.register_fake
def _(x):
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((x.shape[0], 1), dtype=torch.float32),
            x.new_empty((x.shape[1],), dtype=torch.float32))


def quantize_rows_and_sum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_rows`, plus the fp32 sums of x's columns (N,) from the same read: a linear's bias gradient
    when x is its output gradient dy (no second pass over dy). The sums are reduced per program over its
    rows, then over the programs in a fixed order (deterministic)."""
    return _quantize_rows_and_sum_op(x)


def requantize_transposed_ref(q: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of `requantize_transposed`: the same arithmetic as the kernel."""
    top = s.amax().reshape(1)
    return (q.float() * (s / top)).to(torch.float8_e4m3fn).t().contiguous(), top


@triton.jit
def _requantize_transposed_kernel(Q, S, TOP, QT, n_rows, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    """Program (i, j) moves the tile rows [i * BR, ...), cols [j * BC, ...) of q (n_rows, n_cols) to qt
    (n_cols, n_rows), each value rescaled from its row's scale to the shared one."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    q = tl.load(Q + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(S + rows, mask=rows < n_rows, other=0.0) / tl.load(TOP)  # 2^-k: both are powers of two
    moved = cast_rtne(q * shift[:, None], QT.dtype.element_ty)
    tl.store(QT + cols.to(tl.int64)[:, None] * n_rows + rows[None, :], tl.trans(moved), mask=tl.trans(mask))


def requantize_transposed_fwd(q: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if q.dim() != 2 or s.shape != (q.shape[0], 1):
        raise ValueError(f"requantize_transposed needs q (M, K) and its row scales (M, 1), got shapes "
                         f"{tuple(q.shape)} and {tuple(s.shape)}")
    M, K = q.shape
    top = s.amax().reshape(1) if M else torch.ones(1, dtype=torch.float32, device=q.device)
    qt = torch.empty((K, M), dtype=torch.float8_e4m3fn, device=q.device)
    if M and K:
        block = 64
        _requantize_transposed_kernel[(cdiv(M, block), cdiv(K, block))](q.contiguous(), s.contiguous(), top, qt,
                                                                       M, K, BR=block, BC=block, num_warps=4)
    return qt, top


_requantize_transposed_op = torch.library.custom_op("fae_fast::requantize_transposed", requantize_transposed_fwd,
                                                    mutates_args=())


@_requantize_transposed_op.register_fake
def _(q, s):
    return q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float8_e4m3fn), s.new_empty((1,))


def requantize_transposed(q: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rowwise FP8 (q (M, K), power-of-two row scales s (M, 1), as `quantize_rows` gives) -> the same
    values transposed under one tensorwise scale: (qt (K, M) float8_e4m3fn, top (1,) fp32) with
    qt[k, m] * top ~ q[m, k] * s[m], top the largest row scale. Each value moves down by a power of two,
    exactly, except where it leaves e4m3's normal range (then rounded to nearest even, or to zero): the
    precision a tensorwise quantisation of the original has anyway. This is what an FP8 weight-gradient
    GEMM (contracting over M) takes, made from the 1-byte rowwise copy the forward or input-gradient GEMM
    already quantised, with no second read of the bf16 tensor."""
    return _requantize_transposed_op(q, s)
