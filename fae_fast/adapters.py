"""Load published SiT / DiT and LightningDiT checkpoints into fae_fast's Generator, with their outputs.

`load_published(path, fmt)` reads a file as the public code writes it (its train.py layout
{model, ema, opt, args|config}, or a bare state dict; .pt or .safetensors; the EMA weights preferred),
infers the model's options from the keys and shapes, builds the Generator and loads it. Checked by equal
outputs against a forward written after the public code (tests/test_adapters.py). What is converted:

- Names and layouts: the conv patch embedding becomes a linear map over (row, col, channel) patch vectors,
  `adaLN_modulation.1` -> `adaLN.1`, LightningDiT's SwiGLU `w12`/`w3` -> `fc1`/`fc2`, RMSNorm and QK-norm
  weights, `final_layer` -> `final`.
- Time: SiT and LightningDiT embed t in [0, 1] itself, fae_fast 1000 t: the config gets time_scale=1 (a DiT
  file keeps 1000: DiT embeds its integer step). The direction is the same everywhere (t = 0 is noise).
- RoPE: LightningDiT rotates interleaved pairs (2i, 2i+1) of each head (EVA's convention); fae_fast rotates
  halves (i, i + Dh/2) with the same angles per pair. Each head's q and k rows of the qkv weight and bias (and
  the QK-norm weights) are permuted so that pair i of the file becomes pair i here; attention scores are
  unchanged because q and k move together. The file's RoPE tables (`feat_rope.freqs_cos|sin`) are buffers,
  not loaded but checked against ours, as is the fixed sin-cos `pos_embed`.
- Options inferred: depth, width, in_channels, patch_size, grid, num_classes, learn_sigma, norm, mlp,
  mlp_ratio, rope, qk_norm; heads from the RoPE table's head dim, else from the width of the published sizes
  (pass heads=... for another). Any GeneratorConfig field can be overridden; one that contradicts the file
  fails naming the key.
"""
import argparse
import pickle
import re
from pathlib import Path

import torch

from fae_fast.config import GeneratorConfig
from fae_fast.generators import Generator
from fae_fast.layers import rope_angles_2d

# (published-name pattern, fae_fast name); \1 carries the block index
_COMMON = [
    (r"x_embedder\.proj\.(weight|bias)", r"x_embed.\1"),
    (r"t_embedder\.mlp\.(\d)\.(weight|bias)", r"t_embed.mlp.\1.\2"),
    (r"y_embedder\.embedding_table\.weight", r"y_embed.table.weight"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"blocks.\1.adaLN.1.\2"),
    (r"final_layer\.linear\.(weight|bias)", r"final.linear.\1"),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", r"final.adaLN.1.\1"),
]
_SIT = _COMMON + [
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
]
_LIGHTNING = _COMMON + [
    (r"blocks\.(\d+)\.mlp\.w12\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),  # use_swiglu=False
    (r"blocks\.(\d+)\.(norm1|norm2)\.weight", r"blocks.\1.\2.weight"),
    (r"blocks\.(\d+)\.attn\.(q_norm|k_norm)\.weight", r"blocks.\1.attn.\2"),
    (r"final_layer\.norm_final\.weight", r"final.norm.weight"),
]
FORMATS = {"sit": _SIT, "dit": _SIT, "lightningdit": _LIGHTNING}
_TIME_SCALE = {"sit": 1.0, "dit": 1000.0, "lightningdit": 1.0}
_BUFFERS = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")  # checked, not loaded
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}  # DiT/SiT/LightningDiT S, B, L, XL


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch file. A training file ({'ema', 'model', 'opt', 'args' or 'config'}
    as SiT's and LightningDiT's train.py write it) gives its EMA weights, else its model weights. Only
    tensors and plain values are unpickled (SiT's argparse.Namespace of arguments is allowed too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _strip_prefixes(load_file(str(path)))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:  # OSError: a truncated zip
        raise ValueError(f"checkpoint {str(path)!r} cannot be read safely ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}); if it is a damaged download, fetch it again, else "
                         "re-save its state dict alone with torch.save(state_dict, path)") from err
    for key in ("ema", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {str(path)!r} holds no state dict of tensors (nor 'ema'/'model' entries)")
    return _strip_prefixes(state)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without the 'module.' (DDP) or '_orig_mod.' (torch.compile) prefix every key may carry."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def published_config(state: dict[str, torch.Tensor], fmt: str, **overrides) -> GeneratorConfig:
    """The GeneratorConfig a published state dict was trained with, read off its keys and shapes."""
    _check_format(fmt)
    need = lambda key: _need(state, key, fmt)  # noqa: E731
    conv = need("x_embedder.proj.weight")  # (D, C, p, p)
    width, in_channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    tokens = need("pos_embed").shape[-2]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    out = need("final_layer.linear.weight").shape[0]
    swiglu = "blocks.0.mlp.w12.weight" in state
    hidden = need("blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight").shape[0]
    rope = "feat_rope.freqs_cos" in state
    inferred = dict(
        depth=depth, width=width, in_channels=in_channels, patch_size=patch, grid=round(tokens**0.5) * patch,
        num_classes=need("y_embedder.embedding_table.weight").shape[0] - 1,  # the last row is the null label
        learn_sigma=out == 2 * patch * patch * in_channels,
        norm="rms" if "blocks.0.norm1.weight" in state else "layer", mlp="swiglu" if swiglu else "gelu",
        mlp_ratio=1.5 * hidden / 2 / width if swiglu else hidden / width, rope=rope,
        qk_norm="blocks.0.attn.q_norm.weight" in state, pos_embed=True, time_scale=_TIME_SCALE[fmt],
    )
    if rope:
        inferred["heads"] = width // state["feat_rope.freqs_cos"].shape[-1]
    elif width in _HEADS_BY_WIDTH:
        inferred["heads"] = _HEADS_BY_WIDTH[width]
    elif "heads" not in overrides:
        raise ValueError(f"the {fmt} checkpoint's width {width} is none of the published sizes "
                         f"{sorted(_HEADS_BY_WIDTH)}, so its number of heads is unknown; pass heads=...")
    return GeneratorConfig(**{**inferred, **overrides})


def _need(state, key: str, fmt: str) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"checkpoint has no {key!r}; is this a {fmt} checkpoint?")
    return state[key]


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of: {', '.join(FORMATS)}")


def _conv_to_linear(w: torch.Tensor) -> torch.Tensor:
    # conv weight (D, C, p, p) -> linear weight (D, p*p*C) over patch vectors ordered (row, col, channel)
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.ndim == 4 else w


def interleaved_to_halves(head_dim: int) -> torch.Tensor:
    """Index map of one head's channels: channel j here is channel perm[j] of an interleaved-pair (EVA)
    RoPE layout. Pair i = (2i, 2i+1) there becomes (i, i + Dh/2) here."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_qk(name: str, value: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv weight (3*H*Dh, D) or bias (3*H*Dh,), or a QK-norm weight (Dh,), from interleaved to half pairs."""
    if name.endswith("q_norm") or name.endswith("k_norm"):
        return value[interleaved_to_halves(value.shape[0])]
    rows = value.view(3, heads, -1, *value.shape[1:])  # (3, H, Dh, ...)
    perm = interleaved_to_halves(rows.shape[2])
    return torch.cat([rows[:2, :, perm], rows[2:]]).reshape(value.shape)


def convert(published: dict[str, torch.Tensor], fmt: str, model: Generator) -> dict[str, torch.Tensor]:
    """Published state dict -> fae_fast names and layouts, checked against `model` key by key."""
    _check_format(fmt)
    rules = [(re.compile(p + r"$"), r) for p, r in FORMATS[fmt]]
    expected, cfg = model.state_dict(), model.cfg
    rope_pairs = fmt == "lightningdit" and cfg.rope
    out = {}
    for key, value in published.items():
        if key in _BUFFERS:
            _check_buffer(key, value, model)
            continue
        name = next((pat.sub(rep, key) for pat, rep in rules if pat.match(key)), None)
        if name is None or name not in expected:
            raise KeyError(f"checkpoint key {key!r} has no place in the {fmt} generator "
                           f"(mapped to {name!r}); is this a {fmt} checkpoint with these options (qk_norm, rope, mlp)?")
        value = _conv_to_linear(value) if name == "x_embed.weight" else value
        if value.shape != expected[name].shape:
            raise ValueError(f"checkpoint key {key!r} has shape {tuple(value.shape)} but {name} needs "
                             f"{tuple(expected[name].shape)}; the model config does not match the file")
        if rope_pairs and re.search(r"attn\.(qkv\.|q_norm|k_norm)", name):
            value = _permute_qk(name, value, cfg.heads)
        out[name] = value
    missing = [k for k in expected if k not in out]
    if missing:
        raise KeyError(f"checkpoint has nothing for {missing[0]!r} ({len(missing)} missing in all); "
                       f"is this a {fmt} checkpoint with the same options (qk_norm, rope, mlp)?")
    return out


def _check_buffer(key: str, value: torch.Tensor, model: Generator) -> None:
    """The file's fixed tables must be the ones this model computes (else its outputs would differ)."""
    cfg = model.cfg
    if key == "pos_embed":
        ours = model.pos_embed
    elif not cfg.rope:
        raise KeyError(f"checkpoint key {key!r} is a RoPE table but the model has rope=False; set rope=True")
    else:  # EVA's table: pair i = channels (2i, 2i+1) turns by our angle i
        angles = rope_angles_2d(cfg.grid // cfg.patch_size, cfg.width // cfg.heads).repeat_interleave(2, dim=-1)
        ours = angles.cos() if key.endswith("cos") else angles.sin()
    if ours is None or value.numel() != ours.numel() or not torch.allclose(value.float().view_as(ours), ours, atol=1e-4):
        raise ValueError(f"checkpoint key {key!r} differs from fae_fast's fixed table of that name; "
                         "check grid, patch_size, heads and pos_embed of the model config")


def load_published(path: str | Path, fmt: str, *, impl: str = "auto", **overrides) -> Generator:
    """A Generator with a published checkpoint's weights and options (see the module docstring), in eval
    mode. fmt: 'sit', 'dit' or 'lightningdit'; overrides: GeneratorConfig fields (e.g. heads=...)."""
    state = read_state_dict(path)
    model = Generator(published_config(state, fmt, **overrides), impl=impl)
    model.load_state_dict(convert(state, fmt, model))
    return model.eval()
