"""Frame sets: newest fresh frame per camera, stale and failed cameras, timestamps, the ticker."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fake_clock import FakeClock
from test_capture import FAST, Opener, ScriptedCamera, wait_for

from mvld.common.errors import ConfigError
from mvld.edge.capture import DISCONNECTED, CameraReader, Capture
from mvld.edge.framesets import STALE, FrameSetAssembler, Ticker
from mvld.edge.sources import SourceError


def test_fresh_frames_are_taken_and_slow_cameras_are_stale() -> None:
    fast = CameraReader("cam0", Opener(lambda _: ScriptedCamera("fast", fps=100)), FAST)
    slow = CameraReader("cam1", Opener(lambda _: ScriptedCamera("slow", fps=4)), FAST)
    capture = Capture([fast, slow]).start()
    try:
        wait_for(lambda: all(s.frames > 0 for s in capture.snapshots()))
        assembler = FrameSetAssembler(capture, max_age_s=0.1)
        frame_sets = []
        for _ in range(40):
            frame_sets.append(assembler.assemble())
            time.sleep(0.02)
    finally:
        capture.stop()
    assert [fs.seq for fs in frame_sets] == list(range(40))
    fast_views = [fs.views[0] for fs in frame_sets]
    slow_views = [fs.views[1] for fs in frame_sets]
    assert all(v.frame is not None and v.problem is None for v in fast_views)
    assert sum(v.problem == STALE for v in slow_views) >= 20  # a 4 FPS frame is fresh 0.1 s
    assert any(v.frame is not None for v in slow_views)
    for frame_set in frame_sets:
        for view in frame_set.views:
            if view.frame is not None:  # per-view capture time, never older than the bound
                assert view.capture_time == view.frame.timestamp
                assert frame_set.time - view.capture_time < 0.1 + 0.05
            else:
                assert view.capture_time is None


def test_a_frame_is_new_only_in_the_first_frame_set_that_takes_it() -> None:
    reader = CameraReader("cam0", Opener(lambda _: ScriptedCamera(fps=5)), FAST)
    capture = Capture([reader]).start()
    try:
        wait_for(lambda: reader.snapshot().frames > 0)
        assembler = FrameSetAssembler(capture, max_age_s=1.0)
        views = [assembler.assemble().views[0] for _ in range(3)]
    finally:
        capture.stop()
    indices = [v.frame.index for v in views]
    assert indices[0] == indices[1] == indices[2]  # 5 FPS: the same frame three times
    assert [v.new for v in views] == [True, False, False]


def test_a_failed_camera_reports_the_source_reason_not_just_stale() -> None:
    def make(attempt: int) -> ScriptedCamera:
        if attempt > 1:
            raise SourceError("no such device")
        return ScriptedCamera(raise_at=10)  # read error after 9 frames, then gone

    reader = CameraReader("cam0", Opener(make), FAST)
    never = CameraReader(
        "cam1", Opener(lambda _: (_ for _ in ()).throw(SourceError("absent"))), FAST
    )
    capture = Capture([reader, never]).start()
    try:
        wait_for(lambda: reader.snapshot().reason == DISCONNECTED)
        time.sleep(0.15)
        views = FrameSetAssembler(capture, max_age_s=0.1).assemble().views
    finally:
        capture.stop()
    assert views[0].frame is None and views[0].problem == DISCONNECTED
    assert views[0].ever_delivered
    assert views[1].problem == DISCONNECTED and not views[1].ever_delivered


def test_sim_cameras_in_one_frame_set_show_the_same_moment() -> None:
    capture = Capture.from_uris([f"sim://{i}?fps=20&size=32" for i in range(3)], FAST).start()
    try:
        wait_for(lambda: all(s.frames > 2 for s in capture.snapshots()), 5.0)
        assembler = FrameSetAssembler(capture, max_age_s=0.2)
        same = 0
        for _ in range(10):
            views = assembler.assemble().views
            ticks = {v.frame.index for v in views if v.frame is not None}
            same += len(ticks) == 1
            time.sleep(0.05)
    finally:
        capture.stop()
    assert same >= 7  # readers pick up a new tick within a few ms of each other


def test_ticker_keeps_the_rate_and_skips_instead_of_bursting() -> None:
    stop, clock = threading.Event(), FakeClock()
    ticker = Ticker(50.0, clock)
    ticks = [clock.now() for _ in range(20) if ticker.wait(stop)]
    assert np.diff(ticks) == pytest.approx([0.02] * 19)  # on the grid, every period
    clock.advance(0.2 + 0.005)  # the loop fell ten ticks behind
    late = clock.now()
    assert ticker.wait(stop) and clock.now() == late  # the late tick at once ...
    assert ticker.skipped == 9  # ... and the other nine dropped, not burst
    assert ticker.wait(stop)
    assert clock.now() - ticks[0] == pytest.approx(0.60)  # back on the grid
    assert clock.now() - late == pytest.approx(0.015)


def test_ticker_waits_without_cpu_on_the_real_clock() -> None:
    stop, ticker = threading.Event(), Ticker(50.0)
    cpu, started = time.process_time(), time.monotonic()
    for _ in range(10):
        assert ticker.wait(stop)
    assert time.monotonic() - started >= 0.17  # nine periods of real time went by
    assert time.process_time() - cpu < 0.1  # waiting costs no CPU


def test_ticker_returns_false_once_stopped_and_bad_rates_are_refused() -> None:
    stop = threading.Event()
    ticker = Ticker(2.0)
    assert ticker.wait(stop)
    threading.Timer(0.05, stop.set).start()
    started = time.monotonic()
    assert not ticker.wait(stop)
    assert time.monotonic() - started < 0.3
    with pytest.raises(ConfigError):
        Ticker(0)
    with pytest.raises(ConfigError):
        FrameSetAssembler(Capture([CameraReader("c", Opener(lambda _: ScriptedCamera()))]), 0)
