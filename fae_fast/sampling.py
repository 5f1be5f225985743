"""Draw latents from a generator with the sampler a SamplerConfig names (ODE or SDE, CFG on intervals)."""
import torch

from fae_fast.config import SamplerConfig
from fae_fast.transport import guided_velocity, sample_ode, sample_sde, validate_cfg_intervals


@torch.no_grad()
def sample_latents(model, labels: torch.Tensor, noise: torch.Tensor, cfg: SamplerConfig,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate from noise (B, T, C) at t = 0 to latents at t = 1 for `labels` (B,)."""
    validate_cfg_intervals(cfg.cfg)

    def velocity(x, t):
        return guided_velocity(model, x, t, labels, null_label=model.null_label, intervals=cfg.cfg,
                              channels=cfg.guide_channels).float()

    if cfg.method in ("euler", "heun"):
        return sample_ode(velocity, noise, steps=cfg.steps, method=cfg.method, shift=cfg.time_shift)
    if cfg.method == "euler_maruyama":
        return sample_sde(velocity, noise, steps=cfg.steps, shift=cfg.time_shift, generator=generator)
    raise ValueError(f"sampler.method={cfg.method!r} is not 'euler', 'heun' or 'euler_maruyama'")
