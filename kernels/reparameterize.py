"""FAE encoder reparameterisation: (mu | logvar) -> z = mu + eps * exp(logvar / 2) and the per-sample KL,
in one pass; the backward regenerates eps instead of storing it.

Noise convention: eps for z[b, t, c] is tl.randn(seed, offset + (b * T + t) * C + c), i.e. Philox
indexed by z's flat (contiguous) index plus `offset`, so eps is a pure function of (seed, offset,
shape) and `reparameterize_noise` reproduces it exactly on the same device. Use a new seed (or
advance offset by B*T*C) for every call that needs fresh noise. The index must fit in int32.

logvar is clamped to [-30, 20] as in the LDM diagonal Gaussian (no gradient outside the clamp).
KL per sample: 0.5 * sum over (T, C) of mu^2 + exp(logvar) - 1 - logvar, in fp32, summed by one
program per sample in a fixed order (deterministic, no atomics).

Registration: custom_op + register_fake (see swiglu.py for why not triton_op).
"""
import torch
import triton
import triton.language as tl

from .utils import cast_rtne, cdiv, row_block, row_num_warps, tile_rows

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def reparameterize_ref(moments: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference, elementwise in the moments' dtype. moments (B, T, 2C), eps (B, T, C)
    -> z (B, T, C) in the moments' dtype, kl (B,) fp32."""
    mu, logvar = moments.chunk(2, dim=-1)
    logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    z = mu + eps.to(mu.dtype) * torch.exp(0.5 * logvar)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2), dtype=torch.float32)
    return z, kl


# --------------------------------------------------------------------------- Triton kernels
# Tiles are (BLOCK_T rows, BLOCK_C channels) of one sample; moments rows have strides (stride_b, stride_t, 1).


@triton.jit
def _reparameterize_load(m_ptr, rows_off, c, mask, C):
    """A tile's fp32 mu, clamped logvar, inside-the-clamp mask and std = exp(logvar / 2)."""
    mu = tl.load(m_ptr + rows_off + c, mask=mask, other=0.0).to(tl.float32)
    lv_raw = tl.load(m_ptr + rows_off + C + c, mask=mask, other=0.0).to(tl.float32)
    # [LOGVAR_MIN, LOGVAR_MAX]; like torch.clamp, the gradient passes at the bounds themselves
    inside = (lv_raw >= -30.0) & (lv_raw <= 20.0)
    lv = tl.minimum(tl.maximum(lv_raw, -30.0), 20.0)
    return mu, lv, inside, tl.exp(0.5 * lv)


@triton.jit
def _reparameterize_fwd_kernel(m_ptr, z_ptr, kl_ptr, T, C, stride_b, stride_t, seed, offset,
                               BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # one program per sample: it walks the sample's T rows in a fixed order, so its KL sum is deterministic
    b = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)[:, None]
        mask = (t < T) & (c < C)
        mu, lv, inside, std = _reparameterize_load(m_ptr, b.to(tl.int64) * stride_b + t * stride_t, c, mask, C)
        idx = (b * T + t) * C + c  # z's flat index: the Philox counter of eps
        z = mu + tl.randn(seed, idx + offset) * std
        tl.store(z_ptr + idx, cast_rtne(z, z_ptr.dtype.element_ty), mask=mask)
        acc += tl.where(mask, mu * mu + std * std - 1.0 - lv, 0.0)  # exp(lv) = std^2
    tl.store(kl_ptr + b, 0.5 * tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _reparameterize_bwd_kernel(dz_ptr, dkl_ptr, m_ptr, dm_ptr, n_rows, T, C, stride_b, stride_t, seed, offset,
                               BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # Rows r = b * T + t of all samples; no reduction, so any tiling. With eps regenerated from the seed:
    #   dmu     = dz + dkl * mu
    #   dlogvar = (dz * eps * std / 2 + dkl * (exp(logvar) - 1) / 2) * [logvar inside the clamp]
    r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    mask = (r < n_rows) & (c < C)
    b = (r // T).to(tl.int64)
    mu, lv, inside, std = _reparameterize_load(m_ptr, b * stride_b + (r % T) * stride_t, c, mask, C)
    idx = r * C + c
    eps = tl.randn(seed, idx + offset)
    dz = tl.load(dz_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    dkl = tl.load(dkl_ptr + b, mask=r < n_rows, other=0.0)
    dmu = dz + dkl * mu
    dlv = tl.where(inside, 0.5 * (dz * eps * std + dkl * (std * std - 1.0)), 0.0)
    row = dm_ptr + r.to(tl.int64) * (2 * C) + c  # dmoments (B, T, 2C) contiguous
    tl.store(row, cast_rtne(dmu, dm_ptr.dtype.element_ty), mask=mask)
    tl.store(row + C, cast_rtne(dlv, dm_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reparameterize_noise_kernel(out_ptr, n, seed, offset, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + idx, tl.randn(seed, idx + offset), mask=idx < n)


# --------------------------------------------------------------------------- launchers


def _check(moments: torch.Tensor, seed: int, offset: int):
    if moments.dim() != 3 or moments.shape[-1] % 2:
        raise ValueError(f"reparameterize needs moments of shape (B, T, 2C) = [mu | logvar], got {tuple(moments.shape)}")
    _check_counter(moments.numel() // 2, seed, offset)


def _check_counter(n: int, seed: int, offset: int):
    if not 0 <= seed < 2**63 or offset < 0 or offset + n > 2**31 - 1:
        raise ValueError(f"reparameterize needs 0 <= seed < 2**63 and 0 <= offset, offset + B*T*C < 2**31 (the Philox "
                         f"counter is int32), got seed={seed}, offset={offset}, B*T*C={n}")


def _blocks(T: int, C: int) -> dict:
    block_c = row_block(C)
    block_t = tile_rows(block_c, T, elements=2048)
    return dict(BLOCK_T=block_t, BLOCK_C=block_c, num_warps=row_num_warps(block_t * block_c))


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def reparameterize_fwd(moments: torch.Tensor, seed: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """moments (B, T, 2C), last dim contiguous -> z (B, T, C) contiguous in moments' dtype, kl (B,) fp32."""
    _check(moments, seed, offset)
    m = _inner_contiguous(moments)
    B, T, C2 = m.shape
    z = torch.empty((B, T, C2 // 2), dtype=m.dtype, device=m.device)
    kl = torch.empty((B,), dtype=torch.float32, device=m.device)
    if B > 0:
        _reparameterize_fwd_kernel[(B,)](m, z, kl, T, C2 // 2, m.stride(0), m.stride(1), seed, offset,
                                         **_blocks(T, C2 // 2))
    return z, kl


def reparameterize_bwd(dz: torch.Tensor, dkl: torch.Tensor, moments: torch.Tensor, seed: int,
                       offset: int) -> torch.Tensor:
    """dz (B, T, C), dkl (B,), the forward's moments -> dmoments (B, T, 2C) contiguous in moments' dtype."""
    m = _inner_contiguous(moments)
    B, T, C2 = m.shape
    dz, dkl = dz.contiguous(), dkl.to(torch.float32).contiguous()
    dm = torch.empty((B, T, C2), dtype=m.dtype, device=m.device)
    blocks = _blocks(T, C2 // 2)
    n_rows = B * T
    if n_rows > 0:
        grid = (cdiv(n_rows, blocks["BLOCK_T"]),)
        _reparameterize_bwd_kernel[grid](dz, dkl, m, dm, n_rows, T, C2 // 2, m.stride(0), m.stride(1), seed, offset,
                                         **blocks)
    return dm


# --------------------------------------------------------------------------- registration

_reparameterize_fwd_op = torch.library.custom_op("fae_fast::reparameterize_fwd", reparameterize_fwd, mutates_args=())
_reparameterize_bwd_op = torch.library.custom_op("fae_fast::reparameterize_bwd", reparameterize_bwd, mutates_args=())


@_reparameterize_fwd_op.register_fake
def _(moments, seed, offset):
    B, T, C2 = moments.shape
    return moments.new_empty((B, T, C2 // 2)), moments.new_empty((B,), dtype=torch.float32)


@_reparameterize_bwd_op.register_fake
def _(dz, dkl, moments, seed, offset):
    return moments.new_empty(moments.shape)


def _setup_context(ctx, inputs, output):
    moments, ctx.seed, ctx.offset = inputs
    ctx.save_for_backward(moments)  # eps is not saved: the backward regenerates it from (seed, offset)


def _backward(ctx, dz, dkl):
    (moments,) = ctx.saved_tensors
    return _reparameterize_bwd_op(dz, dkl, moments, ctx.seed, ctx.offset), None, None


torch.library.register_autograd("fae_fast::reparameterize_fwd", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public functionals


def reparameterize_noise(shape, seed: int, *, offset: int = 0, device=None) -> torch.Tensor:
    """The exact eps `reparameterize(moments, seed, offset=offset)` draws for z of `shape` (B, T, C),
    as an fp32 tensor on `device` (Philox: the same on the same device type)."""
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    _check_counter(out.numel(), seed, offset)
    if out.numel() > 0:
        block = 4096
        _reparameterize_noise_kernel[(cdiv(out.numel(), block),)](out, out.numel(), seed, offset, BLOCK=block,
                                                                         num_warps=8)
    return out


def reparameterize(moments: torch.Tensor, seed: int, *, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample z ~ N(mu, exp(logvar)) with eps = reparameterize_noise(z.shape, seed, offset) and the KL to N(0, I).

    moments: (B, T, 2C) = [mu | logvar] along the last dim (contiguous last dim, any B/T strides),
        fp32, bf16 or fp16; logvar is clamped to [-30, 20].
    seed, offset: Philox seed and counter offset of eps; the backward regenerates eps from them.
    Returns z (B, T, C) contiguous in moments' dtype and kl (B,) fp32,
        kl[b] = 0.5 * sum over (t, c) of mu^2 + exp(logvar) - 1 - logvar.
    """
    return _reparameterize_fwd_op(moments, seed, offset)
