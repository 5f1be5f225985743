"""Published SiT / LightningDiT checkpoints give their authors' outputs once loaded.

`public_forward` below is this test's own reading of the public forwards (willisma/SiT models.py,
hustvl/LightningDiT models/lightningdit.py), written on their state dicts and image layout: conv patch
embedding, t in [0, 1] embedded as is, DiT's modulation order, EVA's interleaved-pair 2-D RoPE from the
file's tables, SwiGLU halves (silu(first) * second), RMSNorm with weights, unpatchify to (N, C, H, W) and the
learned-sigma half dropped. Every parameter is random (no zero-initialised path hides a difference), and
files are written as the public train.py writes them."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fae_fast.adapters import convert, load_published, published_config, read_state_dict
from fae_fast.generators import Generator

# ---------------------------------------------------------------------------------------- the public layout


def dit_pos_embed(dim: int, n: int) -> torch.Tensor:
    """DiT's fixed 2-D sin-cos table (n*n, dim): first half from the column index, second from the row."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64),
                                indexing="ij")
    emb = lambda pos: torch.cat([(pos.reshape(-1, 1) * omega).sin(), (pos.reshape(-1, 1) * omega).cos()], 1)  # noqa: E731
    return torch.cat([emb(cols), emb(rows)], dim=1).float()


def eva_rope_tables(n: int, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA's VisionRotaryEmbeddingFast for an n x n grid: (n*n, head_dim) cos and sin. The first head_dim/2
    channels turn with the row, the rest with the column; channels 2i and 2i+1 share frequency i."""
    dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
    f = (torch.arange(n).float()[:, None] * freqs).repeat_interleave(2, dim=-1)  # (n, dim)
    table = torch.cat([f[:, None, :].expand(n, n, dim), f[None, :, :].expand(n, n, dim)], dim=-1)
    return table.cos().reshape(n * n, -1), table.sin().reshape(n * n, -1)


def public_state(fmt: str, *, depth=2, width=144, heads=2, in_ch=8, n=4, patch=1, classes=10, learn_sigma=False,
                 qk_norm=False, swiglu=None) -> dict[str, torch.Tensor]:
    """A random state dict with the public code's keys and shapes (n x n tokens of patch x patch cells)."""
    lightning = fmt == "lightningdit"
    swiglu = lightning if swiglu is None else swiglu
    out = in_ch * (2 if learn_sigma else 1) * patch * patch
    rnd = lambda *shape: torch.randn(*shape) / math.sqrt(shape[-1])  # noqa: E731
    sd = {"x_embedder.proj.weight": rnd(width, in_ch, patch, patch) * patch, "x_embedder.proj.bias": rnd(width),
          "pos_embed": dit_pos_embed(width, n)[None], "t_embedder.mlp.0.weight": rnd(width, 256),
          "t_embedder.mlp.0.bias": rnd(width), "t_embedder.mlp.2.weight": rnd(width, width),
          "t_embedder.mlp.2.bias": rnd(width), "y_embedder.embedding_table.weight": torch.randn(classes + 1, width),
          "final_layer.linear.weight": rnd(out, width), "final_layer.linear.bias": rnd(out),
          "final_layer.adaLN_modulation.1.weight": rnd(2 * width, width) * 0.5,
          "final_layer.adaLN_modulation.1.bias": rnd(2 * width)}
    if lightning:
        sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = eva_rope_tables(n, width // heads)
        sd["final_layer.norm_final.weight"] = 1 + 0.3 * torch.randn(width)
    hidden = int(2 / 3 * 4 * width) if swiglu else 4 * width
    for i in range(depth):
        b = f"blocks.{i}."
        sd |= {b + "attn.qkv.weight": rnd(3 * width, width), b + "attn.qkv.bias": rnd(3 * width),
               b + "attn.proj.weight": rnd(width, width), b + "attn.proj.bias": rnd(width),
               b + "adaLN_modulation.1.weight": rnd(6 * width, width) * 0.5, b + "adaLN_modulation.1.bias": rnd(6 * width)}
        if swiglu:
            sd |= {b + "mlp.w12.weight": rnd(2 * hidden, width), b + "mlp.w12.bias": rnd(2 * hidden),
                   b + "mlp.w3.weight": rnd(width, hidden), b + "mlp.w3.bias": rnd(width)}
        else:
            sd |= {b + "mlp.fc1.weight": rnd(hidden, width), b + "mlp.fc1.bias": rnd(hidden),
                   b + "mlp.fc2.weight": rnd(width, hidden), b + "mlp.fc2.bias": rnd(width)}
        if lightning:
            sd |= {b + "norm1.weight": 1 + 0.3 * torch.randn(width), b + "norm2.weight": 1 + 0.3 * torch.randn(width)}
        if qk_norm:
            sd |= {b + "attn.q_norm.weight": 1 + 0.3 * torch.randn(width // heads),
                   b + "attn.k_norm.weight": 1 + 0.3 * torch.randn(width // heads)}
    return sd


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _eva_rotate(x, cos, sin):
    pairs = x.unflatten(-1, (-1, 2))  # (..., Dh/2, 2): channels (2i, 2i+1)
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + turned * sin


def public_forward(sd, x, t, y, *, heads: int, dtype=torch.float32):
    """x (N, C, H, W), t (N,) in [0, 1] with 0 = noise, y (N,) -> velocity (N, C, H, W), computed in `dtype`."""
    W = lambda k: sd[k].to(dtype)  # noqa: E731
    lin = lambda h, k: F.linear(h, W(k + ".weight"), W(k + ".bias"))  # noqa: E731
    p = W("x_embedder.proj.weight").shape[-1]
    h = F.conv2d(x, W("x_embedder.proj.weight"), W("x_embedder.proj.bias"), stride=p).flatten(2).transpose(1, 2)
    h = h + W("pos_embed")
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].to(dtype) * freqs[None].to(dtype)  # t itself: no 1000x
    c = lin(F.silu(lin(torch.cat([args.cos(), args.sin()], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + W("y_embedder.embedding_table.weight")[y]
    norm = lambda h, k: _rms(h, W(k)) if k in sd else F.layer_norm(h, h.shape[-1:], eps=1e-6)  # noqa: E731
    modulate = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]  # noqa: E731
    B, N, D = h.shape
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        b = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        q, k, v = lin(modulate(norm(h, b + "norm1.weight"), sh1, sc1), b + "attn.qkv").reshape(
            B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        if b + "attn.q_norm.weight" in sd:
            q, k = _rms(q, W(b + "attn.q_norm.weight")), _rms(k, W(b + "attn.k_norm.weight"))
        if "feat_rope.freqs_cos" in sd:
            q, k = (_eva_rotate(z, W("feat_rope.freqs_cos"), W("feat_rope.freqs_sin")) for z in (q, k))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        h = h + g1[:, None] * lin(a, b + "attn.proj")
        m = modulate(norm(h, b + "norm2.weight"), sh2, sc2)
        if b + "mlp.w12.weight" in sd:
            x1, x2 = lin(m, b + "mlp.w12").chunk(2, dim=-1)
            m = lin(F.silu(x1) * x2, b + "mlp.w3")
        else:
            m = lin(F.gelu(lin(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + g2[:, None] * m
        i += 1
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(modulate(norm(h, "final_layer.norm_final.weight"), shift, scale), "final_layer.linear")
    n, C = round(N**0.5), out.shape[-1] // (p * p)
    imgs = torch.einsum("nhwpqc->nchpwq", out.reshape(B, n, n, p, p, C)).reshape(B, C, n * p, n * p)
    return imgs[:, : x.shape[1]]  # learned sigma: the first half of the channels is the prediction


# ---------------------------------------------------------------------------------------- the tests


def write(sd, tmp_path, layout: str):
    """The file as public code writes it: SiT's or LightningDiT's train.py dict, a bare EMA dict, safetensors."""
    if layout == "safetensors":
        path = tmp_path / "ema.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
    path = tmp_path / "ckpt.pt"
    decoy = {k: torch.zeros_like(v) for k, v in sd.items()}  # the online weights: the EMA must be chosen
    if layout == "sit-train":
        torch.save({"model": decoy, "ema": sd, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                    "args": argparse.Namespace(model="SiT-XL/2", image_size=256, global_batch_size=256)}, path)
    elif layout == "lightningdit-train":
        torch.save({"model": decoy, "ema": sd, "opt": {}, "config": {"model": {"use_qknorm": False}}}, path)
    else:
        torch.save(sd, path)
    return path


def relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


CASES = {  # name: (fmt, state options, file layout)
    "sit-patch1": ("sit", dict(), "sit-train"),
    "sit-xl2-layout": ("sit", dict(patch=2, in_ch=4, learn_sigma=True), "sit-train"),
    "lightningdit": ("lightningdit", dict(), "lightningdit-train"),
    "lightningdit-qknorm": ("lightningdit", dict(qk_norm=True), "bare"),
    "lightningdit-safetensors": ("lightningdit", dict(qk_norm=True), "safetensors"),
}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_published_checkpoint_gives_the_public_output(case, impl, tmp_path, device):
    """<= 1e-5 relative in fp32, on the plain and the fused path, for the same x, t (public convention), y."""
    fmt, options, layout = CASES[case]
    torch.manual_seed(0)
    sd = public_state(fmt, **options)
    heads = dict(heads=2) if fmt == "sit" else {}  # LightningDiT's heads come from its RoPE table
    model = load_published(write(sd, tmp_path, layout), fmt, impl=impl, **heads).to(device)
    N, C, n = 3, model.cfg.in_channels, model.cfg.grid
    x, t, y = torch.randn(N, C, n, n), torch.rand(N), torch.tensor([0, 9, 10])  # 10: the null label
    want = public_forward(sd, x.double(), t.double(), y, heads=model.cfg.heads, dtype=torch.float64).float()
    x, t, y = x.to(device), t.to(device), y.to(device)
    with torch.no_grad():
        got = model(x.permute(0, 2, 3, 1).reshape(N, n * n, C), t, y)  # tokens row-major, channels last
    got = got.reshape(N, n, n, C).permute(0, 3, 1, 2).cpu()
    assert relative_error(got, want) <= 1e-5, f"{case} ({impl}): relative error {relative_error(got, want):.2e}"


def test_each_conversion_is_needed():
    """Without the time scale, or without the RoPE permutation, the outputs differ: the test above can fail."""
    torch.manual_seed(1)
    sd = public_state("lightningdit", qk_norm=True)
    x, t, y = torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([1, 2])
    want = public_forward(sd, x, t, y, heads=2)
    tokens = x.permute(0, 2, 3, 1).reshape(2, 16, 8)

    def error(model, state):
        model.load_state_dict(state)
        with torch.no_grad():
            return relative_error(model(tokens, t, y).reshape(2, 4, 4, 8).permute(0, 3, 1, 2), want)

    cfg = published_config(sd, "lightningdit")
    model = Generator(cfg, impl="torch")
    state = convert(sd, "lightningdit", model)
    assert error(model, state) <= 1e-5
    assert error(Generator(published_config(sd, "lightningdit", time_scale=1000.0), impl="torch"), state) > 0.05
    unpermuted = dict(state)
    for k, v in sd.items():  # the file's q/k rows as they are
        if "attn.qkv" in k or "q_norm" in k or "k_norm" in k:
            unpermuted[k.replace(".weight", "") if "norm" in k else k] = v
    assert error(model, unpermuted) > 0.01


def test_options_are_read_from_the_file():
    sd = public_state("lightningdit", depth=3, width=144, heads=2, in_ch=8, n=4, classes=10)
    cfg = published_config(sd, "lightningdit")
    assert (cfg.depth, cfg.width, cfg.heads, cfg.in_channels, cfg.grid, cfg.num_classes) == (3, 144, 2, 8, 4, 10)
    assert (cfg.norm, cfg.mlp, cfg.rope, cfg.qk_norm, cfg.learn_sigma, cfg.time_scale) == ("rms", "swiglu", True,
                                                                                           False, False, 1.0)
    sit = published_config(public_state("sit", width=1152, heads=16, depth=1, patch=2, in_ch=4, n=16,
                                        learn_sigma=True), "sit")
    assert (sit.heads, sit.patch_size, sit.grid, sit.learn_sigma, sit.norm, sit.mlp) == (16, 2, 32, True, "layer", "gelu")


def test_bad_files_and_options_name_the_fix(tmp_path):
    sd = public_state("sit")
    with pytest.raises(ValueError, match="pass heads="):
        published_config(sd, "sit")  # width 144 is no published size
    with pytest.raises(ValueError, match="unknown checkpoint format 'sat'"):
        published_config(sd, "sat", heads=2)
    with pytest.raises(KeyError, match="has no place in the sit generator"):
        lightning = public_state("lightningdit")
        convert(lightning, "sit", Generator(published_config(lightning, "lightningdit"), impl="torch"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pt")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(write(sd, tmp_path, "sit-train").read_bytes()[:5000])
    with pytest.raises(ValueError, match="cannot be read safely"):
        read_state_dict(damaged)
    wrong_grid = public_state("lightningdit")
    wrong_grid["feat_rope.freqs_cos"] = eva_rope_tables(4, 144 // 2)[0] * 0.5
    with pytest.raises(ValueError, match="feat_rope.freqs_cos. differs"):
        load_published(write(wrong_grid, tmp_path, "bare"), "lightningdit", impl="torch")
