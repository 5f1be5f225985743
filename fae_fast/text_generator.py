"""The flow transformer conditioned on captions (TextGeneratorConfig): SiT / LightningDiT blocks, each followed
by cross-attention from the latent tokens to the caption's token embeddings (a frozen SigLIP 2 text
tower's, fae_fast/text.py), and the adaLN input the time embedding plus the caption tokens' mean.

Cross-attention (PixArt-style) rather than joint text-image attention (MMDiT): it keeps the self-attention
shape, and with it the fused RoPE + QK-norm kernel and the attention backend measured for 256 latent tokens,
and adds one small attention over 64 caption tokens per block. A measured comparison of the two is still to
be made. Every cross-attention output projection starts at zero, so a fresh model is the class-free flow
transformer with the caption's mean in its adaLN input.

Trained with the flow transformer's flow-matching loss and sampled with its samplers (fae_fast/families.py);
guidance batches a caption's embeddings with the null caption's (zeros).
"""
import torch.nn as nn
import torch.nn.functional as F

from fae_fast.conditioning import TextEmbeddings
from fae_fast.config import TextGeneratorConfig
from fae_fast.generators import Block, Generator, forward_flops_per_sample, patchify_latents, unpatchify_latents


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
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class TextBlock(Block):
    """The flow transformer's block, then x += cross_attention(x, caption)."""

    def __init__(self, cfg: TextGeneratorConfig, ops):
        super().__init__(cfg, ops)
        self.cross = CrossAttention(cfg.width, cfg.heads)

    def forward(self, x, c, text):
        x = super().forward(x, c)
        return x + self.cross(x, text)


class TextGenerator(Generator):
    """Velocity model v(x_t, t, caption): x_t (B, T, C), t (B,) in [0, 1] with 0 = noise, caption token
    embeddings (B, L, text_dim)."""

    def build_conditioning(self, cfg: TextGeneratorConfig) -> None:
        self.conditioning = TextEmbeddings(cfg.caption_dropout)
        self.text_embed = nn.Sequential(nn.LayerNorm(cfg.text_dim, eps=1e-6), nn.Linear(cfg.text_dim, cfg.width))

    def make_block(self, cfg: TextGeneratorConfig) -> nn.Module:
        return TextBlock(cfg, self.ops)

    def initialize_weights(self):
        """The flow transformer's, and every cross-attention output projection at zero."""
        super().initialize_weights()
        for block in self.blocks:
            nn.init.zeros_(block.cross.proj.weight)
            nn.init.zeros_(block.cross.proj.bias)

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
            h = block(h, c, tokens)
        return unpatchify_latents(self.final(h, c), cfg.grid, cfg.patch_size)


def text_flops_per_sample(cfg: TextGeneratorConfig) -> float:
    """The flow transformer's forward FLOPs plus each block's cross-attention and the caption projection."""
    T, L, D = (cfg.grid // cfg.patch_size) ** 2, cfg.text_length, cfg.width
    cross = 2 * T * 2 * D * D + 2 * L * 2 * D * D + 4 * T * L * D  # q and out; k and v; QK^T and AV
    return forward_flops_per_sample(cfg) + cfg.depth * cross + 2 * L * cfg.text_dim * D

