"""FrozenEncoder on a tiny timm ViT with random weights (no network here): shapes, freezing, input
normalisation, local weight files and the errors people see."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from fae_fast.config import encoder_config
from fae_fast.encoders import FrozenEncoder

# vit_tiny_patch16_224 is 192 wide; the registry's feature_dim for 'tiny' is overridden until it says so.
TINY = dict(feature_dim=192)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_encoder(seed: int = 0, **overrides) -> FrozenEncoder:
    torch.manual_seed(seed)
    return FrozenEncoder(encoder_config("tiny", **{**TINY, **overrides}))


def images(b: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_output_is_patch_tokens_of_the_grid():
    enc = tiny_encoder()
    assert enc.feature_dim == 192
    for size in (64, 50, 97):  # any input size is resized to 64 px -> 4 x 4 patches of 16
        out = enc(images(3, size))
        assert out.shape == (3, 16, 192)
        assert torch.isfinite(out).all()


def test_frozen_no_grad_and_always_eval():
    enc = tiny_encoder()
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    x = images().requires_grad_(True)
    out = enc(x)
    assert not out.requires_grad and out.grad_fn is None


def test_input_is_normalised_with_the_encoders_mean_and_std():
    enc = tiny_encoder()
    mean = torch.tensor(enc.model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(enc.model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x = images()
    with torch.no_grad():
        expected = enc.model.forward_features((x - mean) / std)[:, enc.model.num_prefix_tokens:]
        unnormalised = enc.model.forward_features(x)[:, enc.model.num_prefix_tokens:]
    torch.testing.assert_close(enc(x), expected, rtol=0, atol=0)
    assert (enc(x) - unnormalised).abs().max() > 1e-2  # the comparison above can tell the difference


def test_resize_to_the_encoder_size():
    # A constant image stays constant under any resize, so its features must not depend on the input size.
    enc = tiny_encoder()
    colour = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1)
    at_64 = enc(colour.expand(2, 3, 64, 64).contiguous())
    for size in (32, 100):
        torch.testing.assert_close(enc(colour.expand(2, 3, size, size).contiguous()), at_64, rtol=1e-5, atol=1e-5)
    # bicubic overshoots at sharp edges; the resized input must stay in [0, 1] as PIL resizing keeps it
    stripes = (torch.arange(100) // 3 % 2).float().expand(1, 3, 100, 100)
    resized = enc.preprocess(stripes) * enc.std + enc.mean
    assert resized.min() >= -1e-6 and resized.max() <= 1 + 1e-6 and resized.max() - resized.min() > 0.5


def _save(state: dict, path, fmt: str) -> None:
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)  # a nested training checkpoint


@pytest.mark.parametrize("fmt,prefix", [("safetensors", ""), ("pth", ""), ("pth", "model.")])
def test_local_weights_round_trip(tmp_path, fmt, prefix):
    source = tiny_encoder(seed=0)
    path = tmp_path / f"weights.{fmt}"
    state = source.model.state_dict() if not prefix else source.state_dict()  # FrozenEncoder keys have 'model.'
    _save(state, path, fmt)
    loaded = tiny_encoder(seed=1, weights_path=str(path))
    fresh = tiny_encoder(seed=1)
    x = images()
    assert (fresh(x) - source(x)).abs().max() > 1e-2  # another seed really gives other weights
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_weights_with_a_wrong_key_name_the_key(tmp_path):
    state = tiny_encoder().model.state_dict()
    state["blocks.0.attn.qkv.kernel"] = state.pop("blocks.0.attn.qkv.weight")
    path = tmp_path / "bad.safetensors"
    _save(state, path, "safetensors")
    with pytest.raises(RuntimeError, match=r"missing key 'blocks\.0\.attn\.qkv\.weight'") as err:
        tiny_encoder(weights_path=str(path))
    assert "vit_tiny_patch16_224" in str(err.value) and str(path) in str(err.value)


def test_missing_weights_file(tmp_path):
    path = tmp_path / "nowhere" / "dinov2.safetensors"
    with pytest.raises(FileNotFoundError, match=str(path)):
        tiny_encoder(weights_path=str(path))


@pytest.mark.parametrize("error", [
    OSError("We couldn't connect to 'https://huggingface.co' to load the files"),
    ConnectionError("[Errno -2] Name or service not known"),
])
def test_pretrained_offline_raises_one_clear_error(monkeypatch, error):
    real_create = timm.create_model
    calls = []

    def offline_create(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        if pretrained:  # what the hub download does without network
            raise error
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    with pytest.raises(RuntimeError) as err:
        tiny_encoder(pretrained=True)
    message = str(err.value)
    assert "vit_tiny_patch16_224" in message
    assert "encoder.weights_path=" in message and "HF_HUB_CACHE" in message
    assert err.value.__cause__ is error
    # a local file takes precedence over the hub: no download is attempted
    calls.clear()
    state_path = "unused"
    with pytest.raises(FileNotFoundError):
        tiny_encoder(pretrained=True, weights_path=state_path)
    assert calls == [False]


def test_config_errors():
    with pytest.raises(ValueError, match="set encoder.image_size=128"):
        FrozenEncoder(encoder_config("tiny", **TINY), grid=8)
    with pytest.raises(ValueError, match="vit_nonexistent_patch16"):
        FrozenEncoder(encoder_config("tiny", **TINY, timm_name="vit_nonexistent_patch16"))
    with pytest.raises(ValueError, match="set encoder.feature_dim=192"):
        FrozenEncoder(encoder_config("tiny", feature_dim=48))
    with pytest.raises(ValueError, match="set encoder.patch_size=16"):
        FrozenEncoder(encoder_config("tiny", **TINY, patch_size=8, image_size=32))


def test_hub_style_file_loads_as_timm_would(tmp_path):
    """A file as the hub holds it (224 px position table, 1000-class head) loads into the 64 px encoder:
    position embedding resampled and head dropped exactly as timm's own pretrained loading does."""
    torch.manual_seed(2)
    hub_model = timm.create_model("vit_tiny_patch16_224", num_classes=1000)
    path = tmp_path / "model.safetensors"
    _save(hub_model.state_dict(), path, "safetensors")
    enc = tiny_encoder(weights_path=str(path))
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=64,
                                  pretrained_cfg_overlay=dict(file=str(path), custom_load=False)).eval()
    x = images()
    with torch.no_grad():
        expected = reference.forward_features((x - enc.mean) / enc.std)[:, reference.num_prefix_tokens:]
    torch.testing.assert_close(enc(x), expected, rtol=0, atol=0)
