"""Frame sources: the registry, file sources (video, image folder), synchronised sim:// cameras."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from mvld.common.errors import ConfigError
from mvld.edge.sources import (
    EndOfStream,
    Frame,
    FrameSource,
    SourceError,
    open_source,
    register_source,
    registered_schemes,
    scheme_of,
)
from mvld.edge.sources.files import FileSource

H, W = 24, 32


def _write_video(path: Path, frames: int, fps: float = 25.0) -> None:
    """An MJPG video whose frame i is uniformly grey at level 20 * i."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((H, W, 3), 20 * i, np.uint8))
    writer.release()


def _levels(source: FrameSource, count: int) -> list[int]:
    return [round(float(source.read(1.0).image.mean()) / 20) for _ in range(count)]


def test_scheme_parsing_and_unknown_schemes_list_the_valid_ones() -> None:
    assert scheme_of("sim://2") == "sim"
    assert scheme_of("/data/cam0.mp4") == "file" and scheme_of("file:///x") == "file"
    assert scheme_of("0") == "device"
    assert {"file", "sim"} <= set(registered_schemes())
    with pytest.raises(ConfigError, match=r"unknown source scheme 'ftp'; valid: .*file.*rtsp.*sim"):
        open_source("ftp://camera.local/stream")


def test_duplicate_registration_and_unknown_options_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register_source("sim", FileSource)
    _write_video(tmp_path / "v.avi", 3)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['speed'\].*valid: \['fps'"):
        open_source(str(tmp_path / "v.avi"), speed=2)
    with pytest.raises(ConfigError, match="unknown option"):
        open_source("sim://0?colour=red")


def test_video_file_frames_in_order_then_end_of_stream(tmp_path: Path) -> None:
    video = tmp_path / "cam.avi"
    _write_video(video, 5)
    with open_source(f"file://{video}") as source:
        assert isinstance(source, FrameSource)
        frame = source.read(1.0)
        assert isinstance(frame, Frame) and frame.image.shape == (H, W, 3)
        assert frame.image.dtype == np.uint8 and frame.index == 0
        assert frame.camera == f"file://{video}" and abs(frame.timestamp - time.time()) < 5
        assert _levels(source, 4) == [1, 2, 3, 4]
        with pytest.raises(EndOfStream):
            source.read(1.0)
    with pytest.raises(SourceError, match="closed"):
        source.read(1.0)


def test_loop_and_image_folder_in_natural_order(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in (10, 2, 1):  # natural order: 1, 2, 10
        cv2.imwrite(str(folder / f"f{i}.png"), np.full((H, W, 3), 20 * i, np.uint8))
    (folder / "notes.txt").write_text("ignored: not an image")
    with open_source(str(folder), loop=True) as source:
        assert _levels(source, 7) == [1, 2, 10, 1, 2, 10, 1]
    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "absent.mp4"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="not a video"):
        open_source(str(tmp_path / "notes.txt"))


def test_realtime_pacing_follows_the_video_rate(tmp_path: Path) -> None:
    video = tmp_path / "cam.avi"
    _write_video(video, 6, fps=25.0)
    with open_source(str(video), realtime=True) as source:
        start = time.monotonic()
        for _ in range(6):
            source.read(1.0)
        elapsed = time.monotonic() - start
    assert 0.18 <= elapsed < 0.6  # 5 frame periods of 40 ms


def test_sim_cameras_are_synchronised_views_of_one_moving_scene() -> None:
    cameras = [open_source(f"sim://{v}?realtime=false&seed=4") for v in range(3)]
    try:
        sets = []
        for _ in range(4):
            frames = [camera.read(1.0) for camera in cameras]
            assert len({f.index for f in frames}) == 1, "one tick for every camera"
            assert len({f.timestamp for f in frames}) == 1
            assert not np.array_equal(frames[0].image, frames[1].image), "different viewpoints"
            sets.append(frames)
        assert [s[0].index for s in sets] == [0, 1, 2, 3]
        assert sets[3][0].timestamp - sets[0][0].timestamp == pytest.approx(0.3)
        for v in range(3):
            assert not np.array_equal(sets[0][v].image, sets[3][v].image), "the scene moves"
    finally:
        for camera in cameras:
            camera.close()


def test_sim_scene_is_shared_and_released() -> None:
    from mvld.sim import source as sim

    first = open_source("sim://0?realtime=false&seed=9&size=32")
    second = open_source("sim://1", realtime=False, seed=9, size=32)
    assert len(sim._scenes) == 1
    assert first.read(1.0).image.shape == (32, 32, 3)
    first.close()
    assert second.read(1.0).index == 0  # same scene still alive for the other camera
    second.close()
    assert sim._scenes == {}
    with pytest.raises(ConfigError, match=r"camera 5 outside 0\.\.2"):
        open_source("sim://5")
    with pytest.raises(ConfigError, match="bad value"):
        open_source("sim://0?fps=fast")


def test_sim_realtime_paces_at_fps_and_times_out() -> None:
    with open_source("sim://0", fps=20.0, seed=1) as camera:
        start = time.monotonic()
        indices = [camera.read(1.0).index for _ in range(5)]
        elapsed = time.monotonic() - start
    assert indices == [0, 1, 2, 3, 4] and 0.15 <= elapsed < 0.6
    with open_source("sim://0", fps=0.5, seed=2) as slow:
        assert slow.read(1.0) is not None
        assert slow.read(0.05) is None  # the next tick is 2 s away


def test_recording_gives_up_when_no_camera_delivers(tmp_path: Path) -> None:
    from mvld.edge.sources.record import RecordJob, record_dataset

    job = RecordJob(
        uris=("sim://0?fps=0.1&seed=3",),
        out=tmp_path / "rec",
        frames=5,
        timeout_s=0.05,
        idle_limit_s=0.3,
    )
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"no camera delivered a frame for 0.3 s; recorded 1"):
        record_dataset(job)
    assert time.monotonic() - start < 3
