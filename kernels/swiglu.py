"""SwiGLU gate on the packed output of the MLP's first Linear: out = silu(a) * b with a, b the two halves of
h (..., 2H), forward and backward in one pass each. The backward writes dh (..., 2H) itself, so autograd has
no da, db to concatenate.

`swiglu(a, b)` for separate halves is a thin wrapper: it packs them with torch.cat (a copy) and calls the
same op; the model calls `swiglu_packed` on its fc1 output instead.

Registration (the same in every kernel file): `torch.library.custom_op` + `register_fake`, not
`triton_op` + `wrap_triton`. On CPU under TRITON_INTERPRET=1 the custom op runs eagerly and under
`torch.compile(fullgraph=True)`, while a triton_op fails under compile there (fake tensors reach
the interpreter). Custom ops must not return views of their inputs: every output is a new tensor.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import cast_rtne, cdiv, row_block, row_num_warps, rows_2d, tile_rows


def swiglu_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PyTorch reference, computed in the inputs' dtype: silu(a) * b."""
    return F.silu(a) * b


def swiglu_packed_ref(h: torch.Tensor) -> torch.Tensor:
    """PyTorch reference of `swiglu_packed`: silu(h[..., :H]) * h[..., H:]."""
    a, b = h.chunk(2, dim=-1)
    return swiglu_ref(a, b)


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
def _swiglu_fwd_kernel(h_ptr, out_ptr, n_rows, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, cols, mask = _swiglu_tile(n_rows, H, BLOCK_M, BLOCK_N)
    a_ptrs = h_ptr + rows * (2 * H) + cols
    a = tl.load(a_ptrs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(a_ptrs + H, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * H + cols, cast_rtne(a * tl.sigmoid(a) * b, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dout_ptr, h_ptr, dh_ptr, n_rows, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # silu'(a) = sig(a) * (1 + a * (1 - sig(a)));  da = dout * b * silu'(a),  db = dout * silu(a)
    rows, cols, mask = _swiglu_tile(n_rows, H, BLOCK_M, BLOCK_N)
    a_off = rows * (2 * H) + cols  # in h and dh
    dout = tl.load(dout_ptr + rows * H + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(h_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(h_ptr + a_off + H, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    da = dout * b * sig * (1.0 + a * (1.0 - sig))
    db = dout * a * sig
    tl.store(dh_ptr + a_off, cast_rtne(da, dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + a_off + H, cast_rtne(db, dh_ptr.dtype.element_ty), mask=mask)


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
