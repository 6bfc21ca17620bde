"""Record synchronised frame sets from frame sources into the dataset folder format.

Each frame set reads every source once, in camera order; a source that gives no frame within
the timeout, or fails, leaves that view missing; a source at end of stream stays missing. The
recording stops after ``frames`` frame sets or when every source has ended.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from mvld.common.dataset import FrameSetWriter
from mvld.common.errors import ConfigError, DatasetError
from mvld.edge.sources import open_source
from mvld.edge.sources.base import EndOfStream, FrameSource, Pacer, SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordJob:
    """What to record: source URIs (one camera each), where, how many frame sets, how fast."""

    uris: tuple[str, ...]
    out: Path
    frames: int
    fps: float | None = None  # pace frame sets at this rate; None = as fast as sources give
    timeout_s: float = 1.0
    size: tuple[int, int] | None = None  # (H, W) to resize every view to
    idle_limit_s: float = 30.0  # give up when no camera delivered anything for this long

    def __post_init__(self) -> None:
        if not self.uris:
            raise ConfigError("record needs at least one source URI")
        if self.frames < 1:
            raise ConfigError(f"frames must be >= 1, got {self.frames}")
        if self.fps is not None and self.fps <= 0:
            raise ConfigError(f"fps must be > 0, got {self.fps}")


@dataclass
class RecordResult:
    """What a recording produced."""

    out: Path
    frame_sets: int
    missing_per_camera: list[int]
    ended: list[bool]


def record_dataset(job: RecordJob, progress: Callable[[int], None] | None = None) -> RecordResult:
    """Record ``job.frames`` frame sets from ``job.uris`` into ``job.out``."""
    cameras = [f"cam{v}" for v in range(len(job.uris))]
    sources: list[FrameSource] = []
    try:
        for uri in job.uris:
            sources.append(open_source(uri))
        with FrameSetWriter(job.out, cameras) as writer:
            result = _record_loop(job, sources, writer, progress)
    finally:
        for source in sources:
            source.close()
    summary = {"job": {**asdict(job), "out": str(job.out)}, **asdict(result), "out": str(job.out)}
    (job.out / "record.json").write_text(json.dumps(summary, indent=2))
    return result


def _record_loop(
    job: RecordJob,
    sources: list[FrameSource],
    writer: FrameSetWriter,
    progress: Callable[[int], None] | None,
) -> RecordResult:
    result = RecordResult(job.out, 0, [0] * len(sources), [False] * len(sources))
    pacer = Pacer(job.fps) if job.fps else None
    attempt = 0
    last_delivery = time.monotonic()
    while result.frame_sets < job.frames and not all(result.ended):
        if pacer is not None:
            pacer.wait(attempt, timeout_s=float("inf"))
        attempt += 1
        views = [_read_view(job, source, v, result) for v, source in enumerate(sources)]
        if all(view is None for view in views):
            if time.monotonic() - last_delivery > job.idle_limit_s:
                raise SourceError(
                    f"no camera delivered a frame for {job.idle_limit_s:g} s; "
                    f"recorded {result.frame_sets} frame sets"
                )
            continue
        last_delivery = time.monotonic()
        _check_sizes(views, writer.image_size, job.uris)
        for v, view in enumerate(views):
            result.missing_per_camera[v] += view is None
        writer.write(f"{result.frame_sets:06d}", views)
        result.frame_sets += 1
        if progress:
            progress(1)
    return result


def _read_view(job: RecordJob, source: FrameSource, v: int, result: RecordResult):
    """One source's view for this frame set: an image, or None (missing)."""
    if result.ended[v]:
        return None
    try:
        frame = source.read(job.timeout_s)
    except EndOfStream:
        log.info("%s: end of stream", source.uri)
        result.ended[v] = True
        return None
    except SourceError as exc:
        log.warning("%s: %s (view missing)", source.uri, exc)
        return None
    if frame is None:
        return None
    image = frame.image
    if job.size is not None and image.shape[:2] != tuple(job.size):
        image = cv2.resize(image, (job.size[1], job.size[0]), interpolation=cv2.INTER_AREA)
    return image


def _check_sizes(
    views: list[np.ndarray | None], expected: tuple[int, int] | None, uris: tuple[str, ...]
) -> None:
    """All views of a dataset share one size: say which camera differs and how to fix it."""
    sizes = [view.shape[:2] for view in views if view is not None]
    reference = expected or sizes[0]
    for uri, view in zip(uris, views, strict=True):
        if view is not None and view.shape[:2] != reference:
            raise DatasetError(
                f"{uri} gives {view.shape[0]}x{view.shape[1]} frames but the recording is "
                f"{reference[0]}x{reference[1]} (HxW): pass --size to resize every camera"
            )
