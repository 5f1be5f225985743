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
