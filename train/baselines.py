"""Imputation baselines every diffusion result is shown against (docs/EVAL.md).

Each baseline fills the missing views of standardised latents ``z [B, V, D]`` given a presence
mask ``[B, V]`` and returns observed views unchanged, like the ``Imputer``. All are fitted on
the complete frame sets of the training scenes only:

* ``MeanLatent``: the per-view mean latent (what an imputer knowing nothing would guess);
* ``NearestNeighbour``: the training frame set closest on the observed views (squared
  Euclidean distance over the observed dimensions) lends its missing views;
* ``RidgeRegressor``: a deterministic linear regression (closed-form ridge, one per missing
  pattern) from the observed views to the missing ones: the posterior mean of a Gaussian.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

log = logging.getLogger(__name__)


class LatentBaseline(Protocol):
    """``(z [B, V, D] standardised, present [B, V] bool) -> z`` with missing views filled."""

    def __call__(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor: ...


def _check(train: torch.Tensor) -> torch.Tensor:
    if train.ndim != 3 or len(train) < 2:
        raise ValueError(f"training latents must be [N >= 2, V, D]; got {list(train.shape)}")
    return train.double()


def _fill(z: torch.Tensor, present: torch.Tensor, guess: torch.Tensor) -> torch.Tensor:
    """Observed views of ``z``, ``guess`` elsewhere, in ``z``'s dtype."""
    return torch.where(present[..., None], z, guess.to(z.dtype))


def _patterns(present: torch.Tensor) -> dict[tuple[bool, ...], torch.Tensor]:
    """Row indices of each distinct presence pattern (rows with a missing view only)."""
    groups: dict[tuple[bool, ...], list[int]] = {}
    for row, mask in enumerate(present.tolist()):
        if not all(mask):
            groups.setdefault(tuple(mask), []).append(row)
    return {mask: torch.tensor(rows) for mask, rows in groups.items()}


class MeanLatent:
    """Every missing view becomes the training mean of that view."""

    def __init__(self, train: torch.Tensor) -> None:
        self.mean = _check(train).mean(0)  # [V, D]

    def __call__(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return _fill(z, present, self.mean.expand_as(z))


class NearestNeighbour:
    """Missing views copied from the training frame set nearest on the observed views."""

    def __init__(self, train: torch.Tensor, chunk: int = 256) -> None:
        self.train, self.chunk = _check(train), chunk

    def neighbours(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``[B]`` index of the nearest training frame set (by observed views only)."""
        index = torch.zeros(len(z), dtype=torch.long)
        for mask, rows in _patterns(present).items():
            observed = torch.tensor(mask)
            bank = self.train[:, observed].flatten(1)  # [N, D_obs]
            if bank.shape[1] == 0:
                continue  # nothing observed: every neighbour is as near; keep index 0
            for start in range(0, len(rows), self.chunk):
                part = rows[start : start + self.chunk]
                query = z[part][:, observed].double().flatten(1).cpu()
                index[part] = torch.cdist(query, bank).argmin(1)
        return index

    def __call__(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        guess = self.train[self.neighbours(z, present)].to(z.device)
        return _fill(z, present, guess)


class RidgeRegressor:
    """Closed-form ridge regression of the missing views on the observed ones, per pattern."""

    def __init__(self, train: torch.Tensor, alpha: float = 1.0) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0; got {alpha}")
        self.train, self.alpha = _check(train), alpha
        self._fits: dict[tuple[bool, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def fit(self, mask: tuple[bool, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_mean, y_mean, W)`` of the pattern ``mask``: ``y = y_mean + (x - x_mean) W``."""
        if mask not in self._fits:
            observed = torch.tensor(mask)
            x = self.train[:, observed].flatten(1)  # [N, D_obs]
            y = self.train[:, ~observed].flatten(1)  # [N, D_mis]
            x_mean, y_mean = x.mean(0), y.mean(0)
            xc, yc = x - x_mean, y - y_mean
            gram = xc.T @ xc + self.alpha * torch.eye(xc.shape[1], dtype=xc.dtype)
            weights = (
                torch.linalg.solve(gram, xc.T @ yc) if xc.shape[1] else xc.new_zeros(0, yc.shape[1])
            )  # [D_obs, D_mis]
            self._fits[mask] = (x_mean, y_mean, weights)
        return self._fits[mask]

    def __call__(self, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        guess = torch.zeros(z.shape, dtype=torch.float64)
        dim = z.shape[2]
        for mask, rows in _patterns(present).items():
            observed = torch.tensor(mask)
            x_mean, y_mean, weights = self.fit(mask)
            x = z[rows][:, observed].double().flatten(1).cpu()
            y = y_mean + (x - x_mean) @ weights
            filled = guess[rows]
            filled[:, ~observed] = y.reshape(len(rows), -1, dim)
            guess[rows] = filled
        return _fill(z, present, guess.to(z.device))
