"""The one training loop of train_gen.py and train_fae.py: step, NaN guard, loss-spike guard with rollback,
progress lines, checkpoints, in-training evaluation and sample grids. What differs between the programs is
a `TrainingTask`:

    batch(step)                   the data of a step (this rank's share)
    train_step(step, batch)       forward, backward, optimizer and EMA update -> {term: 0-d tensor}, 'loss' first
    flops_per_image(step)         for MFU (the FAE's pixel stages change it when the GAN starts)
    first_batch(batch)            optional: a report from the first batch (the FAE's feature norm)
    evaluate(done)                optional: {term: value} to log at run.eval_every, or None
    save_samples(done)            optional: write a sample grid (under the EMA weights) at run.sample_every
    roll_back(spike)              optional: after a loss spike, load the checkpoint before it -> (that
                                  checkpoint, its step); without it loss spikes are not judged
"""
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from fae_fast.train.runtime import NonFiniteGuard, Progress, SpikeGuard, TermMeter, print0, training_mfu_peak


@dataclass
class LoopSettings:
    """What the loop reads of a run: its RunConfig and the rest of the config it needs."""

    run: object
    """The run's RunConfig (steps, log_every, ckpt_every, sample_every, eval_every, spike_*)."""
    global_batch: int
    lr: float
    """The base learning rate, named in the NaN guard's advice."""
    record: Callable[[], dict]
    """The config saved with each checkpoint."""


def train_loop(task, settings: LoopSettings, d, ckpts, state: dict, start: int,
               resumed_from: Optional[Path] = None) -> list:
    """Train from step `start` to run.steps; returns the progress history (one entry per logged step)."""
    run = settings.run
    progress = Progress(total_steps=run.steps, start_step=start, global_batch=settings.global_batch,
                        flops_per_image=task.flops_per_image(start), peak_flops=training_mfu_peak(d.device),
                        device=d.device, world=d.world, tensorboard_dir=str(Path(run.out_dir) / "tensorboard"),
                        history_path=str(Path(run.out_dir) / "history.json"))
    judges_spikes = hasattr(task, "roll_back") and run.spike_factor > 0
    spikes = SpikeGuard(run.spike_factor, run.spike_window, run.spike_patience,
                        getattr(task, "loss_floor", 0.0)) if judges_spikes else None
    guard, meter, last_ckpt = NonFiniteGuard(d.device), TermMeter(), resumed_from  # where the weights come from
    source_of_weights = lambda: str(last_ckpt) if last_ckpt else None  # noqa: E731
    t0 = time.perf_counter()
    step = start
    while step < run.steps:
        batch = task.batch(step)
        if step == start and hasattr(task, "first_batch"):
            task.first_batch(batch)
        terms = task.train_step(step, batch)
        guard.observe(step, torch.stack([t.detach().float().reshape(()) for t in terms.values()]))
        if spikes is not None:
            spikes.observe(step, terms["loss"])
        meter.add(terms)
        done = step + 1
        if step == start:
            print0(f"first step took {time.perf_counter() - t0:.1f} s (includes compilation)")
        save = (run.ckpt_every and done % run.ckpt_every == 0) or done == run.steps
        if spikes is not None and (done % run.log_every == 0 or save) and (spike := spikes.check()) is not None:
            last_ckpt, step = task.roll_back(spike)  # judged before any save: the checkpoints stay clean
            progress.rewind(step)
            spikes.restart()
            guard, meter = NonFiniteGuard(d.device), TermMeter()  # a NaN inside the spike was rolled back too
            continue
        if done % run.log_every == 0 or done == run.steps:
            means = meter.means()  # over the steps since the last line and over ranks
            guard.check(means, source_of_weights(), settings.lr)
            if hasattr(task, "evaluate") and run.eval_every and done % run.eval_every == 0:
                t_eval = time.perf_counter()
                means |= task.evaluate(done) or {}
                progress.pause(time.perf_counter() - t_eval)
            progress.flops = task.flops_per_image(step)
            print0(progress.line(done, means))
        if save:
            guard.check({"loss": float(terms["loss"].detach())}, source_of_weights(), settings.lr)
            state["progress"]["step"] = done
            last_ckpt = ckpts.save(done, state, settings.record())
            progress.save()
        if run.sample_every and done % run.sample_every == 0 and hasattr(task, "save_samples"):
            task.save_samples(done)
        step = done
    return progress.history
