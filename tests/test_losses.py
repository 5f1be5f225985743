"""FAE losses and reconstruction metrics: KL per element, hinge values, the adaptive weight against
VQGAN's autograd form, the perceptual loss with local and missing VGG weights, PSNR and rFID."""
import math
import urllib.error
import warnings

import pytest
import torch
import torch.nn as nn

from fae_fast import losses
from fae_fast.config import fae_config
from fae_fast.eval.recon import mean_psnr, psnr, rfid, to_uint8
from fae_fast.fae import PixelDecoder, reparameterize
from fae_fast.losses import (PatchDiscriminator, PerceptualWeightsWarning, adaptive_weight, feature_loss,
                             hinge_d_loss, hinge_g_loss, kl_per_element, linear_weight_grad, load_perceptual_loss)
from fae_fast.losses import LayerInput, last_layer_balance

from conftest import PooledPixels  # noqa: E402 (tests/ is on sys.path)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Stage Ia
# ----------------------------------------------------------------------------------------------------
def test_kl_per_element_is_the_mean_gaussian_kl_of_one_latent_element():
    B, T, C = 3, 16, 4
    mu = torch.randn(B, T, C, generator=gen(0))
    logvar = 0.5 * torch.randn(B, T, C, generator=gen(1))
    _, _, kl = reparameterize(torch.cat([mu, logvar], -1), seed=0, impl="torch")  # (B,) sums
    expected = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).mean()
    torch.testing.assert_close(kl_per_element(kl, T * C), expected, rtol=1e-6, atol=0)
    # per element: tiling the latent grid 4x leaves it unchanged (a per-sample sum would grow 4x)
    tiled = torch.cat([mu.repeat(1, 4, 1), logvar.repeat(1, 4, 1)], -1)
    _, _, kl4 = reparameterize(tiled, seed=0, impl="torch")
    torch.testing.assert_close(kl_per_element(kl4, 4 * T * C), expected, rtol=1e-6, atol=0)


def test_feature_loss_is_mse_plus_beta_times_kl_per_element():
    x = torch.randn(2, 16, 8, generator=gen(2))
    x_hat = x + 0.1 * torch.randn(2, 16, 8, generator=gen(3))
    kl = torch.tensor([40.0, 24.0])
    out = feature_loss(x_hat, x, kl, beta=0.5, latent_elements=16 * 4)
    mse = ((x_hat - x) ** 2).mean()
    torch.testing.assert_close(out["rec"], mse)
    torch.testing.assert_close(out["kl"], torch.tensor(32.0 / 64))
    torch.testing.assert_close(out["loss"], mse + 0.5 * 0.5)


# ----------------------------------------------------------------------------------------------------
# Adversarial
# ----------------------------------------------------------------------------------------------------
def test_hinge_loss_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # D: 1/2 (mean(relu(1 - real)) + mean(relu(1 + fake))) = 1/2 ((0 + 0.5 + 2)/3 + (0 + 1 + 2)/3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.0 / 3))
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0  # at the margins: 0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0  # undecided D
    assert hinge_g_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.0) / 3)


def test_linear_weight_grad_matches_autograd():
    layer = nn.Linear(12, 7)
    x = torch.randn(3, 5, 12, generator=gen(4))
    target = torch.randn(3, 5, 7, generator=gen(5))
    y = layer(x)
    loss = ((y - target) ** 2).mean()
    (grad_w,) = torch.autograd.grad(loss, layer.weight, retain_graph=True)
    (grad_y,) = torch.autograd.grad(loss, y)
    torch.testing.assert_close(linear_weight_grad(grad_y, x), grad_w, rtol=1e-5, atol=1e-7)


def test_adaptive_weight_equals_vqgan_on_the_decoders_last_layer():
    """lambda from image gradients (what train_fae does under FSDP) = VQGAN's autograd.grad on the weight."""
    torch.manual_seed(0)
    cfg = fae_config("FAE-tiny")
    decoder, disc = PixelDecoder(cfg, "torch"), PatchDiscriminator(8, 2)
    hook = LayerInput(decoder.out)
    x = torch.randn(2, cfg.grid ** 2, cfg.feature_dim, generator=gen(6))
    target = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=gen(7)) * 2 - 1
    image = decoder(x)
    rec, g = (image - target).abs().mean(), hinge_g_loss(disc(image))
    w = decoder.out.weight
    (rec_w,) = torch.autograd.grad(rec, w, retain_graph=True)
    (gan_w,) = torch.autograd.grad(g, w, retain_graph=True)
    expected = (rec_w.norm() / (gan_w.norm() + 1e-4)).clamp(0, 1e4)
    (rec_img,), (gan_img,) = torch.autograd.grad(rec, image, retain_graph=True), torch.autograd.grad(g, image)
    got = last_layer_balance(rec_img, gan_img, hook.value, decoder.patch, max_weight=1e4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)
    assert 0 < got < 1e4


def test_adaptive_weight_clamps_and_divides():
    assert adaptive_weight(torch.tensor(2.0), torch.tensor(4.0)).item() == pytest.approx(2.0 / (4.0 + 1e-4))
    assert adaptive_weight(torch.tensor(1e3), torch.tensor(0.0)).item() == 1e4  # 1e7 clamped
    assert adaptive_weight(torch.tensor(3.0), torch.tensor(0.0), max_weight=10.0).item() == 10.0
    assert adaptive_weight(torch.tensor(0.0), torch.tensor(1.0)).item() == 0.0
    assert not adaptive_weight(torch.tensor(1.0, requires_grad=True), torch.tensor(1.0)).requires_grad


def test_patch_discriminator_gives_a_logit_per_patch():
    disc = PatchDiscriminator(8, 3)
    out = disc(torch.rand(2, 3, 64, 64, generator=gen(8)) * 2 - 1)
    assert out.shape == (2, 1, 6, 6)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6


# ----------------------------------------------------------------------------------------------------
# Perceptual
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def vgg_file(tmp_path):
    """Random VGG16 conv weights in torchvision's key layout (features.N.*), as a local weights file."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, path)
    return path


def test_perceptual_loss_from_a_local_file(vgg_file):
    loss = load_perceptual_loss(str(vgg_file))
    a = torch.rand(2, 3, 32, 32, generator=gen(9)) * 2 - 1
    b = (a + 0.3 * torch.randn(2, 3, 32, 32, generator=gen(10))).clamp(-1, 1)
    assert loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    far, near = loss(b, a).item(), loss(0.9 * a + 0.1 * b, a).item()
    assert 0 < near < far <= 4.0
    b.requires_grad_(True)
    loss(b, a).backward()
    assert b.grad.abs().sum() > 0 and all(p.grad is None for p in loss.parameters())


def test_perceptual_loss_is_the_lpips_packages(tmp_path):
    """Equal outputs and input gradients to lpips.LPIPS(net='vgg') (v0.1, its learned linear layers) with the
    same VGG16 weights: random ones here, written to a file as torchvision lays them out."""
    lpips = pytest.importorskip("lpips")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lpips passes torchvision's deprecated `pretrained`
        torch.manual_seed(3)
        reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    trunk = {k.split(".", 1)[1]: v for k, v in reference.net.state_dict().items()}  # sliceN.<index>.* -> <index>.*
    torch.save({f"features.{k}": v for k, v in trunk.items()}, tmp_path / "vgg16.pth")
    ours = load_perceptual_loss(str(tmp_path / "vgg16.pth"))
    a = torch.rand(3, 3, 48, 48, generator=gen(11)) * 2 - 1
    b = (a + 0.4 * torch.randn(3, 3, 48, 48, generator=gen(12))).clamp(-1, 1)
    got_b, want_b = b.clone().requires_grad_(), b.clone().requires_grad_()
    got, want = ours(got_b, a), reference(want_b, a).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    got.backward()
    want.backward()
    torch.testing.assert_close(got_b.grad, want_b.grad, rtol=1e-4, atol=1e-9)


def test_perceptual_loss_missing_local_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="loss.vgg_weights"):
        load_perceptual_loss(str(tmp_path / "nope.pth"))


def test_perceptual_loss_offline_stops_or_is_off_with_one_warning(tmp_path, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network (simulated)")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(losses, "_warned", False)
    with pytest.raises(RuntimeError, match="loss.vgg_weights=.*or loss.perceptual_weight=0"):
        load_perceptual_loss("auto")  # required, as in the paper recipes: stop with the fix
    with pytest.warns(PerceptualWeightsWarning) as record:
        assert load_perceptual_loss("auto", required=False) is None
        assert load_perceptual_loss("auto", required=False) is None
    ours = [w for w in record if issubclass(w.category, PerceptualWeightsWarning)]
    assert len(ours) == 1 and "perceptual loss OFF" in str(ours[0].message)
    assert "\n" not in str(ours[0].message)


# ----------------------------------------------------------------------------------------------------
# Reconstruction metrics
# ----------------------------------------------------------------------------------------------------
def test_psnr_of_identical_images_is_inf():
    a = torch.randint(0, 256, (3, 3, 16, 16), generator=gen(11), dtype=torch.uint8)
    assert torch.isinf(psnr(a, a)).all()
    assert mean_psnr(psnr(a, a)) == 100.0


def test_psnr_of_known_noise_matches_the_formula():
    a = torch.randint(10, 246, (4, 3, 32, 32), generator=gen(12)).to(torch.uint8)
    sign = torch.randint(0, 2, a.shape, generator=gen(13)) * 2 - 1
    b = (a.int() + 5 * sign).to(torch.uint8)  # every pixel off by exactly 5 levels: MSE = 25
    torch.testing.assert_close(psnr(a, b), torch.full((4,), 10 * math.log10(255**2 / 25), dtype=torch.float64))
    c = a.clone()
    c[0, 0, 0, 0] += 8  # one image, one pixel: MSE = 64 / 3072
    assert psnr(a, c)[0].item() == pytest.approx(10 * math.log10(255**2 / (64 / 3072)))


def test_psnr_rounds_to_uint8_first():
    x = torch.tensor([-1.0, 0.0, 1.0, 1.5]).view(1, 1, 1, 4)
    assert to_uint8(x).flatten().tolist() == [0, 128, 255, 255]  # 127.5 rounds to even 128; clamped
    assert to_uint8(torch.tensor([0.5]).view(1, 1, 1, 1), (0.0, 1.0)).item() == 128
    with pytest.raises(TypeError, match="to_uint8"):
        psnr(x, x)


def test_rfid_through_the_pluggable_extractor():
    real = torch.randint(0, 256, (128, 3, 16, 16), generator=gen(14), dtype=torch.uint8)
    shifted = (real.int() + 40).clamp(0, 255).to(torch.uint8)
    pairs = lambda fake: [(real[i:i + 32], fake[i:i + 32]) for i in range(0, 128, 32)]  # noqa: E731
    same = rfid(pairs(real), PooledPixels())
    assert abs(same) < 1e-6
    assert rfid(pairs(shifted), PooledPixels()) > 100 * max(abs(same), 1e-3)
