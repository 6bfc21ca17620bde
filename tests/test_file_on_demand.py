"""Issue 17, item 8: a file read with ``--no-realtime`` decodes only the frames that are used.

Before, the reader decoded the file flat out and dropped what the node did not take (3.2x the
CPU at 30 FPS). A ``FileSource`` without ``realtime`` says ``on_demand``; its camera reader
reads the next frame only once the previous one was taken, and a frame waiting for its taker
is not reported stale.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np

from mvld.edge.capture import CameraReader, CaptureConfig
from mvld.edge.sources.base import reads_on_demand
from mvld.edge.sources.files import FileSource

FAST = CaptureConfig(
    read_timeout_s=0.05, watchdog_s=0.3, stall_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.4
)


def _video(path: Path, frames: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (32, 24))
    for i in range(frames):
        writer.write(np.full((24, 32, 3), (5 * i) % 256, np.uint8))
    writer.release()
    return path


def test_only_paced_files_keep_the_newest_frame(tmp_path: Path) -> None:
    video = _video(tmp_path / "cam.avi", 4)
    with (
        FileSource(str(video), realtime=False) as unpaced,
        FileSource(str(video), realtime=True) as paced,
    ):
        assert reads_on_demand(unpaced) and not reads_on_demand(paced)


def test_a_reader_decodes_only_the_frames_taken_and_they_never_go_stale(tmp_path: Path) -> None:
    video = _video(tmp_path / "cam.avi", 60)
    reader = CameraReader("cam0", lambda: FileSource(str(video), realtime=False), FAST)
    reader.start()
    try:
        deadline = time.monotonic() + 10
        while reader.snapshot().frame is None:
            assert time.monotonic() < deadline, "no first frame"
            time.sleep(0.01)
        indices = []
        for _ in range(5):
            time.sleep(0.1)  # a slow node: 10 frame sets per second
            taken_at = time.time()
            snapshot = reader.snapshot(take=True)
            assert snapshot.received is not None
            assert time.monotonic() - snapshot.received < 0.05, "a waiting frame counts as fresh"
            assert snapshot.frame.timestamp >= taken_at, "stamped when taken, not when decoded"
            indices.append(snapshot.frame.index)
        time.sleep(0.3)
        frames = reader.snapshot().frames
    finally:
        reader.stop()
    assert indices == [0, 1, 2, 3, 4], "every frame read was used, in order"
    assert frames <= 6, f"{frames} frames decoded for 5 taken"  # flat out: all 60
