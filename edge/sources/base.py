"""The frame source contract: ``read(timeout_s) -> Frame | None``, ``close()``, context manager.

Every camera kind (files, the simulated rig, and the device sources of the edge issue) is a
:class:`FrameSource`. ``read`` returns ``None`` when no frame arrived within the timeout (a live
camera that is slow or stuck), raises :class:`EndOfStream` when a finite stream is exhausted,
and :class:`SourceError` when the source failed (the caller may reopen it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from mvld.common.errors import MVLDError


class SourceError(MVLDError):
    """A frame source failed: cannot be opened, a read error, a disconnect."""


class EndOfStream(SourceError):  # noqa: N818 - an event, named for what happened
    """A finite source (a file, an image folder) has no more frames."""


@dataclass(frozen=True)
class Frame:
    """One captured image of one camera."""

    image: np.ndarray  # [H, W, 3] uint8 RGB
    camera: str  # the camera's id: its URI
    timestamp: float  # capture time, seconds since the epoch (time.time())
    index: int  # frame number in this source's stream, from 0
    scene: int | None = None  # sources that switch scenes on purpose (sim://) number them


@runtime_checkable
class FrameSource(Protocol):
    """What every camera source provides."""

    uri: str

    def read(self, timeout_s: float = 1.0) -> Frame | None:
        """The next frame, or None if none arrived within ``timeout_s``."""
        ...

    def close(self) -> None:
        """Release the device or file; reading afterwards raises SourceError."""
        ...

    def __enter__(self) -> FrameSource: ...

    def __exit__(self, *exc_info: object) -> None: ...


def reads_on_demand(source: object) -> bool:
    """True for a source with no pace of its own (``on_demand``: a file without ``realtime``):
    its reader should read the next frame only once the previous one was used, so no frame is
    decoded only to be dropped. Live cameras and paced sources keep the newest frame instead."""
    return bool(getattr(source, "on_demand", False))


class Pacer:
    """Real-time pacing at a fixed rate: frame k is due at ``start + k / fps``."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self.start: float | None = None

    def wait(self, index: int, timeout_s: float) -> bool:
        """Sleep until frame ``index`` is due; False if that is further away than the timeout."""
        now = time.monotonic()
        if self.start is None:
            self.start = now - index * self.period
        delay = self.start + index * self.period - now
        if delay > timeout_s:
            time.sleep(max(timeout_s, 0.0))
            return False
        if delay > 0:
            time.sleep(delay)
        return True
