"""Capture: newest-frame readers, the watchdog, reopen with back-off, replug, camera URIs.

The misbehaving cameras here are real FrameSource implementations (a healthy synthetic
camera wrapped to hang, raise or refuse to open on cue), run by the real reader threads and
watchdog; the healthy neighbours are real file and sim:// sources.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from fake_clock import FakeClock

from mvld.common.clock import MONOTONIC, Clock
from mvld.common.errors import ConfigError
from mvld.common.wire import REASONS_BY_STATUS, ViewStatus
from mvld.edge.capture import (
    DISCONNECTED,
    END_OF_STREAM,
    ENDED,
    READ_ERROR,
    STREAMING,
    TIMEOUT,
    CameraReader,
    Capture,
    CaptureConfig,
)
from mvld.edge.health import SOURCE_REASONS
from mvld.edge.sources import EndOfStream, Frame, SourceError, open_source, registered_schemes
from mvld.edge.sources.camera import (
    CameraSpec,
    OpenCVCamera,
    camera_spec,
    csi_pipeline,
    redact,
)
from mvld.edge.sources.files import FileSource

FAST = CaptureConfig(
    read_timeout_s=0.05, watchdog_s=0.3, stall_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.4
)


class ScriptedCamera:
    """A 30 FPS synthetic camera whose n-th read can hang, raise or end (the fault script)."""

    def __init__(
        self,
        uri: str = "scripted",
        hang_at: int | None = None,
        raise_at: int | None = None,
        end_at: int | None = None,
        release: threading.Event | None = None,
        fps: float = 100.0,
    ) -> None:
        self.uri = uri
        self.hang_at, self.raise_at, self.end_at = hang_at, raise_at, end_at
        self.release = release or threading.Event()
        self.period = 1.0 / fps
        self.reads = 0
        self.closed = False

    def read(self, timeout_s: float = 1.0) -> Frame | None:
        if self.closed:
            raise SourceError("closed")
        self.reads += 1
        if self.reads == self.hang_at:
            self.release.wait()  # a driver call that never returns (until the test ends)
        if self.reads == self.raise_at:
            raise SourceError("USB read error")
        if self.reads == self.end_at:
            raise EndOfStream("end")
        time.sleep(self.period)
        image = np.full((24, 32, 3), self.reads % 256, np.uint8)
        return Frame(image, self.uri, time.time(), self.reads)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> ScriptedCamera:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Opener:
    """Opens a fresh camera per call from ``make(attempt)``; records when each call came."""

    def __init__(self, make: Callable[[int], ScriptedCamera], clock: Clock = MONOTONIC) -> None:
        self.make, self.clock = make, clock
        self.times: list[float] = []

    def __call__(self) -> ScriptedCamera:
        self.times.append(self.clock.now())
        return self.make(len(self.times))


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def write_video(path: Path, frames: int, size: tuple[int, int] = (48, 64)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, size[::-1])
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((*size, 3), (7 * i) % 256, np.uint8))
    writer.release()
    return path


def test_reader_keeps_the_newest_frame_and_counts_the_ones_nobody_took() -> None:
    reader = CameraReader("cam0", Opener(lambda _: ScriptedCamera()), FAST)
    reader.start()
    try:
        wait_for(lambda: reader.snapshot().frames >= 10)
        time.sleep(0.1)
        first = reader.snapshot(take=True)
        assert first.state == STREAMING and first.reason is None
        assert first.frame is not None and first.frame.index == first.frames
        assert first.dropped >= first.frames - 2  # nobody took them before
        wait_for(lambda: reader.snapshot().frames > first.frames)
        later = reader.snapshot()
        assert later.frame.index > first.frame.index
    finally:
        reader.stop()


def test_stuck_read_is_abandoned_and_reopened_while_other_cameras_stream(tmp_path: Path) -> None:
    release = threading.Event()
    stuck = Opener(
        lambda attempt: ScriptedCamera(hang_at=5 if attempt == 1 else None, release=release)
    )
    video = write_video(tmp_path / "cam1.avi", 30)
    healthy = CameraReader("cam1", lambda: FileSource(str(video), loop=True, realtime=True), FAST)
    capture = Capture([CameraReader("cam0", stuck, FAST), healthy]).start()
    try:
        wait_for(lambda: capture.readers[0].snapshot().reason == TIMEOUT, 3.0)
        hung_at = time.monotonic()
        frames_during = healthy.snapshot().frames
        wait_for(lambda: len(stuck.times) >= 2, 3.0)  # reopened after the back-off
        wait_for(lambda: capture.readers[0].snapshot().reason is None, 3.0)
        snap = capture.readers[0].snapshot()
        assert snap.abandoned == 1 and snap.reopens == 1 and snap.state == STREAMING
        assert stuck.times[1] - hung_at < 1.0
        # The other camera never stalled while cam0 hung.
        assert healthy.snapshot().frames > frames_during
        assert healthy.snapshot().reason is None
    finally:
        release.set()
        capture.stop()


def test_stuck_open_is_abandoned_too() -> None:
    release = threading.Event()

    def make(attempt: int) -> ScriptedCamera:
        if attempt == 1:
            release.wait()  # e.g. the Jetson camera daemon hangs on open
        return ScriptedCamera()

    opener = Opener(make)
    reader = CameraReader("cam0", opener, FAST)
    capture = Capture([reader]).start()  # the watchdog thread belongs to Capture
    try:
        wait_for(lambda: reader.snapshot().abandoned == 1, 3.0)
        wait_for(lambda: reader.snapshot().frames > 0, 3.0)
        assert len(opener.times) == 2
    finally:
        release.set()
        capture.stop()


def test_a_driver_that_always_hangs_leaves_a_bounded_number_of_threads() -> None:
    release = threading.Event()
    opener = Opener(
        lambda attempt: ScriptedCamera(hang_at=1 if attempt <= 2 else None, release=release)
    )
    config = CaptureConfig(**{**FAST.__dict__, "max_stuck_threads": 2})
    reader = CameraReader("cam0", opener, config)
    capture = Capture([reader]).start()
    try:
        wait_for(lambda: reader.snapshot().abandoned == 2, 3.0)
        time.sleep(1.0)  # several back-off periods: no third thread is sent into the driver
        assert len(opener.times) == 2 and reader.snapshot().reason == TIMEOUT
        release.set()  # the driver lets go: the stuck threads exit, the camera comes back
        wait_for(lambda: reader.snapshot().frames > 0, 3.0)
        assert len(opener.times) == 3
    finally:
        release.set()
        capture.stop()


def test_failed_opens_back_off_exponentially_then_replug_resumes() -> None:
    plugged, clock = threading.Event(), FakeClock()

    def make(attempt: int) -> ScriptedCamera:
        if attempt <= 5:
            raise SourceError("/dev/video0: no such device")
        plugged.wait(5.0)  # the sixth open finds the camera once it is plugged back in
        return ScriptedCamera()

    opener = Opener(make, clock)
    reader = CameraReader("cam0", opener, FAST, clock=clock)
    reader.start()
    try:
        wait_for(lambda: len(opener.times) == 6, 5.0)
        snap = reader.snapshot()
        assert snap.reason == DISCONNECTED and snap.frames == 0
        # doubling from backoff_initial_s, capped at backoff_max_s, exactly on the clock
        assert np.diff(opener.times) == pytest.approx([0.05, 0.10, 0.20, 0.40, 0.40])
        plugged.set()
        wait_for(lambda: reader.snapshot().frames > 3, 3.0)
        assert reader.snapshot().reason is None and reader.snapshot().state == STREAMING
    finally:
        plugged.set()
        reader.stop()


def test_a_dead_camera_waits_out_its_back_off_without_cpu() -> None:
    def make(attempt: int) -> ScriptedCamera:
        raise SourceError("/dev/video0: no such device")

    opener = Opener(make)
    reader = CameraReader("cam0", opener, FAST)
    cpu_before, started = time.process_time(), time.monotonic()
    reader.start()
    try:
        wait_for(lambda: len(opener.times) >= 5, 5.0)
        time.sleep(0.5)
        # the back-off is slept in Event.wait: a second of retries costs almost no CPU
        assert time.monotonic() - started >= 0.75 + 0.5
        assert time.process_time() - cpu_before < 0.25
    finally:
        reader.stop()


def test_read_error_and_silent_stall_reopen_the_source() -> None:
    erroring = Opener(lambda attempt: ScriptedCamera(raise_at=3 if attempt == 1 else None))
    silent = Opener(lambda attempt: SilentCamera() if attempt == 1 else ScriptedCamera())
    capture = Capture(
        [CameraReader("cam0", erroring, FAST), CameraReader("cam1", silent, FAST)]
    ).start()
    try:
        wait_for(lambda: len(erroring.times) == 2 and len(silent.times) == 2, 3.0)
        wait_for(lambda: all(s.frames > 0 and s.reason is None for s in capture.snapshots()), 3.0)
        assert [s.reopens for s in capture.snapshots()] == [1, 1]
    finally:
        capture.stop()


def test_an_unexpected_exception_from_a_driver_does_not_kill_the_reader() -> None:
    def make(attempt: int) -> ScriptedCamera:
        if attempt == 1:
            raise RuntimeError("driver bug")  # not a SourceError: a foreign driver's exception
        return ScriptedCamera()

    opener = Opener(make)
    reader = CameraReader("cam0", opener, FAST)
    reader.start()
    try:
        wait_for(lambda: reader.snapshot().frames > 0, 3.0)
        assert len(opener.times) == 2
    finally:
        reader.stop()


class SilentCamera(ScriptedCamera):
    """Opens fine, then never delivers (GStreamer after an unplug: no error, no frames)."""

    def read(self, timeout_s: float = 1.0) -> Frame | None:
        time.sleep(timeout_s)
        return None


def test_reason_codes_are_the_health_and_wire_vocabulary() -> None:
    reasons = {TIMEOUT, DISCONNECTED, READ_ERROR, END_OF_STREAM}
    assert reasons <= set(SOURCE_REASONS)
    assert reasons <= {code.value for code in REASONS_BY_STATUS[ViewStatus.FAILED]}


def test_end_of_a_file_ends_the_camera_unless_reopening_is_asked_for(tmp_path: Path) -> None:
    video = write_video(tmp_path / "short.avi", 5)
    ended = CameraReader("cam0", lambda: FileSource(str(video)), FAST)
    again = Opener(lambda _: ScriptedCamera(end_at=3))
    reopening = CameraReader(
        "cam1", again, CaptureConfig(**{**FAST.__dict__, "reopen_ended": True})
    )
    capture = Capture([ended, reopening]).start()
    try:
        # taking frames as a node does: a file without realtime is read on demand
        wait_for(lambda: ended.snapshot(take=True).state == ENDED, 3.0)
        assert ended.snapshot().reason == END_OF_STREAM and ended.snapshot().frames == 5
        wait_for(lambda: len(again.times) >= 2, 3.0)
        time.sleep(0.2)
        assert ended.snapshot().reopens == 0
    finally:
        capture.stop()


def test_stop_ends_every_thread_quickly(tmp_path: Path) -> None:
    capture = Capture.from_uris(["sim://0?fps=30&size=32", "sim://1?fps=30&size=32"], FAST)
    capture.start()
    wait_for(lambda: all(s.frames > 2 for s in capture.snapshots()), 5.0)
    started = time.monotonic()
    capture.stop()
    assert time.monotonic() - started < 1.0
    threads = [t.name for t in threading.enumerate() if t.name.startswith("capture-")]
    assert threads == []


def test_capture_refuses_unknown_schemes_and_duplicate_ids() -> None:
    with pytest.raises(ConfigError, match="unknown source scheme 'ftp'"):
        Capture.from_uris(["ftp://x/y"])
    reader = CameraReader("cam0", Opener(lambda _: ScriptedCamera()))
    with pytest.raises(ConfigError, match="unique"):
        Capture([reader, reader])
    with pytest.raises(ConfigError, match="watchdog"):
        CaptureConfig(read_timeout_s=2.0, watchdog_s=1.0)


# -- camera URIs -------------------------------------------------------------------------------


def test_camera_uris_parse_into_opencv_targets() -> None:
    assert camera_spec("0").target == 0 and camera_spec("0").api == cv2.CAP_ANY
    v4l2 = camera_spec("v4l2:///dev/video2?width=640&height=480")
    assert v4l2.target == 2 and v4l2.api == cv2.CAP_V4L2
    assert (cv2.CAP_PROP_FRAME_WIDTH, 640.0) in v4l2.properties
    assert (cv2.CAP_PROP_BUFFERSIZE, 1.0) in v4l2.properties  # newest frame, no backlog
    csi = camera_spec("csi://1", width=1920, height=1080, fps=60, flip=2)
    assert csi.api == cv2.CAP_GSTREAMER and csi.target == csi_pipeline(1, 1920, 1080, 60, 2)
    assert csi.target.startswith("nvarguscamerasrc sensor-id=1 ! ")
    assert "framerate=(fraction)60/1" in csi.target and "flip-method=2" in csi.target
    assert csi.target.endswith("appsink drop=true max-buffers=1 sync=false")
    rtsp = camera_spec("rtsp://user:pw@cam.local:554/live?channel=1", timeout_ms=2000)
    assert rtsp.target == "rtsp://user:pw@cam.local:554/live?channel=1"
    assert rtsp.api == cv2.CAP_FFMPEG
    assert rtsp.params == (
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        2000,
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        2000,
    )
    assert rtsp.describe() == "rtsp://user:***@cam.local:554/live?channel=1"
    assert redact("rtsp://cam.local/live") == "rtsp://cam.local/live"


@pytest.mark.parametrize(
    "uri, options, match",
    [
        ("v4l2://video0", {}, "v4l2:///dev/videoN"),
        ("csi://front", {}, "sensor number"),
        ("0", {"exposure": 3}, "unknown option"),
        ("csi://0?width=wide", {}, "must be an int"),
        ("http://cam/x", {}, "not a camera URI"),
    ],
)
def test_bad_camera_uris_are_config_errors(uri: str, options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        camera_spec(uri, **options)


def test_missing_device_is_a_source_error_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(SourceError, match="cannot open"):
        OpenCVCamera(camera_spec("v4l2:///dev/video63"))
    assert time.monotonic() - started < 2.0


def test_opencv_camera_reads_rgb_frames_and_fails_at_the_end(tmp_path: Path) -> None:
    """The OpenCV read path on a real stream (a video through FFmpeg, as rtsp:// uses)."""
    video = write_video(tmp_path / "stream.avi", 4)
    spec = CameraSpec(
        "rtsp-like", str(video), cv2.CAP_FFMPEG, (cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 2000)
    )
    with OpenCVCamera(spec) as camera:
        frames = [camera.read() for _ in range(4)]
        with pytest.raises(SourceError, match="read failed"):
            camera.read()
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert frames[0].image.shape == (48, 64, 3) and frames[0].image.dtype == np.uint8
    assert abs(float(frames[2].image.mean()) - 14) < 4  # grey level 7 * 2, MJPG-compressed


def test_camera_schemes_are_registered_with_open_source() -> None:
    """``open_source`` knows every camera scheme, and a missing device is a clear source error."""
    assert {"device", "v4l2", "csi", "rtsp"} <= set(registered_schemes())
    with pytest.raises(SourceError):
        open_source("v4l2:///dev/video63")
