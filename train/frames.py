"""Load a dataset folder into memory once, resized to the model's input size.

Training on 2-core CPUs is bound by compute, not I/O, but decoding PNGs every epoch is
wasted work: frame sets are decoded once into a uint8 array (64x64x3 x 3 views x 10k frame
sets is 370 MB). Resizing uses ``mvld.common.preprocess.resize_frame``, the same function
the edge uses, so the cached pixels are exactly what the encoder would be fed.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mvld.common.dataset import FrameSetFolder
from mvld.common.errors import DatasetError
from mvld.common.preprocess import resize_frame

log = logging.getLogger(__name__)
NO_LABEL = -1


@dataclass
class FrameArrays:
    """A whole dataset in memory."""

    images: np.ndarray  # uint8 [N, V, h, w, 3] RGB, zeros where a view is missing
    present: np.ndarray  # bool [N, V]
    labels: np.ndarray  # int64 [N], NO_LABEL where none
    cameras: list[str]
    stems: list[str]

    @property
    def num_views(self) -> int:
        """V, the number of cameras."""
        return len(self.cameras)


def load_frame_arrays(
    root: str | Path, height: int, width: int, skip_bad: bool = False, limit: int | None = None
) -> FrameArrays:
    """Decode the frame sets of ``root`` and resize their views to ``height x width``.

    With ``limit``, only that many frame sets, evenly spaced over the folder, are decoded.
    """
    folder = FrameSetFolder(root, skip_bad=skip_bad)
    try:
        chosen = np.arange(len(folder))
        if limit is not None:
            chosen = evenly_spaced(chosen, limit)
        count, views = len(chosen), len(folder.cameras)
        images = np.zeros((count, views, height, width, 3), dtype=np.uint8)
        present = np.zeros((count, views), dtype=bool)
        labels = np.full(count, NO_LABEL, dtype=np.int64)
        for i, index in enumerate(chosen):
            frame_set = folder[int(index)]
            for v, image in enumerate(frame_set.views):
                if image is not None:
                    images[i, v] = resize_frame(image, height, width)
                    present[i, v] = True
            if frame_set.label is not None:
                labels[i] = frame_set.label
        for path, reason in folder.skipped:
            log.warning("skipped %s: %s", path, reason)
        stems = [folder.stems[int(index)] for index in chosen]
        arrays = FrameArrays(images, present, labels, list(folder.cameras), stems)
    finally:
        folder.close()
    if not present.any():
        raise DatasetError(f"{root}: no readable views")
    return arrays


def split_train_val(count: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation frame sets: the last ``val_fraction`` validates.

    A contiguous tail (not a random subset) because neighbouring frame sets of a recording
    are nearly identical; a random split would leak them into validation.
    """
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val_count = round(count * val_fraction)
    if val_fraction > 0 and count >= 2:
        val_count = max(val_count, 1)
    if count - val_count < 1:
        raise DatasetError(f"a dataset of {count} frame sets is too small to split")
    indices = np.arange(count)
    return indices[: count - val_count], indices[count - val_count :]


def evenly_spaced(items: np.ndarray, count: int) -> np.ndarray:
    """At most ``count`` of ``items``, first to last at even spacing (all of them if fewer).

    Evaluations take a subset of a held-out tail this way so that every part of it, i.e.
    every stretch of scenes, is represented.
    """
    if count >= len(items):
        return items
    return items[np.linspace(0, len(items) - 1, count).round().astype(int)]
