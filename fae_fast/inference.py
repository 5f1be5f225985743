"""Trained models loaded for inference, as training ran them: the generator (a train_gen run's weights and
config, or a published SiT / LightningDiT file), the FAE's parts (encoder, feature decoder, pixel decoder)
from one weights file, the FAE's decoders with the latent cache's statistics (normalised latents -> uint8
images), the frozen encoder, and the casts that give bf16 inference FSDP2's mixed precision.
Used by training/sample.py, extract_latents.py and evaluate_fae.py, by train_gen.py for its sample grids and
in-training FID, and by users."""
import json
from pathlib import Path

import torch

from fae_fast.adapters import load_published
from fae_fast.config import EncoderConfig, FAEConfig, config_from_json, fae_config
from fae_fast.encoders import FrozenEncoder
from fae_fast.families import model_config_from_json
from fae_fast.train.checkpoint import FAE_CONFIG_NAME, CheckpointManager, load_strict, read_weights, with_prefix
from fae_fast.train.runtime import print0

DEFAULT_FAE_SIZE = "FAE-DINOv2-g"


def cast_params(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters to dtype, buffers kept (RoPE angles stay fp32), as FSDP2's mixed precision does in training."""
    for p in module.parameters():
        p.data = p.data.to(dtype)
    return module


def cast_block_inputs(blocks: torch.nn.ModuleList, dtype: torch.dtype) -> None:
    """Cast the floating inputs of each block to dtype, as FSDP2's per-block mixed precision does in
    training: an fp32 position table added before the first block would otherwise promote the stream."""
    def hook(module, args):
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    for block in blocks:
        block.register_forward_pre_hook(hook)


def frozen(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """module on device, in eval mode, without gradients, its parameters in dtype."""
    return cast_params(module.to(device).eval().requires_grad_(False), dtype)


def fae_weights(path: str) -> Path:
    """What an `--fae` option names: an exported .safetensors file (the feature stage's ema.safetensors, or
    the whole fae.safetensors of the pixel-finetune stage), a run folder holding ema.safetensors, or a DCP
    checkpoint folder (its EMA)."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "ema.safetensors").is_file():
        p = p / "ema.safetensors"
    if not (p.is_file() or (p / ".metadata").is_file()):
        raise FileNotFoundError(f"FAE weights {str(p)!r} do not exist; pass the feature stage's ema.safetensors "
                                f"(or its run folder, or a step_XXXXXXXX checkpoint folder) as --fae")
    return p


FAE_PARTS = ("encoder", "feature_decoder", "pixel_decoder")
"""The parts of a trained FAE, each saved under its name as key prefix ('encoder.*', ...)."""


def load_fae_parts(path: str | Path, cfg: FAEConfig, names: tuple[str, ...], hint: str, *,
                   impl: str = "auto") -> list[torch.nn.Module]:
    """The named parts (of FAE_PARTS) of a trained FAE from one weights file or checkpoint, each loaded
    strictly from its '<name>.*' tensors, in eval mode without gradients, on the current default device.
    hint: what the user should pass when the weights do not fit `cfg`."""
    from fae_fast.fae import FAEEncoder, FeatureDecoder, PixelDecoder

    classes = dict(zip(FAE_PARTS, (FAEEncoder, FeatureDecoder, PixelDecoder)))
    tensors = read_weights(path, "FAE")
    parts = []
    for name in names:
        part = classes[name](cfg, impl=impl)
        load_strict(part, with_prefix(tensors, name + "."), str(path), hint, prefix=name + ".")
        parts.append(part.eval().requires_grad_(False))
    return parts


def frozen_encoder(cfg: EncoderConfig, grid: int, device) -> FrozenEncoder:
    """The frozen image encoder on device (built there: fast for a billion parameters), its weights bf16 on
    CUDA (its mean/std buffers stay fp32: preprocessing runs in fp32)."""
    with torch.device(device):
        encoder = FrozenEncoder(cfg, grid=grid)  # checks the timm model against cfg
    if torch.device(device).type == "cuda":
        encoder.model.to(torch.bfloat16)
    return encoder


def generator_config_path(ckpt: str | Path, model_config: str = "") -> Path:
    """Where a generator's config.json is: model_config, beside ckpt, or in the run's newest checkpoint."""
    ckpt = Path(ckpt)
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    candidates = [Path(model_config)] if model_config else [folder / "config.json"]
    if not model_config and (latest := CheckpointManager(folder / "checkpoints").latest()) is not None:
        candidates.append(latest / "config.json")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no generator config found for {ckpt} (looked at {', '.join(map(str, candidates))}); "
                            f"pass --model_config=PATH to a train_gen config.json")


def load_generator(ckpt: str | Path, device, dtype: torch.dtype, *, impl: str = "auto", model_config: str = "",
                   published: str = "") -> torch.nn.Module:
    """A frozen generator from a train_gen run (ema.safetensors or a checkpoint folder, its config found by
    `generator_config_path`) or, with published='sit' | 'lightningdit', from a public SiT / LightningDiT file
    (fae_fast.adapters)."""
    if not ckpt or not Path(ckpt).exists():
        raise FileNotFoundError(f"generator checkpoint {str(ckpt)!r} does not exist; pass --ckpt=runs/<name>/"
                                f"ema.safetensors or a checkpoints/step_XXXXXXXX folder")
    if published:
        return frozen(load_published(Path(ckpt), published, impl=impl), device, dtype)
    config_path = generator_config_path(ckpt, model_config)
    family, config = model_config_from_json(config_path)
    model = family.build(config, impl=impl)
    load_strict(model, read_weights(ckpt, "generator"), str(ckpt),
                f"pass --model_config= the config.json of the run that wrote it (used: {config_path})")
    return frozen(model, device, dtype)


def load_stats(path: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the latent cache, each (C,), from JSON or safetensors; 'identity' gives (0, 1)."""
    if path == "identity":
        return torch.zeros(channels), torch.ones(channels)
    if not Path(path).is_file():
        raise FileNotFoundError(f"latent statistics file {path!r} does not exist; pass --stats= the stats file "
                                f"extract_latents.py wrote (or 'identity' for unnormalised latents)")
    if path.endswith(".json"):
        try:
            saved = {k: torch.tensor(v, dtype=torch.float32) for k, v in json.loads(Path(path).read_text()).items()
                     if k in ("mean", "std")}
        except (ValueError, AttributeError, TypeError) as err:
            raise ValueError(f"latent statistics file {path} is not the JSON extract_latents.py writes ({type(err).__name__}: "
                             f"{str(err)[:80]}); pass --stats= the cache's stats.json") from None
    else:
        saved = read_weights(path, "latent statistics")
    if "mean" not in saved or "std" not in saved or saved["mean"].shape[-1] != channels:
        raise ValueError(f"{path} must hold 'mean' and 'std' of shape ({channels},) for {channels} latent channels")
    return saved["mean"].float(), saved["std"].float()


def resolve_fae_config(fae: str, fae_config_file: str = "", fae_size: str | None = DEFAULT_FAE_SIZE) -> FAEConfig:
    """fae_config_file when given, else the fae_config.json train_fae.py wrote beside the weights `fae`,
    else the registry size fae_size (None: there is no fallback, and a missing file is the error)."""
    path = Path(fae_config_file) if fae_config_file else Path(fae).with_name(FAE_CONFIG_NAME)
    if path.is_file():
        if not fae_config_file:
            print0(f"FAE config from {path}")
        return config_from_json(path, FAEConfig, ("fae", "model"))
    if fae_config_file or fae_size is None:
        raise FileNotFoundError(f"no FAE config at {path}; pass --fae_config= the fae_config.json written with the "
                                f"weights")
    return fae_config(fae_size)


class LatentDecoder:
    """Normalised latents (B, T, C) -> de-normalise -> feature decoder -> pixel decoder -> uint8 (B, S, S, 3).

    fae: a safetensors file with `feature_decoder.*` and `pixel_decoder.*` weights (train_fae.py's
    fae.safetensors); stats: the latent cache's statistics file, or 'identity'; grid and channels: the
    latents the generator makes, checked against the FAE's config (`resolve_fae_config`)."""

    def __init__(self, fae: str, stats: str, *, grid: int, channels: int, device, dtype: torch.dtype,
                 impl: str = "auto", fae_config_file: str = "", fae_size: str = DEFAULT_FAE_SIZE):
        if not Path(fae).is_file():
            raise FileNotFoundError(f"FAE weights file {fae} does not exist; pass --fae= the fae.safetensors "
                                    f"that train_fae.py --stage=pixel-finetune wrote (feature_decoder.* and "
                                    f"pixel_decoder.* weights)")
        if not stats:
            raise ValueError("--stats is needed with --fae: the generator samples normalised latents; pass the "
                             "latent cache's stats file, or --stats=identity for unnormalised latents")
        fcfg = resolve_fae_config(fae, fae_config_file, fae_size)
        if (fcfg.latent_dim, fcfg.grid) != (channels, grid):
            raise ValueError(f"the FAE decodes {fcfg.grid}x{fcfg.grid}x{fcfg.latent_dim} latents but the generator "
                             f"makes {grid}x{grid}x{channels}; pass the matching --fae_size or --fae_config")
        parts = load_fae_parts(fae, fcfg, ("feature_decoder", "pixel_decoder"),
                               "pass the --fae_size or --fae_config it was trained with (keys need the prefix "
                               "'feature_decoder.' and 'pixel_decoder.')", impl=impl)
        self.parts = [frozen(part, device, dtype) for part in parts]
        for part in self.parts:
            cast_block_inputs(part.layers, dtype)
        self.mean, self.std = (t.to(device) for t in load_stats(stats, channels))
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.mean.device, torch.float32)  # sample grids arrive on the host
        features = self.parts[0]((z * self.std + self.mean).to(self.dtype))  # (B, T, F)
        images = self.parts[1](features).float()  # (B, 3, S, S), [-1, 1] but not squashed
        return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
