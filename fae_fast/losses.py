"""FAE training losses: KL per latent element, LPIPS perceptual loss (VGG), hinge GAN with VQGAN's
adaptive weight, and the patch discriminator.

Conventions (images in the pixel decoder's [-1, 1] scale, features (B, T, F), latents (B, T, C)):

    stage Ia  loss = mean_{b,t,f} (x_hat - x)^2  +  beta * KL_el
              KL_el = mean_b KL_b / (T * C),   KL_b = 1/2 sum_{t,c} (mu^2 + exp(logvar) - 1 - logvar)
              Both terms are means over elements, so beta (FAEConfig.kl_beta, default 1e-6) does not
              change meaning with the grid, the channel count or the batch. (LDM's kl_weight = 1e-6
              multiplies a per-sample *sum* against a summed reconstruction; this is not that number.)
    stage Ib  loss = L1 + w_p * P + w_adv * lambda * G,   G = -mean D(x_hat)            (hinge)
              lambda = clamp(||dR/dW|| / (||dG/dW|| + 1e-4), 0, 1e4),  R = L1 + w_p * P, W = the
              pixel decoder's last linear layer (VQGAN, Esser et al. 2021, eq. 7); 0 before disc_start.
              D loss = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))                   (hinge)
"""
import socket
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fae_fast.fae import patchify
from fae_fast.train.runtime import mean_over_ranks

# ----------------------------------------------------------------------------------------------------
# Stage Ia
# ----------------------------------------------------------------------------------------------------


def kl_per_element(kl: torch.Tensor, latent_elements: int) -> torch.Tensor:
    """kl (B,) summed over each sample's T*C latent elements -> scalar mean KL per element."""
    return kl.float().mean() / latent_elements


def feature_loss(x_hat: torch.Tensor, x: torch.Tensor, kl: torch.Tensor, *, beta: float,
                 latent_elements: int) -> dict[str, torch.Tensor]:
    """Stage Ia: {'loss', 'rec' (mean squared error per feature element), 'kl' (per latent element)}."""
    rec = (x_hat.float() - x.float()).pow(2).mean()
    kl_el = kl_per_element(kl, latent_elements)
    return {"loss": rec + beta * kl_el, "rec": rec, "kl": kl_el}


# ----------------------------------------------------------------------------------------------------
# Adversarial
# ----------------------------------------------------------------------------------------------------
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss, halved as in VQGAN so that a perfect D scores 0 and chance scores 1."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: raise D's score of the reconstructions."""
    return -logits_fake.float().mean()


def linear_weight_grad(grad_out: torch.Tensor, layer_input: torch.Tensor) -> torch.Tensor:
    """Gradient of a loss with respect to the weight W (out, in) of y = x W^T + b, from dL/dy (..., out)
    and x (..., in): dL/dW = sum over rows of dL/dy^T x. In fp32; lets the adaptive weight be computed
    from gradients at the decoder's output, without a second backward through a sharded model."""
    g = grad_out.reshape(-1, grad_out.shape[-1]).float()
    x = layer_input.reshape(-1, layer_input.shape[-1]).float()
    return g.T @ x  # (out, in)


def adaptive_weight(rec_grad_norm: torch.Tensor, gan_grad_norm: torch.Tensor, *, max_weight: float = 1e4,
                    eps: float = 1e-4) -> torch.Tensor:
    """VQGAN's balance lambda = ||grad R|| / (||grad G|| + eps), clamped to [0, max_weight], no gradient."""
    return (rec_grad_norm / (gan_grad_norm + eps)).clamp(0.0, max_weight).detach()


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN's NLayerDiscriminator): images (B, 3, S, S) in [-1, 1] -> logits
    (B, 1, S/2^layers - 2, ...), one per overlapping patch (70x70 receptive field with 3 layers).

    Conv 4x4 stride 2 + LeakyReLU(0.2), then `layers - 1` more stride-2 and one stride-1 conv with
    BatchNorm, channels doubling up to 8x, and a 1-channel 4x4 conv. Weights N(0, 0.02), BatchNorm
    weights N(1, 0.02), as VQGAN initialises it."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1
            out = channels * min(2 ** n, 8)
            mods += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        mods.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images):  # (B, 3, S, S)
        return self.net(images)


# ----------------------------------------------------------------------------------------------------
# Perceptual: LPIPS (VGG), Zhang et al. 2018, with the learned linear weights the `lpips` package ships
# ----------------------------------------------------------------------------------------------------
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1
VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16().features
# LPIPS's input scaling of [-1, 1] images (its ScalingLayer): ImageNet mean and std rewritten for [-1, 1]
_LPIPS_SHIFT, _LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)


class PerceptualWeightsWarning(UserWarning):
    """The weights of the perceptual loss could not be had and the term was allowed to be off, so it is."""


class PerceptualLoss(nn.Module):
    """LPIPS (VGG, v0.1): for VGG16 layers relu1_2 ... relu5_3, unit-normalise each position's channel vector,
    square the difference, weight the channels by LPIPS's learned 1x1 linear layer, average over positions,
    and sum over the five layers. Images (B, 3, H, W) in [-1, 1]; returns the batch mean. The frozen VGG
    and linear weights pass gradients to the input only."""

    def __init__(self, features: nn.Sequential, linear: list[torch.Tensor]):
        super().__init__()
        self.vgg = features[: VGG16_TAPS[-1] + 1]
        self.linear = nn.ParameterList(nn.Parameter(w.reshape(1, -1, 1, 1).float(), requires_grad=False)
                                       for w in linear)  # (1, C, 1, 1) per tap
        self.requires_grad_(False)
        self.vgg.eval()
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)  # a fixed metric: never in training mode

    def _taps(self, images):
        h = (images - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.vgg):
            h = layer(h)
            if i in VGG16_TAPS:
                out.append(h.float() / (h.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, images, target):
        both = self._taps(torch.cat([images, target]))  # one VGG pass for both
        B = images.shape[0]
        per_layer = [((f[:B] - f[B:]).pow(2) * w).sum(1).mean((1, 2)) for f, w in zip(both, self.linear)]  # (B,) each
        return torch.stack(per_layer).sum(0).mean()


def _vgg16_features() -> nn.Sequential:
    from torchvision.models import vgg16

    return vgg16(weights=None).features


def _read_vgg_state(path: str) -> dict:
    """A torchvision VGG16 state dict (whole model, or its `features.*` only) from a local file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"VGG16 weights file {str(file)!r} does not exist; fix loss.vgg_weights "
                                f"(a copy of {VGG16_URL}) or set it to 'auto'")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    return {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}


def _hub_vgg_state(timeout_s: float) -> dict:
    """torchvision's VGG16 from the torch hub cache, downloaded if missing (raises when it cannot be had)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # a firewall that drops packets must not hang the run
    try:
        state = torch.hub.load_state_dict_from_url(VGG16_URL, map_location="cpu", progress=False, check_hash=True)
    finally:
        socket.setdefaulttimeout(previous)
    return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}


def lpips_linear_weights() -> list[torch.Tensor]:
    """LPIPS v0.1's learned channel weights for the five VGG taps, from the file the `lpips` package ships
    (read without importing the package, which would build its own VGG)."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the perceptual loss needs the LPIPS weights of the `lpips` package: "
                                  "pip install lpips (or set loss.perceptual_weight=0)")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [state[f"lin{i}.model.1.weight"] for i in range(len(VGG16_TAPS))]


_warned = False


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, PerceptualWeightsWarning, stacklevel=3)


def load_perceptual_loss(weights: str = "auto", *, required: bool = True,
                         timeout_s: float = 60.0) -> PerceptualLoss | None:
    """LPIPS with ImageNet VGG16 weights, or None.

    weights='auto': torchvision's weights from the torch hub cache or the network; any other value is a
    local file (the torchvision .pth, or safetensors of the same keys). When the VGG16 weights cannot be
    had: required=True (the paper recipes) raises naming the fix; required=False turns the term off with one
    PerceptualWeightsWarning per process. A missing or unfitting local file is always an error.
    """
    features = _vgg16_features()
    linear = lpips_linear_weights()
    if weights == "auto":
        try:
            state = _hub_vgg_state(timeout_s)
        except Exception as err:  # noqa: BLE001 - offline, firewall, truncated file: all mean "not available"
            fix = (f"VGG16 weights for the perceptual loss are not in {torch.hub.get_dir()}/checkpoints and not "
                   f"downloadable ({type(err).__name__}); set loss.vgg_weights=/path/to/vgg16-397923af.pth "
                   f"(from {VGG16_URL}), or loss.perceptual_weight=0 to train without the term")
            if required:
                raise RuntimeError(fix) from None
            _warn_once(f"perceptual loss OFF: {fix}")
            return None
    else:
        state = _read_vgg_state(weights)
    try:
        features.load_state_dict(state)
    except RuntimeError as err:
        raise RuntimeError(f"VGG16 weights {weights!r} do not fit torchvision's vgg16 ({str(err).splitlines()[0]}); "
                           f"use torchvision's vgg16-397923af.pth") from None
    return PerceptualLoss(features, linear)


class LayerInput:
    """Keeps the input of a module's last forward (the pixel decoder's output layer, for the adaptive weight)."""

    def __init__(self, module: nn.Module):
        self.value = None
        module.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.value = args[0].detach()


def last_layer_balance(grad_rec, grad_gan, layer_input, patch: int, *, max_weight: float) -> torch.Tensor:
    """VQGAN's adaptive weight on the pixel decoder's last linear layer W, from the gradients of R and G at
    the image (B, 3, S, S) and that layer's input (B, T, D): patchify maps image gradients to the layer's
    output tokens, linear_weight_grad makes dR/dW and dG/dW, averaged over ranks (one lambda for the
    global batch). No second backward through the sharded decoder is needed."""
    grads = mean_over_ranks(torch.stack([linear_weight_grad(patchify(g, patch), layer_input)
                                         for g in (grad_rec, grad_gan)]))
    return adaptive_weight(grads[0].norm(), grads[1].norm(), max_weight=max_weight)
