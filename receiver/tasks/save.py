"""``--task save:dir=DIR[,format=png|mp4][,fps=30]``: write every view of every frame set.

PNG writes the dataset folder format (``DIR/NODE/cam0/00000042.png``, same stem across
cameras = one frame set, see docs/DATASETS.md), so saved streams can train a model. MP4 writes
one video per node and camera (``DIR/NODE/cam0.mp4``, OpenCV ``mp4v``), frames aligned by index.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2

from mvld.common.errors import ConfigError
from mvld.receiver.results import FrameSetResult
from mvld.receiver.tasks.options import parse_choice, parse_positive

__all__ = ["SaveFrameSets"]

log = logging.getLogger(__name__)

FORMATS = ("png", "mp4")


class SaveFrameSets:
    """Save decoded views as PNG files or one MP4 per camera."""

    def __init__(self, dir: str | None = None, format: str = "png", fps: str = "30") -> None:
        if not dir:
            raise ConfigError("task save needs dir=PATH")
        self.root = Path(dir)
        self.format = parse_choice("save", "format", format, FORMATS)
        self.fps = parse_positive("save", "fps", fps)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"task save: cannot create {self.root}: {exc}") from exc
        self._videos: dict[tuple[str, str], cv2.VideoWriter] = {}

    def __call__(self, result: FrameSetResult) -> None:
        for view in result.views:
            bgr = view.image[:, :, ::-1]
            if self.format == "png":
                folder = self.root / result.node_id / view.camera_id
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{result.seq:08d}.png"
                if not cv2.imwrite(str(path), bgr):
                    raise OSError(f"cannot write {path}")
            else:
                self._video(result.node_id, view.camera_id, view.image.shape).write(bgr)

    def _video(self, node: str, camera: str, shape: tuple[int, ...]) -> cv2.VideoWriter:
        key = (node, camera)
        if key not in self._videos:
            path = self.root / node / f"{camera}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = cv2.VideoWriter(
                str(path), cv2.VideoWriter.fourcc(*"mp4v"), self.fps, (shape[1], shape[0])
            )
            if not writer.isOpened():
                raise OSError(f"OpenCV cannot write MP4 to {path}")
            self._videos[key] = writer
        return self._videos[key]

    def close(self) -> None:
        """Finish every video file."""
        for writer in self._videos.values():
            writer.release()
        self._videos.clear()
