"""``sim://N``: camera N of the simulated rig (:mod:`mvld.sim.rig`) as a live source.

All ``sim://`` cameras opened in one process with the same options share one rig and one
scene: the scene advances in ticks at ``fps``; each tick is rendered once for every camera,
so the views a reader gets for tick k show the same moment and carry the same timestamp and
index. With ``realtime=True`` (default) ticks follow the wall clock; with ``realtime=False``
a camera that asks for the next frame advances the scene by one tick at once (for recording
and tests). A new random scene (a new label) starts every ``episode_frames`` ticks; frames
carry its number (``Frame.scene``), so the edge's health monitor re-learns the view instead of
calling the new scene a re-aimed camera.

Options (keyword arguments, or a query string such as ``sim://1?size=128&fps=15``):
``cameras`` (3), ``size`` (64), ``fps`` (10), ``seed`` (0), ``realtime`` (True),
``shadows`` (False), ``episode_frames`` (100).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from mvld.common.errors import ConfigError
from mvld.edge.sources.base import Frame, SourceError
from mvld.sim.rig import RigConfig, SimRig, ring_of_cameras

log = logging.getLogger(__name__)

_MAX_CATCH_UP_TICKS = 50  # a reader paused for long does not replay all the physics it missed


@dataclass(frozen=True)
class SimOptions:
    """The options that identify one shared simulated scene."""

    cameras: int = 3
    size: int = 64
    fps: float = 10.0
    seed: int = 0
    realtime: bool = True
    shadows: bool = False
    episode_frames: int = 100

    def rig_config(self) -> RigConfig:
        """The rig these options describe."""
        return RigConfig(
            cameras=ring_of_cameras(self.cameras),
            image_size=(self.size, self.size),
            fps=self.fps,
            frames_per_episode=self.episode_frames,
            shadows=self.shadows,
        )


class SimScene:
    """One rig shared by the sim:// cameras of a process; every tick is rendered once."""

    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.rig = SimRig(options.rig_config())
        self.rig.reset(options.seed, 0)
        self.users = 0
        self._lock = threading.Lock()
        self._episode = 0
        self._tick = -1  # last rendered tick
        self._views: list[np.ndarray] = []
        self._start_wall = time.time()
        self._start = time.monotonic()

    def frame(
        self, camera: int, after: int, timeout_s: float
    ) -> tuple[int, np.ndarray, float] | None:
        """(tick, view, timestamp) of the first tick after ``after``; None past the timeout."""
        wanted = after + 1
        if self.options.realtime:
            delay = self._start + wanted / self.options.fps - time.monotonic()
            if delay > timeout_s:
                time.sleep(max(timeout_s, 0.0))
                return None
            if delay > 0:
                time.sleep(delay)
            wanted = max(wanted, int((time.monotonic() - self._start) * self.options.fps))
        with self._lock:
            if self._tick < wanted:
                self._advance_to(wanted)
            tick, view = self._tick, self._views[camera]
        return tick, view, self._start_wall + tick / self.options.fps

    def _advance_to(self, tick: int) -> None:
        """Step the scene to ``tick`` (starting new episodes on the way) and render it."""
        steps = tick - max(self._tick, 0)
        if steps > _MAX_CATCH_UP_TICKS:
            log.debug("sim scene skipping %d ticks of physics", steps - _MAX_CATCH_UP_TICKS)
        for current in range(max(self._tick, 0) + 1, tick + 1):
            episode = current // self.options.episode_frames
            if episode != self._episode:
                self._episode = episode
                self.rig.reset(self.options.seed, episode)
            elif tick - current < _MAX_CATCH_UP_TICKS:
                self.rig.advance()
        self._tick = tick
        self._views = self.rig.render().views


_scenes: dict[SimOptions, SimScene] = {}
_scenes_lock = threading.Lock()


class SimSource:
    """One camera of a shared simulated scene."""

    def __init__(self, uri: str, camera: int, options: SimOptions) -> None:
        if not 0 <= camera < options.cameras:
            raise ConfigError(f"{uri}: camera {camera} outside 0..{options.cameras - 1}")
        self.uri = uri
        self.camera = camera
        self.options = options
        with _scenes_lock:
            scene = _scenes.get(options)
            if scene is None:
                scene = _scenes[options] = SimScene(options)
            scene.users += 1
        self._scene: SimScene | None = scene
        self._last = -1

    def read(self, timeout_s: float = 1.0) -> Frame | None:
        """This camera's view of the next tick of the shared scene."""
        if self._scene is None:
            raise SourceError(f"{self.uri}: source is closed")
        got = self._scene.frame(self.camera, self._last, timeout_s)
        if got is None:
            return None
        tick, view, timestamp = got
        self._last = tick
        return Frame(
            image=view,
            camera=self.uri,
            timestamp=timestamp,
            index=tick,
            scene=tick // self.options.episode_frames,
        )

    def close(self) -> None:
        """Leave the shared scene; the last camera to leave closes it."""
        if self._scene is None:
            return
        with _scenes_lock:
            self._scene.users -= 1
            if self._scene.users == 0:
                _scenes.pop(self.options, None)
                self._scene.rig.close()
        self._scene = None

    def __enter__(self) -> SimSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected a boolean, got {text!r}")


def open_sim(uri: str, **options: object) -> SimSource:
    """Open ``sim://N[?option=value&...]``; keyword options override the query string."""
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(uri)
    if not parts.netloc.isdigit():
        raise ConfigError(f"{uri}: expected sim://N with a camera number N")
    merged: dict[str, object] = dict(parse_qsl(parts.query))
    merged.update(options)
    fields = SimOptions.__dataclass_fields__
    unknown = sorted(set(merged) - set(fields))
    if unknown:
        raise ConfigError(f"{uri}: unknown option(s) {unknown}; valid: {sorted(fields)}")
    values = {}
    for name, value in merged.items():
        kind = type(getattr(SimOptions, name))
        try:
            values[name] = (
                _parse_bool(value) if kind is bool and isinstance(value, str) else kind(value)
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{uri}: bad value {value!r} for {name}") from exc
    return SimSource(uri, int(parts.netloc), SimOptions(**values))
