"""Healthy cameras that move: pans, sway, vibration, a vehicle, exposure and light changes.

A field camera is rarely still: a PTZ camera pans, a pole sways in the wind, a camera on a
vehicle or a robot shakes and drifts, auto-exposure and white balance hunt, lights are
switched on and off, people and vehicles cross the view. A health monitor must call all of
that healthy, so the field benchmark (``bench/bench_health_field.py``) and the tests render
it cheaply: each :class:`MovingCamera` looks through a moving window (translation, roll,
zoom; sub-pixel) into one still canvas larger than its output, applies the light of the
moment, pastes textured passers-by and adds fresh sensor noise. Hours of video cost no
rendering: a canvas is drawn once (:func:`textured_canvas`, or :func:`rig_canvas` from the
pybullet rig) and every frame is a crop of it.

Motions (:data:`MOTIONS`), each with its parameters drawn from the camera's seed:

- ``static``: a still view (sensor noise only);
- ``pan``: a PTZ sweep back and forth at 2-5% of the width per second, with a slow tilt;
- ``sway``: a pole in the wind, 1-4% of the width at 0.15-0.5 Hz, with a little roll;
- ``shake``: vibration, 0.3-1.2% of the width at 5-14 Hz plus jitter;
- ``vehicle``: slow zoom (forward motion), yaw drift and vibration;
- ``exposure``: auto-exposure hunting (gain 0.6-1.4) and white-balance ramps (+-10%);
- ``lights``: a lamp switched on and off every 3-12 s, auto-exposure catching up;
- ``passers``: textured people and vehicles crossing the view;
- ``mixed``: pan, exposure and passers-by together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from mvld.common.errors import ConfigError
from mvld.sim.faults import textured_scene

MOTIONS = ("static", "pan", "sway", "shake", "vehicle", "exposure", "lights", "passers", "mixed")
_GEOMETRY = {"pan": "pan", "sway": "sway", "shake": "shake", "vehicle": "vehicle", "mixed": "pan"}
_PHOTOMETRY = {"exposure": "exposure", "lights": "lights", "mixed": "exposure"}
_PASSERS = ("passers", "mixed")


def textured_canvas(seed: int, height: int = 960, width: int = 1280) -> np.ndarray:
    """A still textured RGB scene (shapes, lines, text, grain) to look into."""
    return textured_scene(np.random.default_rng(seed), height, width)


def rig_canvas(seed: int, height: int = 960, width: int = 1280) -> np.ndarray:
    """A 2x2 mosaic of wide-angle pybullet rig renders (one scene, four directions)."""
    from mvld.sim.rig import CameraSpec, RigConfig, SimRig

    tile = (height // 2, width // 2)
    cameras = tuple(CameraSpec(azimuth, 30.0, 0.75, 60.0) for azimuth in (0, 90, 180, 270))
    with SimRig(RigConfig(cameras=cameras, image_size=tile)) as rig:
        rig.reset(seed, 0)
        views = rig.render().views
    top, bottom = np.hstack(views[:2]), np.hstack(views[2:])
    return np.ascontiguousarray(np.vstack([top, bottom]))


@dataclass
class _Passer:
    """A textured person or vehicle crossing the view."""

    image: np.ndarray
    mask: np.ndarray
    x: float
    y: int
    speed: float  # pixels per frame, signed


@dataclass
class MovingCamera:
    """A healthy camera of one motion kind looking into ``canvas`` (RGB, larger than the output).

    ``read()`` gives the next frame (``height`` x ``width`` RGB uint8, at ``fps``).
    """

    canvas: np.ndarray
    motion: str = "static"
    seed: int = 0
    height: int = 480
    width: int = 640
    fps: float = 30.0
    noise_sigma: float = 2.0
    frame_index: int = 0
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.motion not in MOTIONS:
            raise ConfigError(f"unknown motion {self.motion!r}; valid: {', '.join(MOTIONS)}")
        canvas_height, canvas_width = self.canvas.shape[:2]
        if canvas_height < 1.3 * self.height or canvas_width < 1.3 * self.width:
            raise ConfigError(
                f"canvas {canvas_width}x{canvas_height} too small for a moving "
                f"{self.width}x{self.height} view"
            )
        self.rng = np.random.default_rng(self.seed)
        rng = self.rng
        self._noise = np.empty((2 * self.height, 2 * self.width * 3), np.int16)
        cv2.setRNGSeed(int(rng.integers(2**31)))
        cv2.randn(self._noise, np.array([0.0]), np.array([self.noise_sigma]))
        self.geometry = _GEOMETRY.get(self.motion, "static")
        self.photometry = _PHOTOMETRY.get(self.motion, "none")
        width = self.width
        # Geometry: the travel of the window's centre, in canvas pixels.
        self._margin = ((canvas_width - 1.15 * width) / 2, (canvas_height - 1.15 * self.height) / 2)
        self._pan_speed = rng.uniform(0.02, 0.05) * width / self.fps  # pixels per frame
        self._pan_phase = rng.uniform(0, 1, 2)
        self._sway = (
            rng.uniform(0.01, 0.04) * width,
            rng.uniform(2.0, 6.5),
            rng.uniform(0.3, 1.5),
            rng.uniform(0, 2 * np.pi, 3),
        )
        self._shake = (
            rng.uniform(0.003, 0.012) * width,
            rng.uniform(5.0, 14.0, 2),
            rng.uniform(0, 2 * np.pi, 4),
        )
        self._vehicle = (rng.uniform(8.0, 20.0), rng.uniform(16.0, 40.0), rng.uniform(0, 2 * np.pi))
        # Photometry.
        self._exposure = (
            rng.uniform(3.0, 10.0),
            rng.uniform(0.25, 0.4),
            rng.uniform(5.0, 15.0),
            rng.uniform(0, 2 * np.pi, 4),
        )
        self._lamp_on = True
        self._next_toggle = int(rng.uniform(3, 12) * self.fps)
        self._auto_gain = 1.0
        self._lamp = self._lamp_map()
        # Passers-by.
        self._passers: list[_Passer] = []
        self._next_passer = int(rng.uniform(0.5, 4) * self.fps)

    # -- geometry --------------------------------------------------------------------------

    def _pose(self, t: float) -> tuple[float, float, float, float]:
        """(x offset, y offset, roll in degrees, zoom) of the view at time ``t``."""
        rng, width = self.rng, self.width
        if self.geometry == "pan":
            travel = 2 * np.asarray(self._margin)
            path = self._pan_speed * self.frame_index * np.array([1.0, 0.3])
            position = (path / np.maximum(travel, 1) + self._pan_phase) % 2.0
            triangle = np.where(position < 1, position, 2 - position)  # back and forth
            x, y = (triangle - 0.5) * travel
            return float(x), float(y), 0.0, 1.0
        if self.geometry == "sway":
            amplitude, period, roll, phase = self._sway
            w = 2 * np.pi * t / period
            return (
                amplitude * math.sin(w + phase[0]),
                0.5 * amplitude * math.sin(0.7 * w + phase[1]),
                roll * math.sin(w + phase[2]),
                1.0,
            )
        if self.geometry == "shake":
            amplitude, frequency, phase = self._shake
            x = amplitude * (
                math.sin(2 * np.pi * frequency[0] * t + phase[0])
                + 0.5 * math.sin(2 * np.pi * frequency[1] * t + phase[1])
            )
            y = amplitude * (
                math.sin(2 * np.pi * frequency[1] * t + phase[2])
                + 0.5 * math.sin(2 * np.pi * frequency[0] * t + phase[3])
            )
            jitter = rng.normal(0, 0.0015 * width, 2)
            return x + float(jitter[0]), y + float(jitter[1]), 0.2 * math.sin(13 * t), 1.0
        if self.geometry == "vehicle":
            zoom_period, yaw_period, yaw_phase = self._vehicle
            zoom = 1.0 + 0.08 * (1 - math.cos(2 * np.pi * t / zoom_period))
            yaw = 0.12 * width * math.sin(2 * np.pi * t / yaw_period + yaw_phase)
            jitter = rng.normal(0, 0.002 * width, 2)
            return (
                yaw + float(jitter[0]),
                0.02 * width * math.sin(t) + float(jitter[1]),
                0.3 * math.sin(2 * np.pi * t / 7.0),
                zoom,
            )
        return 0.0, 0.0, 0.0, 1.0

    def _view(self, t: float) -> np.ndarray:
        """The canvas crop the camera sees now (sub-pixel)."""
        x, y, roll, zoom = self._pose(t)
        canvas_height, canvas_width = self.canvas.shape[:2]
        centre = (canvas_width / 2 + x, canvas_height / 2 + y)
        if roll == 0.0 and zoom == 1.0:
            return cv2.getRectSubPix(self.canvas, (self.width, self.height), centre)
        matrix = cv2.getRotationMatrix2D(centre, roll, zoom)
        matrix[:, 2] += (self.width / 2 - centre[0], self.height / 2 - centre[1])
        return cv2.warpAffine(
            self.canvas,
            matrix,
            (self.width, self.height),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REFLECT_101,
        )

    # -- light -----------------------------------------------------------------------------

    def _lamp_map(self) -> np.ndarray:
        """A lamp's light over the view: ambient 0.45 plus a soft pool of light (uint8, 255 = 1)."""
        rows, cols = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        cx, cy = self.rng.uniform(0.2, 0.8) * self.width, self.rng.uniform(0.1, 0.6) * self.height
        radius = self.rng.uniform(0.5, 0.9) * self.width
        pool = np.exp(-((cols - cx) ** 2 + (rows - cy) ** 2) / (2 * radius**2))
        light = 0.45 + 0.55 * pool / pool.max()
        return np.repeat((255 * light)[:, :, None], 3, axis=2).astype(np.uint8)

    def _gains(self, t: float) -> tuple[float, float, float]:
        """Per-channel gain of auto-exposure and white balance at time ``t``."""
        if self.photometry == "exposure":
            period, depth, wb_period, phase = self._exposure
            gain = 1.0 + depth * math.sin(2 * np.pi * t / period + phase[0])
            wb = [1.0 + 0.1 * math.sin(2 * np.pi * t / wb_period + p) for p in phase[1:]]
            return gain * wb[0], gain * wb[1], gain * wb[2]
        if self.photometry == "lights":
            if self.frame_index >= self._next_toggle:
                self._lamp_on = not self._lamp_on
                self._next_toggle = self.frame_index + int(self.rng.uniform(3, 12) * self.fps)
            # Auto-exposure brings the mean back towards its target over about a second.
            target = 1.0 if self._lamp_on else 1.8
            self._auto_gain += (target - self._auto_gain) / self.fps
            gain = self._auto_gain * (1.0 if self._lamp_on else 0.45)
            return gain, gain, gain
        return 1.0, 1.0, 1.0

    # -- passers-by ------------------------------------------------------------------------

    def _spawn_passer(self) -> None:
        """A person (tall) or a vehicle (wide) entering from the left or the right."""
        rng, height, width = self.rng, self.height, self.width
        if rng.random() < 0.6:
            h = int(rng.uniform(0.3, 0.7) * height)
            w, speed = int(h * rng.uniform(0.3, 0.45)), rng.uniform(0.1, 0.4) * width / self.fps
        else:
            h = int(rng.uniform(0.2, 0.45) * height)
            w, speed = int(h * rng.uniform(1.5, 2.5)), rng.uniform(0.3, 1.0) * width / self.fps
        w = min(w, width - 1)
        image = textured_scene(rng, h, w)
        mask = np.zeros((h, w), np.uint8)
        cv2.ellipse(mask, (w // 2, h // 2), (w // 2, h // 2), 0, 0, 360, 255, -1)
        left = rng.random() < 0.5
        y = int(rng.uniform(0.2, 1.0) * (height - h))
        self._passers.append(
            _Passer(image, mask, -w if left else width, y, speed if left else -speed)
        )

    def _paste_passers(self, frame: np.ndarray) -> None:
        """Move every passer-by one frame on and draw it (opaque, elliptical)."""
        if self.frame_index >= self._next_passer:
            if len(self._passers) < 2:
                self._spawn_passer()
            self._next_passer = self.frame_index + int(self.rng.uniform(2, 8) * self.fps)
        kept = []
        for passer in self._passers:
            passer.x += passer.speed
            h, w = passer.mask.shape
            x = round(passer.x)
            if x >= self.width or x + w <= 0:
                continue
            kept.append(passer)
            left, right = max(x, 0), min(x + w, self.width)
            region = frame[passer.y : passer.y + h, left:right]
            cv2.copyTo(
                passer.image[:, left - x : right - x], passer.mask[:, left - x : right - x], region
            )
        self._passers = kept

    # -- frames ----------------------------------------------------------------------------

    def read(self) -> np.ndarray:
        """The next frame (RGB uint8)."""
        t = self.frame_index / self.fps
        frame = self._view(t)
        if self.motion in _PASSERS:
            self._paste_passers(frame)
        if self.photometry == "lights" and self._lamp_on:
            frame = cv2.multiply(frame, self._lamp, scale=1 / 255)
        gains = self._gains(t)
        if gains != (1.0, 1.0, 1.0):
            frame = cv2.multiply(frame, (*gains, 0.0))
        self.frame_index += 1
        row = int(self.rng.integers(self.height))
        col = int(self.rng.integers(self.width * 3))
        window = self._noise[row : row + self.height, col : col + self.width * 3]
        return cv2.add(frame, window.reshape(frame.shape), dtype=cv2.CV_8U)
