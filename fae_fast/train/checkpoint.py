"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, resumable, never half-loaded.

Layout under a run's folder:
    checkpoints/step_00005000/        a complete checkpoint (DCP files + config.json + COMPLETE)
    checkpoints/step_00010000.partial/ one being written; never picked up by `latest()`
Every rank writes its shards into the `.partial` folder; after a barrier rank 0 writes the config and
the COMPLETE marker, then renames the folder (an atomic rename). A run killed at any moment therefore
leaves either a complete checkpoint or a `.partial` folder that is ignored and later removed.

Integrity: before the COMPLETE marker, rank 0 writes checksums.json (size and SHA-256 of every file). On
resume the newest complete checkpoint is verified; a damaged one (a truncated or overwritten shard, an
empty config.json) is skipped with one warning naming the folder and the reason, and the run resumes from
the newest intact one. If checkpoints exist and none is intact, the run stops: it never starts from
scratch over them. Hashing costs about 1 s per GB on rank 0, at save and at resume.
"""
import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

_NAME = re.compile(r"^step_(\d{8})$")
_MARKER = "COMPLETE"
_CHECKSUMS = "checksums.json"
FAE_CONFIG_NAME = "fae_config.json"
"""Written by train_fae.py beside the whole-FAE weights file (fae.safetensors): its FAEConfig fields."""


def step_of(folder: Path) -> int:
    """The step of a checkpoint folder step_XXXXXXXX."""
    return int(_NAME.match(Path(folder).name).group(1))


def fill_missing_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter that has no optimizer state yet (one that never had a gradient, e.g.
    the caption stream's output path in a text model's last joint block) the state that DCP gives every
    parameter of a fresh optimizer when a checkpoint is loaded into it: one step at learning rate 0 on a
    zero gradient (the parameter does not move). Saved checkpoints then hold what a load expects, and the
    uninterrupted run, which saved it, holds the same state as the resumed one. DCP's own save does the same
    to an optimizer with no state at all (e.g. the FAE discriminator's before loss.disc_start); in both cases
    a parameter whose first gradient comes after a save starts its Adam steps at 2, not 1 (its first update
    about 0.74x as large with betas (0.9, 0.999)), in the saving run and in a run resumed from it alike."""
    missing = [p for group in optimizer.param_groups for p in group["params"]
               if p.requires_grad and p not in optimizer.state]
    if not missing:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads, missing_ids = [p.grad for p in params], {id(p) for p in missing}
    for p in params:  # only the missing ones take this step
        p.grad = torch.zeros_like(p) if id(p) in missing_ids else None
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for p, grad in zip(params, grads):
        p.grad = grad


class ModelAndOptimizer(Stateful):
    """Model and optimizer state through DCP's FSDP2-aware state-dict helpers."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        fill_missing_optimizer_state(self.optimizer)
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        for group in optim_state.get("param_groups", []):  # a captured step's rate is a device tensor
            if isinstance(group.get("lr"), torch.Tensor):  # saved as the float every run saves and loads
                group["lr"] = float(group["lr"])
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

    def latest_intact(self, upto_step: int | None = None) -> Path | None:
        """The newest complete checkpoint (of step <= upto_step, if given) whose files match their checksums
        (None: there is none). Damaged newer ones are skipped with a warning; if all are damaged, a ValueError
        says so. Rank 0 checks, every rank gets its answer."""
        answer = [None]
        if not dist.is_initialized() or dist.get_rank() == 0:
            answer = [self._pick_intact(upto_step)]
        if dist.is_initialized():
            dist.broadcast_object_list(answer, src=0)
        if isinstance(answer[0], str) and answer[0].startswith("error: "):
            raise ValueError(answer[0][len("error: "):])
        return Path(answer[0]) if answer[0] else None

    def _pick_intact(self, upto_step: int | None) -> str | None:
        done, reasons = self.complete(), []
        if upto_step is not None:
            done = [p for p in done if step_of(p) <= upto_step]
        for path in reversed(done):
            reason = damage(path)
            if reason is None:
                return str(path)
            reasons.append(f"{path.name}: {reason}")
            warnings.warn(f"checkpoint {path} is damaged ({reason}); trying the one before it", stacklevel=3)
        if done:
            return (f"error: every checkpoint in {self.folder} is damaged ({'; '.join(reasons)}); the run will not "
                    f"start from scratch over them: move the folder away to start over, or restore a copy")
        return None

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
            (partial / _CHECKSUMS).write_text(json.dumps(checksums(partial), indent=1))
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def checksums(folder: Path) -> dict[str, dict]:
    """{relative file name: {'bytes', 'sha256'}} of every file in a checkpoint folder (marker excluded)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (_MARKER, _CHECKSUMS))
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}


def damage(folder: Path) -> str | None:
    """Why a complete checkpoint folder cannot be trusted, or None. Folders written before checksums
    existed are checked for a readable config.json only."""
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        return f"config.json unreadable: {type(err).__name__}"
    listed_path = folder / _CHECKSUMS
    if not listed_path.is_file():
        return None
    try:
        listed = json.loads(listed_path.read_text())
    except ValueError:
        return f"{_CHECKSUMS} unreadable"
    for name, want in listed.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {want['bytes']} were written"
        if _sha256(file) != want["sha256"]:
            return f"{name} differs from what was written (checksum)"
    return None


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
    if (folder / _MARKER).exists() and (reason := damage(folder)) is not None:
        raise ValueError(f"checkpoint {folder} is damaged ({reason}); pass an intact step_XXXXXXXX folder or an "
                         f"exported ema.safetensors")
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
        try:
            return load_file(str(p))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError for every bad file
            raise ValueError(f"{what} weights file {str(p)!r} cannot be read ({type(err).__name__}: {str(err)[:100]}); "
                             f"it is damaged or not a safetensors file: export or copy it again") from None
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
