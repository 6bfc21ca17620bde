"""A failed camera's regression estimate, corrected by its own last good latent.

A camera that has just failed most likely still sees what it saw a moment ago: the background
has not moved and the object only a little. The regression prior (:class:`RegressionPrior`)
estimates a missing view from the other cameras now and knows nothing of that past. This
module blends the two: for every missing view and age anchor, a linear map of (the
estimate's channels at a cell, the memory's channels at the same cell, 1) onto the cell's
channels, the same map at every cell of the grid. The maps are fitted by least squares on
sequences (``mvld.train.memory_prior``), never trained by gradient, and stored as buffers in
the checkpoint. (Maps per cell, or reading the memory's 3x3 neighbourhood, fitted the
training scenes better and held-out scenes worse: docs/MODEL.md, "Memory prior".)

The age enters through hat functions over log-age between :data:`MEMORY_ANCHORS_S`, so the
blend changes smoothly while an outage grows (a step at a bucket boundary would show as a
jump in the imputed video). Views with no memory (age ``inf``) keep the regression estimate.
Unfitted, every map is the identity on the estimate: the module then changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from mvld.common.errors import ConfigError

__all__ = ["MEMORY_ANCHORS_S", "MemoryPrior", "anchor_weights", "blend_features"]

MEMORY_ANCHORS_S = (0.1, 0.5, 2.0, 8.0, 30.0)  # ages the maps are fitted at; between: blended


def anchor_weights(age: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` hat-function weights of each age over :data:`MEMORY_ANCHORS_S` on a log
    scale (summing to 1; ages outside the anchors take the nearest one); all zero where the
    age is not finite (no memory)."""
    anchors = torch.log(torch.tensor(MEMORY_ANCHORS_S, dtype=torch.float32, device=age.device))
    known = torch.isfinite(age)
    safe = torch.where(known, age.float(), torch.ones_like(age, dtype=torch.float32))
    log_age = torch.log(safe.clamp(min=MEMORY_ANCHORS_S[0], max=MEMORY_ANCHORS_S[-1]))
    upper = torch.searchsorted(anchors, log_age.contiguous()).clamp(1, len(anchors) - 1)
    low, high = anchors[upper - 1], anchors[upper]
    position = upper - 1 + ((log_age - low) / (high - low)).clamp(0, 1)  # fractional anchor
    steps = torch.arange(len(anchors), device=age.device)
    weights = (1 - (position[..., None] - steps).abs()).clamp(min=0)
    return torch.where(known[..., None], weights, torch.zeros_like(weights))


def blend_features(estimate: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``[B, F, cells]``: per cell, the estimate's ``C`` channels, the memory's ``C`` channels
    and a 1 (``F = 2C + 1``), from grids ``[B, C, cells]``."""
    batch, _, cells = estimate.shape
    ones = torch.ones(batch, 1, cells, dtype=estimate.dtype, device=estimate.device)
    return torch.cat([estimate, memory, ones], dim=1)


class MemoryPrior(nn.Module):
    """Per missing view, ``estimate`` blended with the view's memory by fitted cell maps."""

    maps: torch.Tensor  # buffer [V, K, C, F]

    def __init__(self, views: int, latent_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(latent_shape) != 3:
            raise ConfigError(f"a memory prior needs a (C, h, w) latent, got {latent_shape}")
        channels = latent_shape[0]
        self.views, self.latent_shape = views, tuple(latent_shape)
        self.features = 2 * channels + 1
        identity = torch.zeros(channels, self.features)
        identity[:, :channels] = torch.eye(channels)
        maps = identity.expand(views, len(MEMORY_ANCHORS_S), channels, -1)
        self.register_buffer("maps", maps.clone())

    @property
    def fitted(self) -> bool:
        """Whether any map differs from the identity (a fit was installed)."""
        channels = self.latent_shape[0]
        identity = torch.zeros_like(self.maps)
        identity[..., :channels] = torch.eye(channels, device=self.maps.device)
        return not bool(torch.equal(self.maps, identity))

    def load_maps(self, maps: torch.Tensor) -> None:
        """Install fitted maps ``[V, K, C, F]``."""
        if tuple(maps.shape) != tuple(self.maps.shape):
            raise ConfigError(
                f"memory prior maps: shape {list(maps.shape)}, expected {list(self.maps.shape)}"
            )
        self.maps.copy_(maps.to(self.maps))

    def forward(
        self,
        estimate: torch.Tensor,
        observed: torch.Tensor,
        memory: torch.Tensor,
        memory_age: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, V, D]``: ``estimate`` (standardised) with each missing view that has a memory
        (``memory [B, V, D]``, ``memory_age [B, V]`` seconds, inf = none) blended."""
        batch, views, dim = estimate.shape
        channels, height, width = self.latent_shape
        hats = anchor_weights(memory_age).to(estimate.dtype)  # [B, V, K]
        known = torch.isfinite(memory_age)[..., None]
        memory = torch.where(known, memory.to(estimate.dtype), torch.zeros_like(estimate))
        out = []
        for v in range(views):
            cells = (batch, channels, height * width)
            features = blend_features(estimate[:, v].reshape(cells), memory[:, v].reshape(cells))
            maps = self.maps[v].to(estimate.dtype)  # [K, C, F]
            blended = torch.einsum("bk,kcf,bfn->bcn", hats[:, v], maps, features)
            out.append(blended.reshape(batch, dim))
        blended = torch.stack(out, dim=1)
        use = (~observed)[..., None] & known
        return torch.where(use, blended, estimate)
