"""Exponential moving average of model weights (the weights a diffusion model samples with)."""

import copy
from typing import Generic, TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class ExponentialMovingAverage(Generic[ModuleT]):
    """Keeps ``shadow = d * shadow + (1 - d) * weights`` after every optimiser step.

    ``d = min(decay, (1 + step) / (10 + step))`` warms up, so early checkpoints are not
    dominated by the random initial weights.
    """

    def __init__(self, model: ModuleT, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: ModuleT = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: ModuleT, step: int) -> None:
        """Move the shadow weights towards ``model``'s after optimiser step ``step``."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for shadow, live in zip(self.shadow.parameters(), model.parameters(), strict=True):
            shadow.lerp_(live.detach(), 1.0 - decay)
        for shadow_buffer, live_buffer in zip(self.shadow.buffers(), model.buffers(), strict=True):
            shadow_buffer.copy_(live_buffer)
