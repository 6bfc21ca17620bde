"""Camera memories for video-aware training: each view's latent from earlier in its scene.

The receiver keeps, per camera, the last latent it observed and how old it is; the score
network learns to use it. Training draws such memories from the same scene's earlier frame
sets: for each view independently, no memory with probability ``drop`` (one model serves
cameras that never reported and long-dead ones), else an age of 1 frame up to
``max_age_s`` on a log-uniform scale (short outages are the common case, long ones must
still be covered). Frame sets of another scene are never paired: a cut is a different world.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mvld.common.dataset import Scenes
from mvld.common.errors import ConfigError

__all__ = ["MemoryDraw", "SceneMemory"]


@dataclass(frozen=True)
class MemoryDraw:
    """Memories of a batch: ``latents [B, V, D]`` (standardised) and ``age [B, V]`` seconds
    (``inf`` = no memory)."""

    latents: torch.Tensor
    age: torch.Tensor


class SceneMemory:
    """Draws memories for frame sets of a sequence dataset."""

    def __init__(
        self,
        z: torch.Tensor,
        present: torch.Tensor,
        scenes: Scenes,
        *,
        drop: float = 0.25,
        max_age_s: float = 30.0,
    ) -> None:
        if len(scenes.scene) != len(z):
            raise ConfigError(f"scenes cover {len(scenes.scene)} frame sets, latents {len(z)}")
        if not 0 <= drop <= 1 or not max_age_s > 0:
            raise ConfigError(
                f"memory drop must be in [0, 1] and max age > 0; got {drop}, {max_age_s}"
            )
        self.z, self.present, self.fps = z, present, scenes.fps
        self.position = torch.from_numpy(scenes.position())
        self.drop, self.max_frames = drop, max(1, round(max_age_s * scenes.fps))

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> MemoryDraw:
        """Memories for the frame sets ``index`` (rows of ``z``), one per view."""
        batch, views = len(index), self.z.shape[1]
        reach = self.position[index].clamp(max=self.max_frames)[:, None].expand(batch, views)
        log_age = (
            torch.rand(batch, views, generator=generator)
            * torch.log(reach.clamp(min=1).double()).float()
        )
        frames = torch.minimum(torch.exp(log_age).round().long().clamp(min=1), reach)
        source = index[:, None] - frames  # [B, V] rows of the remembered frame sets
        kept = (torch.rand(batch, views, generator=generator) >= self.drop) & (reach > 0)
        source = torch.where(kept, source, index[:, None])
        view = torch.arange(views).expand(batch, views)
        kept &= self.present[source, view]
        latents = self.z[source, view]  # [B, V, D]
        age = torch.where(kept, frames.float() / self.fps, torch.tensor(float("inf")))
        return MemoryDraw(torch.where(kept[..., None], latents, torch.zeros_like(latents)), age)
