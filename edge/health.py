"""Camera health monitor: is this camera's view usable, and if not, why.

One ``HealthMonitor`` per camera turns each frame (or the absence of one) into a
``CameraHealth``: ``ok``, ``failed`` (no usable picture at all) or ``obstructed`` (a picture,
but of the wrong thing or a degraded one), with a reason code of the wire protocol
(:class:`~mvld.common.wire.ReasonCode`, the vocabulary of DeepStream, jetson-utils and
commercial tamper detection):

- failed: ``timeout``, ``disconnected``, ``read_error``, ``end_of_stream``, ``stale`` (events
  from the capture layer), ``frozen`` (repeated frames), ``black``, ``uniform``, ``noise``;
- obstructed: ``occluded``, ``defocused``, ``dirty``, ``redirected``.

Field cameras move (PTZ pans, swaying poles, vehicles), their exposure hunts, lights go on
and off and people walk past, so nothing here compares a frame with a fixed picture:

- picture failures are properties of the frame itself (or of two consecutive frames);
- the camera's *reference* (a coarse picture, per-cell texture and brightness, the sharpness
  and noise levels) follows the view: every frame the displacement since the last frame is
  measured (block matching on an 80x60 copy) and the reference is shifted with the view, then
  blended towards it. Each part learns from the frames that do not show *its* fault - a
  cover's cells stop learning while the cover is there, the rest of the view keeps learning -
  never from the alarm state, so a wrong alarm cannot freeze the reference;
- obstructions are judged from the frame against the moving reference: a connected region
  that lost its texture and changed colour (``occluded`` when it is featureless, ``dirty``
  when some texture shows through), fine detail lost over the whole view while the coarse
  picture stays (``defocused``), many cells dimmed to a haze (``dirty``);
- ``redirected`` is a sudden change of the whole view to another *stable* view (a knock, a
  re-aim), not a drift: pans and sway move the reference with them. It is a bounded state:
  after ``redirect_relearn_s`` the new view becomes the reference if its picture is healthy,
  as commercial tamper detection re-learns, so the alarm always clears.

Verdicts go through hysteresis, like the "minimum duration" of Axis tampering alarms: a fault
is declared only after it persists for several frames, and cleared only after several
healthy frames. Capture-layer events are facts, not estimates, and are declared at once.
Numpy and OpenCV only; 1-2 ms of one core per 640x480 frame (bench/bench_health_field.py).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter, deque
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mvld.common.config_flags import tomllib
from mvld.common.errors import ConfigError
from mvld.common.wire import ReasonCode, ViewStatus

log = logging.getLogger(__name__)

OK = ViewStatus.OK.value
FAILED = ViewStatus.FAILED.value
OBSTRUCTED = ViewStatus.OBSTRUCTED.value

TIMEOUT = ReasonCode.TIMEOUT.value
STALE = ReasonCode.STALE.value
FROZEN = ReasonCode.FROZEN.value
BLACK = ReasonCode.BLACK.value
UNIFORM = ReasonCode.UNIFORM.value
NOISE = ReasonCode.NOISE.value
OCCLUDED = ReasonCode.OCCLUDED.value
DEFOCUSED = ReasonCode.DEFOCUSED.value
DIRTY = ReasonCode.DIRTY.value
REDIRECTED = ReasonCode.REDIRECTED.value

SOURCE_REASONS = tuple(
    r.value
    for r in (
        ReasonCode.TIMEOUT,
        ReasonCode.DISCONNECTED,
        ReasonCode.READ_ERROR,
        ReasonCode.END_OF_STREAM,
        ReasonCode.STALE,
    )
)
PICTURE_FAILED_REASONS = (FROZEN, BLACK, UNIFORM, NOISE)
FAILED_REASONS = SOURCE_REASONS + PICTURE_FAILED_REASONS
OBSTRUCTED_REASONS = (OCCLUDED, DEFOCUSED, DIRTY, REDIRECTED)

ANALYSIS_SIZE = (160, 120)  # width, height of the grey copy every feature is computed on
GRID = (16, 12)  # columns, rows of the cells that localise texture loss (10x10 px each)
SIGNATURE_SIZE = (80, 60)  # width, height of the coarse picture used for view matching
BLOCKS = (8, 6)  # columns, rows of the signature's matching blocks (10x10 px, 2x2 cells)
BLOCK = 10  # signature pixels per block side
MAX_SHIFT = 3  # signature pixels searched per frame: 3.75% of the width, 5% of the height
TRACK_DEADBAND = 0.25  # signature pixels (2 px at 640 wide): smaller shifts move nothing
CELLS_PER_BLOCK = 2  # cells per block side
CELL = SIGNATURE_SIZE[0] // GRID[0]  # signature pixels per cell side
MIN_BLOCKS = 4  # fewer structured blocks than this: the view cannot be matched
MAX_BLOCKS = 20  # blocks matched at most (the most structured ones)
MIN_SHIFT_GAIN = 0.02  # mean block correlation a shift must gain to count as motion
MIN_CURVATURE = 0.02  # sharpness of the correlation peak that sub-pixel motion needs
SLOW = 0.1  # learning under a fault verdict, relative to the normal rate
MAX_BLIND_SHIFT = 12  # signature pixels searched at most after frames the view was not seen
COARSE_SIZE = (20, 15)  # the picture whose contrast a blur keeps and a cover takes away
HEALTH_PROFILES = ("default", "off")
_NEIGHBOURS = np.ones((3, 3), np.uint8)
KNOWN = 0.99  # a cell's reference is trusted once this much of it was seen
LIGHT_OFFSET = 10.0  # grey levels added to brightness in ratios (dark cells are noisy)
LOG_SCALE = 138.0  # log brightness units: one unit is one grey level at mid-grey (128)
KNOWN_RATE = 0.02  # how fast a cell that came into view becomes known (about 1.7 s)
UNKNOWN_RATE = 0.3  # how fast an unknown cell follows what it sees


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
    """Thresholds and timings of the monitor; defaults tuned on bench_health*.py (docs/HEALTH.md).

    Frame counts assume a steady frame rate; at 30 FPS the defaults declare a picture
    failure after 1/6 s, an obstruction after 1/3 s, and clear after 1/2 s.
    """

    picture_checks: bool = True  # False: only source events and timeouts (``--health off``)
    warmup_frames: int = 15  # healthy frames the reference is averaged over before judging
    confirm_failed_frames: int = 5  # consecutive frozen/black/uniform/noise verdicts to declare
    confirm_obstructed_frames: int = 10  # consecutive obstruction verdicts to declare
    clear_frames: int = 15  # consecutive healthy verdicts to clear any fault
    timeout_s: float = 2.0  # no frame for this long: failed/timeout
    redirect_relearn_s: float = 10.0  # redirected this long with a healthy picture: new normal
    # picture failures
    frozen_max_diff: float = 0.1  # mean |difference| to the previous frame below this ...
    frozen_motion_level: float = 6.0  # ... and no analysis pixel changed by more than this
    frozen_max_moving: int = 2  # ... (more than this many such pixels means motion): frozen
    black_max_mean: float = 25.0  # grey mean below this ...
    black_max_bright_fraction: float = 0.01  # ... and almost no pixel above 60: black
    uniform_max_std: float = 6.0  # grey standard deviation below this: uniform
    noise_min_sigma: float = 25.0  # full-resolution noise estimate above this ...
    noise_min_ratio: float = 4.0  # ... and this many times the reference: noise
    # how the reference follows the view (weights per frame)
    structure_rate: float = 0.03  # coarse picture
    cell_rate: float = 0.03  # per-cell texture and brightness, while they agree with the view
    absorb_rate: float = 0.0002  # ... while they do not (a lasting change: about 3 minutes)
    level_rate: float = 0.02  # sharpness, coarse contrast and noise levels
    # occluded and dirty
    texture_floor: float = 1.5  # cells with less reference texture (|Laplacian|) carry none
    covered_ratio: float = 0.25  # a cell keeping less of its texture than this lost it ...
    changed_level: float = 18.0  # ... and with a colour change (grey levels) is covered
    flat_changed_level: float = 40.0  # a textureless cell changing colour this much ...
    light_max_ratio: float = 1.5  # ... by more than this factor (a light change) is covered
    occluded_min_fraction: float = 0.08  # connected covered region, share of judged cells
    cover_flat_ratio: float = 0.1  # a covered cell keeping less texture than this is bare
    cover_min_bare: float = 0.3  # share of bare cells in the region: occluded, else dirty
    dirty_ratio: float = 0.6  # a cell keeping less texture (short-term average) ...
    dirty_changed_level: float = 8.0  # ... and changing colour this much is degraded
    dirty_min_fraction: float = 0.08  # share of textured cells degraded: dirty ...
    dirty_min_cells: int = 3  # ... and at least this many (one cell of a bare view is no sign)
    short_term_rate: float = 0.3  # weight of the short-term texture average
    max_clipped: float = 0.3  # cells with more over/underexposed pixels are not judged
    # defocused
    defocus_max_ratio: float = 0.5  # fine-to-coarse texture ratio below this share of normal
    defocus_min_coarse: float = 0.5  # ... while the coarse contrast keeps this share ...
    dirty_min_coarse: float = 1.25  # ... up to this share (more: dirt's spots): defocused
    # redirected
    redirect_max_similarity: float = 0.5  # median block correlation with the reference below
    cover_max_structure: float = 0.5  # ... keeping less of its structured blocks: occluded
    redirect_return_similarity: float = 0.7  # correlation that ends a redirect (hysteresis)
    track_speed: float = 0.05  # share of the width a camera may pan per second while unseen
    structure_min_std: float = 3.0  # blocks flatter than this (grey levels) are not matched

    def __post_init__(self) -> None:
        for name in (
            "warmup_frames",
            "confirm_failed_frames",
            "confirm_obstructed_frames",
            "clear_frames",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"health {name} must be at least 1, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ConfigError(f"health timeout_s must be positive, got {self.timeout_s}")
        if self.redirect_relearn_s < 0:
            raise ConfigError(
                f"health redirect_relearn_s must be >= 0 (0: never), got {self.redirect_relearn_s}"
            )
        for name in ("structure_rate", "cell_rate", "absorb_rate", "level_rate", "short_term_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"health {name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_mapping(cls, values: dict[str, object], origin: str = "health config") -> HealthConfig:
        """A config from ``{field: value}`` (a TOML table); unknown keys and bad types raise."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"{origin}: unknown health setting(s) {unknown}; valid: {', '.join(known)}"
            )
        checked: dict[str, Any] = {}  # each value's type is checked against its field's
        for name, value in values.items():
            default = getattr(cls(), name)
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok:
                raise ConfigError(
                    f"{origin}: {name} must be a {type(default).__name__}, got {value!r}"
                )
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)  # a whole number given for a float setting
            checked[name] = value
        return cls(**checked)


def load_health_configs(spec: str, cameras: tuple[str, ...]) -> dict[str, HealthConfig]:
    """The health config of every camera from ``default``, ``off`` or a TOML file.

    A TOML file holds ``HealthConfig`` fields at its top level and, optionally, tables
    ``[cameras.cam1]`` whose fields override the top level for that camera (a table may
    also say ``profile = "off"``). Unknown keys and cameras are errors: a typo must not
    silently fall back to a default.
    """
    if spec in ("", "default"):
        return {camera: HealthConfig() for camera in cameras}
    if spec == "off":
        return {camera: HealthConfig(picture_checks=False) for camera in cameras}
    path = Path(spec)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"--health {spec}: no such file (expected default, off or a TOML file)"
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--health {spec}: {exc}") from exc
    per_camera = document.pop("cameras", {})
    if not isinstance(per_camera, dict):
        raise ConfigError(f"{spec}: [cameras] must be a table of camera tables")
    base = HealthConfig.from_mapping(document, spec)
    unknown = sorted(set(per_camera) - set(cameras))
    if unknown:
        raise ConfigError(
            f"{spec}: unknown camera(s) {unknown}; this node has {', '.join(cameras)}"
        )
    configs = {}
    for camera in cameras:
        overrides = dict(per_camera.get(camera, {}))
        profile = overrides.pop("profile", "default")
        if profile not in HEALTH_PROFILES:
            raise ConfigError(
                f"{spec}: [cameras.{camera}] profile must be one of "
                f"{HEALTH_PROFILES}, got {profile!r}"
            )
        start = base if profile == "default" else replace(base, picture_checks=False)
        merged = {f.name: getattr(start, f.name) for f in fields(HealthConfig)} | overrides
        configs[camera] = HealthConfig.from_mapping(merged, f"{spec} [cameras.{camera}]")
    return configs


def resolve_health_specs(
    specs: list[str] | None, cameras: tuple[str, ...]
) -> dict[str, HealthConfig]:
    """Every camera's config from ``--health`` values: ``SPEC`` for all, ``CAM=SPEC`` for one.

    ``SPEC`` is ``default``, ``off`` or a TOML file (see :func:`load_health_configs`);
    ``CAM`` is a camera id (``cam1``) or number (``1``). Later values win.
    """
    configs = {camera: HealthConfig() for camera in cameras}
    for spec in specs or []:
        camera, sep, value = spec.partition("=")
        if not sep:
            configs.update(load_health_configs(spec, cameras))
            continue
        camera = camera.strip()
        camera = f"cam{camera}" if camera.isdigit() else camera
        if camera not in configs:
            raise ConfigError(
                f"--health {spec}: unknown camera {camera!r}; this node has {', '.join(cameras)}"
            )
        configs[camera] = load_health_configs(value.strip(), cameras)[camera]
    return configs


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
    grey: np.ndarray  # ANALYSIS_SIZE grey copy, uint8
    texture: np.ndarray  # GRID rows x cols: mean |Laplacian| per cell, noise removed
    brightness: np.ndarray  # GRID rows x cols: mean grey level per cell
    signature: np.ndarray  # SIGNATURE_SIZE grey copy, log brightness, float32
    fine: float  # mean cell texture (fine detail)
    coarse: float  # mean |Laplacian| of a 20x15 copy (coarse contrast; blur keeps it)
    laplacian: np.ndarray  # ANALYSIS_SIZE |Laplacian|, float32
    floor: float  # mean |Laplacian| of the sensor noise alone
    clipped: np.ndarray  # GRID rows x cols: share of pixels at the ends of the grey range
    spread: np.ndarray  # BLOCKS rows x cols: structure of the signature's blocks (block_std)


@dataclass
class Reference:
    """A camera's healthy look, following the view: what obstructions are judged against."""

    signature: np.ndarray  # SIGNATURE_SIZE, float32
    cells: np.ndarray  # GRID rows x cols x 3: texture, brightness, known (0..1)
    sharpness: float  # fine / coarse
    coarse: float  # coarse contrast per grey level of brightness
    clipped: float  # share of over/underexposed pixels
    noise_sigma: float
    frames: int = 1  # frames learned
    offset: np.ndarray = field(default_factory=lambda: np.zeros(2))  # view vs signature
    cell_offset: np.ndarray = field(default_factory=lambda: np.zeros(2))  # view vs cell grid
    cells_on_reference: bool = True  # the cell grid is the signature's (not a new view's)


@dataclass
class Match:
    """How the current view matches another one (the reference or the previous frame)."""

    similarity: float | None  # median block correlation at the common shift; None: no structure
    shift: tuple[float, float]  # (dx, dy) signature pixels: current(p) ~ other(p + shift)
    at_edge: bool = False  # the best shift is at the edge of the search: it may lie beyond


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


_SECOND_DIFFERENCE = np.array([[1, -2, 1]], np.float32)


def noise_sigma(frame: np.ndarray, row_step: int = 16) -> float:
    """Sensor noise estimate (grey levels) from full-resolution rows of the green channel.

    The median absolute second difference along a row is dominated by noise, not edges,
    which cover few pixels; for Gaussian noise of std s it is 0.6745 * sqrt(6) * s.
    """
    rows = np.ascontiguousarray(frame[row_step // 2 :: row_step, :, 1])
    second = cv2.filter2D(rows, cv2.CV_16S, _SECOND_DIFFERENCE)[:, 1:-1]
    # The median from a histogram of |second difference| saturated at 255: exact below 255
    # (sigma 154, far beyond any noise threshold), at a fraction of a partition's cost.
    magnitude = cv2.convertScaleAbs(second)
    counts = cv2.calcHist([magnitude], [0], None, [256], [0, 256]).ravel()
    middle = int(np.searchsorted(np.cumsum(counts), magnitude.size // 2, side="right"))
    return float(middle) / (0.6745 * np.sqrt(6.0))


def noise_floor(sigma: float, frame_width: int) -> float:
    """Mean |Laplacian| that sensor noise alone gives an analysis cell.

    Grey noise is 0.67 of the green-channel sigma, INTER_AREA divides it by the linear
    downscale factor, the 4-neighbour Laplacian multiplies a mean |noise| by 3.57; the uint8
    grey copy adds its own rounding (1.03). Measured within 5% on flat noisy frames.
    """
    factor = max(frame_width / ANALYSIS_SIZE[0], 1.0)
    return math.hypot(2.4 * sigma / factor, 1.03)


def extract_features(frame: np.ndarray) -> Features:
    """All per-frame features, from one 160x120 grey copy and a few full-resolution rows."""
    small = downscale(frame)
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    mean, std = (float(v[0][0]) for v in cv2.meanStdDev(grey))
    bright_fraction = float(np.count_nonzero(grey > 60)) / grey.size
    sigma = noise_sigma(frame)
    laplacian = np.abs(cv2.Laplacian(grey, cv2.CV_32F))
    cells = cv2.resize(laplacian, GRID, interpolation=cv2.INTER_AREA)
    floor = noise_floor(sigma, frame.shape[1])
    texture = np.sqrt(np.maximum(cells * cells - floor * floor, 0.0))
    brightness = cv2.resize(grey, GRID, interpolation=cv2.INTER_AREA).astype(np.float32)
    signature = cv2.resize(grey, SIGNATURE_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)
    coarse_picture = cv2.resize(signature, COARSE_SIZE, interpolation=cv2.INTER_AREA)
    coarse = cv2.mean(np.abs(cv2.Laplacian(coarse_picture, cv2.CV_32F)))[0]
    # Views are matched on log brightness: a light that changes over the view multiplies
    # the picture, which the log turns into a smooth term each block's ramp removal takes out.
    signature = LOG_SCALE * cv2.log(signature + LIGHT_OFFSET)
    exposed = cv2.inRange(grey, 9, 239)  # 255 where neither over- nor underexposed
    clipped = (
        1.0 - cv2.resize(exposed, GRID, interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    )
    return Features(
        mean,
        std,
        bright_fraction,
        sigma,
        grey,
        texture,
        brightness,
        signature,
        cv2.mean(texture)[0],
        coarse,
        laplacian,
        floor,
        clipped,
        block_std(signature),
    )


def cell_maps(features: Features, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cell texture and brightness on a grid displaced by ``offset`` (signature pixels).

    The reference's cells stay anchored to the scene while the camera moves; the current
    frame is pooled on that grid (one sub-pixel resampling of this frame), so the reference
    itself is only ever moved by whole cells and never blurred by repeated resampling.
    """
    if not offset.any():
        return features.texture, features.brightness
    shift = (-2.0 * float(offset[0]), -2.0 * float(offset[1]))  # analysis pixels
    laplacian = shift_picture(features.laplacian, shift)
    grey = shift_picture(features.grey.astype(np.float32), shift)
    cells = cv2.resize(laplacian, GRID, interpolation=cv2.INTER_AREA)
    texture = np.sqrt(np.maximum(cells * cells - features.floor * features.floor, 0.0))
    return texture, cv2.resize(grey, GRID, interpolation=cv2.INTER_AREA)


def _ramp_basis(size: int) -> np.ndarray:
    """Orthonormal basis (size*size x 3) of a constant and two linear ramps over a block."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    basis = np.stack([np.ones(size * size, np.float32), xs.ravel(), ys.ravel()], axis=1)
    return np.linalg.qr(basis)[0].astype(np.float32)


_RAMPS = _ramp_basis(BLOCK)
_RAMPS64 = _RAMPS.astype(np.float64)


def median(values: np.ndarray) -> float:
    """np.median of a small 1-D array at a tenth of its overhead (the mean of the middle two)."""
    ordered = np.sort(values, axis=None)
    middle = ordered.size // 2
    if ordered.size % 2:
        return float(ordered[middle])
    return 0.5 * (float(ordered[middle - 1]) + float(ordered[middle]))


def block_std(signature: np.ndarray) -> np.ndarray:
    """Structure of every matching block (BLOCKS rows x cols): std without its linear ramp.

    A smooth light gradient (a lamp's pool of light) is not structure: switched off, it would
    change a flat block's correlation completely.
    """
    columns, rows = BLOCKS
    blocks = signature.reshape(rows, BLOCK, columns, BLOCK).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(rows * columns, BLOCK * BLOCK).astype(np.float64)
    # |residual|^2 = |block|^2 - |its projection on the orthonormal ramps|^2 (the constant is
    # one of them, so the residual has zero mean); float64 keeps the difference exact enough.
    projection = blocks @ _RAMPS64
    energy = np.einsum("ij,ij->i", blocks, blocks) - np.einsum("ij,ij->i", projection, projection)
    return (
        np.sqrt(np.maximum(energy, 0.0) / (BLOCK * BLOCK)).astype(np.float32).reshape(rows, columns)
    )


def match_view(
    current: np.ndarray,
    other: np.ndarray,
    usable: np.ndarray,
    min_std: float,
    search: int = MAX_SHIFT,
    current_spread: np.ndarray | None = None,
) -> Match:
    """Block matching of ``current`` against ``other`` (both SIGNATURE_SIZE) within ``search``.

    Every usable block structured in both is correlated at every offset; the offset with the
    best mean correlation is the view's displacement, and the median correlation of the
    blocks *at that offset* is the similarity: objects moving through a minority of blocks
    do not change it, a re-aimed camera changes every block, and per-block normalisation
    ignores light changes. ``current_spread`` is ``block_std(current)`` when already known.
    """
    spread = block_std(other)
    structured = usable & (spread >= min_std)
    if np.count_nonzero(structured) > MAX_BLOCKS:  # the most structured say enough, cheaper
        cut = np.sort(spread[structured])[-MAX_BLOCKS]
        structured &= spread >= cut
    if current_spread is None:
        current_spread = block_std(current)
    current_structured = current_spread >= min_std / 2
    padded = cv2.copyMakeBorder(other, search, search, search, search, cv2.BORDER_REPLICATE)
    rows, columns = np.nonzero(structured)
    if rows.size < MIN_BLOCKS:
        return Match(None, (0.0, 0.0))
    alive = current_structured[rows, columns]  # a block that went flat matches nothing
    if not alive.any():
        return Match(0.0, (0.0, 0.0))
    stack = _correlation_maps(current, padded, rows[alive] * BLOCK, columns[alive] * BLOCK, search)
    # The common shift maximises the blocks' mean correlation: a block along a straight edge
    # only knows the shift across the edge (a ridge), its neighbours settle the rest.
    mean = np.add.reduce(stack, axis=0) / len(stack)
    best = int(np.argmax(mean))
    dy, dx = divmod(best, stack.shape[2])
    if mean[dy, dx] - mean[search, search] < MIN_SHIFT_GAIN:
        # Hardly better than where the view was: no jump by whole pixels (a poorly structured
        # view would wander with the noise and the light); a slow drift shows sub-pixel.
        dy = dx = search
    sub_x = _parabola(mean[dy, dx - 1 : dx + 2])
    sub_y = _parabola(mean[dy - 1 : dy + 2, dx])
    at_shift = np.zeros(rows.size, np.float32)
    at_shift[alive] = stack[:, dy, dx]
    edge = 2 * search
    return Match(
        median(at_shift),
        (dx - search + sub_x, dy - search + sub_y),
        dx in (0, edge) or dy in (0, edge),
    )


def _correlation_maps(
    current: np.ndarray, padded: np.ndarray, ys: np.ndarray, xs: np.ndarray, search: int
) -> np.ndarray:
    """TM_CCOEFF_NORMED of each block of ``current`` at (ys, xs) over its window of ``padded``.

    [blocks, 2*search+1, 2*search+1]. All blocks in a handful of numpy calls instead of one
    OpenCV call each (whose fixed cost is most of a small block's): the numerators are one
    batched product of each window with its template laid out as a Toeplitz matrix, the
    window norms come from box filters.
    """
    span = 2 * search + 1
    size = BLOCK + 2 * search
    count = len(ys)
    scatter_to, scatter_from, diagonal = _toeplitz_indices(search)
    width = padded.shape[1]
    corners = ys * width + xs  # top-left of each block's window in ``padded``
    window_pixels = np.arange(size)[:, None] * width + np.arange(size)
    windows = np.take(padded, corners[:, None, None] + window_pixels)
    template_pixels = np.arange(BLOCK)[:, None] * current.shape[1] + np.arange(BLOCK)
    templates = np.take(
        current, (ys * current.shape[1] + xs)[:, None, None] + template_pixels
    ).reshape(count, BLOCK * BLOCK)
    templates -= np.add.reduce(templates, axis=1, keepdims=True) / (BLOCK * BLOCK)
    template_norm = np.sqrt(np.einsum("bk,bk->b", templates, templates))
    toeplitz = np.zeros((count, size * BLOCK * span), np.float32)
    toeplitz[:, scatter_to] = templates[:, scatter_from]
    rows = np.matmul(windows, toeplitz.reshape(count, size, BLOCK * span))
    numerator = rows.reshape(count, -1)[:, diagonal].sum(axis=2).reshape(count, span, span)
    # Window sums in float64: no cancellation in the sum of squares.
    positions = corners[:, None, None] + (np.arange(span)[:, None] * width + np.arange(span))
    mean = np.take(
        cv2.boxFilter(
            padded, cv2.CV_64F, (BLOCK, BLOCK), anchor=(0, 0), borderType=cv2.BORDER_CONSTANT
        ),
        positions,
    )
    square = np.take(
        cv2.sqrBoxFilter(
            padded, cv2.CV_64F, (BLOCK, BLOCK), anchor=(0, 0), borderType=cv2.BORDER_CONSTANT
        ),
        positions,
    )
    denominator = (
        np.sqrt(np.maximum(square - mean * mean, 0.0)) * BLOCK * template_norm[:, None, None]
    )
    flat = denominator < 1e-3  # a flat window correlates with nothing (OpenCV gives 0 too)
    correlation = (numerator / np.where(flat, 1.0, denominator)).astype(np.float32)
    correlation[flat] = 0.0
    return np.clip(correlation, -1.0, 1.0, out=correlation)


@functools.cache
def _toeplitz_indices(search: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays of :func:`_correlation_maps` for one search radius.

    The template of a block becomes ``T[c, k, dx] = t[k, c - dx]`` (flat [size, BLOCK, span]),
    so one window row times ``T`` gives that row's correlation with every template row at
    every horizontal shift; the correlation at (dy, dx) sums rows ``dy + k`` with template
    row ``k`` (the ``diagonal`` gather, [span * span, BLOCK]).
    """
    span = 2 * search + 1
    k, column, dx = np.meshgrid(np.arange(BLOCK), np.arange(BLOCK), np.arange(span), indexing="ij")
    scatter_to = (((dx + column) * BLOCK + k) * span + dx).ravel()
    scatter_from = (k * BLOCK + column).ravel()
    dy, dx2, k2 = np.meshgrid(np.arange(span), np.arange(span), np.arange(BLOCK), indexing="ij")
    diagonal = (((dy + k2) * BLOCK + k2) * span + dx2).reshape(span * span, BLOCK)
    return scatter_to, scatter_from, diagonal


def _parabola(values: np.ndarray) -> float:
    """Sub-pixel position of a peak from its value and its two neighbours.

    0 at an edge of the search and for a flat peak (along a straight edge, or a view with
    little structure, the position is not known: holding still beats wandering).
    """
    if values.size != 3:
        return 0.0
    left, centre, right = values.tolist()
    curvature = left - 2 * centre + right
    if curvature > -MIN_CURVATURE:
        return 0.0
    return min(max(0.5 * (left - right) / curvature, -0.5), 0.5)


def shift_picture(
    picture: np.ndarray, shift: tuple[float, float], border: int = cv2.BORDER_REPLICATE
) -> np.ndarray:
    """``picture`` moved so that result(p) = picture(p + shift) (what comes in: ``border``)."""
    if shift == (0, 0):
        return picture
    height, width = picture.shape[:2]
    if border == cv2.BORDER_REPLICATE and picture.ndim == 2 and picture.dtype == np.float32:
        # The same bilinear translation as warpAffine (which replicates the border too, for
        # getRectSubPix), at a fraction of warpAffine's fixed cost on small pictures.
        return cv2.getRectSubPix(
            picture,
            (width, height),
            ((width - 1) / 2 + float(shift[0]), (height - 1) / 2 + float(shift[1])),
        )
    matrix = np.array([[1, 0, shift[0]], [0, 1, shift[1]]], np.float32)
    return cv2.warpAffine(
        picture,
        matrix,
        (picture.shape[1], picture.shape[0]),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=border,
    )


def settled(shift: tuple[float, float]) -> tuple[float, float]:
    """A displacement measured against the reference, or none below :data:`TRACK_DEADBAND`.

    The sub-pixel estimate has a small bias while the exposure changes; a still camera's
    offset that took it every frame drifted by a whole cell in a minute, after which its cells
    described the neighbouring content and were reported ``dirty``. Measured against an
    offset that did not move, a real motion grows past the deadband within a frame or two and
    is then followed in full. (Frame-to-frame dead reckoning adds increments, which a slow pan
    keeps below the deadband: it is not filtered.)
    """
    return (0.0, 0.0) if math.hypot(*shift) < TRACK_DEADBAND else shift


class HealthMonitor:
    """Health of one camera, frame by frame, with hysteresis and a reference that moves along."""

    def __init__(self, config: HealthConfig | None = None, camera: str = "") -> None:
        self.config = config or HealthConfig()
        self.camera = camera
        self.reference: Reference | None = None
        self._state, self._since = OK, 0.0
        self._reason: str | None = None
        self._run: Counter[str] = Counter()  # verdicts of the current run of faulty frames
        self._run_length = 0
        self._clear_count = 0
        self._recent: deque[str] = deque(maxlen=self.config.clear_frames)
        self._last_frame_time: float | None = None
        self._last_rows: np.ndarray | None = None  # every 8th row of the previous frame
        self._last_grey: np.ndarray | None = None
        self._last_signature: np.ndarray | None = None
        self._last_timestamp = 0.0  # capture time of the previous judged frame
        self._matched_last = True  # the previous frame matched the reference
        self._tracked_at = 0.0  # timestamp of the last frame whose view was followed
        self._short_texture: np.ndarray | None = None
        self._scores: dict[str, float] = {}

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
        if not self.config.picture_checks:
            self._apply_hysteresis(None, timestamp)
            return self.health()
        features = extract_features(frame)
        verdict = self._failure(frame, features)
        if verdict is None:
            verdict = self._judge_view(features, timestamp)
        self._last_grey = features.grey
        self._last_signature = features.signature
        self._last_timestamp = timestamp
        self._apply_hysteresis(verdict, timestamp)
        if (
            self._reason == REDIRECTED
            and verdict == REDIRECTED
            and self.config.redirect_relearn_s > 0
            and timestamp - self._since >= self.config.redirect_relearn_s
        ):
            log.warning(
                "camera %s: redirected for %.1f s with a healthy picture: the new view "
                "is the reference now",
                self.camera,
                timestamp - self._since,
            )
            self._adopt(features)
        return self.health()

    def report_source_error(self, reason: str, timestamp: float) -> CameraHealth:
        """The capture layer says the source failed (disconnected, read_error, ...): declare."""
        if reason not in SOURCE_REASONS:
            raise ConfigError(f"unknown source error {reason!r}; valid: {SOURCE_REASONS}")
        self._declare(reason, timestamp)
        self._last_rows = None
        self._last_grey = None
        return self.health()

    def health(self) -> CameraHealth:
        """The current state without a new frame."""
        agreeing = sum(1 for v in self._recent if state_of(v or None) == self._state)
        confidence = agreeing / len(self._recent) if self._recent else 1.0
        return CameraHealth(self._state, self._reason, self._since, confidence, dict(self._scores))

    def relearn(self) -> None:
        """Forget the reference (a camera re-aimed on purpose, a new scene) and warm up again.

        The state is kept: a fault clears the usual way, after ``clear_frames`` healthy
        frames, and failures are still found while the new reference is learned.
        """
        log.info("camera %s: re-learning its reference", self.camera)
        self.reference = None
        self._short_texture = None
        self._matched_last = True

    # -- picture failures --------------------------------------------------------------------

    def _failure(self, frame: np.ndarray, features: Features) -> str | None:
        """noise, black, uniform or frozen from the frame itself (a frozen black frame is black)."""
        config = self.config
        self._scores = {
            "mean": features.mean,
            "std": features.std,
            "noise_sigma": features.noise_sigma,
        }
        reference_noise = self.reference.noise_sigma if self.reference else 0.0
        repeat = self._is_repeat(frame, features.grey)
        if (
            features.noise_sigma > config.noise_min_sigma
            and features.noise_sigma > config.noise_min_ratio * reference_noise
        ):
            return NOISE
        if (
            features.mean < config.black_max_mean
            and features.bright_fraction < config.black_max_bright_fraction
        ):
            return BLACK
        if features.std < config.uniform_max_std:
            return UNIFORM
        # Only a picture with detail can be seen to freeze: a codec turns a smooth cover or
        # a flat frame into repeats as well.
        if repeat and features.fine + features.coarse >= config.texture_floor:
            return FROZEN
        return None

    def _is_repeat(self, frame: np.ndarray, grey: np.ndarray) -> bool:
        """Whether the frame repeats the previous one, bit for bit or up to codec drift.

        Every 8th full-resolution row differs by less than ``frozen_max_diff`` grey levels
        on average (0 when bit-identical, a few hundredths when a video codec refreshes a
        frozen picture, about 1.1 for sensor noise of one grey level), and no more than
        ``frozen_max_moving`` analysis pixels changed by more than ``frozen_motion_level``:
        a noise-free render with one small moving object has a tiny mean difference too.
        """
        rows = np.ascontiguousarray(frame[::8])
        previous, self._last_rows = self._last_rows, rows
        previous_grey = self._last_grey
        if previous is None or previous.shape != rows.shape or previous_grey is None:
            return False
        difference = cv2.norm(rows, previous, cv2.NORM_L1) / rows.size
        self._scores["frame_difference"] = difference
        if difference >= self.config.frozen_max_diff:
            return False
        moving = cv2.absdiff(grey, previous_grey) > self.config.frozen_motion_level
        return int(np.count_nonzero(moving)) <= self.config.frozen_max_moving

    # -- obstructions ------------------------------------------------------------------------

    def _judge_view(self, features: Features, timestamp: float) -> str | None:
        """Learn while warming up; afterwards judge the view against the moving reference."""
        reference = self.reference
        if reference is None or reference.frames < self.config.warmup_frames:
            self._tracked_at = timestamp
            self._learn(features)
            return None
        config = self.config
        texture_ref, brightness_ref = reference.cells[:, :, 0], reference.cells[:, :, 1]
        texture, brightness = cell_maps(features, reference.cell_offset)
        # Cells that were in view long enough, and are not clipped now: over- or underexposed
        # pixels (a light switched on before auto-exposure catches up) show no texture.
        exposed = (features.clipped < config.max_clipped) & _in_view(reference.cell_offset)
        known = (reference.cells[:, :, 2] >= KNOWN) & exposed
        # A cell counts as textured when its whole neighbourhood was: an edge that a shaking
        # camera moves into the next cell has not gone anywhere, texture all around has.
        around = cv2.erode(texture_ref, _NEIGHBOURS)
        textured = known & (around > config.texture_floor)
        # Texture is judged as local contrast (texture per grey level): a lamp switched off
        # over part of the view dims its texture with its light, dirt and covers do not.
        ratio = (brightness + LIGHT_OFFSET) / (brightness_ref + LIGHT_OFFSET)
        kept = texture / (around * ratio + 1e-3)
        # The light's gain, from the cells whose local contrast is what it was (a cover is
        # not a change of light: its cells lost their texture; a passer-by brings another).
        lit = textured & (kept > 0.5) & (kept < 2.0)
        if np.count_nonzero(lit) >= 8:
            gain = median(ratio[lit])
        else:  # too little texture to tell light from cover: the light is what changed
            gain = median(ratio[known]) if known.any() else 1.0
        change = brightness - gain * brightness_ref
        changed = np.abs(change)
        brightness_ratio = (brightness + 5) / (gain * brightness_ref + 5)
        relit = (brightness_ratio > 1 / config.light_max_ratio) & (
            brightness_ratio < config.light_max_ratio
        )  # a light change could explain it
        flat_ref = known & (texture_ref <= config.texture_floor)
        covered = (textured & (kept < config.covered_ratio) & (changed > config.changed_level)) | (
            flat_ref
            & (texture < config.texture_floor)
            & (changed > config.flat_changed_level)
            & ~relit
        )
        # Cells that lost part of their texture and changed colour: a cover's soft edge, dirt.
        dimmed = textured & (kept < config.dirty_ratio) & (changed > config.dirty_changed_level)
        # The region's share of the cells that can be judged (a cover over a sky that is
        # white in every frame, or a clipped highlight, cannot be seen).
        judged = max(_share(textured | flat_ref), 0.5)
        region, region_fraction = _largest_region(covered | dimmed)
        region_fraction /= judged
        cover = region_fraction >= config.occluded_min_fraction
        blocks_clear = ~_cells_to_blocks(covered | dimmed)
        # Does the visible view still match the reference? After frames in which the view
        # could not be followed (a failure, a full cover) it may have moved on meanwhile as
        # far as a camera panning at ``track_speed`` would.
        blind = max(timestamp - self._tracked_at, 0.0)
        search = (
            MAX_SHIFT
            + min(math.ceil(config.track_speed * SIGNATURE_SIZE[0] * blind), MAX_BLIND_SHIFT)
            if blind > 0.1
            else MAX_SHIFT
        )
        sharpness_kept = features.fine / (features.coarse + 0.5) / (reference.sharpness + 1e-6)
        match = self._match_reference(features, blocks_clear, search)
        # Hysteresis: once the view left the reference at once, it must match it clearly to
        # count as back (a repetitive scene shifted far still matches half-way).
        needed = (
            config.redirect_max_similarity
            if self._matched_last
            else config.redirect_return_similarity
        )
        if match.at_edge:  # a jump to the edge of the search (a knock): only a clear match
            needed = max(needed, config.redirect_return_similarity)
        matched = match.similarity is None or match.similarity >= needed
        if match.similarity is not None and matched:
            self._tracked_at = timestamp
        # A sharp view that matches neither the reference nor the previous frame is a cut
        # (another view); a degraded one (dirt, blur arriving at once) is judged as such.
        sharp = sharpness_kept >= config.defocus_max_ratio
        if not matched and not cover and match.similarity is not None:
            # The view changed to a bare one (a cover close to the lens over a plain scene,
            # where no cell had texture to lose): occluded, not another view.
            seen = shift_picture(reference.signature, tuple(reference.offset))
            was = block_std(seen) >= config.structure_min_std
            kept_structure = (
                float((features.spread[was] >= config.structure_min_std / 2).mean())
                if was.any()
                else 1.0
            )
            self._scores["structure_kept"] = kept_structure
            if kept_structure < config.cover_max_structure:
                self._follow(
                    features,
                    (texture, brightness),
                    False,
                    OCCLUDED,
                    np.zeros_like(textured),
                    ~_blocks_to_pixels(blocks_clear),
                )
                return OCCLUDED
        # Covered blocks are left out of the match, so a view that still does not match is
        # another view whatever its cells say (they were compared with the old view).
        if not matched and sharp and self._last_signature is not None:
            previous = match_view(
                features.signature,
                self._last_signature,
                blocks_clear,
                config.structure_min_std,
                current_spread=features.spread,
            )
            self._scores["previous_similarity"] = (
                -1.0 if previous.similarity is None else previous.similarity
            )
            if previous.similarity is not None and previous.similarity < (
                config.redirect_max_similarity
            ):
                # A cut: the view differs from the reference and from the previous frame. The
                # per-cell reference described another view; judge this one from scratch.
                first = self._matched_last
                self._matched_last = False
                self._restart_cells(features, on_reference=False)
                self._scores.update(similarity=float(match.similarity or 0.0))
                return REDIRECTED if first else None
            # The view moved on smoothly from the last frame (a pan behind an unseen cover, a
            # re-aimed camera that sways): the reference's offset follows by dead reckoning,
            # so the view is found where it is once it shows again. Only the camera's own
            # motion counts: most of the view agrees on the shift and it is no faster than a
            # pan (a passer-by filling a plain view moves faster).
            step = math.hypot(*previous.shift)
            fastest = (
                2
                * config.track_speed
                * SIGNATURE_SIZE[0]
                * max(timestamp - self._last_timestamp, 0.0)
            )
            own_motion = (
                previous.similarity is not None
                and step <= fastest
                and previous.similarity >= config.redirect_return_similarity
            )
            if reference.cells_on_reference:
                # The cells are still the reference's (a cover came, no cut): they move with
                # the reference or not at all, so they never have to be re-learned from a
                # frame that may still show the cover.
                if own_motion:
                    self._track_reference(features, previous.shift)
                    self._tracked_at = timestamp
            else:
                self._move_cells(previous.shift)
                if own_motion:
                    reference.offset = reference.offset + np.asarray(previous.shift, float)
                    self._tracked_at = timestamp
        elif matched:
            self._track_reference(features, settled(match.shift))
        self._matched_last = matched
        # Dirt: cells that kept only part of their texture and changed colour, in the
        # short-term average (dirt stays put, passers-by move on).
        if self._short_texture is None or self._short_texture.shape != texture.shape:
            self._short_texture = texture.copy()
        else:
            self._short_texture += config.short_term_rate * (texture - self._short_texture)
        short_kept = self._short_texture / (around * ratio + 1e-3)
        degraded = (
            textured
            & (np.maximum(short_kept, kept) < config.dirty_ratio)
            & (changed > config.dirty_changed_level)
            & ~region
        )
        degraded_fraction = np.count_nonzero(degraded) / max(int(np.count_nonzero(textured)), 1)
        coarse_kept = features.coarse / max(features.mean, 1.0) / (reference.coarse + 1e-6)
        # A cover is bare (featureless); dirt lets some texture through.
        bare_cells = covered & ((kept < config.cover_flat_ratio) | (texture < config.texture_floor))
        bare = _share(bare_cells[region]) if region.any() else 0.0
        self._scores.update(
            gain=gain,
            covered_fraction=region_fraction,
            bare_fraction=bare,
            degraded_fraction=degraded_fraction,
            degraded_cells=float(np.count_nonzero(degraded)),
            sharpness_kept=sharpness_kept,
            coarse_kept=coarse_kept,
            similarity=-1.0 if match.similarity is None else match.similarity,
        )
        # Fine detail lost over the whole view: a blur keeps the coarse contrast, dirt adds
        # some (the edges of its spots), a cover takes it away.
        lost_detail = (
            sharpness_kept < config.defocus_max_ratio
            and cv2.mean(features.clipped)[0] < reference.clipped + config.max_clipped
        )
        blurred = lost_detail and (
            config.defocus_min_coarse <= coarse_kept <= config.dirty_min_coarse
        )
        verdict: str | None = None
        if blurred and sharpness_kept < config.defocus_max_ratio / 2:
            verdict = DEFOCUSED  # so little detail left that bare cells are the blur's
        elif cover and bare >= config.cover_min_bare:
            verdict = OCCLUDED
        elif blurred:
            verdict = DEFOCUSED
        elif (
            (lost_detail and coarse_kept > config.dirty_min_coarse)
            or cover
            or (
                degraded_fraction >= config.dirty_min_fraction
                and np.count_nonzero(degraded) >= config.dirty_min_cells
            )
        ):
            verdict = DIRTY  # a haze with spots, a region that kept some texture, dimmed cells
        elif not matched:
            verdict = REDIRECTED
        # A cell learns only while it agrees with its reference (texture kept, or still bare;
        # brightness within what a light change does): a passer-by, a cover or dirt is never
        # learned as normal; a lasting change is absorbed at ``absorb_rate``.
        short_ratio = self._short_texture / (texture_ref * ratio + 1e-3)
        agree = (
            np.where(
                texture_ref > config.texture_floor,
                (short_ratio >= 0.5) & (short_ratio <= 2.0),
                self._short_texture < config.texture_floor,
            )
            & relit
            & exposed
        )
        self._scores["agreeing_fraction"] = _share(agree)
        self._follow(
            features,
            (texture, brightness),
            matched and match.similarity is not None,
            verdict,
            agree,
            ~_blocks_to_pixels(blocks_clear),
        )
        return verdict

    # -- reference ---------------------------------------------------------------------------
    #
    # The reference is anchored to the scene: ``offset`` says where the view is now relative
    # to it (current(p) ~ reference(p + offset), signature pixels), measured every frame by
    # block matching around the last offset. Nothing is resampled to follow the view: the
    # current frame is read at the offset, and the reference moves by whole cells (exactly)
    # once the view has moved that far. So the reference neither drifts nor blurs.

    def _learn(self, features: Features) -> None:
        """Start or extend the reference with a healthy frame (warm-up: a running mean)."""
        if self.reference is None:
            self.reference = Reference(
                signature=features.signature.copy(),
                cells=_cells_of(features, known=1.0),
                sharpness=features.fine / (features.coarse + 0.5),
                coarse=features.coarse / max(features.mean, 1.0),
                clipped=cv2.mean(features.clipped)[0],
                noise_sigma=features.noise_sigma,
            )
            return
        reference = self.reference
        reference.frames += 1
        if reference.frames == self.config.warmup_frames:
            log.info("camera %s: reference learned", self.camera)
        warm = 1.0 / reference.frames
        usable = np.ones(BLOCKS[::-1], bool)
        match = self._match_reference(features, usable, MAX_SHIFT)
        needed = (
            self.config.redirect_return_similarity
            if match.at_edge
            else self.config.redirect_max_similarity
        )
        if match.similarity is not None and match.similarity >= needed:
            self._track_reference(features, settled(match.shift))
        self._blend_signature(features, max(self.config.structure_rate, warm), None)
        self._blend_cells(
            cell_maps(features, reference.cell_offset), max(self.config.cell_rate, warm)
        )
        self._blend_levels(features, max(self.config.level_rate, warm))

    def _match_reference(self, features: Features, usable: np.ndarray, search: int) -> Match:
        """The current view against the reference, searched around the last offset."""
        reference = self.reference
        assert reference is not None
        seen = shift_picture(reference.signature, tuple(reference.offset))
        return match_view(
            features.signature, seen, usable, self.config.structure_min_std, search, features.spread
        )

    def _track_reference(self, features: Features, shift: tuple[float, float]) -> None:
        """The view matched the reference at ``offset + shift``: follow it (cells as well)."""
        reference = self.reference
        assert reference is not None
        reference.offset = reference.offset + np.asarray(shift, float)
        whole = np.trunc(reference.offset / CELL).astype(int)
        if whole.any():  # moved by a whole cell or more: move the anchor with it
            moved = (int(whole[0]) * CELL, int(whole[1]) * CELL)
            exposed = np.ones_like(reference.signature)
            exposed = shift_picture(exposed, moved, cv2.BORDER_CONSTANT) < 0.5
            reference.signature = shift_picture(reference.signature, moved)
            reference.offset = reference.offset - whole * CELL
            seen_now = shift_picture(features.signature, tuple(-reference.offset))
            reference.signature[exposed] = seen_now[exposed]
            if reference.cells_on_reference:
                self._roll_cells(int(whole[0]), int(whole[1]))
        if reference.cells_on_reference:
            reference.cell_offset = reference.offset.copy()
        else:  # back on the reference after another view: its cells start again here
            self._restart_cells(features, on_reference=True)

    def _move_cells(self, shift: tuple[float, float]) -> None:
        """Follow a view that is not the reference's with the cells alone."""
        reference = self.reference
        assert reference is not None
        reference.cells_on_reference = False
        reference.cell_offset = reference.cell_offset + np.asarray(shift, float)
        whole = np.trunc(reference.cell_offset / CELL).astype(int)
        if whole.any():
            reference.cell_offset = reference.cell_offset - whole * CELL
            self._roll_cells(int(whole[0]), int(whole[1]))

    def _roll_cells(self, dx: int, dy: int) -> None:
        """Move the cell grid (and the short-term texture) by whole cells."""
        reference = self.reference
        assert reference is not None
        reference.cells = _roll_cells(reference.cells, dx, dy)
        if self._short_texture is not None:
            self._short_texture = _roll_cells(self._short_texture[:, :, None], dx, dy)[:, :, 0]

    def _follow(
        self,
        features: Features,
        maps: tuple[np.ndarray, np.ndarray],
        matched: bool,
        verdict: str | None,
        agree: np.ndarray,
        hidden_pixels: np.ndarray,
    ) -> None:
        """Let each part of the reference learn what is healthy for it.

        Under a fault verdict the coarse picture (outside covered blocks) and the levels
        still learn, ten times slower: a wrong verdict fades instead of holding itself up.
        """
        config = self.config
        if matched:  # a real match (structure seen at the offset), not a view without any
            rate = config.structure_rate * (1.0 if verdict is None else SLOW)
            self._blend_signature(features, rate, hidden_pixels)
        healthy_picture = verdict in (None, REDIRECTED)
        self._blend_levels(features, config.level_rate * (1.0 if healthy_picture else SLOW))
        self._blend_cells(maps, np.where(agree, config.cell_rate, config.absorb_rate))

    def _blend_signature(
        self, features: Features, rate: float, hidden_pixels: np.ndarray | None
    ) -> None:
        """The coarse picture learns the current view, read at the offset."""
        reference = self.reference
        assert reference is not None
        back = tuple(-reference.offset)
        delta = shift_picture(features.signature, back) - reference.signature
        if hidden_pixels is not None and hidden_pixels.any():  # covered blocks keep the scene
            delta[shift_picture(hidden_pixels.astype(np.float32), back) > 0.5] = 0.0
        reference.signature += rate * delta

    def _blend_cells(self, maps: tuple[np.ndarray, np.ndarray], rate: float | np.ndarray) -> None:
        """Per-cell texture and brightness learn at ``rate`` (per cell).

        A cell that just came into view (a pan) is unknown: it follows the current values
        quickly and becomes known over a second or two. Cells partly out of view learn nothing.
        """
        reference = self.reference
        assert reference is not None
        known = reference.cells[:, :, 2]
        rates = np.maximum(rate, UNKNOWN_RATE * (1.0 - known)) * _in_view(reference.cell_offset)
        current = np.dstack(maps)
        reference.cells[:, :, :2] += rates[:, :, None] * (current - reference.cells[:, :, :2])
        reference.cells[:, :, 2] = np.minimum(known + KNOWN_RATE, 1.0)

    def _blend_levels(self, features: Features, rate: float) -> None:
        """Sharpness, coarse contrast and noise level learn from a healthy frame."""
        reference = self.reference
        assert reference is not None
        reference.sharpness += rate * (
            features.fine / (features.coarse + 0.5) - reference.sharpness
        )
        reference.coarse += rate * (features.coarse / max(features.mean, 1.0) - reference.coarse)
        reference.noise_sigma += rate * (features.noise_sigma - reference.noise_sigma)
        reference.clipped += rate * (cv2.mean(features.clipped)[0] - reference.clipped)

    def _restart_cells(self, features: Features, on_reference: bool) -> None:
        """The cell maps describe another view (a cut, a re-aim): take this frame's instead."""
        reference = self.reference
        assert reference is not None
        offset = reference.offset.astype(float) if on_reference else np.zeros(2)
        texture, brightness = cell_maps(features, offset)
        reference.cells = np.dstack([texture, brightness, np.ones_like(texture)]).astype(np.float32)
        reference.cell_offset = offset
        reference.cells_on_reference = on_reference
        self._short_texture = texture.copy()

    def _adopt(self, features: Features) -> None:
        """The re-aimed view is the new normal: the reference becomes this frame."""
        reference = self.reference
        assert reference is not None
        reference.signature = features.signature.copy()
        reference.offset = np.zeros(2)
        reference.sharpness = features.fine / (features.coarse + 0.5)
        reference.coarse = features.coarse / max(features.mean, 1.0)
        self._restart_cells(features, on_reference=True)
        self._matched_last = True

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
        needed = (
            self.config.confirm_failed_frames
            if state_of(reason) == FAILED
            else self.config.confirm_obstructed_frames
        )
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
            self._declare(TIMEOUT, timestamp)
        return self.health()


def _cells_of(features: Features, known: float) -> np.ndarray:
    """The per-cell reference channels of one frame: texture, brightness, known."""
    return np.dstack(
        [features.texture, features.brightness, np.full_like(features.texture, known)]
    ).astype(np.float32)


def _in_view(offset: np.ndarray) -> np.ndarray:
    """Cells of a grid displaced by ``offset`` (signature pixels) that lie wholly in view.

    The cell at c covers analysis pixels [size*c - o, size*(c+1) - o) of the frame; what
    varies is how many columns and rows fall off each side, so the masks are cached by that.
    """
    columns, rows = GRID
    size = ANALYSIS_SIZE[0] // columns
    ox, oy = -2.0 * float(offset[0]), -2.0 * float(offset[1])

    def kept(count: int, shift: float, extent: int) -> tuple[int, int]:
        first = max(math.ceil((-0.5 - shift) / size), 0)  # cells with left >= -0.5
        last = min(math.floor((extent + 0.5 - size - shift) / size), count - 1)
        return first, last

    return _in_view_mask(*kept(columns, ox, ANALYSIS_SIZE[0]), *kept(rows, oy, ANALYSIS_SIZE[1]))


@functools.lru_cache(maxsize=64)
def _in_view_mask(first_column: int, last_column: int, first_row: int, last_row: int) -> np.ndarray:
    """GRID mask of the cells in [first, last] of both axes (read-only: it is shared)."""
    mask = np.zeros(GRID[::-1], bool)
    if first_column <= last_column and first_row <= last_row:
        mask[first_row : last_row + 1, first_column : last_column + 1] = True
    mask.flags.writeable = False
    return mask


def _roll_cells(cells: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """result[c] = cells[c + (dx, dy)] (whole cells); cells that come in are unknown (known 0).

    The last channel of a 3-channel map is the known flag; other maps repeat their edge.
    """
    rows, columns = cells.shape[:2]
    ys = np.clip(np.arange(rows) + dy, 0, rows - 1)
    xs = np.clip(np.arange(columns) + dx, 0, columns - 1)
    rolled = cells[ys][:, xs].copy()
    if rolled.shape[2] == 3:
        outside = ((np.arange(rows) + dy < 0) | (np.arange(rows) + dy >= rows))[:, None] | (
            (np.arange(columns) + dx < 0) | (np.arange(columns) + dx >= columns)
        )[None, :]
        rolled[outside, 2] = 0.0
    return rolled


def _share(mask: np.ndarray) -> float:
    """The share of true values (``mask.mean()`` without its overhead)."""
    return np.count_nonzero(mask) / mask.size if mask.size else 0.0


def _largest_region(mask: np.ndarray) -> tuple[np.ndarray, float]:
    """The largest 8-connected region of ``mask`` and its share of all cells."""
    if not mask.any():
        return mask, 0.0
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest, float(stats[largest, cv2.CC_STAT_AREA]) / mask.size


def _cells_to_blocks(cells: np.ndarray) -> np.ndarray:
    """Blocks (BLOCKS) holding at least one marked cell (GRID)."""
    rows, columns = cells.shape
    step = CELLS_PER_BLOCK
    blocks = cells.reshape(rows // step, step, columns // step, step).any(axis=(1, 3))
    assert isinstance(blocks, np.ndarray)  # 2 of 4 axes reduced: never a scalar
    return blocks


def _blocks_to_pixels(blocks: np.ndarray) -> np.ndarray:
    """A block mask (BLOCKS) as a signature-pixel mask (SIGNATURE_SIZE)."""
    return np.repeat(np.repeat(blocks, BLOCK, axis=0), BLOCK, axis=1)
