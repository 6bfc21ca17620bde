"""Deterministic convolutional autoencoder shared by all camera views (no KL term).

Two latent forms share one class. The *vector* latent follows MLD's PolyMNIST autoencoder:
stride-2 convolutions, a linear map to a ``latent_dim`` vector, a mirrored decoder. The
*spatial* latent (``latent_channels > 0``) follows latent diffusion models (Rombach et al.
2022): the encoder stops at a small grid of ``latent_channels`` values per cell
(``[C, H/2^k, W/2^k]``), so the latent keeps where things are and the decoder only has to
draw them; the flattened grid (``C*h*w`` values) is what the wire and the score network see.
One encoder/decoder pair serves every view of a rig, so one exported engine encodes a batch
of cameras. ``res_blocks`` adds residual 3x3 blocks at every resolution of the decoder (its
capacity is what sharpens reconstructions) and, unless ``encoder_res_blocks`` says otherwise,
of the encoder (which runs on the edge). Input is the output of
``mvld.common.preprocess.preprocess_images``: float ``[N, 3, H, W]`` in the configured range.
"""

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mvld.common.errors import ConfigError


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of the autoencoder; stored in every checkpoint."""

    image_size: int = 64  # square input, side divisible by 2 ** len(channels)
    latent_dim: int = 128  # values per view: the vector's size, or C*h*w of the spatial grid
    channels: tuple[int, ...] = field(default=(48, 96, 128))  # one stride-2 stage each
    in_channels: int = 3
    res_blocks: int = 0  # residual blocks per stage of the decoder (and of the encoder)
    latent_channels: int = 0  # 0: vector latent; C > 0: a C x h x w grid (h = bottleneck_size)
    encoder_res_blocks: int | None = None  # None: the same as res_blocks

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not self.channels or min(self.channels) < 1:
            raise ConfigError("autoencoder channels must be a non-empty list of positive ints")
        if self.image_size % (2 ** len(self.channels)) != 0:
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by 2**{len(self.channels)}"
            )
        if self.latent_dim < 1:
            raise ConfigError("latent_dim must be positive")
        if self.res_blocks < 0 or (self.encoder_res_blocks or 0) < 0:
            raise ConfigError("res_blocks and encoder_res_blocks must be >= 0")
        if self.latent_channels < 0:
            raise ConfigError("latent_channels must be >= 0")
        grid = self.latent_channels * self.bottleneck_size**2
        if self.latent_channels and self.latent_dim != grid:
            raise ConfigError(
                f"a spatial latent of {self.latent_channels} channels on a "
                f"{self.bottleneck_size}x{self.bottleneck_size} grid has latent_dim {grid}, "
                f"not {self.latent_dim}"
            )

    @property
    def bottleneck_size(self) -> int:
        """Side of the smallest feature map."""
        return self.image_size // (2 ** len(self.channels))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one view's latent: ``(latent_dim,)`` or ``(C, h, w)``."""
        if self.latent_channels:
            return (self.latent_channels, self.bottleneck_size, self.bottleneck_size)
        return (self.latent_dim,)

    @property
    def encoder_blocks(self) -> int:
        """Residual blocks per encoder stage."""
        return self.res_blocks if self.encoder_res_blocks is None else self.encoder_res_blocks

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = asdict(self)
        data["channels"] = list(self.channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AutoencoderConfig":
        """Rebuild from ``to_dict`` output."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown autoencoder keys {sorted(unknown)}")
        if "channels" in data:
            data = {**data, "channels": tuple(data["channels"])}
        return cls(**data)


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` at a fixed resolution and width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(width), width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(_groups(width), width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """Images ``[N, C, H, W]`` -> latents ``[N, latent_dim]`` (a spatial grid is flattened)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = config.in_channels
        for width in config.channels:
            layers += [
                nn.Conv2d(previous, width, 4, stride=2, padding=1),
                *(ResBlock(width) for _ in range(config.encoder_blocks)),
                nn.GroupNorm(_groups(width), width),
                nn.SiLU(),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        flat = previous * config.bottleneck_size**2
        self.to_latent: nn.Module = (
            nn.Conv2d(previous, config.latent_channels, 3, padding=1)
            if config.latent_channels
            else nn.Linear(flat, config.latent_dim)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images)
        if isinstance(self.to_latent, nn.Conv2d):
            return self.to_latent(features).flatten(1)
        return self.to_latent(features.flatten(1))


class Decoder(nn.Module):
    """Latents ``[N, latent_dim]`` -> images ``[N, C, H, W]`` (unbounded; clip when showing)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        widths = list(reversed(config.channels))
        self.latent_shape = config.latent_shape
        self.start_shape = (widths[0], config.bottleneck_size, config.bottleneck_size)
        self.from_latent: nn.Module = (
            nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
            if config.latent_channels
            else nn.Linear(config.latent_dim, widths[0] * config.bottleneck_size**2)
        )
        layers: list[nn.Module] = []
        # Mirror of the encoder; the last transposed convolution writes the image directly
        # (a full-resolution conv after it would double the cost of a step on CPU).
        for width, following in zip(widths, [*widths[1:], config.in_channels], strict=True):
            layers += [
                *(ResBlock(width) for _ in range(config.res_blocks)),
                nn.GroupNorm(_groups(width), width),
                nn.SiLU(),
                nn.ConvTranspose2d(width, following, 4, stride=2, padding=1),
            ]
        self.features = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        start = self.from_latent(latents.view(-1, *self.latent_shape)).view(-1, *self.start_shape)
        return self.features(start)


class Autoencoder(nn.Module):
    """The encoder/decoder pair; ``forward`` reconstructs."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(images))
