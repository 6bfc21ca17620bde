"""Latents -> images for every view, batched on the model's device.

Observed views are decoded from the latents the edge sent, missing ones from the imputed
latents: both go through the same decoder in one call, so a frame set's views are
comparable. Output is uint8 RGB through the model's own ``postprocess_images``. With a
``precision`` the decoder is a tuned inference copy (``mvld.receiver.precision``): it is more
than half of the receiver's arithmetic per frame set (3 x 672 MFLOP against 20 x 112 MFLOP of
score evaluations for the packaged model).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from mvld.common.preprocess import PreprocessConfig, postprocess_images
from mvld.model.autoencoder import Decoder
from mvld.model.checkpoint import MVLDModel
from mvld.receiver.precision import inference_context, prepare_module, resolve_precision

__all__ = ["LatentDecoder"]

log = logging.getLogger(__name__)


class LatentDecoder:
    """``(latents [..., D]) -> uint8 images [..., H, W, 3]`` with the model's decoder."""

    def __init__(
        self,
        decoder: Decoder,
        preprocess: PreprocessConfig,
        *,
        max_chunk: int = 1024,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.decoder = decoder.eval()
        self.preprocess = preprocess
        self.max_chunk = max_chunk  # bounds device memory at large batch x views
        parameter = next(decoder.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.compute_dtype = compute_dtype or self.dtype

    @classmethod
    def from_model(cls, model: MVLDModel, *, precision: str | None = None) -> LatentDecoder:
        """The decoder of ``model``, on the model's device; ``precision`` as for the imputer
        (None: the decoder as it is)."""
        decoder = model.autoencoder.decoder
        if precision is None:
            return cls(decoder, model.preprocess)
        device = next(decoder.parameters()).device
        dtype = resolve_precision(precision, device)
        log.info("decoder: %s on %s", str(dtype).removeprefix("torch."), device)
        return cls(prepare_module(decoder), model.preprocess, compute_dtype=dtype)

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        """Decode ``[..., D]`` latents; returns a numpy uint8 array ``[..., H, W, 3]`` (RGB)."""
        lead = latents.shape[:-1]
        flat = latents.reshape(-1, latents.shape[-1]).to(self.device, self.dtype)
        with torch.inference_mode(), inference_context(self.device, self.compute_dtype):
            images = torch.cat(
                [
                    self.decoder(flat[i : i + self.max_chunk])
                    for i in range(0, len(flat), self.max_chunk)
                ]
            )
        pixels = postprocess_images(images.float().cpu().numpy(), self.preprocess, "RGB")
        return pixels.reshape(*lead, *pixels.shape[1:])
