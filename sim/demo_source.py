"""``demofault://N``: a simulated camera with a fault schedule, the demo's edge source.

``sim://N`` whose source stops during one time window and whose lens is covered (an
``Occlusion`` from :mod:`mvld.sim.faults`) during another, so ``mvld demo`` shows a failed and
an obstructed camera on a real edge process.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from mvld.common.errors import ConfigError
from mvld.edge.sources.base import Frame, SourceError
from mvld.sim.faults import Occlusion
from mvld.sim.source import open_sim

DEMO_SCHEME = "demofault"
COVER_FRACTION = 0.6
COVER_SEED = 7



def _window(text: str | None) -> tuple[float, float] | None:
    """``"A-B"`` (POSIX seconds) -> ``(A, B)``; None for no window."""
    if not text:
        return None
    try:
        start, end = (float(part) for part in text.split("-", 1))
    except ValueError as exc:
        raise ConfigError(f"fault window {text!r}: expected START-END in POSIX seconds") from exc
    return start, end


class DemoFaultSource:
    """``sim://N`` whose source stops during ``stop`` and whose lens is covered during ``cover``.

    Windows are absolute POSIX times, compared with each frame's capture time, so a reopened
    source keeps the same schedule. ``clock`` names a JSON file that receives the scene's start
    time (``timestamp - index / fps``) so that the demo can map capture times to scene ticks.
    """

    def __init__(self, uri: str, stop: str | None = None, cover: str | None = None,
                 clock: str | None = None, **sim_options: object) -> None:
        self.stop = _window(stop)
        if self._stopped(time.time()):
            raise SourceError(f"{uri}: camera stopped (demo fault)")
        self.sim = open_sim("sim://" + uri.split("://", 1)[1].split("?", 1)[0], **sim_options)
        self.cover = _window(cover)
        self.occlusion = Occlusion(np.random.default_rng(COVER_SEED), COVER_FRACTION)
        self.clock = Path(clock) if clock else None
        self.uri = uri

    def _stopped(self, when: float) -> bool:
        return self.stop is not None and self.stop[0] <= when < self.stop[1]

    def read(self, timeout_s: float = 1.0) -> Frame | None:
        """The next simulated frame, covered or refused while its fault window is open."""
        frame = self.sim.read(timeout_s)
        if frame is None:
            return None
        if self._stopped(frame.timestamp):
            raise SourceError(f"{self.uri}: camera stopped (demo fault)")
        if self.clock is not None and not self.clock.exists():
            start = frame.timestamp - frame.index / self.sim.options.fps
            temporary = self.clock.with_suffix(".tmp")
            temporary.write_text(json.dumps({"start_wall": start, "fps": self.sim.options.fps}))
            temporary.replace(self.clock)
        if self.cover is not None and self.cover[0] <= frame.timestamp < self.cover[1]:
            return dataclasses.replace(frame, image=self.occlusion.apply(frame.image))
        return frame

    def close(self) -> None:
        """Release the shared simulated scene."""
        self.sim.close()


def open_demo_fault(uri: str, **options: object) -> DemoFaultSource:
    """Factory for ``demofault://N?stop=A-B&cover=A-B&clock=PATH&<sim options>``."""
    merged: dict[str, object] = dict(parse_qsl(urlsplit(uri).query))
    merged.update(options)
    return DemoFaultSource(uri, **merged)  # type: ignore[arg-type]
