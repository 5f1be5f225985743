"""SiT and LightningDiT flow-matching transformers on the FAE latent grid (patch size 1).

One block class with options (norm, mlp, rope, qk_norm), configured from GeneratorConfig:
SiT = LayerNorm + GELU + absolute positions; LightningDiT = RMSNorm + SwiGLU + 2-D RoPE + QK-norm.
Latents are tokens: (B, T, C) with T = grid * grid, C = in_channels (16 x 16 x 32 in the paper).
With patch size p > 1 (only to load the published SiT-XL/2), p x p cells form one token.
"""
import torch
import torch.nn as nn

from fae_fast.attention import choose_backend
from fae_fast.conditioning import ClassLabels
from fae_fast.config import GeneratorConfig, validate_generator
from fae_fast.layers import (Attention, LabelEmbedder, ModulatedNorm, Ops, TimestepEmbedder, make_mlp,
                             sincos_pos_embed_2d)


class Block(nn.Module):
    """adaLN-Zero transformer block: x += g1 * attn(mod(x)); x += g2 * mlp(mod(x)).

    The residual after attention and the second modulated norm run as one fused op (two outputs).

    `fp8_norms` (set by fae_fast.fp8.use_fp8 for FP8 training with the FP8 weight gradient, on the fused
    kernels, with a SwiGLU MLP): in training the two norms emit the FP8 inputs of qkv and fc1 themselves
    (`fp8_norm_linear`, `fp8_residual_norm_swiglu`) rather than bf16 that the linears read back to quantise.
    """

    fp8_norms = False
    fp8_sampling = False
    """Set by fae_fast.fp8.use_fp8_sampling: in eval mode the norms and the SwiGLU gate emit the FP8 inputs of
    the block's FP8 sampling linears (`fp8_sampling_block`)."""

    def __init__(self, cfg: GeneratorConfig, ops: Ops):
        super().__init__()
        D = cfg.width
        self.ops, self.norm_kind = ops, cfg.norm
        self.norm1 = ModulatedNorm(D, norm=cfg.norm, ops=ops)
        self.attn = Attention(D, cfg.heads, qk_norm=cfg.qk_norm, rope_grid=cfg.grid if cfg.rope else None, ops=ops)
        self.norm2 = ModulatedNorm(D, norm=cfg.norm, ops=ops)
        self.mlp = make_mlp(cfg.mlp, D, cfg.mlp_ratio, ops=ops)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):  # x (B, T, D), c (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # (B, D) each
        if self.fp8_norms and self.training and (x.shape[0] * x.shape[1]) % 16 == 0:
            return self._forward_fp8_norms(x, shift1, scale1, gate1, shift2, scale2, gate2)
        if self.fp8_sampling and not self.training:
            from fae_fast.fp8 import fp8_sampling_block  # imported: fae_fast.fp8 set the flag

            return fp8_sampling_block(self, x, shift1, scale1, gate1, shift2, scale2, gate2)
        h = self.norm1(x, scale1, shift1)
        x, h = self.ops.gated_residual_modulated_norm(
            x, gate1, self.attn(h), scale2, shift2, self.norm2.weight, norm=self.norm_kind)
        return self.ops.gated_residual(x, gate2, self.mlp(h))

    def _forward_fp8_norms(self, x, shift1, scale1, gate1, shift2, scale2, gate2):
        """The training forward with `fp8_norms`: the same block, each norm fused with the FP8 linear it feeds."""
        from fae_fast.fp8 import fp8_norm_linear, fp8_residual_norm_swiglu  # imported: fae_fast.fp8 set the flag

        attn, mlp = self.attn, self.mlp
        qkv = fp8_norm_linear(x, scale1, shift1, self.norm1.weight, attn.qkv.weight, attn.qkv.bias,
                              norm=self.norm_kind, eps=self.norm1.eps)
        x, mlp_out = fp8_residual_norm_swiglu(x, gate1, attn.attend(qkv), scale2, shift2, self.norm2.weight,
                                              mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                                              norm=self.norm_kind, eps=self.norm2.eps)
        return self.ops.gated_residual(x, gate2, mlp_out)


class FinalLayer(nn.Module):
    """Modulated norm, then a linear map back to latent channels."""

    def __init__(self, cfg: GeneratorConfig, ops: Ops):
        super().__init__()
        self.norm = ModulatedNorm(cfg.width, norm=cfg.norm, ops=ops)
        out = cfg.patch_size**2 * cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.linear = nn.Linear(cfg.width, out)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(self.norm(x, scale, shift))


class Generator(nn.Module):
    """Velocity model v(x_t, t, y): x_t (B, T, C), t (B,) in [0, 1] with 0 = noise, y (B,) labels."""

    def __init__(self, cfg: GeneratorConfig, impl: str = "auto"):
        super().__init__()
        validate_generator(cfg)
        self.cfg, self.ops = cfg, Ops(impl)
        D, p, tokens_per_side = cfg.width, cfg.patch_size, cfg.grid // cfg.patch_size
        self.x_embed = nn.Linear(p * p * cfg.in_channels, D)  # a conv with stride = kernel = p, as a matmul
        self.t_embed = TimestepEmbedder(D, time_scale=cfg.time_scale)
        self.build_conditioning(cfg)
        if cfg.pos_embed:
            self.register_buffer("pos_embed", sincos_pos_embed_2d(tokens_per_side, D)[None], persistent=False)
        else:
            self.pos_embed = None
        self.blocks = nn.ModuleList(self.make_block(cfg, i) for i in range(cfg.depth))
        self.final = FinalLayer(cfg, self.ops)
        self.initialize_weights()

    def build_conditioning(self, cfg: GeneratorConfig) -> None:
        """`self.conditioning` and the modules that embed the condition: class labels here."""
        self.conditioning = ClassLabels(cfg.num_classes, cfg.class_dropout)
        self.y_embed = LabelEmbedder(cfg.num_classes, cfg.width)

    def make_block(self, cfg: GeneratorConfig, index: int) -> nn.Module:
        return Block(cfg, self.ops)

    def initialize_weights(self):
        """DiT initialisation: Xavier linears, N(0, 0.02) embeddings, and adaLN-Zero: every modulation
        and the output layer start at zero, so each block starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(getattr(self, "y_embed", None), LabelEmbedder):
            nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for layer in self.t_embed.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        modulations = [b.adaLN[-1] for b in self.blocks if hasattr(b, "adaLN")]  # a joint block zeroes its own
        for mod in modulations + [self.final.adaLN[-1], self.final.linear]:
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)

    def fp8_modules(self) -> list[nn.Module]:
        """The modules whose linears run in FP8 under run.precision=fp8: each block's attention and MLP
        (the adaLN, embedding and output linears are small or precision-sensitive and stay bf16)."""
        return [m for block in self.blocks for m in (block.attn, block.mlp)]

    def forward(self, x, t, y):  # x (B, grid*grid, C) -> velocity of the same shape
        cfg = self.cfg
        if x.ndim != 3 or x.shape[1:] != (cfg.grid ** 2, cfg.in_channels):
            raise ValueError(f"generator expects latents (B, {cfg.grid ** 2}, {cfg.in_channels}) = (B, grid*grid, "
                             f"in_channels), got {tuple(x.shape)}; set model.grid and model.in_channels to the latents'")
        x = patchify_latents(x, self.cfg.grid, self.cfg.patch_size)
        h = self.x_embed(x.to(self.x_embed.weight.dtype))  # (B, T, D); bf16 under mixed precision
        if self.pos_embed is not None:
            h = h + self.pos_embed.to(h.dtype)
        c = self.t_embed(t) + self.y_embed(y)  # (B, D)
        for block in self.blocks:
            h = block(h, c)
        out = self.final(h, c)  # (B, T, p*p*C [x2])
        if self.cfg.learn_sigma:
            out = out.view(*out.shape[:-1], self.cfg.patch_size**2, 2, -1)[..., 0, :].flatten(-2)
        return unpatchify_latents(out, self.cfg.grid, self.cfg.patch_size)


def patchify_latents(x, grid: int, p: int):
    """(B, grid*grid, C) cells -> (B, (grid/p)^2, p*p*C) tokens, each vector ordered (row, col, channel)."""
    if p == 1:
        return x
    B, _, C = x.shape
    n = grid // p
    x = x.view(B, n, p, n, p, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, n * n, p * p * C)


def unpatchify_latents(x, grid: int, p: int):
    """Inverse of patchify_latents."""
    if p == 1:
        return x
    B = x.shape[0]
    n = grid // p
    x = x.reshape(B, n, n, p, p, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, grid * grid, -1)


def forward_flops_per_sample(cfg: GeneratorConfig) -> float:
    """Matmul + attention FLOPs of one forward pass per sample (a training step is about 3x)."""
    T, D = (cfg.grid // cfg.patch_size) ** 2, cfg.width
    mlp_hidden = int(D * cfg.mlp_ratio) if cfg.mlp == "gelu" else int(2 * D * cfg.mlp_ratio / 3)
    mlp_params = 2 * D * mlp_hidden if cfg.mlp == "gelu" else 3 * D * mlp_hidden
    per_block = 2 * T * (4 * D * D + mlp_params) + 4 * T * T * D  # qkv+proj, mlp; QK^T and AV
    return cfg.depth * per_block


def choose_attention_backend(cfg: GeneratorConfig, rows: int, dtype: torch.dtype, device) -> str:
    """fae_fast.attention.choose_backend for this generator's attention at `rows` samples per forward
    (its heads, (grid / patch)^2 tokens and head dim); call it before compiling."""
    tokens = (cfg.grid // cfg.patch_size) ** 2
    return choose_backend(rows, cfg.heads, tokens, cfg.width // cfg.heads, dtype, device)
