"""Published SiT / LightningDiT state dicts load into fae_fast's Generator with the right layouts."""
import pytest
import torch
import torch.nn.functional as F

from fae_fast.adapters import convert, load_published
from fae_fast.config import generator_config
from fae_fast.generators import Generator, patchify, unpatchify


def _published(model: Generator, fmt: str) -> dict[str, torch.Tensor]:
    """A state dict with the published key names and layouts, written out by hand per key family."""
    cfg, pub = model.cfg, {}
    p, C, D = cfg.patch_size, cfg.in_channels, cfg.width
    pub["x_embedder.proj.weight"] = torch.randn(D, C, p, p)  # a conv, as published
    pub["x_embedder.proj.bias"] = torch.randn(D)
    pub["pos_embed"] = model.pos_embed.clone()
    for name, value in model.state_dict().items():
        if name.startswith("x_embed"):
            continue
        new = (name.replace("t_embed.", "t_embedder.").replace("y_embed.table", "y_embedder.embedding_table")
               .replace(".adaLN.1.", ".adaLN_modulation.1.").replace("final.", "final_layer."))
        if fmt == "lightningdit":
            new = (new.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
                   .replace("final_layer.norm.weight", "final_layer.norm_final.weight")
                   .replace("attn.q_norm", "attn.q_norm.weight").replace("attn.k_norm", "attn.k_norm.weight"))
        pub[new] = torch.randn_like(value)
    return pub


def test_sit_patch2_conv_embedding_and_learned_sigma_layout(tmp_path):
    cfg = generator_config("SiT-tiny/1", patch_size=2, grid=8, in_channels=4, learn_sigma=True, num_classes=10)
    model = Generator(cfg, impl="torch")
    pub = _published(model, "sit")
    torch.save({"ema": pub}, tmp_path / "sit.pt")
    load_published(model, tmp_path / "sit.pt", "sit")
    # the linear patch embedding equals the published conv on the image layout
    x = torch.randn(2, 64, 4)
    image = x.view(2, 8, 8, 4).permute(0, 3, 1, 2)
    conv = F.conv2d(image, pub["x_embedder.proj.weight"], pub["x_embedder.proj.bias"], stride=2)  # (B, D, 4, 4)
    ours = model.x_embed(patchify(x, 8, 2))  # (B, 16, D)
    torch.testing.assert_close(ours, conv.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)
    # DiT's unpatchify: (h, w, p, q, c) -> (c, h*p, w*q); ours must agree on the velocity half
    out = torch.randn(2, 16, 2 * 2 * 8)
    dit = out.view(2, 4, 4, 2, 2, 8).permute(0, 5, 1, 3, 2, 4).reshape(2, 8, 8, 8)[:, :4]
    mine = unpatchify(out.view(2, 16, 4, 2, 4)[..., 0, :].flatten(-2), 8, 2)
    torch.testing.assert_close(mine, dit.permute(0, 2, 3, 1).reshape(2, 64, 4))
    assert model(x, torch.rand(2), torch.tensor([1, 10])).shape == (2, 64, 4)


def test_lightningdit_names_load_and_every_parameter_is_set():
    cfg = generator_config("LightningDiT-tiny/1", in_channels=4, grid=4, num_classes=10)
    model = Generator(cfg, impl="torch")
    pub = _published(model, "lightningdit")
    converted = convert(pub, "lightningdit", model)
    model.load_state_dict(converted)
    torch.testing.assert_close(model.blocks[1].mlp.fc1.weight, pub["blocks.1.mlp.w12.weight"])
    torch.testing.assert_close(model.blocks[0].attn.q_norm, pub["blocks.0.attn.q_norm.weight"])


def test_a_file_that_does_not_fit_names_the_first_bad_key():
    model = Generator(generator_config("LightningDiT-tiny/1", in_channels=4, grid=4, num_classes=10), impl="torch")
    pub = _published(model, "lightningdit")
    with pytest.raises(KeyError, match="key .blocks.0.norm1.weight. has no place in the sit generator"):
        convert(pub, "sit", model)  # a LightningDiT file read as SiT
    pub["blocks.1.attn.qkv.weight"] = torch.randn(7, 7)
    with pytest.raises(ValueError, match=r"'blocks.1.attn.qkv.weight' has shape \(7, 7\)"):
        convert(pub, "lightningdit", model)
    del pub["blocks.1.attn.qkv.weight"]
    with pytest.raises(KeyError, match="nothing for 'blocks.1.attn.qkv.weight'"):
        convert(pub, "lightningdit", model)
