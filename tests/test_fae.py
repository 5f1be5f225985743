"""FAE encoder, feature decoder and pixel decoder: shapes, sizes against the paper, sampling, learning."""
import pytest
import torch
import torch.nn.functional as F

from fae_fast.config import fae_config
from fae_fast.fae import FAEEncoder, FeatureDecoder, PixelDecoder, patchify, reparameterize, unpatchify

IMPLS = ["torch", "triton"]  # triton runs through the interpreter on CPU (conftest.py)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny():
    return fae_config("FAE-tiny")  # 4x4 grid, 48 features, 4 latent channels, 64 px images


def features(cfg, b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, cfg.grid ** 2, cfg.feature_dim, generator=torch.Generator().manual_seed(seed))


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("impl", IMPLS)
def test_shapes(impl, device):
    cfg, x = tiny(), features(tiny()).to(device)
    torch.manual_seed(0)
    enc, dec, pix = (cls(cfg, impl).to(device) for cls in (FAEEncoder, FeatureDecoder, PixelDecoder))
    moments = enc(x)
    z, mu, kl = enc.encode(x, seed=3)
    assert moments.shape == (3, 16, 2 * cfg.latent_dim)
    assert z.shape == mu.shape == (3, 16, cfg.latent_dim) and kl.shape == (3,)
    assert dec(z).shape == (3, 16, cfg.feature_dim)
    assert pix(x).shape == (3, 3, cfg.image_size, cfg.image_size)
    for out in (moments, z, kl, dec(z), pix(x)):
        assert torch.isfinite(out).all()


def test_triton_matches_torch(device):
    """Same weights, both impls: identical maths up to fp32 rounding; the triton z uses the kernel's
    documented Philox noise, reproduced here with reparameterize_noise."""
    from fae_fast.kernels.reparameterize import reparameterize_noise

    cfg, x = tiny(), features(tiny()).to(device)
    pairs = []
    for cls in (FAEEncoder, FeatureDecoder, PixelDecoder):
        torch.manual_seed(0)
        a = cls(cfg, "torch").to(device)
        b = cls(cfg, "triton").to(device)
        b.load_state_dict(a.state_dict())
        pairs.append((a, b))
    (enc_t, enc_k), (dec_t, dec_k), (pix_t, pix_k) = pairs
    z_k, mu_k, kl_k = enc_k.encode(x, seed=11)
    eps = reparameterize_noise(mu_k.shape, 11, device=x.device)
    moments = enc_t(x)
    mu, logvar = moments.chunk(2, dim=-1)
    torch.testing.assert_close(mu_k, mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_k, mu + eps * (0.5 * logvar.clamp(-30, 20)).exp(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_k, enc_t.encode(x, sample=False)[2], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dec_k(z_k), dec_t(z_k), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pix_k(x), pix_t(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls,paper", [(FAEEncoder, 38e6), (FeatureDecoder, 170e6), (PixelDecoder, 305e6)])
def test_parameter_counts_match_the_paper(cls, paper):
    with torch.device("meta"):  # no memory, no init cost
        model = cls(fae_config("FAE-DINOv2-g"), "torch")
    count = num_params(model)
    print(f"{cls.__name__}: {count:,} parameters (paper: about {paper / 1e6:.0f}M)")
    assert abs(count - paper) / paper < 0.03


@pytest.mark.parametrize("impl", IMPLS)
def test_encode_deterministic_modes(impl, device):
    cfg, x = tiny(), features(tiny()).to(device)
    torch.manual_seed(0)
    enc = FAEEncoder(cfg, impl).to(device)
    mu_expected = enc(x)[..., : cfg.latent_dim]
    z1, mu1, _ = enc.encode(x, sample=False)
    z2, _, _ = enc.encode(x, sample=False)
    assert torch.equal(z1, mu1) and torch.equal(z1, z2) and torch.equal(mu1, mu_expected)
    a, b, c = (enc.encode(x, seed=s)[0] for s in (5, 5, 6))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1 and (a - mu1).abs().max() > 0.1  # a seed really draws noise


def test_kl_is_the_gaussian_kl_per_sample():
    moments = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1))
    _, mu, kl = reparameterize(moments, sample=False)
    logvar = moments[..., 4:]
    expected = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2))
    torch.testing.assert_close(kl, expected)


def low_rank_features(cfg, b: int = 8) -> torch.Tensor:
    """Features a 4-channel latent can hold: (B, T, 4) codes times a fixed (4, F) basis, plus a little noise."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(b, cfg.grid ** 2, cfg.latent_dim, generator=g)
    basis = torch.randn(cfg.latent_dim, cfg.feature_dim, generator=g)
    return codes @ basis / cfg.latent_dim ** 0.5 + 0.05 * torch.randn(b, cfg.grid ** 2, cfg.feature_dim, generator=g)


def test_encoder_and_feature_decoder_learn():
    """Stage Ia on one fixed batch: L2 + beta * KL (beta per latent element, summed per sample) must fall."""
    cfg = tiny()
    x = low_rank_features(cfg)
    torch.manual_seed(0)
    enc, dec = FAEEncoder(cfg, "torch"), FeatureDecoder(cfg, "torch")
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for step in range(40):
        z, _, kl = enc.encode(x, seed=step)
        mse = F.mse_loss(dec(z), x)
        loss = mse + cfg.kl_beta * kl.mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert mse.item() < 0.5 * x.pow(2).mean().item()  # clearly better than predicting zeros


def test_patchify_layout_and_round_trip():
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(unpatchify(patchify(images, 16), 16), images)
    # token t = row * grid + col holds the pixels of patch (row, col), laid out (p, q, channel)
    tokens = torch.arange(16.0).view(1, 16, 1).expand(1, 16, 16 * 16 * 3)
    image = unpatchify(tokens, 16)
    assert image[0, 2, 16 * 2 + 5, 16 * 3 + 7] == 2 * 4 + 3
    assert patchify(images, 16)[1, 4 + 1, 3 * 16 * 3 + 2 * 3 + 1] == images[1, 1, 16 + 3, 16 + 2]


def test_pixel_decoder_positions_matter():
    """The sin-cos table breaks the symmetry of attention: identical tokens give different patches."""
    cfg = tiny()
    torch.manual_seed(0)
    pix = PixelDecoder(cfg, "torch")
    same = features(cfg, b=1)[:, :1].expand(1, 16, cfg.feature_dim)
    patches = patchify(pix(same), cfg.image_size // cfg.grid)  # (1, T, p*p*3)
    assert (patches[0, 0] - patches[0, 5]).abs().max() > 1e-2


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible by heads"):
        FeatureDecoder(fae_config("FAE-tiny", dec_width=50), "torch")
    with pytest.raises(ValueError, match="not divisible by heads"):
        PixelDecoder(fae_config("FAE-tiny", pix_width=33), "torch")
    with pytest.raises(ValueError, match="RoPE"):
        FeatureDecoder(fae_config("FAE-tiny", dec_width=40, dec_heads=4), "torch")  # head dim 10
    dec = FeatureDecoder(tiny(), "torch")
    with pytest.raises(ValueError, match=r"expects \(B, 16, 4\)"):
        dec(torch.randn(2, 9, 4))
