"""Epsilon networks of multi-time latent diffusion over all views' latents.

Two kinds share one contract, ``(x [B, V, D], tau [B, V]) -> eps [B, V, D]``, and one
conditioning: the per-view time vector ``tau`` in R^V (observed views have tau = 0) through
Linear -> GELU -> Linear, added in every block; no separate mask input is needed.

- ``mlp`` (:class:`ScoreNet`) follows MLD's score network: ResNet blocks of GroupNorm ->
  SiLU -> Linear with skip concatenations between the down and up paths and a
  zero-initialised output layer. It suits vector latents.
- ``conv`` (:class:`ConvScoreNet`) is a small convolutional U-Net for spatial latents
  (``[C, h, w]`` per view): the views' grids are stacked as channels, with each view's time
  as one more constant channel, so every cell sees what all cameras hold at that place;
  optional self-attention over the coarsest grid relates places that differ between cameras.
  With ``memory`` it also takes each camera's last observed latent and its age (video-aware
  imputation, :func:`memory_features`): zero-initialised layers add them to the input and to
  the time embedding, so a memoryless network warm-starts one with memory unchanged.
  With ``prior_sde`` it carries a :class:`RegressionPrior` (residual diffusion, as in
  CorrDiff): a linear estimate of the missing views from the observed ones, whose weights
  training fits and the checkpoint stores. The network then denoises the residual
  ``z - prior`` (its input is shifted by ``alpha(tau) * prior``; the noise and so the eps
  contract are unchanged) and sees the estimate as input planes, so it starts from the
  regression's answer instead of the mean and only has to learn what a linear map misses.
  With both, a :class:`~mvld.model.memory_prior.MemoryPrior` corrects the estimate of each
  failed camera with its own last good latent before the network sees it.

:func:`make_score_net` builds either from its config.
"""

from dataclasses import asdict, dataclass, field
from itertools import combinations, pairwise
from typing import Any, TypeAlias

import torch
from torch import nn

from mvld.common.errors import ConfigError
from mvld.model.memory_prior import MemoryPrior

SCORE_NET_KINDS = ("mlp", "conv")


@dataclass(frozen=True)
class ScoreNetConfig:
    """Architecture of the score network; stored in every checkpoint."""

    num_views: int = 3
    latent_dim: int = 128  # per view
    widths: tuple[int, ...] = field(default=(1024, 512, 256))  # mlp: down path, widest first;
    # conv: channels per resolution level, finest first (each further level halves h and w)
    time_dim: int = 128
    groups: int = 8
    kind: str = "mlp"  # "mlp" or "conv"
    latent_shape: tuple[int, ...] = ()  # conv: (C, h, w) of one view's latent
    blocks: int = 2  # conv: residual blocks per level on the way down (and up)
    attention_heads: int = 0  # conv: self-attention heads over the coarsest grid; 0: none
    memory: bool = False  # conv: also conditioned on each camera's last observed latent + age
    prior_sde: tuple[float, ...] = ()  # conv: (beta_min, beta_max) of the VP SDE to shift a
    # regression prior with (residual diffusion); empty: no prior

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "latent_shape", tuple(int(s) for s in self.latent_shape))
        object.__setattr__(self, "prior_sde", tuple(float(b) for b in self.prior_sde))
        if self.num_views < 2:
            raise ConfigError("the score network needs at least 2 views")
        if not self.widths or any(w % self.groups for w in self.widths):
            raise ConfigError(f"every width must be divisible by groups={self.groups}")
        if self.kind not in SCORE_NET_KINDS:
            raise ConfigError(f"score network kind must be one of {SCORE_NET_KINDS}")
        if self.kind == "conv":
            shape = self.latent_shape
            if len(shape) != 3 or shape[0] * shape[1] * shape[2] != self.latent_dim:
                raise ConfigError(
                    f"a conv score network needs latent_shape (C, h, w) with "
                    f"C*h*w = latent_dim {self.latent_dim}, got {list(shape)}"
                )
            if min(shape[1:]) % 2 ** (len(self.widths) - 1) or self.blocks < 1:
                raise ConfigError(
                    f"latent grid {shape[1]}x{shape[2]} cannot be halved "
                    f"{len(self.widths) - 1} times, or blocks < 1"
                )
            if self.attention_heads < 0 or (
                self.attention_heads and self.widths[-1] % self.attention_heads
            ):
                raise ConfigError(
                    f"attention_heads {self.attention_heads} must be >= 0 and "
                    f"divide the coarsest width {self.widths[-1]}"
                )
        if self.memory and self.kind != "conv":
            raise ConfigError("memory conditioning needs the conv score network")
        if self.prior_sde and (
            self.kind != "conv"
            or len(self.prior_sde) != 2
            or not 0 <= self.prior_sde[0] < self.prior_sde[1]
        ):
            raise ConfigError(
                f"prior_sde must be (beta_min, beta_max) of a VP SDE on a conv score network; "
                f"got {list(self.prior_sde)} on {self.kind}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            **asdict(self),
            "widths": list(self.widths),
            "latent_shape": list(self.latent_shape),
            "prior_sde": list(self.prior_sde),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScoreNetConfig":
        """Rebuild from ``to_dict`` output."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown score network keys {sorted(unknown)}")
        tuples = ("widths", "latent_shape", "prior_sde")
        data = {**data, **{k: tuple(data[k]) for k in tuples if k in data}}
        return cls(**data)


def zero_init(layer: nn.Linear | nn.Conv2d) -> None:
    """Zero ``layer``'s weight and bias (if it has one), so it starts out adding nothing."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


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
        zero_init(self.output)

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


class ConvResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x))) + time))), optionally changing the width."""

    def __init__(self, width_in: int, width: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups if width_in % groups == 0 else 1, width_in)
        self.conv1 = nn.Conv2d(width_in, width, 3, padding=1)
        self.time = nn.Linear(time_dim, width)
        self.norm2 = nn.GroupNorm(groups, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.skip = nn.Conv2d(width_in, width, 1) if width_in != width else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act(self.norm1(h))) + self.time(time_embedding)[:, :, None, None]
        return self.skip(h) + self.conv2(self.act(self.norm2(out)))


class ConvLevel(nn.ModuleList):
    """The residual blocks of one resolution level, run in order on ``(h, time)``."""

    def forward(self, h: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        for block in self:
            h = block(h, time_embedding)
        return h


class GridAttention(nn.Module):
    """x + self-attention between the cells of a grid.

    Convolutions relate neighbouring cells; a camera sees an object at another place in its
    grid than its neighbour does, so the coarsest level lets every cell attend to every other.
    """

    def __init__(self, width: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, width)
        self.qkv = nn.Conv2d(width, 3 * width, 1)
        self.proj = nn.Conv2d(width, width, 1)
        zero_init(self.proj)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, width, height, cols = h.shape
        qkv = self.qkv(self.norm(h)).reshape(
            batch, 3, self.heads, width // self.heads, height * cols
        )
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [B, heads, cells, d]
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return h + self.proj(out.transpose(-1, -2).reshape(batch, width, height, cols))


MEMORY_HORIZON_S = 60.0  # ages are felt on a log scale up to this; older counts as this old


def memory_features(memory_age: torch.Tensor) -> torch.Tensor:
    """``[B, V, 2]``: (has memory, age on a log scale in [0, 1]) per camera.

    ``memory_age`` holds seconds since the camera's memory was observed; ``inf`` or NaN means
    no memory. Age 0 maps to 0 and ``MEMORY_HORIZON_S`` or older to 1, so a long-dead camera
    looks alike whatever its exact age.
    """
    has = torch.isfinite(memory_age)
    age = torch.where(has, memory_age, torch.zeros_like(memory_age)).clamp(0, MEMORY_HORIZON_S)
    scaled = torch.log1p(age) / torch.log1p(torch.tensor(MEMORY_HORIZON_S))
    return torch.stack([has.to(scaled.dtype), torch.where(has, scaled, 1.0)], dim=-1)


def observed_patterns(views: int) -> list[tuple[bool, ...]]:
    """Every presence pattern with at least one view observed and one missing."""
    return [
        tuple(v in chosen for v in range(views))
        for count in range(1, views)
        for chosen in combinations(range(views), count)
    ]


def pattern_key(mask: tuple[bool, ...]) -> str:
    """``(True, False, True) -> "101"``: the name a pattern's tensors are stored under."""
    return "".join("1" if p else "0" for p in mask)


class RegressionPrior(nn.Module):
    """Linear estimates of missing views from observed ones, one map per presence pattern.

    ``y = y_mean + (x - x_mean) W`` on standardised latents, as the ridge baseline fits it;
    the maps are buffers (fitted by training, stored in the checkpoint, never trained by
    gradient). Every pattern is evaluated densely and the matching one selected per sample, so
    the module has no data-dependent control flow (it traces and exports).
    """

    def __init__(self, views: int, dim: int) -> None:
        super().__init__()
        self.views, self.dim = views, dim
        self.patterns = observed_patterns(views)
        for mask in self.patterns:
            seen = sum(mask)
            key = pattern_key(mask)
            self.register_buffer(f"x_mean_{key}", torch.zeros(seen * dim))
            self.register_buffer(f"y_mean_{key}", torch.zeros((views - seen) * dim))
            self.register_buffer(f"weights_{key}", torch.zeros(seen * dim, (views - seen) * dim))

    def load_fits(
        self, fits: dict[tuple[bool, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> None:
        """Install ``(x_mean, y_mean, W)`` for every pattern (a ridge fit of each)."""
        missing = [pattern_key(m) for m in self.patterns if m not in fits]
        if missing:
            raise ConfigError(f"regression prior: no fit for the patterns {missing}")
        for mask in self.patterns:
            key = pattern_key(mask)
            for name, tensor in zip(("x_mean", "y_mean", "weights"), fits[mask], strict=True):
                buffer = getattr(self, f"{name}_{key}")
                if tuple(tensor.shape) != tuple(buffer.shape):
                    raise ConfigError(
                        f"regression prior {name} of pattern {key}: shape "
                        f"{list(tensor.shape)}, expected {list(buffer.shape)}"
                    )
                buffer.copy_(tensor.to(buffer))

    def fits(self) -> dict[tuple[bool, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The installed ``(x_mean, y_mean, W)`` of every pattern (what :meth:`load_fits` took)."""
        found = {}
        for mask in self.patterns:
            key = pattern_key(mask)
            found[mask] = (
                getattr(self, f"x_mean_{key}").detach(),
                getattr(self, f"y_mean_{key}").detach(),
                getattr(self, f"weights_{key}").detach(),
            )
        return found

    def forward(self, x: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """``[B, V, D]``: observed views as given, missing ones estimated; 0 (the mean) where
        nothing is observed."""
        estimate = torch.zeros_like(x)
        for mask in self.patterns:
            key = pattern_key(mask)
            seen = torch.tensor(mask, device=x.device)
            weights = getattr(self, f"weights_{key}").to(x.dtype)
            inputs = x[:, seen].flatten(1) - getattr(self, f"x_mean_{key}").to(x.dtype)
            guess = inputs @ weights + getattr(self, f"y_mean_{key}").to(x.dtype)
            filled = torch.zeros_like(x)
            filled[:, ~seen] = guess.reshape(len(x), -1, self.dim)
            match = (observed == seen).all(1)[:, None, None]
            estimate = torch.where(match, filled, estimate)
        return torch.where(observed[..., None], x, estimate)


class ConvScoreNet(nn.Module):
    """A convolutional U-Net over the stacked latent grids of all views."""

    def __init__(self, config: ScoreNetConfig) -> None:
        super().__init__()
        self.config = config
        views, (channels, _, _) = config.num_views, config.latent_shape
        widths, time_dim, groups = config.widths, config.time_dim, config.groups
        self.time_embed = nn.Sequential(
            nn.Linear(views, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )
        self.input = nn.Conv2d(views * channels + views, widths[0], 3, padding=1)
        if config.memory:  # memory latents + (has, age) per camera; zero: starts memoryless
            self.memory_input = nn.Conv2d(views * channels + 2 * views, widths[0], 3, padding=1)
            self.memory_embed = nn.Linear(2 * views, time_dim)
            zero_init(self.memory_input)
            zero_init(self.memory_embed)
        self.prior = RegressionPrior(views, config.latent_dim) if config.prior_sde else None
        if self.prior is not None:  # the estimate's planes; zero: starts as the shifted net
            self.prior_input = nn.Conv2d(views * channels, widths[0], 3, padding=1)
            zero_init(self.prior_input)
        self.memory_prior = (  # the estimate corrected by each failed camera's own past
            MemoryPrior(views, config.latent_shape)
            if self.prior is not None and config.memory
            else None
        )
        self.down = nn.ModuleList(
            ConvLevel(ConvResBlock(w, w, time_dim, groups) for _ in range(config.blocks))
            for w in widths
        )
        self.downsample = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in pairwise(widths)
        )
        self.middle = ConvResBlock(widths[-1], widths[-1], time_dim, groups)
        self.attention = (
            GridAttention(widths[-1], config.attention_heads, groups)
            if config.attention_heads
            else None
        )
        self.up = nn.ModuleList(
            ConvLevel(
                ConvResBlock(2 * w if i == 0 else w, w, time_dim, groups)
                for i in range(config.blocks)
            )
            for w in reversed(widths)
        )
        self.upsample = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1)
            )
            for a, b in pairwise(reversed(widths))
        )
        self.out_norm = nn.GroupNorm(groups, widths[0])
        self.output = nn.Conv2d(widths[0], views * channels, 3, padding=1)
        zero_init(self.output)

    def forward(
        self,
        x: torch.Tensor,
        tau: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_age: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``memory [B, V, D]`` (standardised, any value where there is none) and
        ``memory_age [B, V]`` (seconds; inf = none) are used by a network with ``memory``;
        left out, every camera has no memory."""
        batch, views, dim = x.shape  # [B, V, D]
        channels, height, width = self.config.latent_shape
        emb = self.time_embed(tau.to(x.dtype))  # [B, time_dim]
        estimate = None
        if self.prior is not None:
            observed = tau == 0
            estimate = self.prior(x, observed)
            if self.memory_prior is not None and memory is not None and memory_age is not None:
                estimate = self.memory_prior(estimate, observed, memory, memory_age)
            shift = self._alpha(tau).to(x.dtype)[..., None] * estimate
            x = torch.where(observed[..., None], x, x - shift)
        grid = x.reshape(batch, views * channels, height, width)
        times = tau.to(x.dtype)[:, :, None, None].expand(batch, views, height, width)
        h = self.input(torch.cat([grid, times], dim=1))
        if estimate is not None:
            h = h + self.prior_input(estimate.reshape(batch, views * channels, height, width))
        if self.config.memory:
            h, emb = self._add_memory(h, emb, x, memory, memory_age)
        skips = []
        for level, blocks in enumerate(self.down):
            h = blocks(h, emb)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self.middle(h, emb)
        if self.attention is not None:
            h = self.attention(h)
        for level, blocks in enumerate(self.up):
            h = blocks(torch.cat([h, skips.pop()], dim=1), emb)
            if level < len(self.upsample):
                h = self.upsample[level](h)
        out = self.output(nn.functional.silu(self.out_norm(h)))
        return out.reshape(batch, views, dim)

    def _alpha(self, tau: torch.Tensor) -> torch.Tensor:
        """alpha(tau) of the VP SDE in ``prior_sde`` (the mean coefficient of p_t(z | z0))."""
        beta_min, beta_max = self.config.prior_sde
        t = tau.float()
        return torch.exp(-0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min)

    def _add_memory(
        self,
        h: torch.Tensor,
        emb: torch.Tensor,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        memory_age: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, views, _ = x.shape
        channels, height, width = self.config.latent_shape
        if memory is None or memory_age is None:
            memory = torch.zeros_like(x)
            memory_age = torch.full((batch, views), float("inf"), device=x.device)
        features = memory_features(memory_age.float()).to(x.dtype)  # [B, V, 2]
        has = features[..., 0, None]
        memory = torch.where(has > 0, memory.to(x.dtype), torch.zeros_like(x))  # NaN-safe
        planes = features.permute(0, 2, 1).reshape(batch, 2 * views, 1, 1)
        stacked = torch.cat(
            [
                memory.reshape(batch, views * channels, height, width),
                planes.expand(batch, 2 * views, height, width),
            ],
            dim=1,
        )
        return h + self.memory_input(stacked), emb + self.memory_embed(features.flatten(1))


ScoreNetwork: TypeAlias = ScoreNet | ConvScoreNet


def make_score_net(config: ScoreNetConfig) -> ScoreNetwork:
    """The score network ``config.kind`` names."""
    return ConvScoreNet(config) if config.kind == "conv" else ScoreNet(config)
