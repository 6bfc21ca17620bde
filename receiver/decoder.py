"""Latents -> images for every view, batched on the model's device.

Observed views are decoded from the latents the edge sent, missing ones from the imputed
latents: both go through the same decoder in one call, so a frame set's views are
comparable. Output is uint8 RGB through the model's own ``postprocess_images``.
"""

from __future__ import annotations

import numpy as np
import torch

from mvld.common.preprocess import PreprocessConfig, postprocess_images
from mvld.model.autoencoder import Decoder
from mvld.model.checkpoint import MVLDModel

__all__ = ["LatentDecoder"]


class LatentDecoder:
    """``(latents [..., D]) -> uint8 images [..., H, W, 3]`` with the model's decoder."""

    def __init__(self, decoder: Decoder, preprocess: PreprocessConfig, *,
                 max_chunk: int = 1024) -> None:
        self.decoder = decoder.eval()
        self.preprocess = preprocess
        self.max_chunk = max_chunk  # bounds device memory at large batch x views
        parameter = next(decoder.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    @classmethod
    def from_model(cls, model: MVLDModel) -> LatentDecoder:
        """The decoder of ``model``, on the model's device."""
        return cls(model.autoencoder.decoder, model.preprocess)

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        """Decode ``[..., D]`` latents; returns a numpy uint8 array ``[..., H, W, 3]`` (RGB)."""
        lead = latents.shape[:-1]
        flat = latents.reshape(-1, latents.shape[-1]).to(self.device, self.dtype)
        with torch.inference_mode():
            images = torch.cat([self.decoder(flat[i:i + self.max_chunk])
                                for i in range(0, len(flat), self.max_chunk)])
        pixels = postprocess_images(images.float().cpu().numpy(), self.preprocess, "RGB")
        return pixels.reshape(*lead, *pixels.shape[1:])
