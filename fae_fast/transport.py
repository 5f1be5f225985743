"""Flow-matching transport: interpolant, time shift, t sampling, loss, ODE/SDE samplers, CFG schedule.

Conventions (the whole library uses these):
- t in [0, 1]; t = 0 is pure noise, t = 1 is data.
- Linear interpolant x_t = t * x1 + (1 - t) * x0, with x0 ~ N(0, I) noise and x1 data.
- The model predicts the velocity v = x1 - x0; sampling integrates dx/dt = v(x, t) from t = 0 to t = 1.
- Time shift with s: t' = s*t / (1 + (s - 1)*t). In odds form t'/(1-t') = s * t/(1-t), so shifts compose
  by multiplying (s then r is s*r) and shift 1/s undoes shift s. s < 1 maps t below t: an even grid in t
  becomes one that spends more steps near noise. In the t = 1 = noise convention (as in SD3) the same
  map is a shift of 1/s. Paper default s = 0.4.

Velocity, score and the SDE (used by `sample_sde`): x = t*x1 + (1-t)*x0 gives E[x0 | x] = x - t*v and the
score s(x, t) = -E[x0 | x] / (1 - t) = (t*v - x) / (1 - t). For any w(t) >= 0 the SDE
dx = [v + w/2 * s] dt + sqrt(w) dW has the marginals of the ODE (the w/2 * div(p * grad log p) term
cancels the w/2 * Laplacian of the noise in the Fokker-Planck equation).
"""
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor], Tensor]

# w(t) = 2 * g(t) * (1 - t): g is the drift weight on (t*v - x), the factor w/2 * s with the (1 - t) cancelled.
# "sigma" is SiT's default diffusion (D = sigma_t = 1 - t, noise sqrt(2D)): g = 1, bounded at both ends.
# "none" turns the noise off: the SDE code path then is the Euler ODE.
_DIFFUSION_G = {"sigma": 1.0, "none": 0.0}


def time_shift(t: Tensor | float, shift: float) -> Tensor:
    """t' = s*t / (1 + (s - 1)*t); fixes 0 and 1, monotone, t' < t for s < 1 (t = 0 is noise)."""
    if shift <= 0:
        raise ValueError(f"time shift must be positive, got {shift}; the paper uses 0.4.")
    t = torch.as_tensor(t)
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_t(
    batch: int,
    *,
    method: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    device=None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training times (B,): uniform on [0, 1) or logit-normal sigmoid(N(mean, std^2)), then time-shifted."""
    if device is None and generator is not None:
        device = generator.device
    if method == "uniform":
        t = torch.rand(batch, device=device, generator=generator)
    elif method == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, device=device, generator=generator))
    else:
        raise ValueError(f"unknown t sampling method {method!r}; use 'uniform' or 'logit_normal'.")
    return time_shift(t, shift)


def _per_sample(t: Tensor | float, x: Tensor) -> Tensor:
    """t as (B, 1, ..., 1) in x's dtype so it broadcasts over the non-batch dims of x."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.view(-1, *([1] * (x.ndim - 1))) if t.ndim == 1 else t


def interpolate(x1: Tensor, x0: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """(x_t, v): x_t = t*x1 + (1-t)*x0 and the velocity target v = x1 - x0; t (B,) or scalar."""
    tb = _per_sample(t, x1)
    return tb * x1 + (1 - tb) * x0, x1 - x0


def flow_matching_loss(
    velocity_fn: VelocityFn,
    x1: Tensor,
    t: Tensor,
    *,
    noise: Tensor | None = None,
    cosine_weight: float = 0.0,
    cosine_dim: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample loss (B,): mean over non-batch dims of (v_pred - v)^2 [+ cosine_weight * (1 - cos)].

    The cosine term (LightningDiT's velocity-direction loss) penalises the angle between v_pred and v,
    which the squared error weighs by |v|. cosine_dim=None takes the cosine over the whole sample;
    an int takes it along that dim and averages the rest: LightningDiT uses the channel dim (dim=1 of
    B x C x H x W), one cosine per position. The loss is computed in fp32 whatever the model's dtype.
    """
    if noise is None:
        noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    x_t, target = interpolate(x1, noise, t)
    v_pred = velocity_fn(x_t, t).float()
    target = target.float()
    loss = (v_pred - target).square().reshape(len(x1), -1).mean(1)
    if cosine_weight:
        if cosine_dim is None:
            v_pred, target, cosine_dim = v_pred.reshape(len(x1), -1), target.reshape(len(x1), -1), 1
        cos = F.cosine_similarity(v_pred, target, dim=cosine_dim)
        loss = loss + cosine_weight * (1 - cos).reshape(len(x1), -1).mean(1)
    return loss


def timesteps(steps: int, *, shift: float = 1.0, t_end: float = 1.0, device=None) -> Tensor:
    """(steps+1,) float64 grid from 0 to exactly t_end: even in the unshifted clock, then time-shifted.

    The even grid runs to time_shift(t_end, 1/shift), so the shifted grid is the full shifted
    schedule cut at t_end (same step density), not a rescaled copy of it.
    """
    if steps < 1:
        raise ValueError(f"the sampler needs at least one step, got steps={steps}.")
    if not 0.0 < t_end <= 1.0:
        raise ValueError(f"t_end must be in (0, 1] (t = 1 is data), got {t_end}.")
    u_end = time_shift(torch.tensor(t_end, dtype=torch.float64), 1.0 / shift)
    grid = time_shift(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64) * u_end, shift)
    grid[-1] = t_end  # exact end despite rounding in the shift and its inverse
    return grid.to(device)


def validate_cfg_intervals(intervals: Sequence[tuple[float, float, float]]) -> None:
    """Raise ValueError unless every (t_start, t_end, scale) has t_start < t_end and no two overlap."""
    for interval in intervals:
        if len(interval) != 3 or not interval[0] < interval[1]:
            raise ValueError(
                f"CFG interval {tuple(interval)} must be (t_start, t_end, scale) with t_start < t_end "
                f"(t = 0 is noise, t = 1 is data); reorder or fix its bounds."
            )
    ordered = sorted(intervals)
    for prev, cur in zip(ordered, ordered[1:]):
        if cur[0] < prev[1]:  # half-open [start, end): touching intervals are fine
            raise ValueError(
                f"CFG interval {tuple(cur)} overlaps {tuple(prev)}; make them disjoint, e.g. start "
                f"the later one at {prev[1]}."
            )


def cfg_scale(t: float, intervals: Sequence[tuple[float, float, float]]) -> float:
    """Guidance scale at time t: the scale of the interval with t_start <= t < t_end, else 1.0."""
    validate_cfg_intervals(intervals)
    for t_start, t_end, scale in intervals:
        if t_start <= t < t_end:
            return float(scale)
    return 1.0


def guided_velocity(
    model_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    x: Tensor,
    t: Tensor,
    condition: Tensor,
    *,
    null: Tensor,
    intervals: Sequence[tuple[float, float, float]],
    channels: int = 0,
) -> Tensor:
    """Classifier-free guidance v = v_u + scale * (v_c - v_u), scale from cfg_scale(t), on every latent
    channel (channels=0, fae_fast's default for FAE latents) or on the first `channels` only, the rest
    conditional: the public SiT / LightningDiT samplers guide the first 3 (channels=3 reproduces them).

    model_fn(x, t, condition) -> v; null: the unconditional condition, shaped like `condition` (class labels
    (B,), embeddings (B, L, D): fae_fast.conditioning). Every sample shares one t (as in the samplers);
    reading it on the host costs one scalar sync per step, small next to a forward. Scale 1 runs the
    conditional forward alone; otherwise one forward of 2B: [x, x] with [condition, null].
    """
    scale = cfg_scale(float(t.reshape(-1)[0]), intervals)
    if scale == 1.0:
        return model_fn(x, t, condition)
    v = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([condition, null]))
    v_c, v_u = v.chunk(2)
    guided = v_u + scale * (v_c - v_u)
    if channels:
        guided = torch.cat([guided[..., :channels], v_c[..., channels:]], dim=-1)  # (B, T, C)
    return guided


def _grid(steps: int, shift: float, x: Tensor) -> tuple[list[float], list[float], Tensor]:
    """Host times and step sizes (Python floats: no syncs in the loop) and the same times on x's device."""
    ts = timesteps(steps, shift=shift)
    t_dev = ts.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    return ts.tolist(), (ts[1:] - ts[:-1]).tolist(), t_dev


@torch.no_grad()
def sample_ode(
    velocity_fn: VelocityFn, noise: Tensor, *, steps: int = 250, method: str = "euler", shift: float = 1.0
) -> Tensor:
    """Integrate dx/dt = v(x, t) from noise at t = 0 to t = 1; velocity_fn(x, t (B,)) -> v, x of any shape (B, ...).

    Heun is the 2nd-order predictor-corrector (trapezoid on an Euler predictor); its last step is Euler,
    which keeps the order and saves the evaluation at t = 1. The state is updated in place, so
    velocity_fn must not keep a reference to x.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r}; use 'euler' or 'heun'.")
    _, dts, t_dev = _grid(steps, shift, noise)
    x = noise.clone()
    for i, dt in enumerate(dts):
        v = velocity_fn(x, t_dev[i].expand(len(x)))
        if method == "euler" or i == steps - 1:
            x.add_(v, alpha=dt)
        else:
            v_next = velocity_fn(torch.add(x, v, alpha=dt), t_dev[i + 1].expand(len(x)))
            x.add_(v, alpha=dt / 2).add_(v_next, alpha=dt / 2)
    return x


ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
"""Adaptive-step ODE solvers of torchdiffeq (the library SiT and LightningDiT sample with)."""


@torch.no_grad()
def sample_ode_adaptive(velocity_fn: VelocityFn, noise: Tensor, *, method: str = "dopri5", atol: float = 1e-6,
                        rtol: float = 1e-3) -> tuple[Tensor, int]:
    """Integrate dx/dt = v(x, t) from noise at t = 0 to t = 1 with an adaptive solver (step sizes chosen by the
    error estimate against atol + rtol * |x|; no time grid, so no time shift). Returns (x at t = 1, the number
    of velocity evaluations it took)."""
    if method not in ADAPTIVE_METHODS:
        raise ValueError(f"unknown adaptive ODE method {method!r}; use one of {', '.join(ADAPTIVE_METHODS)}")
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise ImportError("adaptive ODE sampling needs torchdiffeq: pip install torchdiffeq") from None
    evaluations = 0

    def f(t: Tensor, x: Tensor) -> Tensor:
        nonlocal evaluations
        evaluations += 1
        return velocity_fn(x, t.expand(len(x)))

    t_span = torch.tensor([0.0, 1.0], device=noise.device, dtype=torch.promote_types(noise.dtype, torch.float32))
    x = odeint(f, noise, t_span, method=method, atol=atol, rtol=rtol)[-1]
    return x, evaluations


@torch.no_grad()
def sample_sde(
    velocity_fn: VelocityFn,
    noise: Tensor,
    *,
    steps: int = 250,
    shift: float = 1.0,
    diffusion: str = "sigma",
    generator: torch.Generator | None = None,
    step_noise: Callable[[int], Tensor] | None = None,
) -> Tensor:
    """Euler-Maruyama on dx = [v + w/2 * s] dt + sqrt(w) dW from t = 0 to 1, w(t) = 2 * g * (1 - t).

    The standard normal increment of step i is drawn from `generator`, or is step_noise(i) (shaped like
    noise) when given: sample.py draws each sample's increments from its own index, so that a sample does
    not depend on which batch or GPU drew it.

    With the score s = (t*v - x)/(1 - t) the drift is v + g*(t*v - x): no 1/(1-t) left, so neither end
    is singular (at t = 0 the score is exactly -x). "sigma" (g = 1) is SiT's default. The last step is
    a deterministic Euler step of the ODE: noise added there could not be removed any more, and the ODE
    carries the marginal at t_{N-1} to the data marginal.
    """
    if diffusion not in _DIFFUSION_G:
        raise ValueError(f"unknown diffusion {diffusion!r}; use one of {sorted(_DIFFUSION_G)}.")
    g = _DIFFUSION_G[diffusion]
    ts, dts, t_dev = _grid(steps, shift, noise)
    x = noise.clone()
    xi = torch.empty_like(x)
    for i, (t, dt) in enumerate(zip(ts, dts)):
        v = velocity_fn(x, t_dev[i].expand(len(x)))
        if i == steps - 1:
            x.add_(v, alpha=dt)
            break
        # x + dt*[(1 + g*t)*v - g*x] + sqrt(2*g*(1-t)*dt) * xi
        x.mul_(1 - g * dt).add_(v, alpha=(1 + g * t) * dt)
        if g:
            increment = xi.normal_(generator=generator) if step_noise is None else step_noise(i)
            x.add_(increment, alpha=math.sqrt(2 * g * (1 - t) * dt))
    return x
