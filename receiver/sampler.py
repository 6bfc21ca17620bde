"""Imputation samplers of multi-time latent diffusion (MLD conditioning), k-diffusion style.

Every sampler is one flat function with the shared signature (docs/ARCHITECTURE.md section 4)::

    sample_<name>(eps_model, x_obs [B, V, D], observed [B, V] bool, *, sde, steps, generator,
                  callback=None, t_eps=1e-3, ...) -> SamplerOutput(x [B, V, D], nfe)

``eps_model(x [B, V, D], tau [B, V]) -> eps [B, V, D]`` is the multi-time noise predictor.
Conditioning follows MLD: at EVERY evaluation the observed views are clamped to their clean
values with tau = 0, and the missing views share the current time t (one t per frame set).
With no view observed this is MLD's joint generation. The time grid is float64, from t = 1 to
``t_eps``; the last interval, from ``t_eps`` to 0, is the Tweedie denoising step
``x0 = (x - sigma eps) / alpha`` (the last sigma is 0, as in EDM and k-diffusion).

Samplers: ``euler_maruyama`` (reverse SDE, the reference), ``heun`` (probability-flow ODE,
EDM's 2nd-order Heun in the (sigma/alpha, x/alpha) variables), ``dpmpp_2m`` (DPM-Solver++(2M),
Lu et al. 2022), ``dpmpp_2m_sde`` (its reverse-SDE form, the imputer's default) and ``adaptive``
(adaptive-step Euler-Heun on the probability-flow ODE with error control, after
Jolicoeur-Martineau et al. 2021, "Gotta go fast"). docs/SAMPLERS.md has the equations.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from mvld.common.errors import ConfigError, MVLDError
from mvld.common.registry import Registry
from mvld.model.sde import VPSDE, append_dims

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


@dataclass
class SamplerOutput:
    """What every sampler returns: the samples and how many eps evaluations they cost."""

    x: torch.Tensor  # [B, V, D], observed views equal to x_obs
    nfe: int  # batched eps_model calls


class Sampler(Protocol):
    """The shared sampler signature; a sampler adds its own keyword options with defaults
    (``SamplerInfo.options`` lists them, the imputer checks them by name)."""

    def __call__(
        self,
        eps_model: EpsModel,
        x_obs: torch.Tensor,
        observed: torch.Tensor,
        *,
        sde: VPSDE,
        steps: int,
        generator: Generator | None,
        callback: Callback | None = None,
    ) -> SamplerOutput: ...


SamplerT = TypeVar("SamplerT", bound=Sampler)
_SHARED_ARGUMENTS = ("eps_model", "x_obs", "observed", "sde", "steps", "generator", "callback")


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler with what is known about it: its cost and its step floor."""

    name: str
    sample: Sampler
    nfe: Callable[[int], int | None]  # eps evaluations at a step count; None: data dependent
    min_steps: int  # fewer steps collapse on the shipped model (docs/SAMPLERS.md)

    @property
    def options(self) -> tuple[str, ...]:
        """Keyword options beyond the shared signature (``t_eps``, ``spacing``, ...)."""
        names = inspect.signature(self.sample).parameters
        return tuple(n for n in names if n not in _SHARED_ARGUMENTS)

    def check_steps(self, steps: int) -> None:
        """ConfigError naming the floor when ``steps`` is below it."""
        if steps < self.min_steps:
            raise ConfigError(
                f"sampler {self.name!r} needs at least {self.min_steps} steps (below that it "
                f"collapses on the shipped model, see docs/SAMPLERS.md); got {steps}"
            )


_SAMPLERS: Registry[SamplerInfo] = Registry("sampler")


def register_sampler(
    name: str, *, nfe: Callable[[int], int | None], min_steps: int
) -> Callable[[SamplerT], SamplerT]:
    """Decorator adding a sampler, its NFE rule and its step floor to the registry."""

    def add(sample: SamplerT) -> SamplerT:
        _SAMPLERS.register(name)(SamplerInfo(name, sample, nfe, min_steps))
        return sample

    return add


def sampler_names() -> list[str]:
    """Names ``get_sampler`` accepts, sorted."""
    return _SAMPLERS.names()


def sampler_info(name: str) -> SamplerInfo:
    """Everything registered for ``name``; an unknown name lists the valid ones."""
    return _SAMPLERS.get(name)


def get_sampler(name: str) -> Sampler:
    """The sampler function registered as ``name``; an unknown name lists the valid ones."""
    return sampler_info(name).sample


SPACINGS = ("uniform", "logsnr", "karras")
# Step floors (docs/SAMPLERS.md, "Step floors"; bench/bench_sampler_floor.py on the shipped
# 128x128 model): dpmpp_2m_sde is 1.4 dB short at 6 steps and within 0.5 dB of 20 steps at 8
# (dpmpp_2m already at 6; the two share the stricter floor); both collapse below 6 (mean-latent
# quality is 13.8 dB); heun collapses at 6 (18.5 dB) and holds at 10 (8 not measured).
# Euler-Maruyama never collapsed in the sweep.
DPMPP_MIN_STEPS = 8
HEUN_MIN_STEPS = 10
STEP_FACTOR_RANGE = (0.2, 5.0)  # adaptive sampler: bounds of the step-size change per attempt


def time_of_noise_ratio(sde: VPSDE, ratio: torch.Tensor) -> torch.Tensor:
    """Inverse of s(t) = sigma(t) / alpha(t) for the linear-beta VP SDE (float64)."""
    slope = sde.beta_max - sde.beta_min
    log_ratio = torch.log1p(ratio.double() ** 2)  # -2 log alpha = slope t^2 / 2 + beta_min t
    return (torch.sqrt(sde.beta_min**2 + 2 * slope * log_ratio) - sde.beta_min) / slope


def time_grid(
    sde: VPSDE,
    steps: int,
    t_eps: float,
    spacing: str = "uniform",
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[steps + 1]`` float64 times: ``steps`` points from T to ``t_eps``, then 0.

    ``uniform`` in t (score_sde, MLD); ``logsnr`` uniform in log(sigma/alpha) (DPM-Solver);
    ``karras``: sigma/alpha uniform in its 1/7th power (EDM's rho = 7), dense near t_eps.
    """
    if spacing not in SPACINGS:
        raise ConfigError(f"unknown time spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64, device=device)
    if spacing == "uniform":
        times = sde.T + ramp * (t_eps - sde.T)
    else:
        ends = torch.tensor([sde.T, t_eps], dtype=torch.float64, device=device)
        alpha, sigma = sde.marginal_coeffs(ends)
        s_max, s_min = sigma / alpha
        if spacing == "logsnr":
            ratio = torch.exp(s_max.log() + ramp * (s_min.log() - s_max.log()))
        else:
            rho = 7.0
            ratio = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        times = time_of_noise_ratio(sde, ratio)
        times[0], times[-1] = sde.T, t_eps
    return torch.cat([times, times.new_zeros(1)])


def clamp_observed(x: torch.Tensor, x_obs: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Observed views set to their clean values, missing views kept."""
    return torch.where(observed[..., None], x_obs, x)


class ConditionedEps:
    """``eps(x, t)`` with MLD conditioning applied and evaluations counted.

    ``t`` is one float64 time (0-d) or one per frame set ``[B]``. Observed views enter clamped
    with tau = 0 and get eps = 0, so no update moves them.
    """

    def __init__(self, eps_model: EpsModel, x_obs: torch.Tensor, observed: torch.Tensor) -> None:
        self.eps_model, self.x_obs, self.observed = eps_model, x_obs, observed
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_rows = t.to(x.dtype).expand(x.shape[0])[:, None]  # [B, 1]
        tau = torch.where(self.observed, torch.zeros_like(t_rows), t_rows)  # [B, V]
        eps = self.eps_model(clamp_observed(x, self.x_obs, self.observed), tau)
        self.nfe += 1
        return torch.where(self.observed[..., None], torch.zeros_like(eps), eps)


def _coeff(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 schedule value (0-d or ``[B]``) broadcast against ``x`` in ``x``'s dtype."""
    return append_dims(value, x.ndim).to(x.dtype)


def _check_inputs(x_obs: torch.Tensor, observed: torch.Tensor, steps: int, t_eps: float) -> None:
    if x_obs.ndim != 3 or observed.shape != x_obs.shape[:2] or observed.dtype != torch.bool:
        raise ValueError(
            f"expected x_obs [B, V, D] and a bool mask [B, V]; got "
            f"{list(x_obs.shape)} and {list(observed.shape)} {observed.dtype}"
        )
    if steps < 2 or not 0.0 < t_eps < 1.0:
        raise ConfigError(f"need steps >= 2 and 0 < t_eps < 1; got steps={steps}, t_eps={t_eps}")


class RowGenerators:
    """One random generator per batch row, usable wherever a sampler takes ``generator``.

    Each row's noise then depends on its own seed only, not on the batch it lands in: a
    camera imputed in consecutive frame sets with the same seed gets the same noise, so its
    imputed video changes only as much as the evidence does, instead of flickering between
    independent samples.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator(device).manual_seed(int(seed) % 2**63) for seed in seeds]

    def randn(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """``torch.randn(shape)``, row ``b`` from generator ``b``."""
        if shape[0] != len(self.generators):
            raise ValueError(f"{len(self.generators)} row generators for a batch of {shape[0]}")
        return torch.stack(
            [
                torch.randn(shape[1:], generator=g, dtype=dtype, device=device)
                for g in self.generators
            ]
        )


Generator = torch.Generator | RowGenerators


def prior_state(
    x_obs: torch.Tensor, observed: torch.Tensor, sde: VPSDE, generator: Generator | None
) -> torch.Tensor:
    """Start of every sampler: missing views drawn from the prior, observed views clean."""
    if isinstance(generator, RowGenerators):
        noise = generator.randn(tuple(x_obs.shape), x_obs.dtype, x_obs.device)
    else:
        noise = sde.prior_sample(tuple(x_obs.shape), generator, x_obs.dtype, x_obs.device)
    return clamp_observed(noise, x_obs, observed)


def tweedie_denoise(
    x: torch.Tensor, eps: torch.Tensor, sde: VPSDE, t: torch.Tensor
) -> torch.Tensor:
    """Posterior mean of x0 given x_t: ``(x - sigma eps) / alpha`` (the step to t = 0)."""
    alpha, sigma = sde.marginal_coeffs(t)
    return (x - _coeff(sigma, x) * eps) / _coeff(alpha, x)


def _noise(x: torch.Tensor, generator: Generator | None) -> torch.Tensor:
    if isinstance(generator, RowGenerators):
        return generator.randn(tuple(x.shape), x.dtype, x.device)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _report(callback: Callback | None, i: int, t: torch.Tensor, x: torch.Tensor, nfe: int) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "nfe": nfe})


def reverse_sde_drift(
    x: torch.Tensor, eps: torch.Tensor, sde: VPSDE, t: torch.Tensor
) -> torch.Tensor:
    """Drift of the reverse-time SDE, ``f(x, t) - g(t)^2 score``, with score = -eps / sigma."""
    g2 = _coeff(sde.diffusion(t) ** 2, x)
    return sde.drift(x, t) - g2 * sde.score_from_eps(eps, t)


@register_sampler("euler_maruyama", nfe=lambda steps: steps, min_steps=2)
def sample_euler_maruyama(
    eps_model: EpsModel,
    x_obs: torch.Tensor,
    observed: torch.Tensor,
    *,
    sde: VPSDE,
    steps: int = 1000,
    generator: Generator | None = None,
    callback: Callback | None = None,
    t_eps: float = 1e-3,
    spacing: str = "uniform",
) -> SamplerOutput:
    """Euler-Maruyama on the reverse SDE (MLD's and score_sde's reference); NFE = steps."""
    _check_inputs(x_obs, observed, steps, t_eps)
    eps_fn = ConditionedEps(eps_model, x_obs, observed)
    ts = time_grid(sde, steps, t_eps, spacing, x_obs.device)
    x = prior_state(x_obs, observed, sde, generator)
    for i in range(steps - 1):
        t, dt = ts[i], ts[i + 1] - ts[i]  # dt < 0: time runs backwards
        x_mean = x + reverse_sde_drift(x, eps_fn(x, t), sde, t) * _coeff(dt, x)
        noise = _coeff(sde.diffusion(t) * (-dt).sqrt(), x) * _noise(x, generator)
        x = clamp_observed(x_mean + noise, x_obs, observed)
        _report(callback, i, t, x, eps_fn.nfe)
    t = ts[steps - 1]
    x = clamp_observed(tweedie_denoise(x, eps_fn(x, t), sde, t), x_obs, observed)
    _report(callback, steps - 1, ts[steps], x, eps_fn.nfe)
    return SamplerOutput(x, eps_fn.nfe)


@register_sampler("heun", nfe=lambda steps: 2 * steps - 1, min_steps=HEUN_MIN_STEPS)
def sample_heun(
    eps_model: EpsModel,
    x_obs: torch.Tensor,
    observed: torch.Tensor,
    *,
    sde: VPSDE,
    steps: int = 10,
    generator: Generator | None = None,
    callback: Callback | None = None,
    t_eps: float = 1e-3,
    spacing: str = "logsnr",
) -> SamplerOutput:
    """Heun on the probability-flow ODE, written as dy/ds = eps with y = x/alpha, s = sigma/alpha.

    EDM's Algorithm 1 for VP: 2nd order, the last step (to s = 0) is Euler; NFE = 2 steps - 1.
    """
    _check_inputs(x_obs, observed, steps, t_eps)
    eps_fn = ConditionedEps(eps_model, x_obs, observed)
    ts = time_grid(sde, steps, t_eps, spacing, x_obs.device)
    alpha, sigma = sde.marginal_coeffs(ts)
    s = sigma / alpha  # noise-to-signal ratio, 0 at the end
    x = prior_state(x_obs, observed, sde, generator)
    for i in range(steps):
        ds = _coeff(s[i + 1] - s[i], x)
        y = x / _coeff(alpha[i], x)
        d = eps_fn(x, ts[i])  # dy/ds at (x, t_i)
        y_next = y + ds * d  # Euler predictor
        if i < steps - 1:  # trapezoidal corrector, skipped on the step to s = 0
            d_next = eps_fn(_coeff(alpha[i + 1], x) * y_next, ts[i + 1])
            y_next = y + ds * (d + d_next) / 2
        x = clamp_observed(_coeff(alpha[i + 1], x) * y_next, x_obs, observed)
        _report(callback, i, ts[i + 1], x, eps_fn.nfe)
    return SamplerOutput(x, eps_fn.nfe)


@register_sampler("dpmpp_2m", nfe=lambda steps: steps, min_steps=DPMPP_MIN_STEPS)
def sample_dpmpp_2m(
    eps_model: EpsModel,
    x_obs: torch.Tensor,
    observed: torch.Tensor,
    *,
    sde: VPSDE,
    steps: int = 20,
    generator: Generator | None = None,
    callback: Callback | None = None,
    t_eps: float = 1e-3,
    spacing: str = "logsnr",
) -> SamplerOutput:
    """DPM-Solver++(2M): multistep 2nd-order exponential integrator on x0 predictions; NFE = steps.

    Step from t_i to t_{i+1}: x <- (sigma_{i+1}/sigma_i) x - alpha_{i+1} expm1(-h) D with
    h = lambda_{i+1} - lambda_i, lambda = log(alpha/sigma), D the x0 prediction extrapolated
    from the previous one; the last step (to t = 0) returns the x0 prediction. It is the
    probability-flow ODE case (eta = 0) of ``dpmpp_2m_sde``, which therefore computes it.
    """
    return sample_dpmpp_2m_sde(
        eps_model,
        x_obs,
        observed,
        sde=sde,
        steps=steps,
        generator=generator,
        callback=callback,
        t_eps=t_eps,
        spacing=spacing,
        eta=0.0,
    )


@register_sampler("dpmpp_2m_sde", nfe=lambda steps: steps, min_steps=DPMPP_MIN_STEPS)
def sample_dpmpp_2m_sde(
    eps_model: EpsModel,
    x_obs: torch.Tensor,
    observed: torch.Tensor,
    *,
    sde: VPSDE,
    steps: int = 20,
    generator: Generator | None = None,
    callback: Callback | None = None,
    t_eps: float = 1e-3,
    spacing: str = "logsnr",
    eta: float = 1.0,
) -> SamplerOutput:
    """DPM-Solver++(2M) SDE (k-diffusion's midpoint form): the reverse SDE, 2nd order; NFE = steps.

    With h = lambda_{i+1} - lambda_i and e = eta h, a step is
    x <- (sigma_{i+1}/sigma_i) exp(-e) x + alpha_{i+1} (1 - exp(-h - e)) (x0 + (x0 - x0_prev) / 2r)
    + sigma_{i+1} sqrt(1 - exp(-2e)) z, r = h_prev / h. The injected noise pulls samples back
    towards the data the way Euler-Maruyama's does, so errors of the network do not accumulate
    along one deterministic path as in the ODE samplers; eta = 0 is ``dpmpp_2m``.
    """
    _check_inputs(x_obs, observed, steps, t_eps)
    eps_fn = ConditionedEps(eps_model, x_obs, observed)
    ts = time_grid(sde, steps, t_eps, spacing, x_obs.device)
    alpha, sigma = sde.marginal_coeffs(ts)
    lam = torch.log(alpha) - torch.log(sigma)  # +inf at t = 0
    x = prior_state(x_obs, observed, sde, generator)
    x0_prev, h_prev = None, None
    for i in range(steps):
        x0 = tweedie_denoise(x, eps_fn(x, ts[i]), sde, ts[i])
        if i == steps - 1:
            x = x0
        else:
            h = lam[i + 1] - lam[i]
            decay = sigma[i + 1] / sigma[i] * torch.exp(-eta * h)
            gain = -alpha[i + 1] * torch.expm1(-(1 + eta) * h)
            x = _coeff(decay, x) * x + _coeff(gain, x) * x0
            if x0_prev is not None and h_prev is not None:
                x = x + _coeff(gain * h / (2 * h_prev), x) * (x0 - x0_prev)
            if eta > 0:
                spread = sigma[i + 1] * torch.sqrt(-torch.expm1(-2 * eta * h))
                x = x + _coeff(spread, x) * _noise(x, generator)
            x0_prev, h_prev = x0, h
        x = clamp_observed(x, x_obs, observed)
        _report(callback, i, ts[i + 1], x, eps_fn.nfe)
    return SamplerOutput(x, eps_fn.nfe)


def _euler_heun_pair(
    eps_fn: ConditionedEps, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, sde: VPSDE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler and Heun steps of the probability-flow ODE from t to t_next (both ``[B]``)."""
    alpha, sigma = sde.marginal_coeffs(t)
    alpha_next, sigma_next = sde.marginal_coeffs(t_next)
    ds, scale = _coeff(sigma_next / alpha_next - sigma / alpha, x), _coeff(alpha_next, x)
    y, d = x / _coeff(alpha, x), eps_fn(x, t)  # y = x / alpha, dy/ds = eps
    x_euler = clamp_observed(scale * (y + ds * d), eps_fn.x_obs, eps_fn.observed)
    d_next = eps_fn(x_euler, t_next)
    x_heun = clamp_observed(scale * (y + ds * (d + d_next) / 2), eps_fn.x_obs, eps_fn.observed)
    return x_euler, x_heun


@register_sampler("adaptive", nfe=lambda steps: None, min_steps=2)
def sample_adaptive(
    eps_model: EpsModel,
    x_obs: torch.Tensor,
    observed: torch.Tensor,
    *,
    sde: VPSDE,
    steps: int = 200,
    generator: Generator | None = None,
    callback: Callback | None = None,
    t_eps: float = 1e-3,
    eps_abs: float = 0.01,
    eps_rel: float = 0.02,
    h_init: float = 0.1,
    safety: float = 0.9,
    exponent: float = 0.9,
) -> SamplerOutput:
    """Adaptive-step Euler-Heun with error control ("Gotta go fast"), one step size per frame set.

    Integrates the probability-flow ODE (deterministic, so rejecting a step biases nothing) in
    steps of h in u = log(alpha/sigma) (half the log-SNR), from t = T to t_eps. A step is
    accepted when E = RMS over the missing dims of (Euler - Heun) / max(eps_abs,
    eps_rel max(|x_euler|, |x_euler_prev|)) is <= 1 (then the Heun value is kept); always
    h <- min(u_end - u, h clip(safety E^-exponent, 0.2, 5)) (the clip, as in Hairer's
    controllers, stops the jump-and-reject cycle of an unbounded factor). ``steps`` caps the
    attempted steps (exceeding it raises). NFE = 2 attempts + 1 (the final Tweedie step).
    """
    _check_inputs(x_obs, observed, steps, t_eps)
    eps_fn = ConditionedEps(eps_model, x_obs, observed)
    x = prior_state(x_obs, observed, sde, generator)
    dims = (~observed).sum(1).clamp(min=1) * x.shape[2]  # [B] missing dims per frame set
    ends = torch.tensor([sde.T, t_eps], dtype=torch.float64, device=x.device)
    alpha, sigma = sde.marginal_coeffs(ends)
    u_start, u_end = (alpha / sigma).log()  # u = log(alpha / sigma) = half the log-SNR
    u = torch.full((x.shape[0],), float(u_start), dtype=torch.float64, device=x.device)
    h, x_prev = torch.full_like(u, h_init), x
    for i in range(steps):
        active = u_end - u > 1e-9
        if not bool(active.any()):
            break
        h = torch.where(active, torch.minimum(h, u_end - u), torch.zeros_like(h))
        t, t_next = (time_of_noise_ratio(sde, torch.exp(-v)) for v in (u, u + h))
        x_euler, x_heun = _euler_heun_pair(eps_fn, x, t, t_next, sde)
        tolerance = (torch.maximum(x_euler.abs(), x_prev.abs()).double() * eps_rel).clamp(eps_abs)
        error = (((x_euler - x_heun).double() / tolerance).pow(2).sum((1, 2)) / dims).sqrt()
        accept = active & (error <= 1.0)  # [B]
        keep = append_dims(accept, x.ndim)
        x, x_prev = torch.where(keep, x_heun, x), torch.where(keep, x_euler, x_prev)
        u = torch.where(accept, u + h, u)
        h = h * (safety * error.clamp(min=1e-12).pow(-exponent)).clamp(*STEP_FACTOR_RANGE)
        _report(callback, i, torch.where(accept, t_next, t), x, eps_fn.nfe)
    if bool((u_end - u > 1e-9).any()):
        raise MVLDError(
            f"adaptive sampler: not done after {steps} attempted steps "
            f"(eps_abs={eps_abs}, eps_rel={eps_rel}); loosen the tolerances "
            "or raise steps"
        )
    t = torch.full_like(u, t_eps)
    x = clamp_observed(tweedie_denoise(x, eps_fn(x, t), sde, t), x_obs, observed)
    return SamplerOutput(x, eps_fn.nfe)
