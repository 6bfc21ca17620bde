"""CPU of file cameras read with ``--no-realtime``: decoded on demand vs. flat out (issue 17, 8).

Three 640x480 Motion JPEG files (textured, changing every frame, looped) are read by the
edge's real capture layer (:class:`~mvld.edge.capture.Capture`, one reader thread per camera)
while a frame-set loop takes every camera's newest frame at ``--fps`` on the node's
:class:`~mvld.edge.framesets.Ticker`, as ``mvld-edge --no-realtime`` does, without the
encoder (whose cost is the same either way). Two modes:

- ``on_demand``: today's reader: the next frame is decoded only once the previous was taken;
- ``flat_out``: the reader before the change (the same source with ``on_demand`` switched
  off): it decodes as fast as it can and the frames nobody took are dropped.

CPU is this process's user + system time over the wall time of each run (1.0 = one core),
and per frame set. On a busy machine the flat-out readers get less CPU than they would take,
so their figure is a lower bound; ``load_avg_1min`` is recorded with the results.

    nice -n 10 python bench/bench_file_on_demand.py              # ~25 s
    python bench/bench_file_on_demand.py --seconds 3 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mvld.edge.capture import CameraReader, Capture, CaptureConfig
from mvld.edge.framesets import FrameSetAssembler, Ticker
from mvld.edge.sources.files import FileSource

WIDTH, HEIGHT = 640, 480
MODES = ("flat_out", "on_demand")


class FlatOutFileSource(FileSource):
    """The file source as the reader treated it before the change: no ``on_demand``."""

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri, **options)
        self.on_demand = False


def write_video(path: Path, frames: int, seed: int) -> Path:
    """A textured MJPG video whose content moves every frame (so decoding is realistic)."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (HEIGHT, WIDTH * 2, 3), dtype=np.uint8)
    texture = cv2.GaussianBlur(texture, (0, 0), 3)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (WIDTH, HEIGHT))
    for i in range(frames):
        shift = (7 * i) % WIDTH
        writer.write(np.ascontiguousarray(texture[:, shift : shift + WIDTH]))
    writer.release()
    return path


def run_mode(mode: str, videos: list[Path], fps: float, seconds: float) -> dict[str, Any]:
    """Read the videos for ``seconds`` at ``fps`` frame sets per second; CPU and counts."""
    kind = FlatOutFileSource if mode == "flat_out" else FileSource
    config = CaptureConfig()
    readers = [
        CameraReader(f"cam{i}", lambda v=video: kind(str(v), loop=True), config, finite=True)
        for i, video in enumerate(videos)
    ]
    capture = Capture(readers)
    assembler = FrameSetAssembler(capture, max_age_s=0.25)
    ticker, stop = Ticker(fps), threading.Event()
    with capture:
        while any(s.frame is None for s in capture.snapshots()):  # measure the steady state
            time.sleep(0.01)
        cpu0, wall0 = time.process_time(), time.monotonic()
        framesets = complete = 0
        while time.monotonic() - wall0 < seconds and ticker.wait(stop):
            frame_set = assembler.assemble()
            framesets += 1
            complete += all(view.frame is not None for view in frame_set.views)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        snapshots = capture.snapshots()
    return {
        "mode": mode,
        "cameras": len(videos),
        "fps": fps,
        "seconds": round(wall, 2),
        "cpu_cores": round(cpu / wall, 3),
        "cpu_ms_per_frameset": round(1e3 * cpu / max(1, framesets), 2),
        "framesets": framesets,
        "complete_framesets": complete,
        "decoded_per_camera_per_s": round(
            sum(s.frames for s in snapshots) / len(snapshots) / wall, 1
        ),
        "dropped": sum(s.dropped for s in snapshots),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cameras", type=int, default=3)
    parser.add_argument("--fps", type=float, default=30.0, help="frame sets per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per mode")
    parser.add_argument("--frames", type=int, default=150, help="frames per video (looped)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/file_on_demand.json"))
    args = parser.parse_args()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        videos = [
            write_video(Path(tmp) / f"cam{i}.avi", args.frames, i) for i in range(args.cameras)
        ]
        rows = [run_mode(mode, videos, args.fps, args.seconds) for mode in MODES]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "results": rows,
                "frame_size": [WIDTH, HEIGHT],
                "codec": "MJPG",
                "cpus": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            },
            indent=2,
        )
        + "\n"
    )
    columns = list(rows[0])
    print(" | ".join(columns))
    print(" | ".join("---" for _ in columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
