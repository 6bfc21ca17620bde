"""Variance-preserving SDE (Song et al. 2021, score_sde_pytorch ``VPSDE``), rank-agnostic.

dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw with beta linear from ``beta_min`` to ``beta_max``
over ``[0, T]``. Times may be a scalar, one per sample ``[B]`` or one per view ``[B, V]``
(multi-time diffusion): they are broadcast against ``x`` from the left, so latents need not
be images. The schedule is evaluated in float64 and cast to ``x``'s dtype at the end.
"""

from dataclasses import asdict, dataclass
from typing import Any

import torch

from mvld.common.errors import ConfigError


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so ``t`` broadcasts against a tensor of rank ``ndim``."""
    missing = ndim - t.ndim
    if missing < 0:
        raise ValueError(f"tensor of rank {t.ndim} cannot broadcast to rank {ndim}")
    return t.reshape(*t.shape, *([1] * missing))


@dataclass(frozen=True)
class VPSDE:
    """The VP SDE; pure maths with no state besides its three parameters."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.beta_min < self.beta_max or self.T <= 0:
            raise ConfigError(f"invalid VP SDE parameters {asdict(self)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in checkpoints."""
        return {"type": "vp", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VPSDE":
        """Rebuild from ``to_dict`` output."""
        if data.get("type", "vp") != "vp":
            raise ConfigError(f"unsupported SDE type {data.get('type')!r} (only 'vp')")
        return cls(**{k: float(v) for k, v in data.items() if k != "type"})

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t), float64."""
        return self.beta_min + t.double() * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha(t) = -1/4 t^2 (b1 - b0) - 1/2 t b0, float64."""
        t = t.double()
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def marginal_coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha(t), sigma(t))`` of p_t(x | x0) = N(alpha x0, sigma^2 I), float64."""
        log_alpha = self.log_mean_coeff(t)
        sigma = torch.sqrt(-torch.expm1(2.0 * log_alpha))
        return torch.exp(log_alpha), sigma

    def marginal(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of p_t(x | x0), both broadcast to ``x0``'s shape and dtype."""
        alpha, sigma = self.marginal_coeffs(t)
        alpha, sigma = append_dims(alpha, x0.ndim), append_dims(sigma, x0.ndim)
        return (alpha * x0.double()).to(x0.dtype), sigma.expand_as(x0).to(x0.dtype)

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t) = -1/2 beta(t) x."""
        return (-0.5 * append_dims(self.beta(t), x.ndim) * x.double()).to(x.dtype)

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """g(t) = sqrt(beta(t)), float64 with ``t``'s shape."""
        return torch.sqrt(self.beta(t))

    def prior_sample(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """A draw from the prior N(0, I) at time T."""
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) summed over all but the first dim."""
        n = z[0].numel()
        flat = z.double().reshape(z.shape[0], -1)
        return -0.5 * n * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64)) - 0.5 * (
            flat**2
        ).sum(1)

    def score_from_eps(self, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert an epsilon prediction to the score: -eps / sigma(t)."""
        _, sigma = self.marginal_coeffs(t)
        return (-eps.double() / append_dims(sigma, eps.ndim)).to(eps.dtype)
