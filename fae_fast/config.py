"""Configs: dataclasses with one docstring per field, one size registry, named recipes, CLI overrides.

A recipe is a function returning a complete config (`RECIPES["lightningdit-xl-80ep"]()`); the command
line picks one with `--recipe NAME` and changes single fields with `--section.field=value`.
Values the paper does not publish are chosen here, next to the field, and said in the README.
"""
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from fae_fast.attention import BACKENDS


# ----------------------------------------------------------------------------------------------------
# Model configs
# ----------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class EncoderConfig:
    """The frozen pretrained encoder whose patch features FAE compresses."""

    timm_name: str = "vit_giant_patch14_reg4_dinov2.lvd142m"
    """timm model name (DINOv2-g/14 with registers by default; any timm ViT in principle)."""
    image_size: int = 224
    """Input resolution; image_size / patch_size must equal the latent grid (16)."""
    patch_size: int = 14
    """Patch size of the encoder (14 for DINOv2, 16 for SigLIP2 at 256 px)."""
    feature_dim: int = 1536
    """Channels of the patch features the encoder returns."""
    pretrained: bool = True
    """Load pretrained weights from the timm hub (needs network or a filled hub cache)."""
    weights_path: str = ""
    """A local weights file (safetensors or torch) used instead of the hub when set."""
    noise_sigma: float = 0.4
    """Std of the Gaussian noise added to features when training the pixel decoder (paper: 0.4 for
    DINOv2-g). For other encoders scale it by the ratio of their mean feature norm to DINOv2-g's."""


@dataclass(kw_only=True)
class FAEConfig:
    """FAE: one-attention-layer encoder to latents, a feature decoder and a pixel decoder."""

    feature_dim: int = 1536
    """Channels of the encoder features (input of the FAE encoder, output of the feature decoder)."""
    latent_dim: int = 32
    """Latent channels per token (16x16x32 latents)."""
    grid: int = 16
    """Tokens per side of the latent grid."""
    enc_heads: int = 24
    """Heads of the FAE encoder's single self-attention layer."""
    enc_head_dim: int = 256
    """Head dimension of that layer (24 x 256 = 6144-wide qkv)."""
    dec_depth: int = 6
    """Transformer layers of the feature decoder."""
    dec_width: int = 1536
    """Width of the feature decoder."""
    dec_heads: int = 24
    """Heads of the feature decoder."""
    dec_mlp_ratio: float = 4.0
    """MLP ratio of the feature decoder; SwiGLU hidden = 2/3 * ratio * width (parameter-matched)."""
    pix_depth: int = 24
    """Transformer layers of the pixel decoder (ViT-L)."""
    pix_width: int = 1024
    """Width of the pixel decoder."""
    pix_heads: int = 16
    """Heads of the pixel decoder."""
    image_size: int = 256
    """Output resolution of the pixel decoder."""
    kl_beta: float = 1e-6
    """KL weight per latent element in stage Ia (not published; small so the latent stays informative)."""


class LatentModel(typing.Protocol):
    """What the data layer (the latent sources and the cache) reads of any generator family's config: the
    latent grid it models, its channels, and its number of classes (its class conditioning)."""

    grid: int
    in_channels: int
    num_classes: int


@dataclass(kw_only=True)
class GeneratorConfig:
    """SiT / LightningDiT flow-matching transformer on the latent grid (one block class, options)."""

    depth: int = 28
    """Number of transformer blocks."""
    width: int = 1152
    """Hidden size."""
    heads: int = 16
    """Attention heads (head dim = width / heads)."""
    mlp_ratio: float = 4.0
    """MLP hidden = ratio * width for GELU; 2/3 of that for SwiGLU (parameter-matched)."""
    in_channels: int = 32
    """Latent channels."""
    grid: int = 16
    """Latent cells per side (16 for FAE latents)."""
    patch_size: int = 1
    """Latent cells per token side (1 on FAE latents; 2 for the published SiT-XL/2 on SD-VAE latents)."""
    learn_sigma: bool = False
    """Output layer also predicts a variance (2C outputs, dropped in forward): only to load published
    checkpoints that have it."""
    num_classes: int = 1000
    """Class labels; index num_classes is the null label used for classifier-free guidance."""
    class_dropout: float = 0.1
    """Probability of replacing a label by the null label during training (CFG)."""
    norm: str = "layer"
    """'layer' (SiT: LayerNorm without affine) or 'rms' (LightningDiT: RMSNorm)."""
    mlp: str = "gelu"
    """'gelu' (SiT) or 'swiglu' (LightningDiT)."""
    rope: bool = False
    """2-D rotary position embedding on q and k (LightningDiT) instead of a fixed sin-cos table."""
    qk_norm: bool = False
    """RMSNorm on q and k before attention (LightningDiT option)."""
    pos_embed: bool = True
    """Add the fixed 2-D sin-cos position embedding to the tokens (SiT; LightningDiT keeps it with RoPE)."""
    time_scale: float = 1000.0
    """The timestep embedder embeds time_scale * t (t in [0, 1], 0 = noise): 1000 in fae_fast's own models
    (DiT's range), 1 in published SiT and LightningDiT checkpoints (fae_fast.adapters sets it)."""


@dataclass(kw_only=True)
class TextGeneratorConfig(GeneratorConfig):
    """The flow transformer conditioned on caption token embeddings (a frozen SigLIP 2 text tower's, fae_fast/
    text.py) instead of class labels: each block adds cross-attention from the latent tokens to the caption
    tokens, and the adaLN input adds the caption tokens' mean to the time embedding
    (fae_fast/text_generator.py)."""

    text_dim: int = 1152
    """Width of the caption token embeddings (SigLIP 2 So400m's text tower: 1152)."""
    text_length: int = 64
    """Caption tokens per caption (SigLIP 2 pads captions to 64)."""
    caption_dropout: float = 0.1
    """Probability of replacing a caption by the null caption (all-zero embeddings) in training (CFG)."""
    text_attention: str = "joint"
    """How the caption enters each block: 'joint' (one attention over latent and caption tokens, the caption a
    second stream with its own weights, MMDiT-style) or 'cross' (cross-attention from the latent tokens to
    the caption tokens, PixArt-style). Joint by a measured comparison on the toy captions (README): at the
    same depth it reached a 6x lower Frechet distance for 21% more FLOPs (4% more at XL size), and cross
    needed 38% more FLOPs than joint (two more layers) to edge past it."""


@dataclass(kw_only=True)
class StarFlowConfig:
    """STARFlow-style normalizing flow on the latent grid (fae_fast/starflow.py): TARFlow blocks, each a causal
    transformer giving every token an affine map conditioned on the tokens before it, the token order flipped
    from block to block; one deep block (most of the capacity, the class-conditioned one, the first to run
    when sampling) after `shallow_blocks` shallow ones. Its layers are LightningDiT's (RMSNorm, SwiGLU, 2-D
    RoPE, QK-norm, adaLN on the class embedding in the deep block and on a learned vector in the others)."""

    width: int = 1152
    """Hidden size of every block's transformer."""
    heads: int = 16
    """Attention heads (head dim = width / heads, divisible by 4 for 2-D RoPE)."""
    deep_layers: int = 24
    """Transformer layers of the deep block."""
    shallow_blocks: int = 5
    """Shallow blocks, between the data and the deep block."""
    shallow_layers: int = 2
    """Transformer layers of each shallow block."""
    mlp_ratio: float = 4.0
    """SwiGLU hidden = 2/3 * ratio * width (parameter-matched to a GELU MLP of this ratio)."""
    in_channels: int = 32
    """Latent channels."""
    grid: int = 16
    """Latent cells per side; every cell is one token."""
    num_classes: int = 1000
    """Class labels; index num_classes is the null label used for guidance."""
    class_dropout: float = 0.1
    """Probability of replacing a label by the null label during training (guidance)."""
    noise_std: float = 0.3
    """Std of the Gaussian noise added to the latents in training (the flow models the noisy latents; the
    sampler denoises its output with the flow's own score). STARFlow's value on SD-VAE latents."""
    denoise: bool = True
    """After sampling, take one denoising step x + noise_std^2 * grad log p(x) (Tweedie, the flow's score)."""


@dataclass(kw_only=True)
class TransportConfig:
    """Flow-matching interpolant and training-time t distribution (conventions in transport.py)."""

    t_sampling: str = "uniform"
    """'uniform' or 'logit_normal'."""
    logit_mean: float = 0.0
    """Mean of the logit-normal t distribution."""
    logit_std: float = 1.0
    """Std of the logit-normal t distribution."""
    time_shift: float = 1.0
    """Shift s applied to training t (t' = s t / (1 + (s-1) t), t = 0 noise); paper: 0.4."""
    cosine_weight: float = 0.0
    """Weight of the velocity-direction (cosine) loss term; 0 disables it."""


@dataclass(kw_only=True)
class SamplerConfig:
    """How samples are drawn from a trained generator."""

    method: str = "euler"
    """'euler' or 'heun' (fixed-step ODE), 'euler_maruyama' (SDE), or an adaptive ODE solver of torchdiffeq:
    'dopri5' (SiT's and LightningDiT's), 'dopri8', 'bosh3', 'adaptive_heun', 'fehlberg2'."""
    steps: int = 250
    """Integration steps (fixed-step methods)."""
    atol: float = 1e-6
    """Absolute error tolerance of the adaptive solvers (SiT's default)."""
    rtol: float = 1e-3
    """Relative error tolerance of the adaptive solvers (SiT's default)."""
    time_shift: float = 1.0
    """Shift of the sampling time grid (paper: 0.4)."""
    cfg: list[tuple[float, float, float]] = field(default_factory=list)
    """Guidance on intervals: (t_start, t_end, scale) with t = 0 noise; empty means no guidance."""
    guide_channels: int = 0
    """Latent channels guidance applies to: 0 = all (fae_fast's default on FAE latents); 3 samples a published
    SiT / LightningDiT checkpoint under its authors' protocol (their samplers guide the first 3 only)."""


# ----------------------------------------------------------------------------------------------------
# Training configs
# ----------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class OptimConfig:
    """AdamW, schedule, clipping and EMA."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay (not published for the generator; 0 as in SiT/LightningDiT)."""
    schedule: str = "constant"
    """'constant' or 'cosine'."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    grad_clip: float = 1.0
    """Max global gradient norm (not published; 1.0 as in LightningDiT); 0 disables clipping."""
    ema_decay: float = 0.9999
    """Decay of the fp32 EMA of the weights (not published; 0.9999 as in SiT/LightningDiT)."""


@dataclass(kw_only=True)
class DataConfig:
    """Where training latents come from."""

    source: str = "toy"
    """'toy' (embedded class-conditional Gaussian mixture, no files), 'toy_captions' (the same latents with
    caption embeddings for a text-conditioned model: fae_fast/data/toy_captions.py), 'synthetic' (random
    latents for benchmarks) or 'cache' (a latent cache written by training/extract_latents.py)."""
    path: str = ""
    """Latent cache folder (source='cache')."""
    global_batch: int = 512
    """Batch over all ranks; must divide by the world size."""
    random_flip: bool = True
    """Use the horizontally flipped latent of an image half of the time (cache must hold flips)."""
    seed: int = 0
    """Seed of data order and of the toy distribution."""
    skip: list[tuple[int, int]] = field(default_factory=list)
    """Data batches never trained on, as inclusive ranges of batch indices [(first, last), ...]: training
    step n reads the n-th batch index outside them. The loss-spike guard adds the ranges it skips (kept in
    checkpoints); set them by hand to replay a run without those batches."""


PRECISIONS = ("bf16", "fp8", "fp32")
"""The values of RunConfig.precision (fp8: the generator only)."""
CUDA_GRAPH_CHOICES = ("auto", "on", "off")
"""The values of RunConfig.cuda_graph."""
ATTENTION_CHOICES = ("auto", *BACKENDS)
"""The values of RunConfig.attention: "auto" or one of fae_fast.attention's backends."""


@dataclass(kw_only=True)
class RunConfig:
    """Length, logging, checkpoints and performance switches of a run."""

    steps: int = 200_000
    """Optimizer steps."""
    out_dir: str = "runs/gen"
    """Folder for checkpoints, logs, plots and samples."""
    log_every: int = 100
    """Steps between log lines."""
    ckpt_every: int = 5000
    """Steps between checkpoints."""
    sample_every: int = 20_000
    """Steps between sample grids (0 disables)."""
    seed: int = 0
    """Seed of model init and noise."""
    impl: str = "auto"
    """'auto' (triton on CUDA, torch elsewhere), 'triton' or 'torch' for the fused layers."""
    compile: bool = True
    """torch.compile each block."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory, costs ~1/3 more compute)."""
    precision: str = "bf16"
    """'bf16' (bf16 params/compute, fp32 master weights and reductions), 'fp8' (bf16, and the blocks'
    attention and MLP linears run their forward and input-gradient GEMMs in FP8 with rowwise scales:
    fae_fast/fp8.py; CUDA with FP8 tensor cores, e.g. H100/H200) or 'fp32'."""
    fp8_weight_gradient: bool = False
    """With run.precision=fp8: the weight-gradient GEMM in FP8 too, with tensorwise scales made from the
    rowwise FP8 copies of x and dy the other two GEMMs use (fae_fast/fp8.py); off, it stays bf16."""
    fp8_bf16_end_blocks: int = 0
    """With run.precision=fp8: the first and the last this many blocks keep bf16 linears, the rest go FP8 (as
    Megatron-LM's --first-last-layers-bf16: the network's ends are where FP8's rounding tends to cost most)."""
    fp8_all_gather: bool = True
    """With run.precision=fp8 under FSDP2: all-gather the FP8 linears' weights in FP8 (1 byte a value and a scale
    a row, against 2 bytes in bf16), each rank quantising its rows as the forward would (fae_fast/fp8_fsdp.py:
    the same forward, bit for bit). Ignored without FSDP2 or FP8."""
    attention: str = "auto"
    """Attention backend on CUDA: 'auto' (per shape, the fastest whose output and gradients agree with fp32
    attention: fae_fast/attention.py) or one of 'sdpa_cudnn', 'sdpa_flash', 'sdpa_efficient', 'flash_attn',
    'xformers' (still checked against fp32 attention: a wrong one stops the run). Ignored on CPU."""
    fsdp: str = "auto"
    """'auto' (FSDP2 when there is more than one rank; one rank runs bf16 autocast, ~10% faster), 'on', 'off'."""
    cuda_graph: str = "off"
    """train_gen.py: capture the whole training step (forward, backward, clipping, AdamW) as one CUDA graph
    after a few eager steps (GraphedStep.warmup) and replay it (fae_fast/train/cuda_graph.py): 'on', 'off',
    or 'auto' (on for one CUDA rank without FSDP2 and without activation checkpointing). The same steps,
    losses and weights as eager; it removes host time, which matters most for run.precision=fp8."""
    eval_samples: int = 0
    """Samples drawn at the end to score the run (toy: Frechet distance to the true distribution)."""
    eval_every: int = 0
    """Steps between evaluations during training (0 or eval_samples=0: none; a multiple of log_every):
    eval_samples samples from a fixed seed with the EMA weights and the sampler config, scored against the
    toy's true distribution (Frechet, data.source='toy') or, on a latent cache with eval_ref and fae_decoder,
    as the FID of the decoded images (a cache run without eval_ref is not evaluated); logged beside the loss
    (history.json, tensorboard) and drawn on loss.png."""
    eval_ref: str = ""
    """Reference of the in-training FID (data.source='cache'): ADM's reference batch .npz or an image folder,
    scored with the TF-Inception network as evaluate.py does (FID-10k with eval_samples=10000)."""
    spike_factor: float = 2.0
    """Loss-spike guard: a step whose loss (mean over ranks) exceeds spike_factor x the median of the last
    spike_window clean steps, spike_patience steps in a row, is a spike; the run rolls back to the newest
    checkpoint before it and skips its batches (data.skip). 0 turns the guard off (the NaN guard stays)."""
    spike_window: int = 200
    """Clean steps whose median the guard compares against (it starts judging after 50 of them)."""
    spike_patience: int = 3
    """Consecutive steps above the threshold that make a spike (one noisy step does not)."""
    spike_max_rollbacks: int = 3
    """Rollbacks allowed within 10 x ckpt_every steps; one more stops the run naming the steps and losses."""


@dataclass(kw_only=True)
class GenTrainConfig:
    """Everything train_gen.py needs."""

    model: GeneratorConfig | StarFlowConfig = field(default_factory=GeneratorConfig)
    """The generator: the config of a registered family (fae_fast/families.py): GeneratorConfig (SiT /
    LightningDiT), its subclass TextGeneratorConfig, or StarFlowConfig; a recipe picks it, and `--model.x`
    sets a field of whichever it picked."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """Interpolant and t distribution."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Sampler for grids and evaluation."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run length and switches."""
    fae_decoder: str = ""
    """The whole-FAE file (fae.safetensors of train_fae.py --stage=pixel-finetune, its fae_config.json
    beside it): sample grids are decoded to images with it, de-normalised with the latent cache's
    stats.json (data.source='cache' only). Empty: grids show the first three latent channels."""


# ----------------------------------------------------------------------------------------------------
# Size registry: the one place where model sizes live
# ----------------------------------------------------------------------------------------------------
_SIT = dict(norm="layer", mlp="gelu", rope=False, qk_norm=False)
_LIGHTNING = dict(norm="rms", mlp="swiglu", rope=True, qk_norm=True)

GENERATOR_SIZES: dict[str, dict] = {
    "SiT-tiny/1": dict(depth=2, width=64, heads=4, **_SIT),
    "SiT-S/1": dict(depth=12, width=384, heads=6, **_SIT),
    "SiT-B/1": dict(depth=12, width=768, heads=12, **_SIT),
    "SiT-L/1": dict(depth=24, width=1024, heads=16, **_SIT),
    "SiT-XL/1": dict(depth=28, width=1152, heads=16, **_SIT),
    "SiT-XL/2": dict(depth=28, width=1152, heads=16, patch_size=2, in_channels=4, grid=32, learn_sigma=True, **_SIT),
    "LightningDiT-tiny/1": dict(depth=2, width=64, heads=4, **_LIGHTNING),
    "LightningDiT-B/1": dict(depth=12, width=768, heads=12, **_LIGHTNING),
    "LightningDiT-XL/1": dict(depth=28, width=1152, heads=16, **_LIGHTNING),
}

FAE_SIZES: dict[str, dict] = {
    "FAE-DINOv2-g": dict(feature_dim=1536),
    "FAE-DINOv2-B": dict(feature_dim=768, enc_heads=12, dec_width=768, dec_heads=12),
    "FAE-SigLIP2-So400m": dict(feature_dim=1152, enc_heads=18, dec_width=1152, dec_heads=18),
    "FAE-tiny": dict(
        feature_dim=192, latent_dim=4, grid=4, enc_heads=2, enc_head_dim=16, dec_depth=2, dec_width=48,
        dec_heads=4, pix_depth=2, pix_width=32, pix_heads=2, image_size=64,
    ),
}

ENCODER_SIZES: dict[str, dict] = {
    "DINOv2-g/14": dict(timm_name="vit_giant_patch14_reg4_dinov2.lvd142m", patch_size=14, feature_dim=1536),
    "DINOv2-B/14": dict(timm_name="vit_base_patch14_reg4_dinov2.lvd142m", patch_size=14, feature_dim=768),
    "SigLIP2-So400m/16": dict(
        timm_name="vit_so400m_patch16_siglip_256.v2_webli", image_size=256, patch_size=16, feature_dim=1152,
        noise_sigma=0.4 * 1.0,  # rescale by measured feature-norm ratio before serious use (see README)
    ),
    "tiny": dict(timm_name="vit_tiny_patch16_224", image_size=64, patch_size=16, feature_dim=192, pretrained=False),
}

FAE_SIZE_OF_ENCODER: dict[str, str] = {
    "DINOv2-g/14": "FAE-DINOv2-g", "DINOv2-B/14": "FAE-DINOv2-B", "SigLIP2-So400m/16": "FAE-SigLIP2-So400m",
    "tiny": "FAE-tiny",
}
"""The FAE size that belongs to each registered encoder (the FAE reads that encoder's features)."""


def _from_registry(registry: dict, name: str, kind: str) -> dict:
    if name not in registry:
        known = ", ".join(sorted(registry))
        raise ValueError(f"unknown {kind} size {name!r}; choose one of: {known}")
    return dict(registry[name])


def generator_config(name: str, **overrides) -> GeneratorConfig:
    """GeneratorConfig for a registered size, e.g. generator_config('LightningDiT-XL/1')."""
    return GeneratorConfig(**{**_from_registry(GENERATOR_SIZES, name, "generator"), **overrides})


def fae_config(name: str, **overrides) -> FAEConfig:
    """FAEConfig for a registered size, e.g. fae_config('FAE-DINOv2-g')."""
    return FAEConfig(**{**_from_registry(FAE_SIZES, name, "FAE"), **overrides})


def encoder_config(name: str, **overrides) -> EncoderConfig:
    """EncoderConfig for a registered encoder, e.g. encoder_config('DINOv2-g/14')."""
    return EncoderConfig(**{**_from_registry(ENCODER_SIZES, name, "encoder"), **overrides})


# ----------------------------------------------------------------------------------------------------
# Validation: configs that cannot work fail here with one sentence
# ----------------------------------------------------------------------------------------------------
def validate_generator(cfg: GeneratorConfig) -> None:
    if cfg.width % cfg.heads:
        raise ValueError(f"generator width {cfg.width} is not divisible by heads {cfg.heads}; pick heads that divide it")
    head_dim = cfg.width // cfg.heads
    if cfg.rope and head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}; change width or heads")
    if cfg.grid % cfg.patch_size:
        raise ValueError(f"latent grid {cfg.grid} is not divisible by patch size {cfg.patch_size}")
    if cfg.norm not in ("layer", "rms"):
        raise ValueError(f"generator norm {cfg.norm!r} is not 'layer' or 'rms'")
    if cfg.mlp not in ("gelu", "swiglu"):
        raise ValueError(f"generator mlp {cfg.mlp!r} is not 'gelu' or 'swiglu'")


def validate_starflow(cfg: StarFlowConfig) -> None:
    if cfg.width % cfg.heads or (cfg.width // cfg.heads) % 4:
        raise ValueError(f"flow width {cfg.width} / heads {cfg.heads} must give a whole head dim divisible by 4 "
                         f"(2-D RoPE); pick heads that do")
    if cfg.deep_layers < 1 or cfg.shallow_blocks < 0 or (cfg.shallow_blocks and cfg.shallow_layers < 1):
        raise ValueError(f"flow needs deep_layers >= 1 and shallow blocks of >= 1 layer, got deep_layers="
                         f"{cfg.deep_layers}, shallow_blocks={cfg.shallow_blocks}, shallow_layers={cfg.shallow_layers}")
    if cfg.noise_std < 0:
        raise ValueError(f"model.noise_std={cfg.noise_std} is negative; the training noise std is >= 0")


def validate_fae(cfg: FAEConfig) -> None:
    if cfg.dec_width % cfg.dec_heads:
        raise ValueError(f"feature decoder width {cfg.dec_width} is not divisible by heads {cfg.dec_heads}; "
                         f"set fae.dec_heads to a divisor of {cfg.dec_width}")
    if cfg.pix_width % cfg.pix_heads:
        raise ValueError(f"pixel decoder width {cfg.pix_width} is not divisible by heads {cfg.pix_heads}; "
                         f"set fae.pix_heads to a divisor of {cfg.pix_width}")
    if cfg.image_size % cfg.grid:
        raise ValueError(f"image size {cfg.image_size} is not a multiple of the latent grid {cfg.grid}; "
                         f"set fae.image_size to a multiple of {cfg.grid} (the paper: 256 on 16)")


def validate_encoder(cfg: EncoderConfig, grid: int) -> None:
    if cfg.image_size % cfg.patch_size or cfg.image_size // cfg.patch_size != grid:
        raise ValueError(
            f"encoder {cfg.timm_name} at {cfg.image_size} px with patch {cfg.patch_size} gives a "
            f"{cfg.image_size / cfg.patch_size:g}x{cfg.image_size / cfg.patch_size:g} grid, not {grid}x{grid}; "
            f"set encoder.image_size={grid * cfg.patch_size}"
        )


# ----------------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------------
def demo() -> GenTrainConfig:
    """The embedded default: a tiny generator on a toy class-conditional Gaussian mixture, CPU, minutes."""
    return GenTrainConfig(
        model=generator_config("LightningDiT-tiny/1", in_channels=4, grid=4, num_classes=8, width=96, heads=4, depth=3),
        transport=TransportConfig(t_sampling="logit_normal"),
        sampler=SamplerConfig(method="heun", steps=32, cfg=[]),
        optim=OptimConfig(lr=1e-3, grad_clip=1.0, ema_decay=0.995, warmup_steps=50),
        data=DataConfig(source="toy", global_batch=256),
        run=RunConfig(
            steps=1500, out_dir="runs/demo", log_every=100, ckpt_every=500, sample_every=0,
            compile=False, precision="fp32", eval_samples=2048, eval_every=500,
        ),
    )


def _paper_generator(size: str, steps: int) -> GenTrainConfig:
    # Table D / Section 4 of the paper: batch 512, AdamW 1e-4 constant, no warmup, time shift 0.4.
    return GenTrainConfig(
        model=generator_config(size),
        transport=TransportConfig(t_sampling="uniform", time_shift=0.4),
        sampler=SamplerConfig(method="euler_maruyama", steps=250, time_shift=0.4),
        optim=OptimConfig(lr=1e-4, betas=(0.9, 0.999), schedule="constant", warmup_steps=0),
        data=DataConfig(source="cache", global_batch=512),
        run=RunConfig(steps=steps, out_dir=f"runs/{size.replace('/', '_')}-{steps // 1000}k"),
    )


def lightningdit_xl_80ep() -> GenTrainConfig:
    """LightningDiT-XL/1 on FAE latents, 80 epochs = 200k steps at batch 512 (paper gFID 2.08 / 1.70 CFG)."""
    return _paper_generator("LightningDiT-XL/1", 200_000)


def lightningdit_xl_800ep() -> GenTrainConfig:
    """LightningDiT-XL/1, 800 epochs = 2M steps at batch 512 (paper gFID 1.48 / 1.29 CFG)."""
    return _paper_generator("LightningDiT-XL/1", 2_000_000)


def sit_xl_80ep() -> GenTrainConfig:
    """SiT-XL/1 (LayerNorm, GELU, absolute positions) on FAE latents, 80 epochs."""
    return _paper_generator("SiT-XL/1", 200_000)


def synthetic_xl_benchmark() -> GenTrainConfig:
    """LightningDiT-XL/1 on random latents at batch 128 per GPU: throughput measurement, no data needed."""
    cfg = _paper_generator("LightningDiT-XL/1", 50)
    cfg.data = DataConfig(source="synthetic", global_batch=128)
    cfg.run.log_every, cfg.run.ckpt_every, cfg.run.sample_every = 10, 0, 0
    return cfg


def t2i_demo() -> GenTrainConfig:
    """A tiny text-conditioned LightningDiT on the toy latents with captions naming each class's colour and
    shape in three wordings (fae_fast/data/toy_captions.py), CPU, minutes."""
    cfg = demo()
    cfg.model = TextGeneratorConfig(**{**dataclasses.asdict(cfg.model), "text_dim": 32, "text_length": 8,
                                       "caption_dropout": 0.1})
    cfg.data.source = "toy_captions"
    cfg.run.out_dir = "runs/t2i-demo"
    return cfg


def t2i_1b() -> GenTrainConfig:
    """The paper's text-to-image scale (about 1.1B parameters: 1.088B) on FAE latents of caption data:
    LightningDiT-XL/1's width, heads and layers (the library's fastest kernels) in 23 joint text-image blocks,
    conditioned on SigLIP 2 So400m's caption tokens (1152 wide, 64 long), caption dropout 0.1 for guidance.
    The paper gives the size, not the layout: the depth is the one whose parameter count is nearest 1.1B
    with the joint blocks chosen on the toy captions (README). Batch and steps are ours: batch 512 as in the
    class-conditional recipes, 400k steps (about 17 passes over CC12M's ~12M pairs); data: a caption cache."""
    base = generator_config("LightningDiT-XL/1")
    model = TextGeneratorConfig(**{**dataclasses.asdict(base), "depth": 23, "text_dim": 1152, "text_length": 64,
                                   "caption_dropout": 0.1, "text_attention": "joint"})
    cfg = _paper_generator("LightningDiT-XL/1", 400_000)
    cfg.model = model
    cfg.run.out_dir = "runs/t2i-1b"
    return cfg


def starflow_demo() -> GenTrainConfig:
    """A tiny STARFlow on the same toy mixture as `demo`: exact-likelihood training, CPU, minutes."""
    cfg = demo()
    cfg.model = StarFlowConfig(in_channels=4, grid=4, num_classes=8, width=96, heads=4, deep_layers=3,
                               shallow_blocks=2, shallow_layers=1, noise_std=0.05)
    cfg.run.out_dir = "runs/starflow-demo"
    return cfg


def starflow_imagenet256() -> GenTrainConfig:
    """STARFlow on FAE latents of ImageNet 256 (16x16x32), class-conditional. Layout of STARFlow's released
    configuration (five shallow blocks of 2 layers, one deep block of 24; noise 0.3, label dropout 0.1,
    AdamW); width 1152 / 16 heads, the XL width of the diffusion recipes, so that one set of kernels and
    shapes serves both (STARFlow publishes no class-conditional ImageNet configuration file)."""
    return GenTrainConfig(
        model=StarFlowConfig(),
        sampler=SamplerConfig(cfg=[(0.0, 1.0, 1.5)]),
        optim=OptimConfig(lr=1e-4, betas=(0.9, 0.95), schedule="constant", warmup_steps=1000, grad_clip=1.0),
        data=DataConfig(source="cache", global_batch=512),
        run=RunConfig(steps=200_000, out_dir="runs/starflow-imagenet256"),
    )


RECIPES: dict[str, typing.Callable[[], object]] = {
    "demo": demo,
    "lightningdit-xl-80ep": lightningdit_xl_80ep,
    "lightningdit-xl-800ep": lightningdit_xl_800ep,
    "sit-xl-80ep": sit_xl_80ep,
    "synthetic-xl-benchmark": synthetic_xl_benchmark,
    "starflow-demo": starflow_demo,
    "starflow-imagenet256": starflow_imagenet256,
    "t2i-demo": t2i_demo,
    "t2i-1b": t2i_1b,
}


def recipe(name: str):
    """The config of a named recipe."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()


# ----------------------------------------------------------------------------------------------------
# Configs saved beside weights (the command line is fae_fast/cli.py)
# ----------------------------------------------------------------------------------------------------
def config_from_json(path, cls, sections: tuple[str, ...] = ()):
    """A `cls` dataclass from a JSON file: the first of `sections` present, else the top level."""
    saved = json.loads(Path(path).read_text())
    values = next((saved[s] for s in sections if isinstance(saved.get(s), dict)), saved)
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(values) - known):
        raise ValueError(f"{path} has fields {unknown} that {cls.__name__} does not know; is it the right file?")
    return cls(**values)


def to_dict(cfg) -> dict:
    """Plain-dict view of a config (for logs and checkpoints)."""
    return dataclasses.asdict(cfg)
