"""What every torchrun program here shares: process group, progress lines, EMA, schedules, NaN guard, plots.

train_gen.py and train_fae.py both build on these pieces; nothing here knows which model it trains.
"""
import atexit
import collections
import contextlib
import datetime
import functools
import json
import logging
import math
import os
import socket
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Dist:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU); a plain `python` start becomes a
    one-process group, so the same code path (FSDP2, DCP) runs either way."""
    alone = "RANK" not in os.environ  # a plain `python` start: no launcher, no port to share
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: process LOCAL_RANK={local_rank} has no GPU of its own (this machine shows "
                             f"{torch.cuda.device_count()}); start at most that many per node (torchrun "
                             f"--nproc_per_node={torch.cuda.device_count()}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) "
                             "to run every process on the CPU")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        atexit.register(_leave_process_group)  # an error exit too: NCCL's leak warning must not bury the error
        # alone: an in-memory store, so that no port can be taken by another process between choice and use
        store = dict(store=dist.HashStore(), rank=0, world_size=1) if alone else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None, **store)
    show_library_log(dist.get_rank() == 0)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """t averaged over the ranks in place (one all-reduce; nothing to do on one rank); returns t."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def gather_objects(obj) -> list:
    """Every rank's `obj` (any picklable object), in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def show_library_log(is_main: bool) -> None:
    """fae_fast's log lines (the attention backend chosen per shape, notes on optional packages) on stderr:
    INFO and above on rank 0, warnings on the others. Only the fae_fast loggers: other libraries keep theirs."""
    log = logging.getLogger("fae_fast")
    if not any(getattr(h, "fae_fast_program", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        handler.fae_fast_program = True
        log.addHandler(handler)
    log.setLevel(logging.INFO if is_main else logging.WARNING)


def finish_distributed() -> None:
    """All ranks meet, then leave the process group together. Without this a rank that exits while a
    peer is still busy (rank 0 writing plots) closes gloo's sockets under the peer, which then aborts."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------
# Optimisation helpers
# ----------------------------------------------------------------------------------------------------
def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate: linear warmup, then constant or cosine to zero."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"optim.schedule={schedule!r} is not 'constant' or 'cosine'")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameter), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """fp32 exponential moving average of the trainable weights, sharded exactly like them.

    Under FSDP2 the parameters are DTensors; the EMA keeps fp32 copies of the same DTensors and updates
    the local shards only (the update is elementwise, so no communication is needed).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        # ema <- decay * ema + (1 - decay) * param, on the local shards
        torch._foreach_lerp_([_local(s) for s in self.shadow], [_local(p).float() for p in self.params],
                             1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """Temporarily load the EMA weights into the model (all ranks must enter together)."""
        backup = [_local(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                _local(p).copy_(_local(s))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    _local(p).copy_(b)

    def state_dict(self) -> dict:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, s in zip(self.names, self.shadow):
                if state[name] is not s:
                    _local(s).copy_(_local(state[name]))


class NonFiniteGuard:
    """Remembers, on the device and without a sync per step, the first step whose loss was not finite."""

    def __init__(self, device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, step: int, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all() & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, terms: dict[str, float], last_checkpoint: str | None, lr: float | None = None) -> None:
        step = int(self.first_bad)
        if step >= 0:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
            lower = f"lower --optim.lr (now {lr:g})" if lr is not None else "lower --optim.lr"
            if last_checkpoint is None:
                advice = f"No checkpoint was written yet: {lower} and start again."
            else:
                advice = (f"{lower} and run the same command: it resumes from the newest checkpoint, {last_checkpoint}, "
                          f"which this run left untouched. If the loss had already risen before that step (see "
                          f"loss.png), delete that checkpoint folder first, or start over in a new --run.out_dir.")
            raise FloatingPointError(f"loss became NaN or inf at step {step} (recent terms: {shown}); stopped. {advice}")


def data_index(step: int, skip: list) -> int:
    """The batch index training step `step` reads: the step-th index outside the inclusive ranges `skip`."""
    index = step
    for first, last in sorted((int(a), int(b)) for a, b in skip):
        if index >= first:
            index += last - first + 1
    return index


def merge_ranges(ranges: list) -> list[list[int]]:
    """Sorted, non-overlapping inclusive ranges covering the same indices."""
    out: list[list[int]] = []
    for first, last in sorted((int(a), int(b)) for a, b in ranges):
        if out and first <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return out


@dataclass
class Spike:
    first_step: int
    """The first training step of the run of high losses."""
    last_step: int
    """The step at which the run reached spike_patience steps."""
    losses: list[float]
    """The losses of that run."""
    median: float
    """The median of the clean window they were judged against."""


class SpikeGuard:
    """Judges per-step losses (mean over ranks) against the median of the last `window` clean ones, on the
    host, once per log interval (the losses wait on the device until then: no sync per step). A loss is high
    when its excess over `floor` (the least the loss can be: 0 for a squared error, the noise's entropy for
    an NLL, which can be negative) is more than `factor` times the median's."""

    MIN_HISTORY = 50

    def __init__(self, factor: float, window: int, patience: int, floor: float = 0.0):
        self.factor, self.patience, self.floor = factor, patience, floor
        self.clean: collections.deque = collections.deque(maxlen=window)
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.run: list[tuple[int, float]] = []

    def observe(self, step: int, loss: torch.Tensor) -> None:
        if self.factor > 0:
            self.pending.append((step, loss.detach().float().reshape(())))

    def check(self) -> Spike | None:
        """The first spike among the losses observed since the last check, or None."""
        if not self.pending:
            return None
        steps, values = zip(*self.pending)
        losses = mean_over_ranks(torch.stack(values))
        self.pending = []
        for step, loss in zip(steps, losses.tolist()):
            if spike := self._judge(step, loss):
                return spike
        return None

    def _judge(self, step: int, loss: float) -> Spike | None:
        if not math.isfinite(loss):  # NaN / inf: the NonFiniteGuard stops the run and says so
            self.run = []
            return None
        median = statistics.median(self.clean) if len(self.clean) >= self.MIN_HISTORY else math.inf
        if loss - self.floor > self.factor * (median - self.floor):
            self.run.append((step, loss))
            if len(self.run) >= self.patience:
                spike = Spike(self.run[0][0], step, [v for _, v in self.run], median)
                self.run = []
                return spike
            return None
        self.run = []  # a run shorter than patience was noise; its steps stay out of the clean window
        self.clean.append(loss)
        return None

    def restart(self) -> None:
        """After a rollback: forget the losses not yet judged and any run in progress (the window stays)."""
        self.pending, self.run = [], []


# ----------------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------------
def measured_bf16_peak(device: torch.device) -> float:
    """bf16 matmul FLOP/s of this GPU: the best of five timings of twenty 8192^3 products after fifty to
    raise the clocks, measured once per process and device (a few milliseconds from idle read up to 9% low
    on an H200: 723-794 TFLOP/s across processes), so that every MFU of a process has the same denominator;
    0 on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0.0
    return _measured_bf16_peak(device.index if device.index is not None else torch.cuda.current_device())


BEST_KNOWN_BF16_PEAK = {"NVIDIA H100 80GB HBM3": 749e12, "NVIDIA H200": 790e12}
"""The highest bf16 8192^3 product rate measured on each lent GPU kind (the project's BASELINES, 2026-11-22)."""


def conservative_bf16_peak(measured: float, gpu_name: str) -> float:
    """The larger of a run's measured bf16 peak and the best known for its GPU kind. A GPU that measures its
    peak low (H200s read 652-794 TFLOP/s in different calls, while their training steps moved 4%) inflates an
    MFU against its own measurement; one against this cannot be inflated that way."""
    return max(measured, BEST_KNOWN_BF16_PEAK.get(gpu_name, 0.0))


def training_mfu_peak(device: torch.device) -> float:
    """The denominator of the MFU in training progress lines: the conservative peak (above) of this GPU, 0 on
    CPU. A GPU shared with other work measures its peak low (an FP8 toy run beside a test suite on an H200
    printed MFU 1.11 against its own measurement); against the best known rate it cannot read above 1 that way."""
    measured = measured_bf16_peak(device)
    return conservative_bf16_peak(measured, torch.cuda.get_device_name(device)) if measured else 0.0


@functools.cache
def _measured_bf16_peak(index: int) -> float:
    a = torch.randn(8192, 8192, device=f"cuda:{index}", dtype=torch.bfloat16)
    for _ in range(50):
        a @ a
    best = math.inf
    for _ in range(5):
        torch.cuda.synchronize(index)
        start = time.perf_counter()
        for _ in range(20):
            a @ a
        torch.cuda.synchronize(index)
        best = min(best, time.perf_counter() - start)
    return 20 * 2 * 8192**3 / best


class Progress:
    """One line per log interval: a bar, step, loss terms, images/s (all ranks, and per GPU on several),
    MFU (per GPU, against one GPU's measured peak), memory and ETA.

    With `history_path` the logged terms of earlier runs of the same folder, up to `start_step`, are read
    back on resume and `save()` writes them all again: the curve of a resumed run is whole."""

    def __init__(self, *, total_steps: int, start_step: int, global_batch: int, flops_per_image: float,
                 peak_flops: float, device: torch.device, world: int = 1, tensorboard_dir: str | None = None,
                 history_path: str | None = None):
        self.total, self.batch, self.flops, self.peak, self.device = total_steps, global_batch, flops_per_image, peak_flops, device
        self.world = world
        self.last_step, self.last_time = start_step, time.perf_counter()
        self.history_path = history_path
        self.history: list[tuple[int, dict[str, float]]] = _earlier_history(history_path, start_step)
        self.writer = _tensorboard(tensorboard_dir)

    def save(self) -> None:
        """Write the history (rank 0) as JSON [[step, {term: value}], ...]."""
        if self.history_path and (not dist.is_initialized() or dist.get_rank() == 0):
            with open(self.history_path, "w") as f:
                json.dump(self.history, f)

    def rewind(self, step: int) -> None:
        """Forget what was logged after `step` (a rollback): the curve shows the path the run kept."""
        self.history = [(s, terms) for s, terms in self.history if s <= step]

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation) out of the next line's images/s and ETA."""
        self.last_time += seconds

    def line(self, step: int, terms: dict[str, float]) -> str:
        now = time.perf_counter()
        rate = (step - self.last_step) * self.batch / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        self.history.append((step, terms))
        if self.writer is not None:
            for key, value in {**terms, "images_per_s": rate}.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        eta = datetime.timedelta(seconds=int((self.total - step) * self.batch / max(rate, 1e-9)))
        filled = int(20 * step / self.total)
        parts = [f"[{'#' * filled}{'.' * (20 - filled)}] step {step}/{self.total}"]
        parts += [f"{k} {v:.4f}" for k, v in terms.items()]
        unit = "GPU" if self.device.type == "cuda" else "rank"
        parts.append(f"{rate:,.0f} img/s" + (f" ({rate / self.world:,.0f} per {unit})" if self.world > 1 else ""))
        if self.peak:
            parts.append(f"MFU {rate / self.world * self.flops / self.peak:.2f}")
        if self.device.type == "cuda":
            parts.append(f"mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB")
        parts.append(f"ETA {eta}")
        return " | ".join(parts)


def _earlier_history(path: str | None, upto: int) -> list:
    """Entries of a history file with step <= upto (a resumed run continues from step `upto`), or []."""
    if not path or upto <= 0 or not os.path.exists(path):
        return []
    with open(path) as f:
        return [(int(step), terms) for step, terms in json.load(f) if int(step) <= upto]


def _tensorboard(log_dir: str | None):
    """A SummaryWriter on rank 0 when tensorboard is installed and a folder is given, else None."""
    if not log_dir or (dist.is_initialized() and dist.get_rank() != 0):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the log lines and loss.png carry the same numbers
        return None
    return SummaryWriter(log_dir)


EVAL_TERMS = ("fid", "frechet")
"""History terms that are evaluations (drawn on a second axis), not losses."""


def plot_curves(history: list[tuple[int, dict[str, float]]], path: str, title: str) -> None:
    """Write the logged loss terms against step as a PNG, evaluations (FID, Frechet) on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    evals = [k for k in EVAL_TERMS if any(k in terms for _, terms in history)]
    for key in dict.fromkeys(k for _, terms in history for k in terms if k not in EVAL_TERMS):
        points = [(s, terms[key]) for s, terms in history if key in terms]
        ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    if evals:  # evaluations on their own axis, as points: they come every eval_every steps
        twin = ax.twinx()
        for key, colour in zip(evals, ("tab:red", "tab:purple")):
            twin.plot(*zip(*[(s, terms[key]) for s, terms in history if key in terms]), "o-", color=colour, label=key)
        twin.set_ylabel(" / ".join(evals))
        more_lines, more_labels = twin.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    ax.legend(lines, labels)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Step pieces shared by the training programs (train_gen.py, train_fae.py)
# ----------------------------------------------------------------------------------------------------
def make_adamw(params, optim, device: torch.device, *, lr: float | None = None, betas=None) -> torch.optim.AdamW:
    """AdamW of an OptimConfig (fused on CUDA, foreach elsewhere); lr and betas may be overridden. A step
    captured as a CUDA graph makes it capturable first (fae_fast/train/cuda_graph.make_capturable)."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=optim.lr if lr is None else lr, betas=optim.betas if betas is None else betas,
                             weight_decay=optim.weight_decay, fused=fused, foreach=not fused)


def set_lr(optimizer: torch.optim.Optimizer, optim, step: int, total: int) -> None:
    """Peak lr of an OptimConfig times its warmup/schedule factor at `step` (written in place into a
    learning rate held as a tensor, so that a captured step reads it)."""
    factor = lr_factor(step, total=total, warmup=optim.warmup_steps, schedule=optim.schedule)
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(optim.lr * factor)
        else:
            group["lr"] = optim.lr * factor


class TermMeter:
    """Sums of logged loss terms kept on the device (no sync per step); `means()` averages them over the
    steps since the last call and over ranks with one all-reduce."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        keys = list(self.sums)
        stacked = mean_over_ranks(torch.stack([self.sums[k] for k in keys]) / max(self.count, 1))
        self.sums, self.count = {}, 0
        return dict(zip(keys, stacked.tolist()))
