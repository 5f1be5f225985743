"""Config and recipes of training/train_fae.py (stages feature | pixel | pixel-finetune).

Recipes are functions of the stage returning a complete FAETrainConfig; the command line picks one with
`--recipe NAME --stage STAGE` and changes single fields with `--section.field=value` (fae_fast.config).
Values the paper (arXiv 2512.07829, Table D) does not publish are chosen here, next to the field.
"""
import typing
from dataclasses import dataclass, field

from fae_fast.config import (ATTENTION_CHOICES, EncoderConfig, FAEConfig, OptimConfig, RunConfig, encoder_config,
                             fae_config, validate_encoder, validate_fae)

STAGES = ("feature", "pixel", "pixel-finetune")
STAGE_DOCS = {
    "feature": "stage Ia: FAE encoder + feature decoder on frozen encoder features (L2 + beta KL)",
    "pixel": "stage Ib: pixel decoder on clean features + noise (L1 + LPIPS + GAN)",
    "pixel-finetune": "stage II: pixel decoder on the feature decoder's output; writes the whole fae.safetensors",
}


@dataclass(kw_only=True)
class ImageSourceConfig:
    """Where training images come from."""

    source: str = "folder"
    """'folder' (an ImageNet-layout folder through fae_fast.data.images) or 'synthetic' (a fixed set of
    generated smooth images, made on the device: demos, tests and benchmarks)."""
    root: str = ""
    """Data root holding <split>/<class>/*.JPEG (source='folder')."""
    split: str = "train"
    """Sub-folder of root to read."""
    global_batch: int = 1024
    """Images per step over all ranks; must divide by the world size."""
    backend: str = "auto"
    """Image decoder of fae_fast.data.images: 'auto', 'dali', 'torchvision_gpu' or 'pil'."""
    workers: int = 8
    """Decoding processes or threads per rank."""
    random_flip: bool = True
    """Flip each image horizontally with probability 1/2."""
    synthetic_images: int = 64
    """Size of the generated image set (source='synthetic')."""
    seed: int = 0
    """Seed of data order, flips and generated images."""
    exclude_list: str = ""
    """Problem-file list written by `python -m fae_fast.data.check` (source='folder'): never read."""
    on_error: str = "skip"
    """A file that cannot be decoded (source='folder'): 'skip' it with a warning naming it, or 'stop'."""


@dataclass(kw_only=True)
class FAELossConfig:
    """Pixel-decoder losses (stages pixel and pixel-finetune); stage Ia's beta is FAEConfig.kl_beta."""

    l1_weight: float = 1.0
    """Weight of the mean absolute pixel error (images in [-1, 1])."""
    perceptual_weight: float = 1.0
    """Weight of the LPIPS (VGG) term (VQGAN/LDM use 1.0); 0 turns it off without loading VGG."""
    vgg_weights: str = "auto"
    """'auto' (torchvision's VGG16 from the torch hub cache, downloaded if missing) or a local copy of
    vgg16-397923af.pth. LPIPS's own linear weights come with the `lpips` package."""
    perceptual_required: bool = True
    """When the VGG16 weights cannot be had: True stops the run naming the fix (the paper recipes); False
    trains without the term after one warning (quick runs)."""
    adv_weight: float = 0.5
    """Weight of the adaptive-weighted hinge GAN term (LDM's KL-f8 autoencoder config: disc_weight 0.5)."""
    disc_start: int = 50_000
    """Step at which the discriminator starts training and the GAN term switches on (LDM: 50001)."""
    disc_lr: float = 1e-4
    """Discriminator learning rate (constant)."""
    disc_betas: tuple[float, float] = (0.5, 0.9)
    """Discriminator AdamW betas (VQGAN's)."""
    disc_channels: int = 64
    """Channels of the discriminator's first layer."""
    disc_layers: int = 3
    """Stride-2 layers of the PatchGAN discriminator (3: 70x70 patches)."""
    adaptive_weight_max: float = 1e4
    """Upper clamp of VQGAN's adaptive weight."""


@dataclass(kw_only=True)
class FAETrainConfig:
    """Everything train_fae.py needs."""

    stage: str = "feature"
    """'feature' (stage Ia: FAE encoder + feature decoder), 'pixel' (Ib: pixel decoder on noisy encoder
    features) or 'pixel-finetune' (II: the pixel decoder on the trained FAE's reconstructed features)."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The frozen pretrained encoder (noise_sigma: the stage-Ib feature noise)."""
    fae: FAEConfig = field(default_factory=FAEConfig)
    """FAE sizes and kl_beta."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer of the trained model (the discriminator's is in loss)."""
    data: ImageSourceConfig = field(default_factory=ImageSourceConfig)
    """Training images."""
    loss: FAELossConfig = field(default_factory=FAELossConfig)
    """Pixel-decoder loss terms and the discriminator."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run length and switches (eval_samples: images whose reconstruction is scored at the end)."""
    fae_weights: str = ""
    """pixel-finetune: the trained FAE (the feature stage's ema.safetensors, or a checkpoint folder);
    'random' for a randomly initialised FAE (speed runs only: the benchmark recipe)."""
    pixel_init: str = ""
    """pixel-finetune: pixel-decoder weights to start from (the pixel stage's ema.safetensors)."""


def validate(cfg: FAETrainConfig) -> None:
    """Configs that cannot work fail here with one sentence."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage {cfg.stage!r} is not one of {', '.join(STAGES)}; "
                         f"pass --stage feature|pixel|pixel-finetune")
    validate_fae(cfg.fae)
    validate_encoder(cfg.encoder, cfg.fae.grid)
    if cfg.encoder.feature_dim != cfg.fae.feature_dim:
        raise ValueError(f"encoder.feature_dim={cfg.encoder.feature_dim} differs from fae.feature_dim="
                         f"{cfg.fae.feature_dim}; set --fae.feature_dim={cfg.encoder.feature_dim}")
    if cfg.run.precision not in ("bf16", "fp32"):
        raise ValueError(f"run.precision={cfg.run.precision!r} is not 'bf16' or 'fp32' (FP8 is for the generator's "
                         f"blocks: training/train_gen.py --run.precision=fp8)")
    if cfg.run.fp8_weight_gradient or cfg.run.fp8_bf16_end_blocks:
        raise ValueError("run.fp8_weight_gradient and run.fp8_bf16_end_blocks are for the generator's FP8 linears "
                         "(training/train_gen.py --run.precision=fp8); leave them off for train_fae.py")
    if cfg.run.attention not in ATTENTION_CHOICES:
        raise ValueError(f"run.attention={cfg.run.attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if cfg.run.cuda_graph != "off":
        raise ValueError(f"run.cuda_graph={cfg.run.cuda_graph!r}: train_fae.py runs its step eagerly (the captured "
                         f"step is training/train_gen.py's); leave run.cuda_graph at 'off'")
    if cfg.data.source not in ("folder", "synthetic"):
        raise ValueError(f"data.source={cfg.data.source!r} is not 'folder' or 'synthetic'")
    if cfg.data.source == "folder" and not cfg.data.root:
        raise ValueError("data.source='folder' needs data.root; pass --data.root=/path/to/imagenet "
                         "(or --data.source=synthetic for generated images)")
    if cfg.stage == "pixel-finetune" and not cfg.fae_weights:
        raise ValueError("stage pixel-finetune needs the trained FAE; pass --fae_weights=RUN/ema.safetensors "
                         "of a feature-stage run")


# ----------------------------------------------------------------------------------------------------
# Recipes: functions of the stage
# ----------------------------------------------------------------------------------------------------
def tiny(stage: str = "feature") -> FAETrainConfig:
    """CPU demo and tests: a random tiny timm ViT (192 wide, 4x4 patches at 64 px), FAE-tiny, 48 generated
    images; the stages chain through runs/fae-tiny-<stage>/ema.safetensors."""
    pixel = stage != "feature"
    return FAETrainConfig(
        stage=stage,
        encoder=encoder_config("tiny", feature_dim=192),  # vit_tiny_patch16_224 is 192 wide
        fae=fae_config("FAE-tiny", feature_dim=192),
        optim=OptimConfig(lr=2e-3 if not pixel else 1e-3, schedule="cosine", warmup_steps=10, grad_clip=1.0,
                          ema_decay=0.98),
        data=ImageSourceConfig(source="synthetic", global_batch=16, synthetic_images=48, workers=0),
        loss=FAELossConfig(disc_start=100, disc_lr=2e-4, disc_channels=16,  # a 64-px image needs no wider D
                           perceptual_required=False),  # a quick run: without VGG16 weights, on without the term
        run=RunConfig(steps=200, out_dir=f"runs/fae-tiny-{stage}", log_every=20, ckpt_every=100, sample_every=0,
                      compile=False, precision="fp32", eval_samples=32),
        fae_weights="runs/fae-tiny-feature/ema.safetensors" if stage == "pixel-finetune" else "",
        pixel_init="runs/fae-tiny-pixel/ema.safetensors" if stage == "pixel-finetune" else "",
    )


def dinov2_g(stage: str = "feature") -> FAETrainConfig:
    """The paper on ImageNet 256 (Table D): DINOv2-g/14 at 224 px, AdamW 1e-4 betas (0.9, 0.999), cosine,
    1k warmup. feature: 1M steps at batch 1024. pixel: 1M steps at batch 512. pixel-finetune (length not
    published): 100k steps at batch 512 from the pixel stage's weights, GAN on from the start."""
    steps, batch = {"feature": (1_000_000, 1024), "pixel": (1_000_000, 512),
                    "pixel-finetune": (100_000, 512)}[stage]
    return FAETrainConfig(
        stage=stage,
        encoder=encoder_config("DINOv2-g/14"),
        fae=fae_config("FAE-DINOv2-g"),
        optim=OptimConfig(lr=1e-4, betas=(0.9, 0.999), schedule="cosine", warmup_steps=1000, weight_decay=0.0,
                          grad_clip=1.0, ema_decay=0.9999),
        data=ImageSourceConfig(source="folder", global_batch=batch),
        loss=FAELossConfig(disc_start=0 if stage == "pixel-finetune" else 50_000),
        run=RunConfig(steps=steps, out_dir=f"runs/fae-dinov2-g-{stage}", log_every=100, ckpt_every=5000,
                      sample_every=20_000, compile=True, precision="bf16",
                      eval_samples=64 if stage == "feature" else 10_000),  # pixel stages: PSNR and rFID-10k
        fae_weights="runs/fae-dinov2-g-feature/ema.safetensors" if stage == "pixel-finetune" else "",
        pixel_init="runs/fae-dinov2-g-pixel/ema.safetensors" if stage == "pixel-finetune" else "",
    )


def dinov2_g_benchmark(stage: str = "feature") -> FAETrainConfig:
    """Full size with random encoder weights and generated images: 30 steps at batch 128 per run, to read
    images/s and MFU off the log (no data, no weights, no checkpoints)."""
    cfg = dinov2_g(stage)
    cfg.encoder.pretrained = False
    cfg.data = ImageSourceConfig(source="synthetic", global_batch=128, synthetic_images=256)
    cfg.loss.disc_start = 0
    cfg.loss.perceptual_weight = 0.0
    cfg.run.steps, cfg.run.log_every, cfg.run.ckpt_every, cfg.run.sample_every, cfg.run.eval_samples = 30, 10, 0, 0, 0
    cfg.fae_weights = "random" if stage == "pixel-finetune" else ""
    cfg.pixel_init = ""
    cfg.run.out_dir = f"runs/fae-benchmark-{stage}"
    return cfg


RECIPES: dict[str, typing.Callable[[str], FAETrainConfig]] = {
    "tiny": tiny,
    "dinov2-g": dinov2_g,
    "dinov2-g-benchmark": dinov2_g_benchmark,
}


def fae_recipe(name: str, stage: str) -> FAETrainConfig:
    """The config of a named recipe for one stage."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(sorted(RECIPES))}")
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {', '.join(STAGES)}; "
                         f"pass --stage feature|pixel|pixel-finetune")
    return RECIPES[name](stage)
