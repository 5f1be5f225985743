"""Load published SiT / DiT and LightningDiT checkpoints into fae_fast's Generator.

Only names and layouts change: the conv patch embedding becomes a linear map over (row, col, channel)
patch vectors, `adaLN_modulation.1` becomes `adaLN.1`, LightningDiT's fused SwiGLU `w12`/`w3` become
`fc1`/`fc2`, and so on. The fixed sin-cos position table is not loaded but checked against ours.
A file that does not fit raises one error naming the first key that does not match and why.

Note: LightningDiT's released code applies RoPE with EVA's pair convention; fae_fast rotates halves
(kernels/rope.py). Weights load either way, but reproducing that checkpoint's outputs bit for bit would
need the q/k channel permutation between the two conventions, which is not applied here.
"""
import re
from pathlib import Path

import torch

from fae_fast.generators import Generator

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
    (r"blocks\.(\d+)\.(norm1|norm2)\.(?:weight|scale)", r"blocks.\1.\2.weight"),
    (r"blocks\.(\d+)\.attn\.(q_norm|k_norm)\.(?:weight|scale)", r"blocks.\1.attn.\2"),
    (r"final_layer\.norm_final\.(?:weight|scale)", r"final.norm.weight"),
]
FORMATS = {"sit": _SIT, "dit": _SIT, "lightningdit": _LIGHTNING}
_SKIPPED = {"pos_embed"}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch file; unwraps {'ema': ...} / {'model': ...} training files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("ema", "model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            return state[key]
    return state


def _conv_to_linear(w: torch.Tensor) -> torch.Tensor:
    # conv weight (D, C, p, p) -> linear weight (D, p*p*C) over patch vectors ordered (row, col, channel)
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.ndim == 4 else w


def convert(published: dict[str, torch.Tensor], fmt: str, model: Generator) -> dict[str, torch.Tensor]:
    """Published state dict -> fae_fast names and layouts, checked against `model` key by key."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    rules = [(re.compile(p + r"$"), r) for p, r in FORMATS[fmt]]
    expected = model.state_dict()
    out = {}
    for key, value in published.items():
        if key in _SKIPPED:
            _check_pos_embed(value, model)
            continue
        name = next((pat.sub(rep, key) for pat, rep in rules if pat.match(key)), None)
        if name is None or name not in expected:
            raise KeyError(f"checkpoint key {key!r} has no place in the {fmt} generator "
                           f"(mapped to {name!r}); is this a {fmt} checkpoint of this size?")
        value = _conv_to_linear(value) if name == "x_embed.weight" else value
        if value.shape != expected[name].shape:
            raise ValueError(f"checkpoint key {key!r} has shape {tuple(value.shape)} but {name} needs "
                             f"{tuple(expected[name].shape)}; the model config does not match the file")
        out[name] = value
    missing = [k for k in expected if k not in out]
    if missing:
        raise KeyError(f"checkpoint has nothing for {missing[0]!r} ({len(missing)} missing in all); "
                       f"is this a {fmt} checkpoint with the same options (qk_norm, rope, mlp)?")
    return out


def _check_pos_embed(value: torch.Tensor, model: Generator) -> None:
    ours = model.pos_embed
    if ours is None or value.numel() != ours.numel() or not torch.allclose(value.float().view_as(ours), ours, atol=1e-4):
        raise ValueError("checkpoint key 'pos_embed' differs from fae_fast's fixed 2-D sin-cos table; "
                         "check model.grid, model.patch_size and model.pos_embed")


def load_published(model: Generator, path: str | Path, fmt: str) -> Generator:
    """Load a published checkpoint file into `model` (unsharded), in place."""
    model.load_state_dict(convert(read_state_dict(path), fmt, model))
    return model
