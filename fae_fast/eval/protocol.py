"""Which label and which noise sample number i of an evaluation set gets: a pure function of (seed, i).

A 50k-sample FID run is split over GPUs, batches and restarts; if sample i drew its noise from a
batch-wide generator, the set would depend on the batch size, the world size and where a crash
happened. Here every random number is Philox4x32-10 (Salmon et al., SC'11; the counter-based generator
cuRAND and torch use) of the counter (block, stream, i_lo, i_hi) under the key (seed_lo, seed_hi):
- stream 0: the initial noise of sample i; stream 1: its random label; stream 2 + k: the Brownian
  increment of SDE step k. `block` numbers the 4-word blocks within one sample's tensor.
Everything is integer arithmetic on int64 tensors (values below 2^32, products below 2^63: no
overflow), so the bits are the same on CPU and GPU, for any batch, and for any split across ranks.
"""
import math

import torch
from torch import Tensor

STREAM_NOISE, STREAM_LABEL, STREAM_SDE = 0, 1, 2
GRID_INDEX_OFFSET = 1 << 40
"""Indices of sample-grid images start here, so a grid never reuses an evaluation sample's noise."""

_M0, _M1, _W0, _W1, _MASK = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of a * m, a < 2^32 (int64), m a 32-bit constant: m is split in 16-bit
    halves so that no partial product reaches 2^63."""
    p = a * (m >> 16)  # < 2^48
    s = a * (m & 0xFFFF) + ((p & 0xFFFF) << 16)  # < 2^49: the low 48 bits of a*m, plus a carry
    return (p >> 16) + (s >> 32), s & _MASK


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int, rounds: int = 10):
    """Philox4x32-R of counter words c0..c3 (broadcastable int64 tensors < 2^32) under key (k0, k1):
    four int64 tensors of 32-bit random words (Random123's known-answer vectors are in the tests)."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def _words(seed: int, indices: Tensor, stream: int, blocks: int) -> Tensor:
    """(B, 4 * blocks) random 32-bit words (int64) for samples `indices` (B,) in `stream`."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed {seed} must be in [0, 2^64)")
    i = indices.to(torch.int64)[:, None]  # (B, 1)
    block = torch.arange(blocks, device=i.device, dtype=torch.int64)[None]  # (1, blocks)
    zero = torch.zeros_like(i)
    out = philox4x32(block + zero, zero + stream, i & _MASK, i >> 32, seed & _MASK, seed >> 32)
    return torch.stack(out, dim=-1).reshape(len(indices), 4 * blocks)


def index_normal(seed: int, indices: Tensor, shape: tuple[int, ...], stream: int = STREAM_NOISE) -> Tensor:
    """(B, *shape) float32 N(0, 1) noise; row b depends only on (seed, indices[b], stream).

    Box-Muller on pairs of words, in float64: a uniform u = (w + 1/2) / 2^32 never hits 0 or 1.
    """
    numel = math.prod(shape)
    w = _words(seed, indices, stream, (numel + 3) // 4).double()
    u = (w + 0.5) / 2.0**32
    u1, u2 = u[:, 0::2], u[:, 1::2]
    r, theta = (-2 * u1.log()).sqrt(), (2 * math.pi) * u2
    z = torch.stack([r * theta.cos(), r * theta.sin()], dim=-1).reshape(len(indices), -1)
    return z[:, :numel].float().reshape(len(indices), *shape)


def index_labels(seed: int, indices: Tensor, num_classes: int, mode: str = "balanced") -> Tensor:
    """(B,) int64 class labels of samples `indices`.

    'balanced': label i mod K, so N samples hold N/K of each class (within one when K does not divide N;
    50 per class for 50k ImageNet samples), and every prefix of the set is as balanced as it can be.
    'random': uniform on [0, K) from the label stream (modulo bias below K / 2^32).
    """
    indices = indices.to(torch.int64)
    if mode == "balanced":
        return indices % num_classes
    if mode == "random":
        return _words(seed, indices, STREAM_LABEL, 1)[:, 0] % num_classes
    raise ValueError(f"labels={mode!r} is not 'balanced' or 'random'")
