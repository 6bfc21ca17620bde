"""Micro-batching: frame sets of many nodes go through one imputation call.

One sampler call on a batch of B frame sets costs about as much as a call on one (the score
network is an MLP over [B, V*D]), so the worker collects up to ``max_batch`` frame sets,
waiting at most ``max_wait_s`` after the first one arrives: a small wait buys throughput at
saturation, a short one bounds the latency it adds when load is light.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from mvld.common.errors import ConfigError
from mvld.receiver.ingest import NodeBacklog, PendingFrameSet

__all__ = ["Batch", "MicroBatcher"]


@dataclass(eq=False)
class Batch:
    """Frame sets imputed together; ``latents``/``present`` stack them in the model's order."""

    items: list[PendingFrameSet]
    latents: torch.Tensor  # float32 [B, V, D]
    present: torch.Tensor  # bool [B, V]

    @classmethod
    def stack(cls, items: list[PendingFrameSet], device: torch.device | str) -> Batch:
        """Stack the frame sets' latents and presence masks on ``device``."""
        latents = torch.from_numpy(np.stack([item.latents for item in items])).to(device)
        present = torch.from_numpy(np.stack([item.present for item in items])).to(device)
        return cls(items, latents, present)

    def __len__(self) -> int:
        return len(self.items)


class MicroBatcher:
    """Collects batches from a :class:`NodeBacklog` by size and waiting-time limits."""

    def __init__(self, backlog: NodeBacklog, *, max_batch: int = 64, max_wait_s: float = 0.010
                 ) -> None:
        if max_batch < 1:
            raise ConfigError(f"max batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ConfigError(f"max wait must be >= 0, got {max_wait_s}")
        self.backlog, self.max_batch, self.max_wait_s = backlog, max_batch, max_wait_s

    def next_items(self, stop: threading.Event, idle_s: float = 0.1) -> list[PendingFrameSet]:
        """The next batch's frame sets; empty if nothing arrived within ``idle_s`` or on stop."""
        if not self.backlog.wait(idle_s) or stop.is_set():
            return []
        deadline = time.monotonic() + self.max_wait_s
        while len(self.backlog) < self.max_batch and not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(remaining, 0.001))  # frame sets trickle in; 1 ms granularity
        return self.backlog.take(self.max_batch)
