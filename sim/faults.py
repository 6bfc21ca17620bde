"""Camera fault injection, and a synthetic healthy camera to inject into.

Tests and ``bench/bench_health.py`` use this to turn a healthy stream into a faulty one the
way a field camera fails (docs/ARCHITECTURE.md section 5): the sensor goes black or saturates to a
flat colour, the driver repeats the last frame, interference turns the image into snow,
something covers part or all of the lens (close to the lens, so out of focus and almost
texture-free), the focus slips, dirt settles on the lens, or the camera gets knocked and
looks elsewhere. Every fault is an injector built once per episode (so a dirt pattern or a
shift stays put while the episode lasts) whose ``apply`` maps an RGB uint8 frame to the
faulty frame. Optical faults (cover, blur, dirt) add fresh sensor noise after the optics,
as a real sensor would.

``SyntheticCamera`` renders a textured scene with moving objects, slow lighting drift and
sensor noise, so that false alarms measured on it mean something.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from mvld.common.errors import ConfigError

Frame = np.ndarray  # H x W x 3, uint8, RGB


def add_sensor_noise(frame: Frame, rng: np.random.Generator, sigma: float = 2.0) -> Frame:
    """Gaussian read noise, fresh per call (the noise a real sensor adds after the optics).

    Drawn by OpenCV (fast) from a seed taken from ``rng``, so a seeded stream repeats.
    """
    noise = np.empty(frame.shape, np.int16)
    cv2.setRNGSeed(int(rng.integers(2**31)))
    # One channel: sigma everywhere (mean and stddev as one-element arrays, as cv2 types them).
    cv2.randn(noise.reshape(frame.shape[0], -1), np.array([0.0]), np.array([sigma]))
    return cv2.add(frame, noise, dtype=cv2.CV_8U)


class FaultInjector:
    """One fault episode: ``apply`` turns each healthy frame into the faulty one."""

    name = "fault"

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def apply(self, frame: Frame) -> Frame:
        """The frame as the faulty camera delivers it."""
        raise NotImplementedError


class Black(FaultInjector):
    """Lens cap or dead sensor: near-zero values with a little read noise."""

    name = "black"

    def apply(self, frame: Frame) -> Frame:
        dark = np.full_like(frame, int(self.rng.integers(0, 6)))
        return add_sensor_noise(dark, self.rng, 1.5)


class Uniform(FaultInjector):
    """A flat frame: sensor stuck at one colour, or a blank wall filling the view."""

    name = "uniform"

    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__(rng)
        self.colour = rng.integers(40, 240, size=3)

    def apply(self, frame: Frame) -> Frame:
        flat = np.empty_like(frame)
        flat[:] = self.colour.astype(np.uint8)
        return add_sensor_noise(flat, self.rng, 1.5)


class Frozen(FaultInjector):
    """The driver repeats the last good frame, bit for bit."""

    name = "frozen"

    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__(rng)
        self.held: Frame | None = None

    def apply(self, frame: Frame) -> Frame:
        if self.held is None:
            self.held = frame.copy()
        return self.held.copy()


class Noise(FaultInjector):
    """Interference or a broken link: the picture turns into snow (``mix`` of it)."""

    name = "noise"

    def __init__(self, rng: np.random.Generator, mix: float = 1.0) -> None:
        super().__init__(rng)
        self.mix = mix

    def apply(self, frame: Frame) -> Frame:
        snow = self.rng.integers(0, 256, size=frame.shape, dtype=np.uint8)
        if self.mix >= 1.0:
            return snow
        return cv2.addWeighted(frame, 1.0 - self.mix, snow, self.mix, 0.0)


class Occlusion(FaultInjector):
    """Something close to the lens covers ``fraction`` of the frame from one side.

    Close to the lens means out of focus: a smooth, shaded, almost texture-free patch with
    a soft edge (a hand, a cloth, a box, a leaf).
    """

    name = "occlusion"

    def __init__(self, rng: np.random.Generator, fraction: float = 1.0) -> None:
        super().__init__(rng)
        self.fraction = fraction
        self.mask: np.ndarray | None = None
        self.patch: np.ndarray | None = None

    def _build(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Fix the covering patch and its soft mask for this episode; returns (mask, patch)."""
        mask: np.ndarray = np.zeros((height, width), np.float32)
        side = int(self.rng.integers(4))
        if side in (0, 1):  # enters from the left or right
            extent = round(self.fraction * width)
            cols = slice(0, extent) if side == 0 else slice(width - extent, width)
            mask[:, cols] = 1.0
        else:  # enters from the top or bottom
            extent = round(self.fraction * height)
            rows = slice(0, extent) if side == 2 else slice(height - extent, height)
            mask[rows, :] = 1.0
        if self.fraction < 1.0:
            mask = cv2.GaussianBlur(mask, (0, 0), 0.02 * width)
        colour = self.rng.uniform(20, 200, size=3).astype(np.float32)
        ramp = np.linspace(0.7, 1.2, width, dtype=np.float32)[None, :, None]
        if self.rng.random() < 0.5:
            ramp = ramp[:, ::-1]
        patch = np.broadcast_to(colour * ramp, (height, width, 3))
        self.mask = mask[:, :, None]
        self.patch = np.clip(patch, 0, 255).astype(np.float32)
        return self.mask, self.patch

    def apply(self, frame: Frame) -> Frame:
        if self.mask is None or self.patch is None:
            mask, patch = self._build(*frame.shape[:2])
        else:
            mask, patch = self.mask, self.patch
        covered = frame * (1.0 - mask) + patch * mask
        return add_sensor_noise(covered.astype(np.uint8), self.rng)


class Blur(FaultInjector):
    """Focus slipped: a Gaussian blur of ``sigma`` pixels (at the frame's size), then noise."""

    name = "blur"

    def __init__(self, rng: np.random.Generator, sigma: float = 6.0) -> None:
        super().__init__(rng)
        self.sigma = sigma

    def apply(self, frame: Frame) -> Frame:
        return add_sensor_noise(cv2.GaussianBlur(frame, (0, 0), self.sigma), self.rng)


class Dirt(FaultInjector):
    """Mud or drops on the lens: several soft, semi-opaque brownish blobs that stay put."""

    name = "dirt"

    def __init__(self, rng: np.random.Generator, blobs: int = 8) -> None:
        super().__init__(rng)
        self.blobs = blobs
        self.alpha: np.ndarray | None = None
        self.colour = rng.uniform(40, 110, size=3).astype(np.float32) * np.array(
            [1, 0.85, 0.6], np.float32
        )

    def _build(self, height: int, width: int) -> np.ndarray:
        """Draw this episode's blobs into an opacity map (returned and kept)."""
        alpha: np.ndarray = np.zeros((height, width), np.float32)
        for _ in range(self.blobs):
            centre = (int(self.rng.integers(width)), int(self.rng.integers(height)))
            axes = tuple(int(a) for a in self.rng.uniform(0.04, 0.11, size=2) * width)
            angle = float(self.rng.uniform(0, 180))
            opacity = float(self.rng.uniform(0.7, 0.95))
            cv2.ellipse(alpha, centre, axes, angle, 0, 360, opacity, -1)
        alpha = cv2.GaussianBlur(alpha, (0, 0), 0.015 * width)
        self.alpha = np.minimum(alpha, 0.95)[:, :, None]
        return self.alpha

    def apply(self, frame: Frame) -> Frame:
        alpha = self._build(*frame.shape[:2]) if self.alpha is None else self.alpha
        soft = cv2.GaussianBlur(frame, (0, 0), 3.0)
        dirty = soft * alpha * 0.3 + self.colour * alpha * 0.7
        dirty += frame * (1.0 - alpha)
        return add_sensor_noise(np.clip(dirty, 0, 255).astype(np.uint8), self.rng)


class Shift(FaultInjector):
    """The camera was knocked: the view moves by ``fraction`` of the frame and tilts a little."""

    name = "shift"

    def __init__(self, rng: np.random.Generator, fraction: float = 0.25) -> None:
        super().__init__(rng)
        direction = rng.uniform(0, 2 * np.pi)
        self.offset = fraction * np.array([np.cos(direction), np.sin(direction)])
        self.angle = float(rng.uniform(-8, 8))

    def apply(self, frame: Frame) -> Frame:
        height, width = frame.shape[:2]
        # A 2x3 float64 matrix (OpenCV's stubs allow any dtype); asarray does not copy it.
        matrix = np.asarray(
            cv2.getRotationMatrix2D((width / 2, height / 2), self.angle, 1.0), np.float64
        )
        matrix[:, 2] += self.offset * (width, height)
        return cv2.warpAffine(frame, matrix, (width, height), borderMode=cv2.BORDER_REFLECT_101)


# name -> (injector factory, the reason codes a correct health monitor may report, best first)
FaultFactory = Callable[[np.random.Generator], FaultInjector]
FAULTS: dict[str, tuple[FaultFactory, tuple[str, ...]]] = {
    "black": (Black, ("black",)),
    "uniform": (Uniform, ("uniform",)),
    "frozen": (Frozen, ("frozen",)),
    "noise": (Noise, ("noise",)),
    "occlusion_30": (lambda rng: Occlusion(rng, 0.3), ("occluded",)),
    "occlusion_60": (lambda rng: Occlusion(rng, 0.6), ("occluded",)),
    "occlusion_100": (lambda rng: Occlusion(rng, 1.0), ("occluded", "uniform", "black")),
    "blur_2": (lambda rng: Blur(rng, 2.0), ("defocused",)),
    "blur_4": (lambda rng: Blur(rng, 4.0), ("defocused",)),
    "blur_8": (lambda rng: Blur(rng, 8.0), ("defocused",)),
    "dirt": (Dirt, ("dirty",)),
    "dirt_heavy": (lambda rng: Dirt(rng, 30), ("dirty",)),
    "shift_10": (lambda rng: Shift(rng, 0.10), ("redirected",)),
    "shift_25": (lambda rng: Shift(rng, 0.25), ("redirected",)),
}

# Faults that take the whole view away (the benchmark's recall target applies to these).
FULL_FAULTS = ("black", "uniform", "frozen", "noise", "occlusion_100", "blur_8", "shift_25")


def make_fault(name: str, rng: np.random.Generator) -> FaultInjector:
    """A fresh injector for one episode of the named fault."""
    if name not in FAULTS:
        raise ConfigError(f"unknown fault {name!r}; valid faults: {', '.join(FAULTS)}")
    return FAULTS[name][0](rng)


def accepted_reasons(name: str) -> tuple[str, ...]:
    """The reason codes a correct health monitor may report for the named fault, best first.

    Only a full cover has alternatives: a flat or dark cover (a lens cap, a cloth) cannot be
    told from a sensor that delivers a flat or black picture.
    """
    if name not in FAULTS:
        raise ConfigError(f"unknown fault {name!r}; valid faults: {', '.join(FAULTS)}")
    return FAULTS[name][1]


def expected_reason(name: str) -> str:
    """The reason code a correct health monitor should report for the named fault."""
    return accepted_reasons(name)[0]


def textured_scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A still RGB scene: shapes, lines, text and fine texture, lightly softened."""
    scene: np.ndarray = np.empty((height, width, 3), np.uint8)
    top, bottom = rng.uniform(60, 200, size=(2, 3))
    ramp = np.linspace(0, 1, height)[:, None, None]
    scene[:] = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
    for _ in range(30):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(width)), int(rng.integers(height))
        size = int(rng.integers(4, max(5, width // 5)))
        kind = rng.integers(3)
        if kind == 0:
            cv2.rectangle(scene, (x, y), (x + size, y + size // 2), colour, -1)
        elif kind == 1:
            cv2.circle(scene, (x, y), size // 2, colour, -1)
        else:
            end = (int(rng.integers(width)), int(rng.integers(height)))
            cv2.line(scene, (x, y), end, colour, int(rng.integers(1, 5)))
    for _ in range(6):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        org = (int(rng.integers(max(1, width - 100))), int(rng.integers(height)))
        cv2.putText(scene, "MVLD 0123", org, cv2.FONT_HERSHEY_SIMPLEX, 0.8, colour, 2)
    coarse_grain = rng.integers(0, 60, size=(height // 4, width // 4, 1), dtype=np.uint8)
    grain = cv2.resize(coarse_grain, (width, height), interpolation=cv2.INTER_LINEAR)[:, :, None]
    scene = cv2.add(scene, np.repeat(grain, 3, axis=2))
    return cv2.GaussianBlur(scene, (0, 0), 0.8)


@dataclass
class _Sprite:
    """A textured object moving across the scene, bouncing off the borders."""

    image: np.ndarray
    position: np.ndarray
    velocity: np.ndarray


@dataclass
class SyntheticCamera:
    """A healthy camera looking at a textured scene with moving objects.

    Realistic variation: objects move, the light drifts slowly in brightness and colour
    (``lighting_amplitude`` of the mean over ``lighting_period`` frames) and every frame gets
    fresh sensor noise of ``noise_sigma`` grey levels.
    """

    height: int = 480
    width: int = 640
    seed: int = 0
    moving_objects: int = 4
    lighting_amplitude: float = 0.2
    lighting_period: int = 900
    noise_sigma: float = 2.5
    frame_index: int = 0
    rng: np.random.Generator = field(init=False)
    background: np.ndarray = field(init=False)
    sprites: list[_Sprite] = field(init=False)
    noise_bank: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        # Noise windows cut at random offsets from a bank twice the frame: fresh-looking noise
        # every frame at the cost of one add.
        self.noise_bank = np.empty((2 * self.height, 2 * self.width * 3), np.int16)
        cv2.randn(self.noise_bank, np.array([0.0]), np.array([self.noise_sigma]))
        self.background = self._textured_scene(self.height, self.width)
        self.sprites = [self._sprite() for _ in range(self.moving_objects)]
        self.phase = float(self.rng.uniform(0, 2 * np.pi))

    def _textured_scene(self, height: int, width: int) -> np.ndarray:
        """A still background (see :func:`textured_scene`)."""
        return textured_scene(self.rng, height, width)

    def _sprite(self) -> _Sprite:
        """A random textured object with a random position and speed."""
        size = int(self.rng.integers(self.width // 12, self.width // 5))
        image = self._textured_scene(size, size)
        position = self.rng.uniform(0, 1, 2) * (self.width - size, self.height - size)
        velocity = self.rng.uniform(-4, 4, 2) * self.width / 640
        return _Sprite(image, position, velocity)

    def _move(self, sprite: _Sprite) -> None:
        """Advance one frame, bouncing off the borders."""
        size = sprite.image.shape[0]
        sprite.position += sprite.velocity
        limits = (self.width - size, self.height - size)
        for axis in (0, 1):
            if not 0 <= sprite.position[axis] <= limits[axis]:
                sprite.velocity[axis] *= -1
                sprite.position[axis] = np.clip(sprite.position[axis], 0, limits[axis])

    def read(self) -> Frame:
        """The next frame (RGB uint8)."""
        frame = self.background.copy()
        for sprite in self.sprites:
            self._move(sprite)
            x, y = sprite.position.astype(int)
            size = sprite.image.shape[0]
            frame[y : y + size, x : x + size] = sprite.image
        angle = 2 * np.pi * self.frame_index / self.lighting_period + self.phase
        gain = 1.0 + self.lighting_amplitude * np.sin(angle)
        tint = 1.0 + 0.03 * np.array([np.sin(angle / 3), 0.0, -np.sin(angle / 3)])
        frame = cv2.multiply(frame, (*tuple(float(g) for g in gain * tint), 0.0))
        self.frame_index += 1
        row = int(self.rng.integers(self.height))
        col = int(self.rng.integers(self.width * 3))
        window = self.noise_bank[row : row + self.height, col : col + self.width * 3]
        return cv2.add(frame, window.reshape(frame.shape), dtype=cv2.CV_8U)
