"""Camera health monitor: is this camera's view usable, and if not, why.

One ``HealthMonitor`` per camera turns each frame (or the absence of one) into a
``CameraHealth``: ``ok``, ``failed`` (no usable picture at all) or ``obstructed`` (a picture,
but of the wrong thing or a degraded one), with a reason code from the vocabulary of
DeepStream, jetson-utils and commercial tamper detection (DESIGN.md section 4):

- failed: ``timeout``, ``disconnected``, ``read_error``, ``end_of_stream``, ``stale`` (events
  from the capture layer), ``frozen`` (repeated frames), ``black``, ``uniform``, ``noise``;
- obstructed: ``occluded``, ``defocused``, ``dirty``, ``redirected`` (judged against a
  reference of this camera's own view, learned during warm-up and adapted slowly while
  the camera is healthy).

Every frame gets a verdict from cheap features of a 160x120 grey copy (two INTER_AREA
halvings, ~0.1 ms at 640x480) and a few full-resolution rows (sensor noise, repeats). Verdicts go
through hysteresis, like the "minimum duration" of Axis tampering alarms: a fault is
declared only after it persists for several frames, and cleared only after several
healthy frames. Capture-layer events (disconnect, read error, end of stream, stale,
timeout) are facts, not estimates, and are declared at once. Numpy and OpenCV only.
"""

import logging
from collections import Counter, deque
from dataclasses import dataclass, field

import cv2
import numpy as np

from mvld.common.errors import ConfigError

log = logging.getLogger(__name__)

OK = "ok"
FAILED = "failed"
OBSTRUCTED = "obstructed"

SOURCE_REASONS = ("timeout", "disconnected", "read_error", "end_of_stream", "stale")
PICTURE_FAILED_REASONS = ("frozen", "black", "uniform", "noise")
FAILED_REASONS = SOURCE_REASONS + PICTURE_FAILED_REASONS
OBSTRUCTED_REASONS = ("occluded", "defocused", "dirty", "redirected")

ANALYSIS_SIZE = (160, 120)  # width, height of the grey copy every feature is computed on
GRID = (8, 6)  # columns, rows of the cells that localise texture loss (20x20 px each)
PATCH_SIZE = (80, 60)  # width, height of the grey copy cut into GRID patches (10x10 px)


def state_of(reason: str | None) -> str:
    """The state a reason code belongs to (``ok`` for no reason)."""
    if reason is None:
        return OK
    if reason in FAILED_REASONS:
        return FAILED
    if reason in OBSTRUCTED_REASONS:
        return OBSTRUCTED
    raise ConfigError(f"unknown health reason {reason!r}")


@dataclass(frozen=True)
class HealthConfig:
    """Thresholds and timings of the monitor; the defaults are tuned on bench_health.py.

    Frame counts assume a steady frame rate; at 30 FPS the defaults declare a picture
    failure after 1/6 s, an obstruction after 1/3 s, and clear after 1/2 s.
    """

    warmup_frames: int = 15  # healthy frames averaged into the reference
    confirm_failed_frames: int = 5  # consecutive frozen/black/uniform/noise verdicts to declare
    confirm_obstructed_frames: int = 10  # consecutive obstruction verdicts to declare
    clear_frames: int = 15  # consecutive healthy verdicts to clear any fault
    timeout_s: float = 2.0  # no frame for this long: failed/timeout
    frozen_max_diff: float = 0.1  # mean |difference| to the previous frame below this: frozen
    adapt_rate: float = 0.002  # reference EMA weight per healthy frame (time constant 500)
    black_max_mean: float = 25.0  # grey mean below this ...
    black_max_bright_fraction: float = 0.01  # ... and almost no pixel above 60: black
    uniform_max_std: float = 6.0  # grey standard deviation below this: uniform
    noise_min_sigma: float = 25.0  # full-resolution noise estimate above this ...
    noise_min_ratio: float = 4.0  # ... and this many times the reference: noise
    texture_floor: float = 2.0  # cells whose reference |Laplacian| is below carry no texture
    degraded_ratio: float = 0.7  # a cell keeping less texture (short-term average): degraded
    short_term_rate: float = 0.2  # EMA weight of the short-term cell texture average
    covered_ratio: float = 0.25  # a cell keeping less than this and changed is covered
    changed_level: float = 18.0  # colour change (grey levels, after gain) that marks a cell
    occluded_min_fraction: float = 0.12  # covered fraction of textured cells: occluded
    dirty_min_fraction: float = 0.3  # degraded fraction of textured cells: dirty
    defocus_max_ratio: float = 0.6  # texture kept over all textured cells below this ...
    defocus_min_similarity: float = 0.4  # ... with the coarse picture kept: defocused
    gained_ratio: float = 2.5  # a cell with this many times its reference texture gained some
    redirect_min_gained: float = 0.06  # gained fraction of all cells that means the view moved
    redirect_max_similarity: float = 0.5  # median patch correlation with the reference below
    structure_min_std: float = 3.0  # reference patches flatter than this (grey levels) ignored

    def __post_init__(self) -> None:
        for name in ("warmup_frames", "confirm_failed_frames", "confirm_obstructed_frames",
                     "clear_frames"):
            if getattr(self, name) < 1:
                raise ConfigError(f"health {name} must be at least 1, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ConfigError(f"health timeout_s must be positive, got {self.timeout_s}")
        if not 0.0 <= self.adapt_rate < 1.0:
            raise ConfigError(f"health adapt_rate must be in [0, 1), got {self.adapt_rate}")


@dataclass
class CameraHealth:
    """The monitor's answer for one frame: state, reason and the evidence behind them."""

    state: str  # ok | failed | obstructed
    reason: str | None  # one of FAILED_REASONS or OBSTRUCTED_REASONS; None when ok
    since: float  # timestamp at which the camera entered this state
    confidence: float  # share of recent verdicts that agree with the state, 0..1
    scores: dict[str, float] = field(default_factory=dict)  # features, for logs and metrics

    @property
    def usable(self) -> bool:
        """Whether the view should be encoded and sent."""
        return self.state == OK


@dataclass
class Features:
    """What one frame looks like to the monitor."""

    mean: float
    std: float
    bright_fraction: float
    noise_sigma: float
    cell_texture: np.ndarray  # GRID rows x cols, mean |Laplacian| per cell
    cell_colour: np.ndarray  # GRID rows x cols x 3, mean RGB per cell
    patches: np.ndarray  # cells x 100, each cell's 10x10 grey patch, zero-mean float32


@dataclass
class Reference:
    """A camera's healthy look: what obstruction detectors compare against."""

    noise_sigma: float
    cell_texture: np.ndarray
    cell_colour: np.ndarray
    patches: np.ndarray  # cells x 100, zero-mean; averaged over warm-up, adapted slowly


def downscale(frame: np.ndarray) -> np.ndarray:
    """The frame at ANALYSIS_SIZE by successive 2x INTER_AREA halvings (the fast path)."""
    width, height = ANALYSIS_SIZE
    small = frame
    while small.shape[1] >= 2 * width and small.shape[0] >= 2 * height:
        half = (small.shape[1] // 2, small.shape[0] // 2)
        small = cv2.resize(small, half, interpolation=cv2.INTER_AREA)
    if small.shape[:2] != (height, width):
        shrinking = small.shape[1] > width
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        small = cv2.resize(small, ANALYSIS_SIZE, interpolation=interpolation)
    return small


def noise_sigma(frame: np.ndarray, row_step: int = 16) -> float:
    """Sensor noise estimate (grey levels) from full-resolution rows of the green channel.

    The median absolute second difference along a row is dominated by noise, not edges,
    which cover few pixels; for Gaussian noise of std s it is 0.6745 * sqrt(6) * s.
    """
    rows = frame[row_step // 2 :: row_step, :, 1].astype(np.int16)
    second = np.abs(rows[:, 2:] - 2 * rows[:, 1:-1] + rows[:, :-2]).ravel()
    middle = second.size // 2
    return float(np.partition(second, middle)[middle]) / (0.6745 * np.sqrt(6.0))


def extract_features(frame: np.ndarray) -> Features:
    """All per-frame features; about 0.3 ms for a 640x480 frame on one core."""
    small = downscale(frame)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    mean, std = (float(v[0][0]) for v in cv2.meanStdDev(grey))
    bright_fraction = float(np.count_nonzero(grey > 60)) / grey.size
    laplacian = np.abs(cv2.Laplacian(grey, cv2.CV_32F))
    cell_texture = cv2.resize(laplacian, GRID, interpolation=cv2.INTER_AREA)
    cell_colour = cv2.resize(small, GRID, interpolation=cv2.INTER_AREA).astype(np.float32)
    return Features(mean, std, bright_fraction, noise_sigma(frame), cell_texture,
                    cell_colour, grid_patches(grey))


def grid_patches(grey: np.ndarray) -> np.ndarray:
    """The grey copy at PATCH_SIZE cut into one zero-mean row per GRID cell."""
    columns, rows = GRID
    small = cv2.resize(grey, PATCH_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)
    height, width = PATCH_SIZE[1] // rows, PATCH_SIZE[0] // columns
    patches = small.reshape(rows, height, columns, width).transpose(0, 2, 1, 3)
    patches = patches.reshape(rows * columns, height * width)
    return patches - patches.mean(axis=1, keepdims=True)


def patch_similarity(patches: np.ndarray, reference: np.ndarray, min_std: float) -> float:
    """Median over structured reference cells of the patch correlation with the reference.

    Per-cell normalised correlation ignores light changes; the median ignores objects
    moving through fewer than half of the cells; a re-aimed camera moves every cell.
    """
    ref_norm = np.linalg.norm(reference, axis=1)
    structured = ref_norm > min_std * np.sqrt(reference.shape[1])
    if not structured.any():
        return 1.0
    current, ref = patches[structured], reference[structured]
    dots = np.einsum("ij,ij->i", current, ref)
    norms = np.linalg.norm(current, axis=1) * ref_norm[structured] + 1e-6
    return float(np.median(dots / norms))


class HealthMonitor:
    """Health of one camera, frame by frame, with hysteresis and a learned reference."""

    def __init__(self, config: HealthConfig | None = None, camera: str = "") -> None:
        self.config = config or HealthConfig()
        self.camera = camera
        self.reference: Reference | None = None
        self._warmup: list[Features] = []
        self._state, self._reason, self._since = OK, None, 0.0
        self._run: Counter[str] = Counter()  # verdicts of the current run of faulty frames
        self._run_length = 0
        self._clear_count = 0
        self._recent: deque[str] = deque(maxlen=self.config.clear_frames)
        self._last_frame_time: float | None = None
        self._last_rows: np.ndarray | None = None  # every 8th row of the previous frame
        self._scores: dict[str, float] = {}
        self._short_texture: np.ndarray | None = None  # cell texture, short-term average

    # -- public contract -------------------------------------------------------------------

    def update(self, frame: np.ndarray | None, timestamp: float) -> CameraHealth:
        """Judge one frame (HxWx3 uint8 RGB) captured at ``timestamp`` (seconds).

        ``None`` means the capture layer had no frame at this tick: the state holds until
        ``timeout_s`` has passed since the last frame, then the camera is failed/timeout.
        """
        if frame is None:
            return self._no_frame(timestamp)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 frame, got {frame.shape} {frame.dtype}")
        self._last_frame_time = timestamp
        features = extract_features(frame)
        self._follow_short_term(features.cell_texture)
        verdict = self._verdict(frame, features)
        self._apply_hysteresis(verdict, timestamp)
        if verdict is None and self._state == OK:
            self._learn(features)
        return self.health()

    def report_source_error(self, reason: str, timestamp: float) -> CameraHealth:
        """The capture layer says the source failed (disconnected, read_error, ...): declare."""
        if reason not in SOURCE_REASONS:
            raise ConfigError(f"unknown source error {reason!r}; valid: {SOURCE_REASONS}")
        self._declare(reason, timestamp)
        self._last_rows = None
        return self.health()

    def health(self) -> CameraHealth:
        """The current state without a new frame."""
        agreeing = sum(1 for v in self._recent if state_of(v or None) == self._state)
        confidence = agreeing / len(self._recent) if self._recent else 1.0
        return CameraHealth(self._state, self._reason, self._since, confidence,
                            dict(self._scores))

    def relearn(self) -> None:
        """Forget the reference (e.g. after a camera was re-aimed on purpose) and warm up again."""
        self.reference = None
        self._warmup.clear()

    # -- verdict of one frame ---------------------------------------------------------------

    def _verdict(self, frame: np.ndarray, features: Features) -> str | None:
        """The fault this single frame shows, or None; failures before obstructions.

        Order: noise, black, uniform, frozen (a frozen black frame is reported black), then
        the obstruction checks against the reference.
        """
        config = self.config
        self._scores = {"mean": features.mean, "std": features.std,
                        "noise_sigma": features.noise_sigma}
        reference_noise = self.reference.noise_sigma if self.reference else 0.0
        repeat = self._is_repeat(frame)
        if (features.noise_sigma > config.noise_min_sigma
                and features.noise_sigma > config.noise_min_ratio * reference_noise):
            return "noise"
        if (features.mean < config.black_max_mean
                and features.bright_fraction < config.black_max_bright_fraction):
            return "black"
        if features.std < config.uniform_max_std:
            return "uniform"
        # Only a picture with detail can be seen to freeze: a codec turns a smooth cover or
        # a flat frame into repeats as well.
        if repeat and float(features.cell_texture.mean()) >= config.texture_floor:
            return "frozen"
        if self.reference is None:
            return None
        return self._obstruction(features, self.reference)

    def _is_repeat(self, frame: np.ndarray) -> bool:
        """Whether the frame repeats the previous one, bit for bit or up to codec drift.

        Compares every 8th full-resolution row: a repeat differs by less than
        ``frozen_max_diff`` grey levels on average (0 when bit-identical, a few hundredths
        when a video codec refreshes a frozen picture), sensor noise of one grey level by
        about 1.1.
        """
        rows = np.ascontiguousarray(frame[::8])
        previous, self._last_rows = self._last_rows, rows
        if previous is None or previous.shape != rows.shape:
            return False
        difference = cv2.norm(rows, previous, cv2.NORM_L1) / rows.size
        self._scores["frame_difference"] = difference
        return difference < self.config.frozen_max_diff

    def _obstruction(self, features: Features, reference: Reference) -> str | None:
        """Compare the frame with the camera's reference: occluded, defocused, dirty, redirected."""
        config = self.config
        textured = reference.cell_texture > config.texture_floor
        if not textured.any():
            return None
        ref_colour = reference.cell_colour
        # Illumination gain, robust to a minority of changed cells.
        gain = float(np.median((features.cell_colour.mean(2) + 5) / (ref_colour.mean(2) + 5)))
        kept = features.cell_texture / (gain * reference.cell_texture + 1e-6)
        changed = np.abs(features.cell_colour - gain * ref_colour).max(2) > config.changed_level
        covered = textured & changed & (kept < config.covered_ratio)
        # Dirt stays put while objects move: a cell is degraded when both this frame and the
        # short-term average have lost texture.
        short_kept = self._short_texture / (gain * reference.cell_texture + 1e-6)
        degraded = textured & (np.maximum(kept, short_kept) < config.degraded_ratio)
        gained = features.cell_texture > np.maximum(
            config.gained_ratio * gain * reference.cell_texture, 2 * config.texture_floor)
        covered_fraction = float(covered.sum() / textured.sum())
        degraded_fraction = float(degraded.sum() / textured.sum())
        gained_fraction = float(gained.mean())
        texture_kept = float(features.cell_texture[textured].sum()
                             / (gain * reference.cell_texture[textured].sum() + 1e-6))
        similarity = patch_similarity(features.patches, reference.patches,
                                      config.structure_min_std)
        self._scores.update(gain=gain, covered_fraction=covered_fraction,
                            degraded_fraction=degraded_fraction, gained_fraction=gained_fraction,
                            texture_kept=texture_kept, similarity=similarity)
        # A re-aimed view shows texture in new places; covers and blur only take it away.
        # Blur takes it everywhere but keeps the coarse picture; a cover hides the picture
        # (all of it, or part of it while the rest stays sharp).
        scene_moved = gained_fraction >= config.redirect_min_gained
        if not scene_moved and texture_kept < config.defocus_max_ratio:
            if similarity >= config.defocus_min_similarity:
                return "defocused"
            return "occluded"
        if not scene_moved and covered_fraction >= config.occluded_min_fraction:
            return "occluded"
        if similarity < config.redirect_max_similarity:
            return "redirected"
        if degraded_fraction >= config.dirty_min_fraction:
            return "dirty"
        return None

    def _follow_short_term(self, cell_texture: np.ndarray) -> None:
        """Update the short-term average of the cell texture (every frame)."""
        if self._short_texture is None:
            self._short_texture = cell_texture.copy()
        else:
            self._short_texture += self.config.short_term_rate * (
                cell_texture - self._short_texture)

    # -- reference ---------------------------------------------------------------------------

    def _learn(self, features: Features) -> None:
        """Build the reference from warm-up frames, then follow it slowly while healthy."""
        if self.reference is None:
            self._warmup.append(features)
            if len(self._warmup) >= self.config.warmup_frames:
                self.reference = Reference(
                    noise_sigma=float(np.median([f.noise_sigma for f in self._warmup])),
                    cell_texture=np.median([f.cell_texture for f in self._warmup], axis=0),
                    cell_colour=np.median([f.cell_colour for f in self._warmup], axis=0),
                    patches=np.mean([f.patches for f in self._warmup], axis=0),
                )
                self._warmup.clear()
                log.info("camera %s: reference learned", self.camera)
            return
        rate = self.config.adapt_rate
        ref = self.reference
        ref.noise_sigma += rate * (features.noise_sigma - ref.noise_sigma)
        ref.cell_texture += rate * (features.cell_texture - ref.cell_texture)
        ref.cell_colour += rate * (features.cell_colour - ref.cell_colour)
        ref.patches += rate * (features.patches - ref.patches)

    # -- hysteresis --------------------------------------------------------------------------

    def _apply_hysteresis(self, verdict: str | None, timestamp: float) -> None:
        """Declare a fault after a confirmed run of faulty verdicts; clear after healthy ones."""
        self._recent.append(verdict or "")
        if verdict is None:
            self._run.clear()
            self._run_length = 0
            if self._state != OK:
                self._clear_count += 1
                if self._clear_count >= self.config.clear_frames:
                    log.info("camera %s: healthy again (was %s)", self.camera, self._reason)
                    self._state, self._reason, self._since = OK, None, timestamp
            return
        self._clear_count = 0
        if verdict == self._reason:
            self._run.clear()
            self._run_length = 0
            return
        self._run[verdict] += 1
        self._run_length += 1
        reason = self._run.most_common(1)[0][0]
        needed = (self.config.confirm_failed_frames if state_of(reason) == FAILED
                  else self.config.confirm_obstructed_frames)
        if self._run_length >= needed:
            self._declare(reason, timestamp)

    def _declare(self, reason: str, timestamp: float) -> None:
        """Enter the fault state of ``reason``."""
        if reason != self._reason:
            log.warning("camera %s: %s (%s)", self.camera, state_of(reason), reason)
            self._state, self._reason, self._since = state_of(reason), reason, timestamp
        self._run.clear()
        self._run_length = 0
        self._clear_count = 0

    def _no_frame(self, timestamp: float) -> CameraHealth:
        """No frame this tick: time out once the last frame is too old."""
        last = self._last_frame_time
        if last is None:
            self._last_frame_time = last = timestamp
        if timestamp - last >= self.config.timeout_s and self._reason not in SOURCE_REASONS:
            self._declare("timeout", timestamp)
        return self.health()

