"""FAE: a one-attention-layer encoder from frozen features to Gaussian latents, and two decoders.

    x (B, T, F) frozen features --FAEEncoder--> moments (B, T, 2C) = [mu | logvar] --reparameterize--> z (B, T, C)
    z --FeatureDecoder--> x_hat (B, T, F)           (stage Ia: |x_hat - x|^2 + beta * KL)
    x or x_hat --PixelDecoder--> image (B, 3, S, S) (stages Ib / II)

Tokens are row-major on the grid: t = row * grid + col, T = grid * grid (16 x 16 in the paper).
All three models are built from one pre-norm `TransformerLayer` with options.

Initialisation (ViT/MAE practice, as in generators.py): Xavier-uniform weights and zero biases for every
linear, the fused qkv treated as one matrix; norms start at weight 1, bias 0. No zero-init output layer:
nothing here is adaLN-modulated, so there is no identity block to start from.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fae_fast.config import FAEConfig, validate_fae
from fae_fast.kernels import reparameterize as reparameterize_kernel
from fae_fast.layers import Attention, Ops, make_mlp, sincos_pos_embed_2d


def make_norm(kind: str, dim: int) -> nn.Module:
    """Un-modulated pre-norm: 'layer' (LayerNorm with affine) or 'rms' (RMSNorm with weight)."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=1e-6)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=1e-6)
    raise ValueError(f"norm {kind!r} is not 'layer' or 'rms'")


class TransformerLayer(nn.Module):
    """Pre-norm layer: x += attn(norm1(x)); x += mlp(norm2(x)). mlp=None leaves attention only
    (the FAE encoder); rope_grid=g rotates q and k by 2-D RoPE on a g x g token grid."""

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, norm: str = "layer",
                 mlp: str | None = "gelu", mlp_ratio: float = 4.0, rope_grid: int | None = None, ops: Ops):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, heads, head_dim=head_dim, rope_grid=rope_grid, ops=ops)
        self.norm2 = make_norm(norm, dim) if mlp else None
        self.mlp = make_mlp(mlp, dim, mlp_ratio, ops=ops) if mlp else None

    def forward(self, x):  # (B, T, D)
        x = x + self.attn(self.norm1(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


def init_weights(model: nn.Module) -> None:
    """Xavier-uniform linears with zero biases (see the module docstring)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def _check_tokens(x: torch.Tensor, tokens: int, channels: int, what: str) -> None:
    if x.ndim != 3 or x.shape[1] != tokens or x.shape[2] != channels:
        raise ValueError(f"{what} expects (B, {tokens}, {channels}) tokens, got shape {tuple(x.shape)}; "
                         f"check the FAE config's grid and channel sizes")


# ----------------------------------------------------------------------------------------------------
# Encoder and reparameterisation
# ----------------------------------------------------------------------------------------------------
def reparameterize(moments: torch.Tensor, *, sample: bool = True, seed: int | None = None,
                   impl: str = "torch") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moments (B, T, 2C) = [mu | logvar] -> z (B, T, C), mu (B, T, C), kl (B,) summed per sample.

    z = mu + exp(logvar / 2) * eps, logvar clamped to (-30, 20) by the kernel and its reference
    (fae_fast.kernels.reparameterize, fixed as in the LDM diagonal Gaussian).
    sample=False: z = mu (eps = 0; kl is the same). With a seed the draw is reproducible; impl='triton'
    draws eps with Philox inside the kernel and impl='torch' with torch.randn, so their z differ.
    """
    mu = moments[..., : moments.shape[-1] // 2]  # (B, T, C)
    if sample and impl == "triton":
        if seed is None:  # follow torch's global RNG so that torch.manual_seed makes runs repeatable
            seed = int(torch.randint(0, 2**31 - 1, ()))
        z, kl = reparameterize_kernel.reparameterize(moments, seed)
        return z, mu, kl
    if sample:
        generator = torch.Generator(moments.device).manual_seed(seed) if seed is not None else None
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    else:
        eps = torch.zeros_like(mu)
    z, kl = reparameterize_kernel.reparameterize_ref(moments, eps)
    return (z if sample else mu), mu, kl


class FAEEncoder(nn.Module):
    """features (B, T, F) -> one self-attention layer with skip -> GELU -> linear -> moments (B, T, 2C).

    The paper's encoder: enc_heads x enc_head_dim attention (24 x 256 = 6144-wide qkv on 1536 channels),
    about 38M parameters. No position embedding: the frozen encoder's features already carry position.
    """

    def __init__(self, cfg: FAEConfig, impl: str = "auto"):
        super().__init__()
        validate_fae(cfg)
        self.cfg, self.ops = cfg, Ops(impl)
        self.layer = TransformerLayer(cfg.feature_dim, cfg.enc_heads, head_dim=cfg.enc_head_dim, norm="layer",
                                      mlp=None, ops=self.ops)
        self.to_moments = nn.Linear(cfg.feature_dim, 2 * cfg.latent_dim)
        init_weights(self)

    def forward(self, x):  # (B, T, F)
        _check_tokens(x, self.cfg.grid ** 2, self.cfg.feature_dim, "FAE encoder")
        x = x.to(self.to_moments.weight.dtype)  # frozen-encoder features arrive in their own dtype
        h = F.gelu(self.layer(x))  # (B, T, F)
        return self.to_moments(h)  # (B, T, 2C): [mu | logvar]

    def encode(self, x, sample: bool = True, seed: int | None = None):
        """features (B, T, F) -> z (B, T, C), mu (B, T, C), kl (B,); see `reparameterize`."""
        return reparameterize(self(x), sample=sample, seed=seed, impl=self.ops.impl)


# ----------------------------------------------------------------------------------------------------
# Decoders
# ----------------------------------------------------------------------------------------------------
class FeatureDecoder(nn.Module):
    """z (B, T, C) -> linear -> dec_depth layers (RMSNorm, 2-D RoPE attention, SwiGLU) -> RMSNorm -> linear
    -> x_hat (B, T, F). Paper: 6 x 1536, 24 heads, MLP ratio 4; about 170M parameters."""

    def __init__(self, cfg: FAEConfig, impl: str = "auto"):
        super().__init__()
        validate_fae(cfg)
        head_dim = cfg.dec_width // cfg.dec_heads
        if head_dim % 4:
            raise ValueError(f"feature decoder head dim {head_dim} is not divisible by 4 as 2-D RoPE needs; "
                             f"change dec_width or dec_heads")
        self.cfg, self.ops = cfg, Ops(impl)
        D = cfg.dec_width
        self.embed = nn.Linear(cfg.latent_dim, D)
        self.layers = nn.ModuleList(
            TransformerLayer(D, cfg.dec_heads, norm="rms", mlp="swiglu", mlp_ratio=cfg.dec_mlp_ratio,
                             rope_grid=cfg.grid, ops=self.ops)
            for _ in range(cfg.dec_depth))
        self.norm = make_norm("rms", D)
        self.out = nn.Linear(D, cfg.feature_dim)
        init_weights(self)

    def forward(self, z):  # (B, T, C)
        _check_tokens(z, self.cfg.grid ** 2, self.cfg.latent_dim, "feature decoder")
        h = self.embed(z.to(self.embed.weight.dtype))  # (B, T, D); bf16 under mixed precision
        for layer in self.layers:
            h = layer(h)
        return self.out(self.norm(h))  # (B, T, F)


class FeatureAutoencoder(nn.Module):
    """Stage Ia's trained pair under one root, weights named encoder.* (FAEEncoder) and decoder.*
    (FeatureDecoder): features (B, T, F) -> x_hat (B, T, F) and the per-sample KL (B,)."""

    def __init__(self, cfg, impl: str = "auto"):
        super().__init__()
        self.encoder, self.decoder = FAEEncoder(cfg, impl), FeatureDecoder(cfg, impl)

    def forward(self, x, seed: int | None = None, sample: bool = True):
        z, _, kl = self.encoder.encode(x, sample=sample, seed=seed)  # both cast inputs to their weights' dtype
        return self.decoder(z), kl


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, T, patch*patch*3), tokens row-major, each patch laid out (p, q, channel) as MAE."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int = 3) -> torch.Tensor:
    """(B, T, patch*patch*channels) -> (B, channels, grid*patch, grid*patch); the inverse of `patchify`."""
    B, T, _ = tokens.shape
    grid = int(round(T ** 0.5))
    x = tokens.reshape(B, grid, grid, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, grid * patch, grid * patch)


class PixelDecoder(nn.Module):
    """features (B, T, F) -> linear + fixed 2-D sin-cos positions -> pix_depth ViT layers (LayerNorm, GELU MLP
    ratio 4) -> LayerNorm -> linear to patch pixels -> image (B, 3, S, S), patch = S / grid.

    Paper: ViT-L (24 x 1024, 16 heads), about 305M parameters. The output is in the [-1, 1] image scale
    but not squashed (no tanh): the reconstruction losses see the raw values; clamp when saving images.
    """

    def __init__(self, cfg: FAEConfig, impl: str = "auto"):
        super().__init__()
        validate_fae(cfg)
        self.cfg, self.ops = cfg, Ops(impl)
        self.patch = cfg.image_size // cfg.grid
        D = cfg.pix_width
        self.embed = nn.Linear(cfg.feature_dim, D)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.grid, D)[None], persistent=False)  # (1, T, D)
        self.layers = nn.ModuleList(
            TransformerLayer(D, cfg.pix_heads, norm="layer", mlp="gelu", mlp_ratio=4.0, ops=self.ops)
            for _ in range(cfg.pix_depth))
        self.norm = make_norm("layer", D)
        self.out = nn.Linear(D, self.patch * self.patch * 3)
        init_weights(self)

    def forward(self, x):  # (B, T, F)
        _check_tokens(x, self.cfg.grid ** 2, self.cfg.feature_dim, "pixel decoder")
        h = self.embed(x.to(self.embed.weight.dtype))
        h = h + self.pos_embed.to(h.dtype)  # (B, T, D); the fp32 table must not promote bf16 activations
        for layer in self.layers:
            h = layer(h)
        return unpatchify(self.out(self.norm(h)), self.patch)  # (B, 3, S, S)
