"""Frame sets: at the node's rate, every camera's newest frame if it is fresh enough.

Cameras are free-running (no hardware trigger), so a frame set is a sample, not a sync: at
each tick of :class:`Ticker` the assembler takes each reader's newest frame. A frame older
than ``max_age_s`` (by its arrival time) does not describe the present: that camera is
reported with a problem instead, the reader's own failure reason when it has one
(``disconnected``, ``read_error``, ``end_of_stream``, ``timeout``), else ``stale`` (or
``timeout`` for a camera still opening, which has no frame to be stale). Each view
keeps its own capture timestamp, which travels on the wire.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from mvld.common.clock import MONOTONIC, Clock
from mvld.common.errors import ConfigError
from mvld.common.wire import ReasonCode
from mvld.edge.capture import CameraSnapshot, Capture
from mvld.edge.sources import Frame

STALE = ReasonCode.STALE.value
TIMEOUT = ReasonCode.TIMEOUT.value


@dataclass(frozen=True)
class CapturedView:
    """One camera in one frame set: a fresh frame, or the reason there is none."""

    camera_id: str
    frame: Frame | None  # the newest frame when fresh; None otherwise
    new: bool  # the frame was not in the previous frame set (health judges new frames only)
    problem: str | None  # None with a frame; else stale or the source's failure reason
    ever_delivered: bool  # the camera has delivered a frame since the node started
    state: str  # the reader's state (streaming, waiting, ...), for status lines

    @property
    def capture_time(self) -> float | None:
        """POSIX seconds of the frame, None without one."""
        return None if self.frame is None else self.frame.timestamp

    def require_frame(self) -> Frame:
        """The frame of a view that has one (``problem is None``); a view without is a bug."""
        if self.frame is None:
            raise ValueError(f"camera {self.camera_id} has no frame ({self.problem})")
        return self.frame


@dataclass(frozen=True)
class FrameSet:
    """What all cameras of the node saw at one tick."""

    seq: int
    time: float  # POSIX seconds of the tick
    views: tuple[CapturedView, ...]


class FrameSetAssembler:
    """Turns the readers' snapshots into frame sets, tracking which frames are new."""

    def __init__(self, capture: Capture, max_age_s: float = 0.25) -> None:
        if max_age_s <= 0:
            raise ConfigError(f"frame max age must be positive, got {max_age_s}")
        self.capture = capture
        self.max_age_s = max_age_s
        self._last_count: dict[str, int] = {}
        self._seq = 0

    def assemble(self) -> FrameSet:
        """The next frame set (sequence numbers count from 0)."""
        now = self.capture.clock.now()
        views = tuple(self._view(snapshot, now) for snapshot in self.capture.snapshots(True))
        frame_set = FrameSet(self._seq, time.time(), views)
        self._seq += 1
        return frame_set

    def _view(self, snapshot: CameraSnapshot, now: float) -> CapturedView:
        frame = snapshot.frame
        delivered = frame is not None
        fresh = (
            frame is not None
            and snapshot.received is not None
            and now - snapshot.received <= self.max_age_s
        )
        if not fresh:
            # A camera that has not delivered yet (still opening) waits for its first frame:
            # that is a timeout, not a stale frame.
            problem = snapshot.reason or (STALE if delivered else TIMEOUT)
            return CapturedView(snapshot.camera_id, None, False, problem, delivered, snapshot.state)
        new = self._last_count.get(snapshot.camera_id) != snapshot.frames  # frame counter
        self._last_count[snapshot.camera_id] = snapshot.frames
        return CapturedView(snapshot.camera_id, frame, new, None, True, snapshot.state)


class Ticker:
    """A fixed-rate schedule on ``clock``; late ticks are skipped, not queued."""

    def __init__(self, fps: float, clock: Clock = MONOTONIC) -> None:
        if fps <= 0:
            raise ConfigError(f"--fps must be positive, got {fps}")
        self.period = 1.0 / fps
        self.clock = clock
        self.skipped = 0
        self._next: float | None = None

    def wait(self, stop: threading.Event) -> bool:
        """Sleep (no CPU) until the next tick; False when ``stop`` was set meanwhile."""
        now = self.clock.now()
        if self._next is None:
            self._next = now
        delay = self._next - now
        if delay > 0 and self.clock.wait(stop, delay):
            return False
        if delay < -self.period:  # fell behind: skip the missed ticks instead of bursting
            missed = int(-delay / self.period)
            self.skipped += missed
            self._next += missed * self.period
        self._next += self.period
        return not stop.is_set()
