"""The one image preprocessing definition shared by training, export and the edge.

Training, the exported encoder and the edge node must feed the encoder identically, so
resize, colour order and scaling live here, in numpy and OpenCV only (the edge has no
torch). ``PreprocessConfig`` is stored in every checkpoint and export, so a consumer
rebuilds exactly the transform the model was trained with.
"""

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from mvld.common.errors import ConfigError

CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True)
class PreprocessConfig:
    """How a uint8 camera frame becomes the encoder's float input (and back)."""

    height: int = 64
    width: int = 64
    channel_order: str = "RGB"  # order of the encoder's input channels
    low: float = -1.0  # value that pixel 0 maps to
    high: float = 1.0  # value that pixel 255 maps to

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8:
            raise ConfigError(f"image size {self.height}x{self.width} is too small (min 8x8)")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ConfigError(f"channel_order must be one of {CHANNEL_ORDERS}")
        if not self.high > self.low:
            raise ConfigError(f"scaling range [{self.low}, {self.high}] is empty")

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the encoder input."""
        return (self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form, stored in checkpoints and exports."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        """Rebuild from ``to_dict`` output; unknown keys are a ``ConfigError``."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown preprocessing keys {sorted(unknown)}")
        return cls(**data)


def resize_frame(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize one ``HxWx3`` frame to the model's size (no-op when it already fits)."""
    if image.shape[:2] == (height, width):
        return image
    # INTER_AREA averages when shrinking (no aliasing); INTER_LINEAR when enlarging.
    shrinking = image.shape[0] > height or image.shape[1] > width
    return cv2.resize(
        image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    )


def preprocess_images(
    images: np.ndarray | list[np.ndarray], config: PreprocessConfig, input_order: str = "RGB"
) -> np.ndarray:
    """uint8 frames ``[N, H, W, 3]`` (or a list of ``HxWx3``) -> float32 ``[N, 3, h, w]``.

    ``input_order`` says how the frames arrive (OpenCV capture gives ``"BGR"``).
    """
    if input_order not in CHANNEL_ORDERS:
        raise ConfigError(f"input_order must be one of {CHANNEL_ORDERS}")
    frames = list(images) if isinstance(images, list) else list(np.asarray(images))
    out = np.empty((len(frames), 3, config.height, config.width), dtype=np.float32)
    scale = np.float32((config.high - config.low) / 255.0)
    for i, frame in enumerate(frames):
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ConfigError(f"frame {i} must be HxWx3 uint8, got {frame.shape} {frame.dtype}")
        frame = resize_frame(frame, config.height, config.width)
        if input_order != config.channel_order:
            frame = frame[:, :, ::-1]
        out[i] = frame.transpose(2, 0, 1).astype(np.float32) * scale + np.float32(config.low)
    return out


def postprocess_images(
    x: np.ndarray, config: PreprocessConfig, output_order: str = "RGB"
) -> np.ndarray:
    """Decoder output float ``[N, 3, h, w]`` -> uint8 ``[N, h, w, 3]`` in ``output_order``."""
    if output_order not in CHANNEL_ORDERS:
        raise ConfigError(f"output_order must be one of {CHANNEL_ORDERS}")
    unit = (np.asarray(x, dtype=np.float32) - config.low) / (config.high - config.low)
    pixels = np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    if output_order != config.channel_order:
        pixels = pixels[..., ::-1]
    return np.ascontiguousarray(pixels)
