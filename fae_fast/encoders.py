"""Frozen pretrained encoders (DINOv2, SigLIP2, any timm ViT) that turn images into patch features.

Weights come from the timm hub (network or a filled Hugging Face cache) or from a local file
(`EncoderConfig.weights_path`: safetensors or torch, in timm's own layout or a hub/original layout
that timm's checkpoint filter converts). The encoder is frozen: no gradients, eval mode always.
Images in: (B, 3, H, W) floats in [0, 1] at any size. Features out: (B, T, C) patch tokens,
T = (image_size / patch_size)^2, class and register tokens dropped.
"""
import sys
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from fae_fast.config import EncoderConfig, validate_encoder

_OFFLINE_FIX = ("set encoder.weights_path=/path/to/file or pre-fill the Hugging Face cache (HF_HUB_CACHE) "
                "on a machine with network")


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exception types a failed hub download raises. Network and cache misses are OSErrors in
    huggingface_hub (LocalEntryNotFoundError is a FileNotFoundError) and urllib; its HTTP and offline-mode
    errors and the httpx transport errors are not, so they are added when importable."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub import errors as hf_errors
        errors += [getattr(hf_errors, n) for n in ("HfHubHTTPError", "OfflineModeIsEnabled") if hasattr(hf_errors, n)]
    except ImportError:
        pass
    for module in ("httpx", "httpx2"):  # huggingface_hub >= 1.0 talks HTTP through httpx
        if module in sys.modules:
            errors.append(sys.modules[module].HTTPError)
    return tuple(errors)


def _create_timm_model(cfg: EncoderConfig) -> nn.Module:
    """timm.create_model with the classifier removed and the encoder's input size set."""
    if not timm.is_model(cfg.timm_name):
        raise ValueError(f"timm has no model named {cfg.timm_name!r}; see timm.list_models() for the names")
    pretrained = cfg.pretrained and not cfg.weights_path
    kwargs = dict(pretrained=pretrained, num_classes=0, img_size=cfg.image_size)
    try:
        try:
            return timm.create_model(cfg.timm_name, **kwargs)
        except TypeError as err:  # architectures without a fixed input size take no img_size
            if "img_size" not in str(err):
                raise
            kwargs.pop("img_size")
            return timm.create_model(cfg.timm_name, **kwargs)
    except _hub_errors() as err:
        if not pretrained:
            raise
        raise RuntimeError(f"cannot load the pretrained weights of {cfg.timm_name} from the Hugging Face hub "
                           f"({type(err).__name__}); {_OFFLINE_FIX}") from err


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch file, unwrapped from {'state_dict': ...} / {'model': ...}."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path), device="cpu")
    else:  # .pth / .bin / .pt: tensors only, never pickled code
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    for prefix in ("module.", "model."):  # DDP wrappers, or a saved FrozenEncoder
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str, timm_name: str) -> None:
    """Load a local weights file into a timm model, strictly, naming the first key that does not fit."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"encoder weights file {str(file)!r} does not exist; fix encoder.weights_path")
    state = _read_state_dict(file)
    # timm's own filter converts hub/original layouts (DINOv2, OpenCLIP) and resamples position embeddings
    # to this image size, as pretrained loading from the hub does.
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith("head")}  # classifier is removed
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
        raise RuntimeError(f"weights file {str(file)!r} does not fit {timm_name}: {what} "
                           f"({len(missing)} missing, {len(unexpected)} unexpected); "
                           f"check that the file holds {timm_name} weights")


class FrozenEncoder(nn.Module):
    """A frozen timm ViT: images (B, 3, H, W) in [0, 1] -> patch features (B, T, C).

    `grid` is the latent grid the features must have (FAEConfig.grid); by default the encoder's own
    image_size / patch_size.
    """

    def __init__(self, cfg: EncoderConfig, grid: int | None = None):
        super().__init__()
        grid = grid if grid is not None else cfg.image_size // cfg.patch_size
        validate_encoder(cfg, grid)  # cheap config errors before building a billion-parameter model
        self.cfg, self.grid = cfg, grid
        self.model = _create_timm_model(cfg)
        if cfg.weights_path:
            load_weights(self.model, cfg.weights_path, cfg.timm_name)
        self.feature_dim = int(getattr(self.model, "embed_dim", self.model.num_features))
        self._check_model(cfg)
        data_cfg = timm.data.resolve_model_data_config(self.model)
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def _check_model(self, cfg: EncoderConfig) -> None:
        """The timm model must agree with the config on channels and patch size."""
        if cfg.feature_dim != self.feature_dim:
            raise ValueError(f"encoder {cfg.timm_name} returns {self.feature_dim} channels but encoder.feature_dim is "
                             f"{cfg.feature_dim}; set encoder.feature_dim={self.feature_dim}")
        patch = getattr(getattr(self.model, "patch_embed", None), "patch_size", None)
        if patch is not None and tuple(patch) != (cfg.patch_size, cfg.patch_size):
            raise ValueError(f"encoder {cfg.timm_name} has patch size {tuple(patch)} but encoder.patch_size is "
                             f"{cfg.patch_size}; set encoder.patch_size={patch[0]}")

    def train(self, mode: bool = True):
        """Stays in eval mode: the features must not depend on the caller's train/eval state."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, S, S) resized (bicubic, antialiased) and normalised."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encoder input must be images (B, 3, H, W), got shape {tuple(images.shape)}")
        size = self.cfg.image_size
        x = images.float()
        if x.shape[-2:] != (size, size):
            # clamp: bicubic overshoots [0, 1]; the PIL pipelines the encoders were trained with cannot
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        x = (x - self.mean) / self.std
        return x.to(next(self.model.parameters()).dtype)  # resize and normalise in fp32, run in the model's dtype

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        tokens = self.model.forward_features(x)  # (B, prefix + T, C), final norm applied
        patches = tokens[:, getattr(self.model, "num_prefix_tokens", 0):]  # (B, T, C): no class/register tokens
        if patches.shape[1] != self.grid * self.grid:
            raise RuntimeError(f"encoder {self.cfg.timm_name} returned {patches.shape[1]} patch tokens, not "
                               f"{self.grid}x{self.grid}; check encoder.image_size and encoder.patch_size")
        return patches
