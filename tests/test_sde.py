"""The VP SDE against closed forms and a simulated forward process."""

import math

import pytest
import torch

from mvld.common.errors import ConfigError
from mvld.model.sde import VPSDE, append_dims


def test_marginal_matches_the_closed_form() -> None:
    sde = VPSDE()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    alpha, sigma = sde.marginal_coeffs(t)
    expected = torch.exp(-0.25 * t**2 * 19.9 - 0.5 * t * 0.1)
    torch.testing.assert_close(alpha, expected)
    torch.testing.assert_close(sigma, torch.sqrt(1 - expected**2))
    assert alpha[0] == 1.0 and sigma[0] == 0.0
    assert alpha[2] == pytest.approx(math.exp(-5.025))


def test_small_times_keep_float64_precision() -> None:
    _, sigma = VPSDE().marginal_coeffs(torch.tensor([1e-7], dtype=torch.float32))
    assert sigma.dtype == torch.float64
    assert sigma.item() == pytest.approx(math.sqrt(1e-7 * 0.1), rel=1e-4)


def test_drift_and_diffusion() -> None:
    sde = VPSDE()
    x = torch.ones(2, 3)
    t = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(sde.drift(x, t), torch.tensor([[-0.05] * 3, [-10.0] * 3]))
    torch.testing.assert_close(
        sde.diffusion(t), torch.tensor([0.1, 20.0], dtype=torch.float64).sqrt()
    )


def test_per_view_times_broadcast_over_latent_dimensions() -> None:
    sde = VPSDE()
    x0 = torch.ones(2, 3, 4)
    tau = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 0.0]])
    mean, std = sde.marginal(x0, tau)
    assert mean.shape == std.shape == x0.shape
    alpha, _ = sde.marginal_coeffs(tau)
    torch.testing.assert_close(mean[..., 0], alpha.float())
    assert torch.all(std[0, 0] == 0) and torch.all(std[1, 1:] == 0)


def test_euler_maruyama_forward_simulation_matches_the_marginal() -> None:
    sde = VPSDE()
    generator = torch.Generator().manual_seed(0)
    x = torch.full((20000, 1), 2.0, dtype=torch.float64)
    steps, t_end = 400, 0.6
    dt = t_end / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt, dtype=torch.float64)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        x = x + sde.drift(x, t) * dt + append_dims(sde.diffusion(t), 2) * math.sqrt(dt) * noise
    mean, std = sde.marginal(
        torch.full((1, 1), 2.0, dtype=torch.float64), torch.tensor([t_end], dtype=torch.float64)
    )
    assert x.mean().item() == pytest.approx(mean.item(), abs=0.02)
    assert x.std().item() == pytest.approx(std.item(), abs=0.02)


def test_score_from_eps_and_prior() -> None:
    sde = VPSDE()
    t = torch.tensor([0.5])
    _, sigma = sde.marginal_coeffs(t)
    eps = torch.ones(1, 2)
    torch.testing.assert_close(sde.score_from_eps(eps, t), (-1 / sigma).float().expand(1, 2))
    z = torch.zeros(1, 4)
    assert sde.prior_logp(z).item() == pytest.approx(-2 * math.log(2 * math.pi))


def test_round_trip_and_invalid_parameters() -> None:
    sde = VPSDE(beta_min=0.2, beta_max=10.0)
    assert VPSDE.from_dict(sde.to_dict()) == sde
    with pytest.raises(ConfigError):
        VPSDE(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ConfigError, match="unsupported"):
        VPSDE.from_dict({"type": "ve"})
