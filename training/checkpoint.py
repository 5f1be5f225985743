"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, resumable, never half-loaded.

Layout under a run's folder:
    checkpoints/step_00005000/        a complete checkpoint (DCP files + config.json + COMPLETE)
    checkpoints/step_00010000.partial/ one being written; never picked up by `latest()`
Every rank writes its shards into the `.partial` folder; after a barrier rank 0 writes the config and
the COMPLETE marker, then renames the folder (an atomic rename). A run killed at any moment therefore
leaves either a complete checkpoint or a `.partial` folder that is ignored and later removed.
"""
import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

_NAME = re.compile(r"^step_(\d{8})$")
_MARKER = "COMPLETE"
FAE_CONFIG_NAME = "fae_config.json"
"""Written by train_fae.py beside the whole-FAE weights file (fae.safetensors): its FAEConfig fields."""


class ModelAndOptimizer(Stateful):
    """Model and optimizer state through DCP's FSDP2-aware state-dict helpers."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state):
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


class CheckpointManager:
    """Save and find complete checkpoints in `folder`, keeping the newest `keep`."""

    def __init__(self, folder: str | Path, keep: int = 2):
        self.folder, self.keep = Path(folder), keep

    def complete(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if _NAME.match(p.name) and (p / _MARKER).exists()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, state: dict, config: dict) -> Path:
        final = self.folder / f"step_{step:08d}"
        partial = final.with_name(final.name + ".partial")
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        dcp.save(state, checkpoint_id=str(partial))
        dist.barrier()
        if dist.get_rank() == 0:
            (partial / "config.json").write_text(json.dumps(config, indent=1))
            (partial / _MARKER).write_text(str(step))
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.folder.glob("step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def load(path: Path, state: dict, config: dict, *, must_match: tuple[str, ...] = ("model",)) -> None:
        """Load `path` into `state` in place, after checking that the config sections in `must_match`
        agree with the ones the checkpoint was written with."""
        saved = json.loads((path / "config.json").read_text())
        for section in must_match:
            for key, value in config[section].items():
                old = saved.get(section, {}).get(key)
                if old != value and not (isinstance(value, (list, tuple)) and list(value) == old):
                    raise ValueError(
                        f"checkpoint {path} was written with {section}.{key}={old!r}, but this run has "
                        f"{section}.{key}={value!r}; pass --{section}.{key}={old!r} or use another run.out_dir")
        dcp.load(state, checkpoint_id=str(path))


def export_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None, path: str | Path) -> None:
    """Write full (gathered) weights as one safetensors file on rank 0: `tensors` (e.g. the EMA, keyed by
    parameter name) or the model's own. All ranks must call this (gathering is collective)."""
    from safetensors.torch import save_file

    if tensors is None:
        tensors = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    full = {}
    for name, t in tensors.items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        full[name.replace("_checkpoint_wrapped_module.", "")] = t.detach().float().cpu().contiguous()
    if dist.get_rank() == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(full, str(path))
    dist.barrier()


# ----------------------------------------------------------------------------------------------------
# Reading weights back into plain (unsharded) modules: sampling, extraction, the next FAE stage
# ----------------------------------------------------------------------------------------------------
def read_dcp_ema(folder: Path) -> dict[str, torch.Tensor]:
    """Full EMA weights of a DCP checkpoint folder (keys 'ema.<param>'), read by this process alone."""
    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    entries = {k[len("ema."):]: v for k, v in meta.items() if k.startswith("ema.")}
    if not entries:
        raise ValueError(f"checkpoint {folder} holds no EMA weights ('ema.*'); pass a step_XXXXXXXX checkpoint "
                         f"folder of train_gen.py or train_fae.py, or its exported ema.safetensors")
    state = {"ema": {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in entries.items()}}
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return state["ema"]


def read_weights(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors of an exported safetensors file, or the EMA of a DCP checkpoint folder."""
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if p.is_dir():
        return read_dcp_ema(p)
    if p.is_file():
        return load_file(str(p))
    raise FileNotFoundError(f"{what} weights {str(p)!r} do not exist; train that stage first or fix the path")


def load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str, hint: str,
                prefix: str = "") -> None:
    """Strict load with one error naming what does not fit: missing or unexpected names, or the first
    tensor of another shape (wrapper prefixes of FSDP/compile removed). `prefix`: the names' prefix in
    the file, for the message."""
    tensors = {k.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): v for k, v in tensors.items()}
    own = module.state_dict()
    for name, mine in own.items():  # in the module's order: the first misfit is the one to name
        if name in tensors and tuple(tensors[name].shape) != tuple(mine.shape):
            raise ValueError(f"weights in {source} do not fit the {type(module).__name__} config: {prefix}{name} is "
                             f"{tuple(tensors[name].shape)} there but {tuple(mine.shape)} here; {hint}")
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights in {source} do not fit the {type(module).__name__} config (missing "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''}); {hint}")


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, with it removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
