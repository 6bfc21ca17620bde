"""Deterministic convolutional autoencoder shared by all camera views (no KL term).

As in MLD's PolyMNIST autoencoder: stride-2 convolutions, a linear map to the latent,
and a mirrored decoder; one encoder/decoder pair serves every view of a rig, so one
exported engine encodes a batch of cameras. ``res_blocks`` adds residual 3x3 blocks at
every resolution (the decoder's capacity is what sharpens reconstructions). Input is the output of
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
    latent_dim: int = 128  # latent size per view
    channels: tuple[int, ...] = field(default=(48, 96, 128))  # one stride-2 stage each
    in_channels: int = 3
    res_blocks: int = 0  # residual blocks per stage, in the encoder and the decoder

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
        if self.res_blocks < 0:
            raise ConfigError("res_blocks must be >= 0")

    @property
    def bottleneck_size(self) -> int:
        """Side of the smallest feature map."""
        return self.image_size // (2 ** len(self.channels))

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
        return cls(**{**data, "channels": tuple(data.get("channels", (32, 64, 64)))})


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` at a fixed resolution and width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(width), width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(_groups(width), width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """Images ``[N, C, H, W]`` -> latents ``[N, latent_dim]``."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = config.in_channels
        for width in config.channels:
            layers += [nn.Conv2d(previous, width, 4, stride=2, padding=1),
                       *(ResBlock(width) for _ in range(config.res_blocks)),
                       nn.GroupNorm(_groups(width), width), nn.SiLU()]
            previous = width
        self.features = nn.Sequential(*layers)
        flat = previous * config.bottleneck_size**2
        self.to_latent = nn.Linear(flat, config.latent_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.features(images).flatten(1))


class Decoder(nn.Module):
    """Latents ``[N, latent_dim]`` -> images ``[N, C, H, W]`` (unbounded; clip when showing)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        widths = list(reversed(config.channels))
        self.start_shape = (widths[0], config.bottleneck_size, config.bottleneck_size)
        self.from_latent = nn.Linear(config.latent_dim, widths[0] * config.bottleneck_size**2)
        layers: list[nn.Module] = []
        # Mirror of the encoder; the last transposed convolution writes the image directly
        # (a full-resolution conv after it would double the cost of a step on CPU).
        for width, following in zip(widths, [*widths[1:], config.in_channels], strict=True):
            layers += [*(ResBlock(width) for _ in range(config.res_blocks)),
                       nn.GroupNorm(_groups(width), width), nn.SiLU(),
                       nn.ConvTranspose2d(width, following, 4, stride=2, padding=1)]
        self.features = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        start = self.from_latent(latents).view(-1, *self.start_shape)
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


def psnr(reconstruction: torch.Tensor, target: torch.Tensor, low: float, high: float) -> float:
    """PSNR in dB of images in ``[low, high]`` (the reconstruction is clipped first)."""
    clipped = reconstruction.clamp(low, high).double()
    mse = torch.mean((clipped - target.double()) ** 2).item()
    if mse == 0:
        return float("inf")
    return 10.0 * float(torch.log10(torch.tensor((high - low) ** 2 / mse)))
