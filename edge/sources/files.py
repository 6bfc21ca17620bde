"""File sources: a video file or a folder of images, as ``file://PATH`` or a plain path.

Options: ``loop`` (start again at the end instead of raising EndOfStream) and ``realtime``
(pace reads at ``fps``: the video's own rate unless given; image folders need ``fps``).

Without ``realtime`` the source has no pace of its own and says so with ``on_demand``: a
reader should ask for the next frame only once the previous one was used. Reading flat out
and dropping the unused frames cost 3.2x the CPU at 30 FPS, and skipping frames is no cheaper
(``grab()`` decodes too: 2.5 of 2.7 ms per 640x480 MJPG frame; a seek costs 40 ms).
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from mvld.common.dataset import IMAGE_SUFFIXES, VIDEO_SUFFIXES, decode_image, natural_key
from mvld.common.errors import DatasetError
from mvld.edge.sources.base import EndOfStream, Frame, Pacer, SourceError

DEFAULT_FOLDER_FPS = 10.0


def path_of(uri: str) -> Path:
    """The file system path of a ``file://`` URI or a plain path."""
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


class FileSource:
    """Frames of a video file or an image folder (natural file-name order)."""

    def __init__(
        self, uri: str, *, loop: bool = False, realtime: bool = False, fps: float | None = None
    ) -> None:
        self.uri = uri
        self.path = path_of(uri)
        self.loop = loop
        self._index = 0  # frames returned so far
        self._position = 0  # position in the underlying file or folder
        self._capture: cv2.VideoCapture | None = None
        self._images: list[Path] = []
        if self.path.is_dir():
            self._images = sorted(
                (p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                key=lambda p: natural_key(p.name),
            )
            if not self._images:
                raise SourceError(f"{uri}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
            rate = fps or DEFAULT_FOLDER_FPS
        elif self.path.is_file() and self.path.suffix.lower() in VIDEO_SUFFIXES:
            self._capture = cv2.VideoCapture(str(self.path))
            if not self._capture.isOpened():
                raise SourceError(f"{uri}: cannot open the video")
            rate = fps or self._capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FOLDER_FPS
        elif self.path.exists():
            raise SourceError(f"{uri}: not a video ({', '.join(VIDEO_SUFFIXES)}) or image folder")
        else:
            raise SourceError(f"{uri}: no such file or folder")
        self.fps = float(rate)
        self._pacer = Pacer(self.fps) if realtime else None
        self.on_demand = not realtime  # read one frame per frame used (see the module doc)
        self._closed = False

    def read(self, timeout_s: float = 1.0) -> Frame | None:
        """The next frame; EndOfStream at the end unless looping."""
        if self._closed:
            raise SourceError(f"{self.uri}: source is closed")
        if self._pacer is not None and not self._pacer.wait(self._index, timeout_s):
            return None
        image = self._next_image()
        if image is None and self.loop and self._position > 0:
            self._rewind()
            image = self._next_image()
        if image is None:
            raise EndOfStream(f"{self.uri}: end of stream after {self._index} frames")
        frame = Frame(image=image, camera=self.uri, timestamp=time.time(), index=self._index)
        self._index += 1
        return frame

    def _next_image(self) -> np.ndarray | None:
        if self._capture is not None:
            ok, bgr = self._capture.read()
            if not ok:
                return None
            self._position += 1
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if self._position >= len(self._images):
            return None
        path = self._images[self._position]
        self._position += 1
        try:
            return decode_image(path)
        except DatasetError as exc:
            raise SourceError(str(exc)) from exc

    def _rewind(self) -> None:
        self._position = 0
        if self._capture is not None:
            self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)

    def close(self) -> None:
        """Release the video reader."""
        self._closed = True
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
