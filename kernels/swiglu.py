"""SwiGLU gate: out = silu(a) * b, forward and backward in one pass each.

The MLP computes one Linear to 2H and chunks it, so a and b are strided halves of one (..., 2H)
tensor: the kernels take a row stride per operand and read the halves in place (no copy).

Registration (the same in every kernel file): `torch.library.custom_op` + `register_fake`, not
`triton_op` + `wrap_triton`. On CPU under TRITON_INTERPRET=1 the custom op runs eagerly and under
`torch.compile(fullgraph=True)`, while a triton_op fails under compile there (fake tensors reach
the interpreter). Custom ops must not return views of their inputs: every output is a new tensor.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import cast_rtne, row_block, row_num_warps, rows_2d, tile_rows


def swiglu_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PyTorch reference, computed in the inputs' dtype: silu(a) * b."""
    return F.silu(a) * b


# --------------------------------------------------------------------------- Triton kernels
# Each program owns a (BLOCK_M rows, BLOCK_N columns) tile of the (n_rows, H) problem.


@triton.jit
def _tile(n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices (BLOCK_M, 1) as int64 (row * stride may pass 2^31), columns (1, BLOCK_N), mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    return rows.to(tl.int64), cols, mask


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, out_ptr, n_rows, n_cols, stride_a, stride_b,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    a = tl.load(a_ptr + rows * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    out = a * tl.sigmoid(a) * b
    tl.store(out_ptr + rows * n_cols + cols, cast_rtne(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dout_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n_rows, n_cols, stride_dout, stride_a, stride_b,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # silu'(a) = sig(a) * (1 + a * (1 - sig(a)));  da = dout * b * silu'(a),  db = dout * silu(a)
    rows, cols, mask = _tile(n_rows, n_cols, BLOCK_M, BLOCK_N)
    dout = tl.load(dout_ptr + rows * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + rows * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    da = dout * b * sig * (1.0 + a * (1.0 - sig))
    db = dout * a * sig
    tl.store(da_ptr + rows * n_cols + cols, cast_rtne(da, da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + rows * n_cols + cols, cast_rtne(db, db_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _launch(kernel, n_rows: int, n_cols: int, *args):
    """Grid of (BLOCK_M, BLOCK_N) tiles, ~4096 elements each; columns split in blocks of <= 1024
    (H = 3072 and 4096 split evenly, so no lane is masked off at the real sizes)."""
    if n_rows == 0 or n_cols == 0:
        return
    block_n = min(row_block(n_cols), 1024)
    block_m = tile_rows(block_n, n_rows)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=row_num_warps(block_m * block_n))


def _check(a: torch.Tensor, b: torch.Tensor):
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"swiglu needs a and b of one shape and dtype, got {tuple(a.shape)} {a.dtype} "
                         f"and {tuple(b.shape)} {b.dtype}")


def swiglu_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b (..., H) with a contiguous last dim (any row strides) -> silu(a) * b, (..., H) contiguous."""
    _check(a, b)
    a2, b2 = rows_2d(a), rows_2d(b)  # (N, H) views; a copy only if the leading dims do not collapse
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    n_rows, n_cols = a2.shape
    _launch(_swiglu_fwd_kernel, n_rows, n_cols, a2, b2, out, n_rows, n_cols, a2.stride(0), b2.stride(0))
    return out


def swiglu_bwd(dout: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dout, a, b (..., H) -> (da, db), each (..., H) contiguous in a's dtype."""
    d2, a2, b2 = rows_2d(dout), rows_2d(a), rows_2d(b)
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    db = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    n_rows, n_cols = a2.shape
    _launch(_swiglu_bwd_kernel, n_rows, n_cols, d2, a2, b2, da, db, n_rows, n_cols,
            d2.stride(0), a2.stride(0), b2.stride(0))
    return da, db


# --------------------------------------------------------------------------- registration

_swiglu_fwd_op = torch.library.custom_op("fae_fast::swiglu_fwd", swiglu_fwd, mutates_args=())
_swiglu_bwd_op = torch.library.custom_op("fae_fast::swiglu_bwd", swiglu_bwd, mutates_args=())


@_swiglu_fwd_op.register_fake
def _(a, b):
    _check(a, b)
    return torch.empty(a.shape, dtype=a.dtype, device=a.device)


@_swiglu_bwd_op.register_fake
def _(dout, a, b):
    return (torch.empty(a.shape, dtype=a.dtype, device=a.device),
            torch.empty(a.shape, dtype=a.dtype, device=a.device))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # a, b: the views themselves, so nothing is copied


def _backward(ctx, dout):
    a, b = ctx.saved_tensors
    return _swiglu_bwd_op(dout, a, b)


torch.library.register_autograd("fae_fast::swiglu_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public functional


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b in one pass, fp32 inside.

    a, b: (..., H), same shape and dtype (fp32, bf16, fp16), last dim contiguous; typically the two
    halves of `fc1(x).chunk(2, -1)`, read in place. Returns (..., H) contiguous in that dtype.
    """
    return _swiglu_fwd_op(a, b)
