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
    """``"A-B"`` (seconds) -> ``(A, B)``; None for no window."""
    if not text:
        return None
    try:
        start, end = (float(part) for part in text.split("-", 1))
    except ValueError as exc:
        raise ConfigError(f"fault window {text!r}: expected START-END in seconds") from exc
    return start, end


def _write_json(path: Path, data: dict[str, float]) -> None:
    """Readers polling ``path`` see no file or the whole of it, never a part."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data))
    temporary.replace(path)


def write_fault_epoch(path: Path, start_wall: float) -> None:
    """Start the fault clock of every source given ``epoch=path``."""
    _write_json(path, {"start_wall": start_wall})


class DemoFaultSource:
    """``sim://N`` whose source stops during ``stop`` and whose lens is covered during ``cover``.

    Windows are compared with each frame's capture time, so a reopened source keeps the same
    schedule. They are absolute POSIX times, or with ``epoch`` seconds after the time in that
    JSON file (``{"start_wall": T}``, :func:`write_fault_epoch`): until it exists, no fault
    happens, so the schedule starts when the demo sees the stream up, however long the edge
    took to start. ``clock`` names a JSON file that receives the scene's start time
    (``timestamp - index / fps``) so that the demo can map capture times to scene ticks.
    """

    def __init__(
        self,
        uri: str,
        stop: str | None = None,
        cover: str | None = None,
        clock: str | None = None,
        epoch: str | None = None,
        **sim_options: object,
    ) -> None:
        self.uri = uri
        self.epoch_path = Path(epoch) if epoch else None
        self._epoch: float | None = None if self.epoch_path else 0.0
        self.stop = _window(stop)
        if self._stopped(time.time()):
            raise SourceError(f"{uri}: camera stopped (demo fault)")
        self.sim = open_sim("sim://" + uri.split("://", 1)[1].split("?", 1)[0], **sim_options)
        self.cover = _window(cover)
        self.occlusion = Occlusion(np.random.default_rng(COVER_SEED), COVER_FRACTION)
        self.clock = Path(clock) if clock else None

    def _epoch_now(self) -> float | None:
        """The fault clock's start (0 for absolute windows); None while it has not started."""
        if self._epoch is None and self.epoch_path is not None and self.epoch_path.exists():
            try:
                self._epoch = float(json.loads(self.epoch_path.read_text())["start_wall"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"{self.uri}: fault clock {self.epoch_path} is unreadable ({exc})"
                ) from exc
        return self._epoch

    def _inside(self, window: tuple[float, float] | None, when: float) -> bool:
        if window is None:
            return False
        epoch = self._epoch_now()
        return epoch is not None and epoch + window[0] <= when < epoch + window[1]

    def _stopped(self, when: float) -> bool:
        return self._inside(self.stop, when)

    def read(self, timeout_s: float = 1.0) -> Frame | None:
        """The next simulated frame, covered or refused while its fault window is open."""
        frame = self.sim.read(timeout_s)
        if frame is None:
            return None
        if self._stopped(frame.timestamp):
            raise SourceError(f"{self.uri}: camera stopped (demo fault)")
        if self.clock is not None and not self.clock.exists():
            start = frame.timestamp - frame.index / self.sim.options.fps
            _write_json(self.clock, {"start_wall": start, "fps": self.sim.options.fps})
        if self._inside(self.cover, frame.timestamp):
            return dataclasses.replace(frame, image=self.occlusion.apply(frame.image))
        return frame

    def close(self) -> None:
        """Release the shared simulated scene."""
        self.sim.close()

    def __enter__(self) -> DemoFaultSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_demo_fault(uri: str, **options: object) -> DemoFaultSource:
    """Factory for ``demofault://N?stop=A-B&cover=A-B&clock=PATH&epoch=PATH&<sim options>``."""
    merged: dict[str, object] = dict(parse_qsl(urlsplit(uri).query))
    merged.update(options)
    text = {
        name: None if (value := merged.pop(name, None)) is None else str(value)
        for name in ("stop", "cover", "clock", "epoch")
    }
    return DemoFaultSource(
        uri,
        stop=text["stop"],
        cover=text["cover"],
        clock=text["clock"],
        epoch=text["epoch"],
        **merged,
    )
