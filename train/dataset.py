"""A torch ``Dataset`` over a multi-camera dataset folder (:mod:`mvld.common.dataset`).

Each item is ``(views, present, label)``:

* ``views``   float32 [V, 3, H, W], every present view preprocessed, missing views all zeros;
* ``present`` bool [V], True where the view exists;
* ``label``   int64 scalar, the frame set's label or -1 when it has none.

Preprocessing is one parameterised function (HxWx3 uint8 RGB -> 3xHxW float32, numpy): the
default :func:`scale_to_unit`, or :func:`shared_preprocess` for the model's own
``mvld.common.preprocess`` definition (what the edge feeds the exported encoder).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from mvld.common.dataset import FrameSetFolder
from mvld.common.preprocess import PreprocessConfig, preprocess_images

Preprocess = Callable[[np.ndarray], np.ndarray]
NO_LABEL = -1


def scale_to_unit(image: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB -> 3xHxW float32 in [0, 1], optionally resized to size=(H, W) first."""
    if size is not None and image.shape[:2] != tuple(size):
        image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32) / 255.0


def shared_preprocess(config: PreprocessConfig) -> Preprocess:
    """The model's preprocessing (resize, channel order, scaling) as a per-view function."""

    def preprocess(image: np.ndarray) -> np.ndarray:
        return preprocess_images([image], config)[0]

    return preprocess


class MultiViewDataset(Dataset):
    """Frame sets as tensors plus a per-view presence mask (see the module docstring)."""

    def __init__(
        self,
        source: FrameSetFolder | str | Path,
        *,
        preprocess: Preprocess = scale_to_unit,
        indices: list[int] | None = None,
    ) -> None:
        self.folder = source if isinstance(source, FrameSetFolder) else FrameSetFolder(source)
        self.preprocess = preprocess
        self.indices = list(range(len(self.folder))) if indices is None else list(indices)
        height, width = self.folder.image_size
        # The output shape of one view, from the preprocessing itself (it may resize).
        self.view_shape = preprocess(np.zeros((height, width, 3), np.uint8)).shape

    @property
    def num_views(self) -> int:
        """V, the number of cameras."""
        return len(self.folder.cameras)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frame_set = self.folder[self.indices[index]]
        views = np.zeros((self.num_views, *self.view_shape), np.float32)  # [V, 3, H, W]
        present = np.zeros(self.num_views, dtype=bool)  # [V]
        for v, image in enumerate(frame_set.views):
            if image is not None:
                views[v] = self.preprocess(image)
                present[v] = True
        label = NO_LABEL if frame_set.label is None else frame_set.label
        return torch.from_numpy(views), torch.from_numpy(present), torch.tensor(label)

    def presence(self) -> np.ndarray:
        """bool [N, V] for this dataset's items, without decoding images."""
        return self.folder.presence()[self.indices]

    def labels(self) -> np.ndarray:
        """int64 [N]: each item's label, -1 where none."""
        labels = self.folder.labels or {}
        stems = self.folder.stems
        return np.array([labels.get(stems[i], NO_LABEL) for i in self.indices], dtype=np.int64)
