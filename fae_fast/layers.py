"""Building blocks shared by the FAE and generator models.

Modules own parameters and call a functional op; `impl="triton"` uses the fused kernels of
fae_fast.kernels, `impl="torch"` their PyTorch references. The choice is an explicit argument
(default: triton on CUDA, torch elsewhere), never an environment switch.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fae_fast.attention import attention_tokens


def resolve_impl(impl: str = "auto") -> str:
    """'auto' -> 'triton' when CUDA is available, else 'torch'."""
    if impl == "auto":
        return "triton" if torch.cuda.is_available() else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl {impl!r} is not 'auto', 'triton' or 'torch'")
    from fae_fast.kernels.utils import interpreting  # here: importing fae_fast.layers loads no Triton

    if impl == "triton" and not torch.cuda.is_available() and not interpreting():
        raise ValueError("impl='triton' needs a CUDA GPU; on a CPU the kernels run only through Triton's interpreter "
                         "(TRITON_INTERPRET=1 set before fae_fast is imported; slow, for tests). Use impl='auto' "
                         "(PyTorch ops on CPU) or impl='torch'")
    return impl


FUSED_OPS = {
    "modulated_norm": "modulated_norm",
    "gated_residual": "gated_residual",
    "gated_residual_modulated_norm": "gated_residual",
    "rope": "rope",
    "rope_qkv": "rope",
    "joint_rope_qkv": "rope",
    "swiglu": "swiglu",
    "swiglu_packed": "swiglu",
}
"""Op name -> the kernels/ file that holds it: `<name>` is the fused functional, `<name>_ref` its PyTorch
reference with the same signature. A new fused op is one kernel file and one line here."""


def op_table(impl: str) -> dict:
    """{op name: function} of an impl: the fused kernels ('triton') or their references ('torch')."""
    import importlib

    suffix = "" if resolve_impl(impl) == "triton" else "_ref"
    return {name: getattr(importlib.import_module(f"fae_fast.kernels.{module}"), name + suffix)
            for name, module in FUSED_OPS.items()}


class Ops:
    """The functional ops of FUSED_OPS bound to one impl, by name (ops.modulated_norm, ...), held by every
    module that uses them."""

    def __init__(self, impl: str = "auto"):
        self.impl = resolve_impl(impl)
        for name, fn in op_table(self.impl).items():
            setattr(self, name, fn)


class ModulatedNorm(nn.Module):
    """norm(x) * (1 + scale) + shift, norm = LayerNorm without affine or RMSNorm with a weight.

    x (B, T, D); scale and shift (B, D) per sample or (B, T, D) per token.
    """

    def __init__(self, dim: int, *, norm: str = "layer", eps: float = 1e-6, ops: Ops):
        super().__init__()
        self.norm, self.eps, self.ops = norm, eps, ops
        self.weight = nn.Parameter(torch.ones(dim)) if norm == "rms" else None

    def forward(self, x, scale, shift):
        return self.ops.modulated_norm(x, scale, shift, self.weight, norm=self.norm, eps=self.eps)


class SwiGLU(nn.Module):
    """out = W2 (silu(W1a x) * W1b x); one matmul makes both halves, the kernel fuses the gate."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, *, ops: Ops):
        super().__init__()
        self.ops = ops
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x):
        return self.fc2(self.ops.swiglu_packed(self.fc1(x)))  # silu(a) * b of fc1's halves a, b


class GeluMLP(nn.Module):
    """Linear -> GELU (tanh) -> Linear, as in DiT/SiT."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def make_mlp(kind: str, dim: int, mlp_ratio: float, *, ops: Ops) -> nn.Module:
    """GELU MLP with hidden ratio*dim, or SwiGLU with 2/3 of that (same parameter count)."""
    if kind == "gelu":
        return GeluMLP(dim, int(dim * mlp_ratio))
    if kind == "swiglu":
        return SwiGLU(dim, int(2 * dim * mlp_ratio / 3), ops=ops)
    raise ValueError(f"mlp {kind!r} is not 'gelu' or 'swiglu'")


def rope_angles_2d(grid: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles (grid*grid, head_dim/2) for 2-D RoPE in the rotate-half convention.

    The first half of the head_dim/2 rotated pairs turns with the token's row, the second half with its
    column, each with frequencies theta^(-i/n) for i < n = head_dim/4.
    """
    n = head_dim // 4
    freqs = theta ** (-torch.arange(n, dtype=torch.float64) / n)  # (n,)
    pos = torch.arange(grid, dtype=torch.float64)
    rows = pos.repeat_interleave(grid)  # token t = r * grid + c
    cols = pos.repeat(grid)
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (T, head_dim/2)
    return angles.float()


class Attention(nn.Module):
    """Multi-head self-attention with optional QK RMSNorm and 2-D RoPE (fused in one kernel pass).

    With `rope_grid` set, the module owns its RoPE angle table as an fp32 buffer: buffers are not cast
    by mixed-precision wrappers, and angles of up to ~grid radians need fp32.
    """

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, qk_norm: bool = False,
                 rope_grid: int | None = None, ops: Ops):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim or dim // heads
        inner = heads * self.head_dim
        self.ops = ops
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.q_norm = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(self.head_dim)) if qk_norm else None
        angles = rope_angles_2d(rope_grid, self.head_dim) if rope_grid else None
        self.register_buffer("rope_angles", angles, persistent=False)

    def forward(self, x):  # x (B, T, D)
        return self.attend(self.qkv(x))

    def attend(self, qkv):
        """The attention after the qkv projection: qkv (B, T, 3 * H * Dh) -> (B, T, D). A block that computes
        the projection fused with its norm (FP8 training) enters here."""
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, 3, self.heads, self.head_dim)
        if self.rope_angles is not None or self.q_norm is not None:
            # QK-norm and/or RoPE (angles None: no rotation) in one pass; q, k, v come out (B, H, T, Dh) laid
            # out (B, T, H, Dh), so the attention output reads as (B, T, H * Dh) without a copy, and the
            # backward writes d(qkv) in one pass
            q, k, v = self.ops.rope_qkv(qkv, self.rope_angles, self.q_norm, self.k_norm)
        else:
            q, k, v = qkv.unbind(2)  # each (B, T, H, Dh), strided views of qkv
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return self.proj(attention_tokens(q, k, v))  # (B, T, H * Dh)


def sincos_pos_embed_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid*grid, dim), as in MAE/DiT."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = pos.repeat_interleave(grid), pos.repeat(grid)

    def embed(p):
        out = p[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features (cos | sin) of time_scale * t -> MLP, as in DiT/SiT. fae_fast
    trains with time_scale 1000; published SiT and LightningDiT embed t itself (time_scale 1)."""

    def __init__(self, dim: int, freq_dim: int = 256, time_scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = self.time_scale * t.float()[:, None] * freqs[None]
        features = torch.cat([args.cos(), args.sin()], dim=-1)  # (B, freq_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector. Label `num_classes` is the null label (fae_fast.conditioning.ClassLabels drops
    labels to it in training, so that one network also learns the unconditional velocity for CFG)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        return self.table(labels)
