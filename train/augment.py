"""Label-preserving augmentation of real views for the downstream classifier.

The classifier is the yardstick of decoded and imputed views, so it should judge what a view
shows (which object, from where), not pixel-level detail that any lossy codec removes.
Trained on sharp renders only, a small CNN keys on texture and edges and loses most of its
accuracy on mildly smoothed images of the same scene. Each training view is therefore
shifted by a few pixels, jittered in brightness and contrast, and blurred with a random
Gaussian. Mirroring is chosen per dataset (:func:`augment_for_dataset`): it changes the label
of digits, text or left/right cues, so it is off unless asked for (``--mirror``) or the
dataset declares its labels mirror-invariant (docs/DATASETS.md). Every draw comes from the
step's generator, so training stays seeded.
"""

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from mvld.common.dataset import METADATA_FILE, RENDER_FILE

log = logging.getLogger(__name__)

MIRROR_PROB = 0.5


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms (images preprocessed to ``[-1, 1]``)."""

    flip_prob: float = 0.0  # horizontal mirror (only for mirror-invariant labels)
    max_shift: int = 4  # pixels, each axis, reflect-padded
    brightness: float = 0.1  # additive offset, uniform in +-brightness
    contrast: float = 0.15  # gain, uniform in 1 +- contrast
    blur_prob: float = 0.5
    max_blur_sigma: float = 1.5  # pixels, uniform in (0, max]


def mirror_invariant(data: str | Path) -> bool:
    """Whether a dataset declares that mirroring a view keeps its label.

    ``dataset.json`` with ``"mirror_invariant": true`` says so; a dataset rendered by the
    simulated rig (``render.json`` with its ``classes``) does, since its objects' classes do
    not depend on left or right. Anything else, including an unreadable file, does not.
    """
    root = Path(data)
    try:
        metadata = json.loads((root / METADATA_FILE).read_text())
        if isinstance(metadata, dict) and "mirror_invariant" in metadata:
            return metadata["mirror_invariant"] is True
    except (OSError, json.JSONDecodeError):
        pass
    try:
        render = json.loads((root / RENDER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(render, dict) and "classes" in render


def augment_for_dataset(data: str | Path, mirror: bool) -> AugmentConfig:
    """The classifier's augmentation for ``data``: mirroring when asked or declared safe."""
    allowed = mirror or mirror_invariant(data)
    log.info(
        "classifier augmentation: %s",
        "with horizontal mirroring"
        if allowed
        else "no mirroring (pass --mirror, or see docs/DATASETS.md, if labels survive it)",
    )
    return replace(AugmentConfig(), flip_prob=MIRROR_PROB if allowed else 0.0)


def _uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator
) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur each image ``[N, C, H, W]`` with its own sigma ``[N]`` (0: unchanged)."""
    count, channels, height, width = images.shape
    radius = max(1, int(torch.ceil(3 * sigmas.max()).item()))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    spread = sigmas.clamp(min=1e-3)[:, None].to(images.dtype)
    taps = torch.exp(-0.5 * (offsets[None] / spread) ** 2)
    taps = taps / taps.sum(1, keepdim=True)  # [N, K]; sigma ~ 0 gives a delta
    kernel = taps.repeat_interleave(channels, 0)[:, None]  # [N * C, 1, K]
    flat = images.reshape(1, count * channels, height, width)
    flat = nn.functional.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = nn.functional.conv2d(flat, kernel[..., None], groups=count * channels)  # vertical
    flat = nn.functional.conv2d(flat, kernel[:, :, None], groups=count * channels)  # horizontal
    return flat.reshape(count, channels, height, width)


def augment_views(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """A randomly transformed copy of a batch of preprocessed views ``[N, C, H, W]``."""
    count, _, height, width = images.shape
    out = images
    flip = torch.rand(count, generator=generator) < config.flip_prob
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if config.max_shift > 0:
        pad = config.max_shift
        padded = nn.functional.pad(out, (pad, pad, pad, pad), mode="reflect")
        dy, dx = torch.randint(0, 2 * pad + 1, (2, count), generator=generator)
        rows = (dy[:, None] + torch.arange(height))[:, :, None]  # [N, H, 1]
        cols = (dx[:, None] + torch.arange(width))[:, None, :]  # [N, 1, W]
        index = torch.arange(count)[:, None, None]
        out = padded[index, :, rows, cols].permute(0, 3, 1, 2)  # indexing gives [N, H, W, C]
    gain = _uniform((count, 1, 1, 1), 1 - config.contrast, 1 + config.contrast, generator)
    offset = _uniform((count, 1, 1, 1), -config.brightness, config.brightness, generator)
    out = out * gain + offset
    blurred = torch.rand(count, generator=generator) < config.blur_prob
    sigmas = _uniform((count,), 0.0, config.max_blur_sigma, generator) * blurred
    if bool(blurred.any()):
        out = gaussian_blur(out, sigmas)
    return out.clamp(-1.0, 1.0)
