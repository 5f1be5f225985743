"""Transport: time shift, t sampling, interpolant, loss, CFG schedule, and the ODE/SDE samplers.

The samplers are checked on Gaussian targets N(m, diag(sigma^2)), whose velocity field is known in
closed form. With x0 ~ N(0, 1) independent of x1 ~ N(m, sigma^2), per dimension:
    x_t ~ N(t*m, V_t),  V_t = t^2 sigma^2 + (1-t)^2,  Cov(x1 - x0, x_t) = t sigma^2 - (1-t),
    v(x, t) = E[x1 - x0 | x_t = x] = m + K_t (x - t*m),  K_t = (t sigma^2 - (1-t)) / V_t = V_t' / (2 V_t).
The ODE flow is then the affine map x_t = t*m + sqrt(V_t) * x0, so the exact sample from noise x0 is
m + sigma * x0. Moment tolerances are 5 standard errors of the sample moments (SE of the mean
sigma/sqrt(n), of the std sigma/sqrt(2n)); the discretization bias at the step counts used is
measured below it by the pathwise and discrete-law tests.
"""
import math

import pytest
import torch

from fae_fast.transport import (
    cfg_scale,
    flow_matching_loss,
    guided_velocity,
    interpolate,
    sample_ode,
    sample_sde,
    sample_t,
    time_shift,
    timesteps,
    validate_cfg_intervals,
)

M = torch.tensor([-1.0, 0.5, 2.0])
SIGMA = torch.tensor([0.5, 1.0, 2.0])
N_SAMPLES = 20_000
SE_K = 5.0  # tolerance in standard errors


def gaussian_velocity(m: torch.Tensor, sigma: torch.Tensor):
    """Exact velocity field of N(m, sigma^2) along the last dim of x; t (B,)."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        mm, ss = m.to(x), sigma.to(x)
        var = t**2 * ss**2 + (1 - t) ** 2
        return mm + (t * ss**2 - (1 - t)) / var * (x - t * mm)

    return velocity


def assert_gaussian_moments(x: torch.Tensor, m: torch.Tensor, sigma: torch.Tensor) -> None:
    n = x.shape[0]
    mean_err = (x.mean(0) - m).abs()
    std_err = (x.std(0) - sigma).abs()
    assert torch.all(mean_err <= SE_K * sigma / math.sqrt(n)), (x.mean(0), m)
    assert torch.all(std_err <= SE_K * sigma / math.sqrt(2 * n)), (x.std(0), sigma)


def noise(n: int = N_SAMPLES, dim: int = 3, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- time shift, t sampling, interpolant


def test_time_shift_closed_form_and_endpoints():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    # 0.4*t / (1 - 0.6*t) by hand: 0.1/0.85, 0.2/0.7, 0.3/0.55
    expected = torch.tensor([0.0, 2 / 17, 2 / 7, 6 / 11, 1.0], dtype=torch.float64)
    torch.testing.assert_close(time_shift(t, 0.4), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(time_shift(t, 3.0)[[0, -1]], t[[0, -1]], rtol=0, atol=0)
    assert time_shift(0.5, 1.0).item() == 0.5


@pytest.mark.parametrize("s", [0.4, 0.7, 2.5])
def test_time_shift_monotone_direction_inverse_composition(s):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    shifted = time_shift(t, s)
    assert torch.all(shifted[1:] > shifted[:-1])
    inner = slice(1, -1)
    assert torch.all(shifted[inner] < t[inner]) if s < 1 else torch.all(shifted[inner] > t[inner])
    torch.testing.assert_close(time_shift(shifted, 1 / s), t, rtol=0, atol=1e-14)
    torch.testing.assert_close(time_shift(time_shift(t, s), 0.5), time_shift(t, 0.5 * s), rtol=0, atol=1e-14)
    # in the t = 1 = noise convention (u = 1 - t) the same map is a shift of 1/s
    torch.testing.assert_close(1 - time_shift(1 - t, 1 / s), shifted, rtol=0, atol=1e-14)


def test_time_shift_spends_steps_near_noise():
    # t' < 1/2 exactly when t < 1/(1+s): with s = 0.4, 5/7 of an even grid lands in the noisier half
    grid = timesteps(700, shift=0.4)
    assert (grid < 0.5).sum().item() == 500
    with pytest.raises(ValueError, match="positive"):
        time_shift(0.5, 0.0)


def test_sample_t_uniform_range_and_shift():
    t = sample_t(100_000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (100_000,) and t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < SE_K * math.sqrt(1 / 12 / 100_000)
    shifted = sample_t(100_000, shift=0.4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, time_shift(t, 0.4))


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.7)])
def test_sample_t_logit_normal_moments(mean, std):
    n = 100_000
    t = sample_t(n, method="logit_normal", mean=mean, std=std, generator=torch.Generator().manual_seed(1))
    assert t.min() > 0 and t.max() < 1
    logit = torch.logit(t.double())
    assert abs(logit.mean().item() - mean) < SE_K * std / math.sqrt(n)
    assert abs(logit.std().item() - std) < SE_K * std / math.sqrt(2 * n)
    shifted = sample_t(n, method="logit_normal", mean=mean, std=std, shift=0.4,
                       generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(shifted, time_shift(t, 0.4))
    with pytest.raises(ValueError, match="logit_normal"):
        sample_t(4, method="lognormal")


def test_interpolate_endpoints_and_target():
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    x_t, v = interpolate(x1, x0, torch.tensor([0.0, 1.0, 0.25]))
    torch.testing.assert_close(x_t[0], x0[0], rtol=0, atol=0)
    torch.testing.assert_close(x_t[1], x1[1], rtol=0, atol=0)
    torch.testing.assert_close(x_t[2], 0.25 * x1[2] + 0.75 * x0[2])
    torch.testing.assert_close(v, x1 - x0, rtol=0, atol=0)


# ---------------------------------------------------------------- loss


def loss_inputs():
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    return x1, x0, torch.rand(4, generator=g)


def test_flow_matching_loss_zero_at_target_positive_otherwise():
    x1, x0, t = loss_inputs()
    exact = flow_matching_loss(lambda x_t, tt: x1 - x0, x1, t, noise=x0)
    assert exact.shape == (4,) and torch.all(exact == 0)
    off = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(5))
    loss = flow_matching_loss(lambda x_t, tt: x1 - x0 + off, x1, t, noise=x0)
    torch.testing.assert_close(loss, off.square().mean((1, 2)))
    # the velocity_fn sees x_t and t
    seen = {}
    flow_matching_loss(lambda x_t, tt: seen.update(x=x_t, t=tt) or x_t, x1, t, noise=x0)
    torch.testing.assert_close(seen["x"], interpolate(x1, x0, t)[0], rtol=0, atol=0)
    assert seen["t"] is t


def test_flow_matching_loss_draws_noise_from_generator():
    x1, _, t = loss_inputs()
    fn = lambda x_t, tt: torch.zeros_like(x_t)  # noqa: E731
    drawn = flow_matching_loss(fn, x1, t, generator=torch.Generator().manual_seed(9))
    given = torch.randn(x1.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(drawn, flow_matching_loss(fn, x1, t, noise=given), rtol=0, atol=0)


def test_flow_matching_loss_cosine_term():
    x1, x0, t = loss_inputs()
    v = x1 - x0
    mse = lambda pred: (pred - v).square().mean((1, 2))  # noqa: E731
    w = 0.3
    same_dir = flow_matching_loss(lambda x_t, tt: 2 * v, x1, t, noise=x0, cosine_weight=w)
    torch.testing.assert_close(same_dir, mse(2 * v))  # angle 0: no cosine penalty
    opposite = flow_matching_loss(lambda x_t, tt: -v, x1, t, noise=x0, cosine_weight=w)
    torch.testing.assert_close(opposite, mse(-v) + 2 * w)
    flat = v.reshape(4, -1)
    ortho = torch.randn(flat.shape, generator=torch.Generator().manual_seed(3))
    ortho = (ortho - (ortho * flat).sum(1, keepdim=True) / flat.square().sum(1, keepdim=True) * flat).view_as(v)
    loss = flow_matching_loss(lambda x_t, tt: ortho, x1, t, noise=x0, cosine_weight=w)
    torch.testing.assert_close(loss, mse(ortho) + w)
    # along one dim (LightningDiT: channels), one cosine per position, averaged
    per_dim = flow_matching_loss(lambda x_t, tt: ortho, x1, t, noise=x0, cosine_weight=w, cosine_dim=1)
    cos = torch.nn.functional.cosine_similarity(ortho, v, dim=1)
    torch.testing.assert_close(per_dim, mse(ortho) + w * (1 - cos).mean(1))


# ---------------------------------------------------------------- time grid and CFG schedule


def test_timesteps_grid():
    grid = timesteps(8, shift=0.4)
    assert grid.shape == (9,) and grid.dtype == torch.float64
    torch.testing.assert_close(grid, time_shift(torch.linspace(0, 1, 9, dtype=torch.float64), 0.4))
    # t_end < 1 cuts the same schedule, not a rescaled copy: 10 steps to the 20-step grid's midpoint
    cut = timesteps(10, shift=0.4, t_end=time_shift(0.5, 0.4).item())
    torch.testing.assert_close(cut, timesteps(20, shift=0.4)[:11], rtol=0, atol=1e-7)
    assert timesteps(7, shift=0.4, t_end=0.9)[-1].item() == 0.9
    for bad in (dict(steps=0), dict(steps=4, t_end=1.5)):
        with pytest.raises(ValueError):
            timesteps(**bad)


def test_cfg_scale_intervals():
    intervals = [(0.3, 0.6, 2.0), (0.6, 1.0, 4.0)]  # touching at 0.6 is allowed
    assert cfg_scale(0.1, intervals) == 1.0
    assert cfg_scale(0.3, intervals) == 2.0  # start is inside
    assert cfg_scale(0.45, intervals) == 2.0
    assert cfg_scale(0.6, intervals) == 4.0  # end is outside: the next interval takes over
    assert cfg_scale(0.999, intervals) == 4.0
    assert cfg_scale(1.0, intervals) == 1.0
    assert cfg_scale(0.5, [(0.0, 0.3, 5.0)]) == 1.0
    assert cfg_scale(0.5, []) == 1.0


@pytest.mark.parametrize(
    "intervals,named",
    [([(0.2, 0.5, 2.0), (0.4, 0.9, 3.0)], r"\(0\.4, 0\.9, 3\.0\) overlaps \(0\.2, 0\.5, 2\.0\)"),
     ([(0.6, 1.0, 2.0), (0.0, 0.7, 3.0)], r"\(0\.6, 1\.0, 2\.0\) overlaps \(0\.0, 0\.7, 3\.0\)"),
     ([(0.7, 0.3, 2.0)], r"\(0\.7, 0\.3, 2\.0\) must be"),
     ([(0.3, 0.3, 2.0)], r"t_start < t_end")],
)
def test_cfg_intervals_rejected(intervals, named):
    with pytest.raises(ValueError, match=named):
        validate_cfg_intervals(intervals)
    with pytest.raises(ValueError, match=named):
        cfg_scale(0.5, intervals)


# ---------------------------------------------------------------- two-class toy for guidance

CLASS_M, CLASS_S, NULL = torch.tensor([-2.0, 1.5]), torch.tensor([0.5, 0.8]), 2


def toy_model(calls: list | None = None):
    """Exact velocities of a 1-D two-class toy: class c ~ N(m_c, s_c^2); NULL = the 50/50 mixture.

    The mixture's velocity is sum_c p(c | x_t) v_c(x, t), with p(c | x_t) from x_t ~ N(t m_c, V_c(t)).
    """
    per_class = [gaussian_velocity(CLASS_M[c : c + 1], CLASS_S[c : c + 1]) for c in range(2)]

    def model(x, t, labels):
        if calls is not None:
            calls.append((len(x), labels.clone()))
        v = torch.stack([f(x, t) for f in per_class])  # (2, B, 1)
        tb = t.to(x.dtype)[:, None]
        var = tb**2 * CLASS_S**2 + (1 - tb) ** 2  # (B, 2)
        log_p = -0.5 * (x - tb * CLASS_M) ** 2 / var - 0.5 * var.log()
        mixture = (log_p.softmax(1).T[:, :, None] * v).sum(0)
        cond = v.gather(0, labels.clamp(max=1).view(1, -1, 1)).squeeze(0)
        return torch.where((labels == NULL)[:, None], mixture, cond)

    return model


def toy_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 2


def test_guided_velocity_forward_count_and_value():
    calls = []
    model, x, labels = toy_model(calls), noise(6, 1), toy_labels(6)
    intervals = [(0.5, 1.0, 3.0)]
    t = torch.full((6,), 0.2)
    torch.testing.assert_close(guided_velocity(model, x, t, labels, null=torch.full_like(labels, NULL), intervals=intervals),
                               model(x, t, labels), rtol=0, atol=0)
    assert [c[0] for c in calls] == [6, 6]  # one forward of B (and the reference call)
    calls.clear()
    t = torch.full((6,), 0.7)
    v = guided_velocity(model, x, t, labels, null=torch.full_like(labels, NULL), intervals=intervals)
    assert len(calls) == 1 and calls[0][0] == 12
    assert torch.equal(calls[0][1], torch.cat([labels, torch.full_like(labels, NULL)]))
    v_c, v_u = model(x, t, labels), model(x, t, torch.full_like(labels, NULL))
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u))
    assert (v - v_c).abs().max() > 0.1  # the guidance did something


SAMPLERS = {
    "euler": lambda f, x0, shift: sample_ode(f, x0, steps=40, method="euler", shift=shift),
    "heun": lambda f, x0, shift: sample_ode(f, x0, steps=40, method="heun", shift=shift),
    "sde": lambda f, x0, shift: sample_sde(f, x0, steps=40, shift=shift, generator=torch.Generator().manual_seed(7)),
}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("intervals", [[], [(0.0, 1.0, 1.0)]])
def test_guided_sampling_with_scale_one_is_conditional_sampling(sampler, intervals):
    calls = []
    model, x0, labels = toy_model(calls), noise(512, 1), toy_labels(512)
    guided = SAMPLERS[sampler](
        lambda x, t: guided_velocity(model, x, t, labels, null=torch.full_like(labels, NULL), intervals=intervals), x0, 0.4)
    assert all(n == 512 for n, _ in calls)
    conditional = SAMPLERS[sampler](lambda x, t: model(x, t, labels), x0, 0.4)
    torch.testing.assert_close(guided, conditional, rtol=0, atol=0)


def recorded(fn, log):
    def wrapped(x, t):
        v = fn(x, t)
        log.append((t[0].item(), x.clone(), v.clone()))
        return v

    return wrapped


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guidance_acts_only_inside_its_interval(sampler):
    model, x0, labels = toy_model(), noise(512, 1), toy_labels(512)
    t_start, t_end = 0.3, 0.6
    intervals = [(t_start, t_end, 4.0)]
    guided_log, cond_log = [], []
    guided = SAMPLERS[sampler](recorded(
        lambda x, t: guided_velocity(model, x, t, labels, null=torch.full_like(labels, NULL), intervals=intervals), guided_log), x0, 0.4)
    conditional = SAMPLERS[sampler](recorded(lambda x, t: model(x, t, labels), cond_log), x0, 0.4)
    inside = [t_start <= t < t_end for t, _, _ in guided_log]
    assert any(inside) and not all(inside)
    for (t, x, v), is_inside in zip(guided_log, inside):
        diff = (v - model(x, torch.full((len(x),), t), labels)).abs().max()
        assert diff > 1e-3 if is_inside else diff == 0, (t, diff)
    first = inside.index(True)
    for i, ((_, xg, _), (_, xc, _)) in enumerate(zip(guided_log, cond_log)):
        same = torch.equal(xg, xc)
        assert same if i <= first else not same, i
    assert (guided - conditional).abs().max() > 1e-2


# ---------------------------------------------------------------- ODE sampler on a Gaussian target


@pytest.mark.parametrize("shift", [1.0, 0.4])
@pytest.mark.parametrize("method,steps", [("euler", 250), ("heun", 50)])
def test_ode_lands_on_gaussian(method, steps, shift):
    x = sample_ode(gaussian_velocity(M, SIGMA), noise(), steps=steps, method=method, shift=shift)
    assert_gaussian_moments(x, M, SIGMA)


@pytest.mark.parametrize("shift", [1.0, 0.4])
def test_ode_follows_exact_transport_map_with_expected_order(shift):
    """Pathwise error against m + sigma*x0 (float64): Euler first order, Heun second order."""
    m, sigma = torch.tensor([-1.0, 0.5, 2.0, 0.0]), torch.tensor([0.5, 1.0, 2.0, 0.1])  # 0.1: a stiff dim
    x0 = noise(2000, 4, dtype=torch.float64)
    exact = m.double() + sigma.double() * x0
    err = {(method, n): (sample_ode(gaussian_velocity(m, sigma), x0, steps=n, method=method, shift=shift)
                         - exact).abs().max().item()
           for method in ("euler", "heun") for n in (100, 200)}
    assert 1.8 < err["euler", 100] / err["euler", 200] < 2.2  # halving dt halves the error
    assert 3.5 < err["heun", 100] / err["heun", 200] < 4.5  # ... and quarters it
    assert err["heun", 100] < err["euler", 100] and err["heun", 200] < err["euler", 200]


def test_samplers_take_any_shape():
    """A (B, 2, 5, 3) state gives the same result as the same numbers laid out as (2*5*B, 3)."""
    x0 = torch.randn(8, 2, 5, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    field = gaussian_velocity(M, SIGMA)

    def flat_field(x, t):
        return field(x, t.repeat_interleave(10))

    flat0 = x0.reshape(80, 3)
    for method in ("euler", "heun"):
        out = sample_ode(field, x0, steps=20, method=method, shift=0.4)
        ref = sample_ode(lambda x, t: flat_field(x, t[:8]), flat0, steps=20, method=method, shift=0.4)
        assert out.shape == x0.shape
        torch.testing.assert_close(out.reshape(80, 3), ref, rtol=0, atol=1e-12)
    assert not torch.equal(x0, sample_ode(field, x0, steps=3))  # the input noise is left alone
    assert torch.equal(x0, torch.randn(8, 2, 5, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64))


# ---------------------------------------------------------------- SDE sampler on a Gaussian target


def em_law(steps: int, shift: float, m: torch.Tensor, sigma: torch.Tensor):
    """Exact mean and std of sample_sde's output for the Gaussian field (float64 recursion).

    The drift v + (t v - x) is affine in x here, so each Euler-Maruyama step maps
    N(mu, var) to N(a mu + b, a^2 var + 2 (1-t) dt); the last step is the noiseless ODE step.
    """
    ts = timesteps(steps, shift=shift).tolist()
    m, sigma = m.double(), sigma.double()
    mu, var = torch.zeros_like(m), torch.ones_like(m)
    for i in range(steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        k = (t * sigma**2 - (1 - t)) / (t**2 * sigma**2 + (1 - t) ** 2)
        g = 0.0 if i == steps - 1 else 1.0
        a = 1 - g * dt + (1 + g * t) * dt * k
        mu = a * mu + (1 + g * t) * dt * m * (1 - k * t)
        var = a**2 * var + 2 * g * (1 - t) * dt
    return mu, var.sqrt()


@pytest.mark.parametrize("shift", [1.0, 0.4])
def test_sde_discrete_law_converges_to_target(shift):
    """The SDE's drift/noise pair keeps the marginals: its discrete law has bias O(dt) only."""
    bias = {n: (em_law(n, shift, M, SIGMA)[1] / SIGMA.double() - 1).abs() for n in (250, 1000)}
    torch.testing.assert_close(em_law(250, shift, M, SIGMA)[0], M.double(), rtol=0, atol=1e-12)
    assert torch.all(bias[250] < 0.005)  # under 1 SE of the std at N_SAMPLES: the 5 SE test below is about sampling
    assert torch.all((bias[250] / bias[1000] > 3) & (bias[250] / bias[1000] < 5))  # first order


@pytest.mark.parametrize("shift", [1.0, 0.4])
def test_sde_lands_on_gaussian(shift):
    x = sample_sde(gaussian_velocity(M, SIGMA), noise(), steps=250, shift=shift,
                   generator=torch.Generator().manual_seed(3))
    assert_gaussian_moments(x, M, SIGMA)


def test_sde_noise_and_its_absence():
    field, x0 = gaussian_velocity(M, SIGMA), noise(1000)
    ode = sample_ode(field, x0, steps=50, shift=0.4)
    torch.testing.assert_close(sample_sde(field, x0, steps=50, shift=0.4, diffusion="none"), ode)
    a = sample_sde(field, x0, steps=50, generator=torch.Generator().manual_seed(1))
    b = sample_sde(field, x0, steps=50, generator=torch.Generator().manual_seed(1))
    c = sample_sde(field, x0, steps=50, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and (a - c).abs().max() > 0.1
    with pytest.raises(ValueError, match="diffusion"):
        sample_sde(field, x0, diffusion="constant")


def test_guidance_on_the_first_channels_only():
    """channels=k (the public SiT / LightningDiT samplers: k = 3): the first k channels guided, the rest the
    conditional velocity, as their forward_with_cfg builds it on the (N, C, H, W) layout."""
    model = lambda x, t, y: x * (1.0 + y[:, None, None].float()) + t[:, None, None]  # noqa: E731
    x, labels, t = torch.randn(4, 9, 5), torch.tensor([0, 1, 2, 3]), torch.full((4,), 0.8)
    v = guided_velocity(model, x, t, labels, null=torch.full_like(labels, 7), intervals=[(0.0, 1.0, 4.0)], channels=3)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, 7)]))
    out = out.transpose(1, 2)  # (2B, C, T): the public layout
    cond, uncond = out[:4, :3], out[4:, :3]
    want = torch.cat([uncond + 4.0 * (cond - uncond), out[:4, 3:]], dim=1).transpose(1, 2)
    torch.testing.assert_close(v, want)
    every = guided_velocity(model, x, t, labels, null=torch.full_like(labels, 7), intervals=[(0.0, 1.0, 4.0)])
    torch.testing.assert_close(v[..., :3], every[..., :3])
    assert (v[..., 3:] - every[..., 3:]).abs().max() > 0.1


def test_paper_interval_guides_120_of_250_shifted_steps():
    """The ablations' interval t in [0.3, 1) is 70% of the time axis; on the 250-step grid with time shift
    0.4 (more steps near noise) it covers 120 steps, as the README says."""
    ts = timesteps(250, shift=0.4)
    assert sum(cfg_scale(float(t), [(0.3, 1.0, 1.5)]) != 1.0 for t in ts[:-1]) == 120


def test_dopri5_lands_on_the_exact_gaussian_map_within_its_tolerance():
    """For N(m, s^2) data the probability-flow ODE keeps each sample's standardised value: x1 = m + s * x0
    exactly. dopri5 reaches it to about its tolerance, tighter with a tighter one, and reports its cost."""
    from fae_fast.transport import sample_ode_adaptive

    m, s = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64), torch.tensor([0.3, 1.5, 2.0], dtype=torch.float64)
    x0 = noise(256, dtype=torch.float64)
    exact = m + s * x0
    loose, nfe_loose = sample_ode_adaptive(gaussian_velocity(m, s), x0, rtol=1e-3, atol=1e-6)
    tight, nfe_tight = sample_ode_adaptive(gaussian_velocity(m, s), x0, rtol=1e-7, atol=1e-9)
    err_loose, err_tight = ((x - exact).abs().max().item() / exact.abs().max().item() for x in (loose, tight))
    assert err_loose < 5e-3 and err_tight < 1e-6 and err_tight < err_loose / 100, (err_loose, err_tight)
    assert 6 <= nfe_loose < nfe_tight < 2000, (nfe_loose, nfe_tight)


def test_sampler_config_routes_adaptive_methods(caplog):
    from fae_fast.conditioning import ClassLabels
    from fae_fast.config import SamplerConfig
    from fae_fast.sampling import sample_latents

    m, s = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])
    velocity = gaussian_velocity(m, s)

    class Model:
        conditioning = ClassLabels(1)  # labels 0, null label 1

        def __call__(self, x, t, labels):
            return velocity(x, t)

    x0 = noise(64, dim=2)
    with caplog.at_level("INFO", logger="fae_fast"):
        out = sample_latents(Model(), torch.zeros(64, dtype=torch.long), x0,
                             SamplerConfig(method="dopri5", rtol=1e-6, atol=1e-8, cfg=[]))
    torch.testing.assert_close(out, m + s * x0, atol=1e-4, rtol=0)
    assert any("dopri5 (atol 1e-08, rtol 1e-06):" in r.message and "velocity evaluations" in r.message
               for r in caplog.records)
    with pytest.raises(ValueError, match="dopri5"):
        sample_latents(Model(), torch.zeros(64, dtype=torch.long), x0, SamplerConfig(method="rk45", cfg=[]))
