"""Draw latents from a generator with the sampler a SamplerConfig names (ODE or SDE, CFG on intervals), and
what each sample of a class-conditional evaluation set is conditioned on (ClassConditions; a COCO caption set's
counterpart is fae_fast.eval.coco.CocoConditions)."""
import logging

import torch

from fae_fast.config import SamplerConfig
from fae_fast.transport import (ADAPTIVE_METHODS, cfg_scale, guided_velocity, sample_ode, sample_ode_adaptive,
                                sample_sde, timesteps, validate_cfg_intervals)

log = logging.getLogger("fae_fast.sampling")


@torch.no_grad()
def sample_latents(model, condition: torch.Tensor, noise: torch.Tensor, cfg: SamplerConfig,
                   generator: torch.Generator | None = None, step_noise=None) -> torch.Tensor:
    """Integrate from noise (B, T, C) at t = 0 to latents at t = 1 for `condition` (class labels (B,), or
    what model.conditioning takes), guided on cfg.cfg's intervals. The SDE's increments come from
    `generator`, or are step_noise(step) when given (transport.sample_sde)."""
    validate_cfg_intervals(cfg.cfg)
    null = model.conditioning.null(condition)

    def velocity(x, t):
        return guided_velocity(model, x, t, condition, null=null, intervals=cfg.cfg,
                               channels=cfg.guide_channels).float()

    if cfg.method in ("euler", "heun"):
        return sample_ode(velocity, noise, steps=cfg.steps, method=cfg.method, shift=cfg.time_shift)
    if cfg.method in ADAPTIVE_METHODS:
        x, evaluations = sample_ode_adaptive(velocity, noise, method=cfg.method, atol=cfg.atol, rtol=cfg.rtol)
        log.info(f"{cfg.method} (atol {cfg.atol:g}, rtol {cfg.rtol:g}): {evaluations} velocity evaluations")
        return x
    if cfg.method == "euler_maruyama":
        return sample_sde(velocity, noise, steps=cfg.steps, shift=cfg.time_shift, generator=generator,
                          step_noise=step_noise)
    raise ValueError(f"sampler.method={cfg.method!r} is not 'euler', 'heun', 'euler_maruyama' or one of "
                     f"{', '.join(ADAPTIVE_METHODS)}")


def evaluation_plan(sampler: SamplerConfig) -> tuple[int, int]:
    """(plain, guided) model evaluations per sample of a fixed-step sampler: guided ones run a forward of 2B."""
    ts = timesteps(sampler.steps, shift=sampler.time_shift).tolist()
    times = ts[:-1]
    if sampler.method == "heun":
        times += ts[1:-1]  # the corrector's evaluations; the last step is Euler
    guided = sum(cfg_scale(t, sampler.cfg) != 1.0 for t in times)
    return len(times) - guided, guided


class ClassConditions:
    """What sample i of a class-conditional evaluation set is conditioned on: its class label, a pure function of
    (seed, i) (`conditioning.for_indices`), which is also the label the set records (ADM's arr_1)."""

    def __init__(self, conditioning, seed: int, mode: str = "balanced"):
        self.conditioning, self.seed, self.mode = conditioning, seed, mode

    def __call__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(condition, recorded label), both the labels (B,) of sample `indices` (B,)."""
        labels = self.conditioning.for_indices(self.seed, indices, self.mode)
        return labels, labels

    def grid_rows(self, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditions of a sample grid's rows: the labels `classes` (modulo the number of classes)."""
        labels = torch.tensor([c % self.conditioning.num_classes for c in classes])
        return labels, labels
