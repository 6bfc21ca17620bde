"""A :class:`mvld.common.clock.Clock` whose time moves only when code waits on it.

A wait of ``t`` seconds returns at once with the clock ``t`` later (unless the event is
already set), so a schedule built from waits is exact however loaded the machine is.
"""

from __future__ import annotations

import threading


class FakeClock:
    """Time that advances by each wait's timeout (thread-safe); ``waits`` records them."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.waits: list[float] = []

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward, as if ``seconds`` passed without anyone waiting."""
        with self._lock:
            self._now += seconds

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        if event.is_set():
            return True
        with self._lock:
            self._now += max(0.0, timeout_s)
            self.waits.append(timeout_s)
        return event.is_set()
