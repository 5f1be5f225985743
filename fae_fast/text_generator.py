"""The flow transformer conditioned on captions (TextGeneratorConfig): SiT / LightningDiT blocks, each followed
by cross-attention from the latent tokens to the caption's token embeddings (a frozen SigLIP 2 text
tower's, fae_fast/text.py), and the adaLN input the time embedding plus the caption tokens' mean.

`text_attention='cross'` (PixArt-style) keeps the self-attention shape, and with it the fused RoPE + QK-norm
kernel and the attention backend measured for 256 latent tokens, and adds one small attention over the
caption tokens per block. `'joint'` (MMDiT-style) runs one attention over latent and caption tokens, the
caption a second stream with its own adaLN, norms, projections and MLP, updated block by block (RoPE and
QK-norm on the latent tokens only). The README compares the two on the toy captions;
joint is the default. Every output projection
of the caption's path starts at zero, so a fresh model is the class-free flow transformer with the caption's
mean in its adaLN input.

Trained with the flow transformer's flow-matching loss and sampled with its samplers (fae_fast/families.py);
guidance batches a caption's embeddings with the null caption's (zeros).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fae_fast.attention import attention_tokens, choose_backend, output_layout_tokens
from fae_fast.conditioning import TextEmbeddings
from fae_fast.config import TextGeneratorConfig
from fae_fast.generators import Block, Generator, forward_flops_per_sample, patchify_latents, unpatchify_latents
from fae_fast.layers import ModulatedNorm, make_mlp

TEXT_ATTENTION = ("cross", "joint")


class CrossAttention(nn.Module):
    """x (B, T, D) attends to the caption tokens (B, L, D): q from x, k and v from the caption."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, text):
        B, T, D = x.shape
        H, Dh = self.heads, D // self.heads
        q = self.q(self.norm(x)).view(B, T, H, Dh).transpose(1, 2)
        k, v = self.kv(text).view(B, text.shape[1], 2, H, Dh).permute(2, 0, 3, 1, 4)
        return self.proj(output_layout_tokens(F.scaled_dot_product_attention(q, k, v)))  # see fae_fast.attention


class TextBlock(Block):
    """The flow transformer's block, then x += cross_attention(x, caption)."""

    def __init__(self, cfg: TextGeneratorConfig, ops):
        super().__init__(cfg, ops)
        self.cross = CrossAttention(cfg.width, cfg.heads)

    def forward(self, x, c, text):
        x = super().forward(x, c)
        return x + self.cross(x, text), text

    def zero_text_outputs(self):
        nn.init.zeros_(self.cross.proj.weight)
        nn.init.zeros_(self.cross.proj.bias)


class JointBlock(nn.Module):
    """One attention over the latent tokens and the caption tokens; each stream its own adaLN, norms,
    projections and MLP (the latent stream is the flow transformer's block, fused kernels and all). The last
    block (`text_output=False`) only lets the caption be attended to: nothing reads the caption tokens after
    it, so it has no caption output projection or MLP (MMDiT's last block is built the same way)."""

    def __init__(self, cfg: TextGeneratorConfig, ops, text_output: bool = True):
        super().__init__()
        D = cfg.width
        self.text_output = text_output
        self.image = Block(cfg, ops)
        self.text_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, (6 if text_output else 2) * D))
        self.text_norm1 = ModulatedNorm(D, norm="layer", ops=ops)  # LayerNorm without affine: no parameters
        self.text_qkv = nn.Linear(D, 3 * D)
        if text_output:
            self.text_proj = nn.Linear(D, D)
            self.text_mlp = make_mlp(cfg.mlp, D, cfg.mlp_ratio, ops=ops)

    def forward(self, x, c, text):  # x (B, T, D), c (B, D), text (B, L, D) -> both updated
        image, attn = self.image, self.image.attn
        shift1, scale1, gate1, shift2, scale2, gate2 = image.adaLN(c).chunk(6, dim=-1)
        B, T, _ = x.shape
        L = text.shape[1]
        qkv = attn.qkv(image.norm1(x, scale1, shift1)).view(B, T, 3, attn.heads, attn.head_dim)
        text_modulation = self.text_adaLN(c).chunk(6 if self.text_output else 2, dim=-1)
        t_shift1, t_scale1 = text_modulation[:2]
        text_qkv = self.text_qkv(self.text_norm1(text, t_scale1, t_shift1)).view(B, L, 3, attn.heads, attn.head_dim)
        if attn.rope_angles is not None or attn.q_norm is not None:  # RoPE and QK-norm on the latent tokens only
            q, k, v = image.ops.joint_rope_qkv(qkv, text_qkv, attn.rope_angles, attn.q_norm, attn.k_norm)
        else:
            q, k, v = (torch.cat([latent, caption], 2)
                       for latent, caption in zip(qkv.permute(2, 0, 3, 1, 4), text_qkv.permute(2, 0, 3, 1, 4)))
        out = attention_tokens(q, k, v)  # (B, T + L, H * Dh)
        x, h = image.ops.gated_residual_modulated_norm(
            x, gate1, attn.proj(out[:, :T]), scale2, shift2, image.norm2.weight, norm=image.norm_kind)
        x = image.ops.gated_residual(x, gate2, image.mlp(h))
        if not self.text_output:
            return x, text
        t_gate1, t_shift2, t_scale2, t_gate2 = text_modulation[2:]  # the caption stream: the same fused ops
        text, th = image.ops.gated_residual_modulated_norm(text, t_gate1, self.text_proj(out[:, T:]), t_scale2,
                                                           t_shift2, None, norm="layer")
        return x, image.ops.gated_residual(text, t_gate2, self.text_mlp(th))

    def zero_text_outputs(self):
        for mod in (self.image.adaLN[-1], self.text_adaLN[-1]):
            nn.init.zeros_(mod.weight)
            nn.init.zeros_(mod.bias)


class TextGenerator(Generator):
    """Velocity model v(x_t, t, caption): x_t (B, T, C), t (B,) in [0, 1] with 0 = noise, caption token
    embeddings (B, L, text_dim)."""

    def build_conditioning(self, cfg: TextGeneratorConfig) -> None:
        self.conditioning = TextEmbeddings(cfg.caption_dropout)
        self.text_embed = nn.Sequential(nn.LayerNorm(cfg.text_dim, eps=1e-6), nn.Linear(cfg.text_dim, cfg.width))

    def make_block(self, cfg: TextGeneratorConfig, index: int) -> nn.Module:
        if cfg.text_attention not in TEXT_ATTENTION:
            raise ValueError(f"model.text_attention={cfg.text_attention!r} is not one of {', '.join(TEXT_ATTENTION)}")
        if cfg.text_attention == "cross":
            return TextBlock(cfg, self.ops)
        return JointBlock(cfg, self.ops, text_output=index < cfg.depth - 1)

    def initialize_weights(self):
        """The flow transformer's, with the caption path's output projections (and a joint block's
        modulations) at zero."""
        super().initialize_weights()
        for block in self.blocks:
            block.zero_text_outputs()

    def fp8_modules(self) -> list[nn.Module]:
        layers = [getattr(block, "image", block) for block in self.blocks]
        return [m for layer in layers for m in (layer.attn, layer.mlp)]

    def forward(self, x, t, text):  # x (B, grid*grid, C), text (B, L, text_dim) -> velocity like x
        cfg = self.cfg
        if x.ndim != 3 or x.shape[1:] != (cfg.grid ** 2, cfg.in_channels):
            raise ValueError(f"generator expects latents (B, {cfg.grid ** 2}, {cfg.in_channels}), got {tuple(x.shape)}")
        if text.ndim != 3 or text.shape[-1] != cfg.text_dim:
            raise ValueError(f"generator expects caption embeddings (B, L, {cfg.text_dim}) = model.text_dim wide, "
                             f"got {tuple(text.shape)}; set model.text_dim to the text tower's width")
        x = patchify_latents(x, cfg.grid, cfg.patch_size)
        h = self.x_embed(x.to(self.x_embed.weight.dtype))
        if self.pos_embed is not None:
            h = h + self.pos_embed.to(h.dtype)
        tokens = self.text_embed(text.to(self.text_embed[1].weight.dtype))  # (B, L, D)
        c = self.t_embed(t) + tokens.mean(dim=1)
        for block in self.blocks:
            h, tokens = block(h, c, tokens)
        return unpatchify_latents(self.final(h, c), cfg.grid, cfg.patch_size)


def choose_text_attention_backend(cfg: TextGeneratorConfig, rows: int, dtype: torch.dtype, device) -> str:
    """fae_fast.attention.choose_backend for the shape this model attends with at `rows` samples per forward:
    latent and caption tokens together (joint), or the latent tokens (cross: its self-attention; the small
    cross-attention over the caption runs SDPA's own choice); call it before compiling."""
    tokens = (cfg.grid // cfg.patch_size) ** 2 + (cfg.text_length if cfg.text_attention == "joint" else 0)
    return choose_backend(rows, cfg.heads, tokens, cfg.width // cfg.heads, dtype, device)


def text_flops_per_sample(cfg: TextGeneratorConfig) -> float:
    """The flow transformer's forward FLOPs plus each block's caption path and the caption projection."""
    T, L, D = (cfg.grid // cfg.patch_size) ** 2, cfg.text_length, cfg.width
    if cfg.text_attention == "cross":
        per_block = 2 * T * 2 * D * D + 2 * L * 2 * D * D + 4 * T * L * D  # q and out; k and v; QK^T and AV
    else:  # the caption stream's qkv, proj and MLP (the last block: qkv only), and the attention's extra L keys
        # and queries
        hidden = int(D * cfg.mlp_ratio) if cfg.mlp == "gelu" else int(2 * D * cfg.mlp_ratio / 3)
        mlp = 2 * D * hidden if cfg.mlp == "gelu" else 3 * D * hidden
        attention = 4 * ((T + L) ** 2 - T * T) * D
        per_block = 2 * L * (4 * D * D + mlp) + attention
        last_block = 2 * L * 3 * D * D + attention
        return forward_flops_per_sample(cfg) + (cfg.depth - 1) * per_block + last_block + 2 * L * cfg.text_dim * D
    return forward_flops_per_sample(cfg) + cfg.depth * per_block + 2 * L * cfg.text_dim * D

