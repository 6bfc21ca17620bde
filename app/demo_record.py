"""What one ``mvld demo`` run was asked for and collected: the seam between the run and its report.

:mod:`mvld.demo` fills a :class:`DemoRecord`; :mod:`mvld.report` draws it. Neither imports the
other's internals through this module, so the two never import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mvld.common.errors import ConfigError


@dataclass(frozen=True)
class DemoConfig:
    """What ``mvld demo`` was asked for."""

    out: Path = Path("mvld-demo")
    seconds: float = 40.0
    fps: float = 10.0
    model: Path | None = None  # folder with last.json/.safetensors and encoder.onnx; None: shipped

    def __post_init__(self) -> None:
        if self.seconds < 5:
            raise ConfigError(f"--seconds must be at least 5, got {self.seconds}")
        if not 1 <= self.fps <= 30:
            raise ConfigError(f"--fps must be within 1..30, got {self.fps}")


@dataclass(frozen=True)
class FaultPlan:
    """When the demo's faults happen, in seconds after the stream starts."""

    stop_camera: int = 1
    stop: tuple[float, float] = (0.0, 0.0)
    cover_camera: int = 2
    cover: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def for_duration(cls, seconds: float) -> FaultPlan:
        """Camera 1 stops from 25% to 55% of the run; camera 2 is covered from 45% to 85%."""
        return cls(stop=(0.25 * seconds, 0.55 * seconds), cover=(0.45 * seconds, 0.85 * seconds))


@dataclass
class DemoRecord:
    """Everything the demo collected; :mod:`mvld.report` turns it into figures."""

    config: DemoConfig
    plan: FaultPlan
    start_wall: float  # POSIX time the stream's fault clock started
    results: list[dict] = field(default_factory=list)  # the receiver's published results
    edge_bytes: list[tuple[float, float]] = field(default_factory=list)  # (time, bytes sent)
    edge_metrics: dict[str, float] = field(default_factory=dict)
    receiver_metrics: dict[str, float] = field(default_factory=dict)
    scene_clock: dict[str, float] = field(default_factory=dict)  # start_wall and fps of the scene
    truth: dict[int, list[np.ndarray]] = field(default_factory=dict)  # tick -> true views


def scene_tick(record: DemoRecord, result: dict) -> int | None:
    """The simulated scene's tick a result shows (from its views' capture times)."""
    times = [v["capture_time"] for v in result["views"] if v["capture_time"] is not None]
    if not times or not record.scene_clock:
        return None
    return round((max(times) - record.scene_clock["start_wall"]) * record.scene_clock["fps"])
