"""The exact eps of Gaussian latents under the VP SDE: the samplers' known answer.

Data x0 ~ N(mu, Sigma) in R^{V*D}. Observed dims o are clean (tau = 0) at the value c, the missing
dims m share the time t. Given x0_o = c, x0_m ~ N(mu_c, S_c) with

    mu_c = mu_m + S_mo S_oo^-1 (c - mu_o),    S_c = S_mm - S_mo S_oo^-1 S_om,

and the VP SDE gives x_t,m = a_t x0_m + s_t n, so x_t,m | c ~ N(a_t mu_c, a_t^2 S_c + s_t^2 I):

    eps(x, t) = -s_t grad log p = s_t (a_t^2 S_c + s_t^2 I)^-1 (x_m - a_t mu_c).

The exact eps model reads c from its input wherever tau = 0, as a trained network does, so a
sampler that does not clamp the observed views conditions on the wrong values. Used by the
sampler tests and ``bench/bench_samplers.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mvld.model.sde import VPSDE

VIEWS, DIM = 3, 2
CLEAN = torch.tensor([0.8, -0.5, 1.2, 0.3, -0.7, 0.9], dtype=torch.float64).reshape(VIEWS, DIM)
PATTERNS = {
    "view0": (True, False, False),
    "views01": (True, True, False),
    "joint": (False, False, False),
}


def gaussian_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``mu [V, D]`` and a correlated ``Sigma [V*D, V*D]`` (unit-ish variances, strong coupling)."""
    gen = torch.Generator().manual_seed(seed)
    n = VIEWS * DIM
    mixing = torch.randn(n, n, generator=gen, dtype=torch.float64)
    shared = torch.randn(n, 2, generator=gen, dtype=torch.float64)  # couples the views
    eye = torch.eye(n, dtype=torch.float64)
    cov = 0.15 * mixing @ mixing.T / n + shared @ shared.T + 0.05 * eye
    scale = cov.diagonal().rsqrt()
    cov = scale[:, None] * cov * scale[None, :]  # unit variances, correlations kept
    mu = torch.linspace(-1.0, 1.5, n, dtype=torch.float64).reshape(VIEWS, DIM)
    return mu, cov


@dataclass
class GaussianMoments:
    """A Gaussian over the missing dims: mean ``[M]`` and covariance ``[M, M]``."""

    mean: torch.Tensor
    cov: torch.Tensor


class GaussianEps:
    """Exact multi-time eps of N(mu, Sigma) under a VP SDE: ``(x [B, V, D], tau [B, V]) -> eps``."""

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor, sde: VPSDE) -> None:
        self.mu, self.cov, self.sde = mu.reshape(-1), cov, sde
        self.dim = mu.shape[1]
        self._cache: dict[tuple[bool, ...], tuple[torch.Tensor, ...]] = {}

    def dims_of(self, views: torch.Tensor) -> torch.Tensor:
        """Flat dim indices of the views selected by the bool mask ``views [V]``."""
        return (views[:, None].expand(-1, self.dim)).reshape(-1).nonzero().squeeze(1)

    def conditional(self, observed: torch.Tensor, clean: torch.Tensor) -> GaussianMoments:
        """Moments of the missing dims given the observed dims' clean values ``[B, O]``."""
        o, m = self.dims_of(observed), self.dims_of(~observed)
        if len(o) == 0:
            return GaussianMoments(self.mu.expand(clean.shape[0], -1), self.cov)
        gain = torch.linalg.solve(self.cov[o][:, o], self.cov[o][:, m]).T  # S_mo S_oo^-1
        mean = self.mu[m] + (clean - self.mu[o]) @ gain.T
        return GaussianMoments(mean, self.cov[m][:, m] - gain @ self.cov[o][:, m])

    def _pattern(self, pattern: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Cached ``(o, m, gain, mean offset, eigenvalues, eigenvectors)`` of one observed set."""
        key = tuple(pattern.tolist())
        if key not in self._cache:
            o, m = self.dims_of(pattern), self.dims_of(~pattern)
            gain = torch.linalg.solve(self.cov[o][:, o], self.cov[o][:, m]).T  # S_mo S_oo^-1
            moments = self.conditional(pattern, self.mu[o][None])  # gain applies to c - mu_o
            values, vectors = torch.linalg.eigh(moments.cov)
            self._cache[key] = (o, m, gain, self.mu[m], values, vectors)
        return self._cache[key]

    def __call__(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        flat = x.double().reshape(x.shape[0], -1)
        eps = torch.zeros_like(flat)
        clean = tau == 0
        patterns = clean[:1] if bool((clean == clean[:1]).all()) else torch.unique(clean, dim=0)
        for pattern in patterns:
            if bool(pattern.all()):
                continue  # every view clean: nothing to denoise, eps = 0
            rows = (clean == pattern).all(1).nonzero().squeeze(1)
            t = tau[rows][:, ~pattern].double()
            if not bool((t == t[:, :1]).all()):
                raise ValueError("the missing views of a frame set must share one time")
            o, m, gain, mean_m, values, vectors = self._pattern(pattern)
            mean = mean_m + (flat[rows][:, o] - self.mu[o]) @ gain.T  # [R, M], mu_c per row
            t = t[:1, 0] if bool((t == t[0, 0]).all()) else t[:, 0]  # one time: coeffs once
            alpha, sigma = (c[:, None] for c in self.sde.marginal_coeffs(t))
            rotated = (flat[rows][:, m] - alpha * mean) @ vectors
            eps[rows[:, None], m] = (sigma * rotated / (alpha**2 * values + sigma**2)) @ vectors.T
        return eps.reshape(x.shape).to(x.dtype)


def moment_errors(samples: torch.Tensor, target: GaussianMoments) -> tuple[float, float]:
    """Whitened errors: |S^-1/2 (mean - mu)| and |S^-1/2 C S^-1/2 - I|_F (NaN if non-finite)."""
    if not bool(samples.isfinite().all()):
        return float("nan"), float("nan")
    values, vectors = torch.linalg.eigh(target.cov)
    whiten = vectors @ torch.diag(values.rsqrt()) @ vectors.T
    white = (samples - target.mean) @ whiten
    mean_error = white.mean(0).norm().item()
    cov_error = (torch.cov(white.T) - torch.eye(len(values), dtype=white.dtype)).norm().item()
    return mean_error, cov_error
