"""Epsilon network of multi-time latent diffusion: an MLP "U-Net" over all views' latents.

Follows MLD's score network: ResNet blocks of GroupNorm -> SiLU -> Linear with skip
concatenations between the down and up paths and a zero-initialised output layer. It is
conditioned on the per-view time vector ``tau`` in R^V (observed views have tau = 0)
through Linear -> GELU -> Linear, added in every block; no separate mask input is needed.
Contract: ``(x [B, V, D], tau [B, V]) -> eps [B, V, D]``.
"""

from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from mvld.common.errors import ConfigError


@dataclass(frozen=True)
class ScoreNetConfig:
    """Architecture of the score network; stored in every checkpoint."""

    num_views: int = 3
    latent_dim: int = 128  # per view
    widths: tuple[int, ...] = field(default=(1024, 512, 256))  # down path, widest first
    time_dim: int = 128
    groups: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.num_views < 2:
            raise ConfigError("the score network needs at least 2 views")
        if not self.widths or any(w % self.groups for w in self.widths):
            raise ConfigError(f"every width must be divisible by groups={self.groups}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScoreNetConfig":
        """Rebuild from ``to_dict`` output."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown score network keys {sorted(unknown)}")
        return cls(**{**data, "widths": tuple(data.get("widths", (512, 256, 128)))})


class ResidualBlock(nn.Module):
    """x + Linear(SiLU(GN(Linear(SiLU(GN(x))) + time))): MLD's MLP ResNet block."""

    def __init__(self, width: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, width)
        self.linear1 = nn.Linear(width, width)
        self.time = nn.Linear(time_dim, width)
        self.norm2 = nn.GroupNorm(groups, width)
        self.linear2 = nn.Linear(width, width)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        out = self.linear1(self.act(self.norm1(h))) + self.time(time_embedding)
        return h + self.linear2(self.act(self.norm2(out)))


class ScoreNet(nn.Module):
    """Predicts the noise added to the latents of every view, given per-view times."""

    def __init__(self, config: ScoreNetConfig) -> None:
        super().__init__()
        self.config = config
        widths, time_dim, groups = config.widths, config.time_dim, config.groups
        self.time_embed = nn.Sequential(
            nn.Linear(config.num_views, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )
        self.input = nn.Linear(config.num_views * config.latent_dim, widths[0])
        self.down_blocks = nn.ModuleList(ResidualBlock(w, time_dim, groups) for w in widths)
        self.down_proj = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))
        self.middle = ResidualBlock(widths[-1], time_dim, groups)
        ups = list(reversed(widths))
        self.up_proj = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(ups))
        self.up_merge = nn.ModuleList(nn.Linear(2 * w, w) for w in ups)
        self.up_blocks = nn.ModuleList(ResidualBlock(w, time_dim, groups) for w in ups)
        self.out_norm = nn.GroupNorm(groups, widths[0])
        self.output = nn.Linear(widths[0], config.num_views * config.latent_dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        batch, views, dim = x.shape  # [B, V, D]
        emb = self.time_embed(tau.to(x.dtype))  # [B, time_dim]
        h = self.input(x.reshape(batch, views * dim))
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.down_proj):
                h = self.down_proj[i](h)
        h = self.middle(h, emb)
        for i, (merge, block) in enumerate(zip(self.up_merge, self.up_blocks, strict=True)):
            h = block(merge(torch.cat([h, skips.pop()], dim=1)), emb)
            if i < len(self.up_proj):
                h = self.up_proj[i](h)
        out = self.output(nn.functional.silu(self.out_norm(h)))
        return out.view(batch, views, dim)
