"""Known-answer test of the imputation samplers: Gaussian data, where the exact score is analytic.

Data x0 ~ N(mu, Sigma) in R^{V*D}. Observed dims o are clean (tau = 0) at the value c, the missing
dims m share the time t. Given x0_o = c, x0_m ~ N(mu_c, S_c) with

    mu_c = mu_m + S_mo S_oo^-1 (c - mu_o),    S_c = S_mm - S_mo S_oo^-1 S_om,

and the VP SDE gives x_t,m = a_t x0_m + s_t n, so x_t,m | c ~ N(a_t mu_c, a_t^2 S_c + s_t^2 I):

    eps(x, t) = -s_t grad log p = s_t (a_t^2 S_c + s_t^2 I)^-1 (x_m - a_t mu_c).

The exact eps model reads c from its input wherever tau = 0, as a trained network does, so a
sampler that does not clamp the observed views conditions on the wrong values. Each sampler
driven by it must reproduce mu_c and S_c; deliberately broken variants (wrong drift or score
sign, missing clamp, wrong time grid, wrong beta) must fail the same check.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from gaussian_reference import (
    CLEAN,
    PATTERNS,
    GaussianEps,
    GaussianMoments,
    gaussian_problem,
    moment_errors,
)

import mvld.receiver.sampler as sampler_module
from mvld.common.errors import ConfigError, MVLDError
from mvld.model.sde import VPSDE
from mvld.receiver.sampler import SamplerOutput, get_sampler

SDE = VPSDE()


SAMPLES = 4000
MEAN_TOL, COV_TOL = 0.15, 0.35  # whitened; sampling noise alone is ~0.03 and ~0.08 here
STEPS = {"euler_maruyama": 200, "heun": 20, "dpmpp_2m": 20, "dpmpp_2m_sde": 20, "adaptive": 200}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> GaussianEps:
    return GaussianEps(*gaussian_problem(), SDE)


def run(
    eps_model: Callable,
    name: str,
    pattern: tuple[bool, ...],
    sde: VPSDE = SDE,
    seed: int = 0,
    samples: int = SAMPLES,
    dtype: torch.dtype = torch.float64,
) -> tuple[SamplerOutput, torch.Tensor, torch.Tensor]:
    """Sample the missing views given ``CLEAN``; also return x_obs and the mask."""
    observed = torch.tensor(pattern).expand(samples, -1)
    x_obs = CLEAN.to(dtype).expand(samples, -1, -1).clone()
    generator = torch.Generator().manual_seed(seed)
    out = get_sampler(name)(
        eps_model, x_obs, observed, sde=sde, steps=STEPS[name], generator=generator
    )
    return out, x_obs, observed


def check(
    model: GaussianEps,
    name: str,
    pattern: tuple[bool, ...],
    eps_model: Callable | None = None,
    sde: VPSDE = SDE,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, float]:
    """Whitened moment errors of ``name``'s samples against the exact conditional."""
    out, _, _ = run(eps_model or model, name, pattern, sde, dtype=dtype)
    mask = torch.tensor(pattern)
    target = model.conditional(mask, CLEAN.reshape(1, -1)[:, model.dims_of(mask)])
    target = GaussianMoments(target.mean[0], target.cov)
    missing = out.x.double().reshape(len(out.x), -1)[:, model.dims_of(~mask)]
    return moment_errors(missing, target)


def passes(errors: tuple[float, float]) -> bool:
    """The known-answer criterion (False for NaN errors)."""
    return errors[0] < MEAN_TOL and errors[1] < COV_TOL


CASES = [("euler_maruyama", "view0")] + [
    (name, pattern)
    for name in ("heun", "dpmpp_2m", "dpmpp_2m_sde", "adaptive")
    for pattern in PATTERNS
]


@pytest.mark.parametrize(("name", "pattern"), CASES)
def test_sampler_reproduces_exact_conditional(model, name, pattern):
    errors = check(model, name, PATTERNS[pattern])
    assert passes(errors), f"{name} on {pattern}: whitened mean/cov errors {errors}"


@pytest.mark.parametrize("name", list(STEPS))
def test_sampler_holds_in_float32(model, name):
    errors = check(model, name, PATTERNS["view0"], dtype=torch.float32)
    assert passes(errors), f"{name} in float32: whitened mean/cov errors {errors}"


class FlippedDriftVPSDE(VPSDE):
    """Fault: the forward drift with the wrong sign."""

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -super().drift(x, t)


def grid_zero_to_one(sde, steps, t_eps, spacing="uniform", device="cpu"):
    """Fault: the time grid runs forwards, from 0 to 1."""
    return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=device)


def grid_reversed(sde, steps, t_eps, spacing="uniform", device="cpu"):
    """Fault: the grid from t_eps up to 1 (then 0), i.e. the right points in the wrong order."""
    times = torch.linspace(t_eps, 1.0, steps, dtype=torch.float64, device=device)
    return torch.cat([times, times.new_zeros(1)])


def no_clamp(x, x_obs, observed):
    """Fault: observed views never set to their clean values."""
    return x


FAULTS = {
    "score_sign": dict(negate=True),
    "forward_drift_sign": dict(sde=FlippedDriftVPSDE()),
    "wrong_beta_max": dict(sde=VPSDE(beta_max=10.0)),
    "missing_clamp": dict(patch=("clamp_observed", no_clamp)),
    "grid_0_to_1": dict(patch=("time_grid", grid_zero_to_one)),
    "grid_reversed": dict(patch=("time_grid", grid_reversed)),
}
APPLIES = {  # faults that can occur in each sampler's code path
    "euler_maruyama": list(FAULTS),
    "heun": ["score_sign", "wrong_beta_max", "missing_clamp", "grid_0_to_1", "grid_reversed"],
    "dpmpp_2m": ["score_sign", "wrong_beta_max", "missing_clamp", "grid_0_to_1", "grid_reversed"],
    "dpmpp_2m_sde": [
        "score_sign",
        "wrong_beta_max",
        "missing_clamp",
        "grid_0_to_1",
        "grid_reversed",
    ],
    "adaptive": ["score_sign", "wrong_beta_max", "missing_clamp"],
}


@pytest.mark.parametrize(
    ("name", "fault"), [(name, fault) for name, faults in APPLIES.items() for fault in faults]
)
def test_broken_sampler_fails_the_same_check(model, monkeypatch, name, fault):
    spec = FAULTS[fault]
    if "patch" in spec:
        monkeypatch.setattr(sampler_module, *spec["patch"])
    eps_model = (lambda x, tau: -model(x, tau)) if spec.get("negate") else model
    try:
        errors = check(model, name, PATTERNS["view0"], eps_model, spec.get("sde", SDE))
    except MVLDError:  # the adaptive sampler may give up: also a detected failure
        return
    assert not passes(errors), f"{name} with fault {fault} passed: errors {errors}"


class CountingEps:
    """The exact model, counting its calls (to check the NFE each sampler reports)."""

    def __init__(self, model: GaussianEps) -> None:
        self.model, self.calls = model, 0

    def __call__(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x, tau)


@pytest.mark.parametrize("name", list(STEPS))
def test_sampler_is_deterministic_for_a_seed_and_keeps_observed_views(model, name):
    pattern = PATTERNS["view0"]
    first, x_obs, observed = run(model, name, pattern, seed=3, samples=64)
    again, _, _ = run(model, name, pattern, seed=3, samples=64)
    other, _, _ = run(model, name, pattern, seed=4, samples=64)
    assert torch.equal(first.x, again.x) and first.nfe == again.nfe
    assert not torch.equal(first.x, other.x)
    assert torch.equal(first.x[observed], x_obs[observed])  # bit for bit
    assert bool(first.x.isfinite().all())


@pytest.mark.parametrize("name", list(STEPS))
def test_reported_nfe_counts_every_model_call(model, name):
    counting = CountingEps(model)
    out, _, _ = run(counting, name, PATTERNS["views01"], samples=16)
    assert out.nfe == counting.calls
    expected = sampler_module.sampler_info(name).nfe(STEPS[name])
    assert expected is None or out.nfe == expected


def test_heun_default_is_19_evaluations_and_callback_sees_every_step(model):
    seen = []
    observed = torch.tensor(PATTERNS["view0"]).expand(8, -1)
    out = sampler_module.sample_heun(
        model,
        CLEAN.expand(8, -1, -1),
        observed,
        sde=SDE,
        generator=torch.Generator().manual_seed(0),
        callback=seen.append,
    )
    assert out.nfe == 19 and [info["i"] for info in seen] == list(range(10))
    assert seen[-1]["nfe"] == 19 and float(seen[-1]["t"]) == 0.0


def test_time_grid_is_float64_from_one_to_t_eps_then_zero():
    for spacing in sampler_module.SPACINGS:
        grid = sampler_module.time_grid(SDE, 12, 1e-3, spacing)
        assert grid.dtype == torch.float64 and len(grid) == 13
        assert float(grid[0]) == 1.0 and abs(float(grid[-2]) - 1e-3) < 1e-12 and grid[-1] == 0
        assert bool((grid.diff() < 0).all())
    with pytest.raises(ConfigError, match="valid: uniform, logsnr, karras"):
        sampler_module.time_grid(SDE, 12, 1e-3, "cosine")


def test_registry_rejects_duplicates_and_lists_valid_names():
    assert set(STEPS) <= set(sampler_module.sampler_names())
    with pytest.raises(ConfigError, match="already registered"):
        sampler_module.register_sampler("heun", nfe=lambda s: s, min_steps=1)(
            sampler_module.sample_heun
        )
    valid = "valid: adaptive, dpmpp_2m, dpmpp_2m_sde, euler_maruyama, heun"
    with pytest.raises(ConfigError, match=valid):
        get_sampler("ddim")


def test_registry_carries_nfe_options_and_a_step_floor():
    info = sampler_module.sampler_info("heun")
    assert info.nfe(10) == 19 and sampler_module.sampler_info("adaptive").nfe(10) is None
    assert "spacing" in info.options and "steps" not in info.options
    floor = sampler_module.sampler_info("dpmpp_2m_sde").min_steps
    sampler_module.sampler_info("dpmpp_2m_sde").check_steps(floor)
    with pytest.raises(ConfigError, match=f"at least {floor} steps"):
        sampler_module.sampler_info("dpmpp_2m_sde").check_steps(floor - 1)


def test_bad_inputs_are_rejected(model):
    x_obs = CLEAN.expand(4, -1, -1)
    with pytest.raises(ValueError, match="bool mask"):
        get_sampler("heun")(model, x_obs, torch.ones(4, 3), sde=SDE, steps=10, generator=None)
    with pytest.raises(ConfigError, match="steps >= 2"):
        get_sampler("heun")(
            model, x_obs, torch.ones(4, 3, dtype=torch.bool), sde=SDE, steps=1, generator=None
        )


def test_adaptive_gives_up_loudly_when_its_step_budget_is_spent(model):
    with pytest.raises(MVLDError, match="not done after 5 attempted steps"):
        observed = torch.tensor(PATTERNS["view0"]).expand(8, -1)
        sampler_module.sample_adaptive(
            model,
            CLEAN.expand(8, -1, -1),
            observed,
            sde=SDE,
            steps=5,
            generator=torch.Generator().manual_seed(0),
        )
