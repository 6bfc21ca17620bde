"""The monotonic clock that schedules waits on the edge (capture back-off, the frame-set ticker).

Code that waits takes a :class:`Clock` instead of calling ``time.monotonic`` and
``Event.wait`` itself, so a test can give it a clock whose time moves only when waited on and
check a schedule exactly, whatever the load on the machine. Frame timestamps stay on the wall
clock (``time.time``): they go on the wire, not into a schedule.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["MONOTONIC", "Clock", "MonotonicClock"]


class Clock(Protocol):
    """Monotonic seconds and an interruptible sleep on the same time line."""

    def now(self) -> float:
        """Seconds on a clock that never goes back (its zero is arbitrary)."""
        ...

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        """Sleep (no CPU) until ``event`` is set or ``timeout_s`` passed; whether it is set."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and ``Event.wait``."""

    def now(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        return event.wait(max(0.0, timeout_s))


MONOTONIC = MonotonicClock()
