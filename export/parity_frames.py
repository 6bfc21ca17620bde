"""Real camera frames for parity checks: a dataset folder, or the simulated rig rendering them.

Exports are checked on what the model will see in the field (camera frames through the shared
preprocessing), not on random tensors. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mvld.common.dataset import FrameSetFolder
from mvld.common.errors import ConfigError


def frames_from_dataset(path: Path, count: int, views: int) -> list[np.ndarray]:
    """``count`` complete frame sets of ``views`` cameras from a dataset folder (flattened)."""
    frames: list[np.ndarray] = []
    with FrameSetFolder(path) as dataset:
        if len(dataset.cameras) != views:
            raise ConfigError(f"{path} has {len(dataset.cameras)} cameras; the model has {views}")
        for index in range(len(dataset)):
            views_seen = [v for v in dataset[index].views if v is not None]
            if len(views_seen) == views:
                frames.extend(views_seen)
            if len(frames) >= count * views:
                break
    if not frames:
        raise ConfigError(f"{path} holds no complete frame set for the parity check")
    return frames


def frames_from_rig(size: tuple[int, int], count: int, views: int, seed: int) -> list[np.ndarray]:
    """``count`` frame sets rendered by the simulated rig (each from its own episode)."""
    try:
        from mvld.sim.rig import RigConfig, SimRig, ring_of_cameras  # needs pybullet
    except ImportError as exc:
        raise ConfigError(
            f"the simulated rig is unavailable ({exc}): install pybullet or "
            "pass --frames DATASET for the parity frames"
        ) from exc

    frames: list[np.ndarray] = []
    config = RigConfig(cameras=ring_of_cameras(views), image_size=size)
    with SimRig(config) as rig:
        for episode in range(count):
            rig.reset(seed, episode)
            frames.extend(rig.render().views)
    return frames
