"""Camera health monitor: every fault found with the right reason, hysteresis, no false alarms.

Streams are real frames at 640x480: a synthetic textured scene with moving objects, lighting
drift and fresh sensor noise (``SyntheticCamera``), faults injected as a field camera shows
them (``mvld.sim.faults``). Timing is measured by ``bench/bench_health.py``, not here.
"""

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from mvld.common.errors import ConfigError
from mvld.common.wire import REASONS_BY_STATUS, ViewStatus
from mvld.edge.health import (
    ANALYSIS_SIZE,
    FAILED,
    FAILED_REASONS,
    OBSTRUCTED,
    OBSTRUCTED_REASONS,
    OK,
    HealthConfig,
    HealthMonitor,
    downscale,
    noise_sigma,
)
from mvld.sim.faults import (
    FAULTS,
    FULL_FAULTS,
    Dirt,
    Frozen,
    Occlusion,
    SyntheticCamera,
    accepted_reasons,
    add_sensor_noise,
    expected_reason,
    make_fault,
)

CONFIG = HealthConfig()
WARMUP = 40


def warmed_up(seed: int = 0, **camera_options) -> tuple[SyntheticCamera, HealthMonitor, int]:
    """A camera and a monitor that has learned the camera's reference."""
    camera = SyntheticCamera(seed=seed, **camera_options)
    monitor = HealthMonitor(CONFIG, camera=f"cam{seed}")
    for index in range(WARMUP):
        assert monitor.update(camera.read(), index / 30).state == OK
    assert monitor.reference is not None
    return camera, monitor, WARMUP


def confirm_frames(reason: str) -> int:
    """The confirmation window of a reason."""
    if reason in FAILED_REASONS:
        return CONFIG.confirm_failed_frames
    return CONFIG.confirm_obstructed_frames


# Partial faults a monitor must still catch on this textured scene (the benchmark reports the
# weaker ones: blur_2, dirt, shift_10).
DETECTED = [*FULL_FAULTS, "occlusion_30", "occlusion_60", "blur_4"]


@pytest.mark.parametrize("fault", DETECTED)
def test_fault_detected_with_its_reason_within_the_confirmation_window(fault: str) -> None:
    camera, monitor, index = warmed_up(seed=3)
    injector = make_fault(fault, np.random.default_rng(7))
    states = []
    for step in range(CONFIG.confirm_obstructed_frames + 5):
        health = monitor.update(injector.apply(camera.read()), (index + step) / 30)
        states.append(health.state)
    assert health.reason in accepted_reasons(fault)
    assert health.state == (FAILED if health.reason in FAILED_REASONS else OBSTRUCTED)
    # A frozen stream's first frame is new; the repeats start with the second.
    window = confirm_frames(health.reason) + (1 if fault == "frozen" else 0)
    first = next(step for step, state in enumerate(states) if state != OK)
    assert first == window - 1, f"{fault}: declared at frame {first}, window {window}"
    assert health.since == pytest.approx((index + first) / 30)
    assert not health.usable


def test_heavy_dirt_is_reported_dirty() -> None:
    camera, monitor, index = warmed_up(seed=5)
    injector = Dirt(np.random.default_rng(1), blobs=30)
    # The short-term texture average needs a few frames to fall, then the window runs.
    for step in range(CONFIG.confirm_obstructed_frames + 15):
        health = monitor.update(injector.apply(camera.read()), (index + step) / 30)
    assert (health.state, health.reason) == (OBSTRUCTED, "dirty")


def test_fault_clears_only_after_the_clearing_window() -> None:
    camera, monitor, index = warmed_up(seed=1)
    injector = make_fault("occlusion_60", np.random.default_rng(0))
    for _ in range(20):
        health = monitor.update(injector.apply(camera.read()), index / 30)
        index += 1
    assert (health.state, health.reason) == (OBSTRUCTED, "occluded")
    states = []
    for _ in range(CONFIG.clear_frames + 5):
        states.append(monitor.update(camera.read(), index / 30).state)
        index += 1
    assert states[: CONFIG.clear_frames - 1] == [OBSTRUCTED] * (CONFIG.clear_frames - 1)
    assert states[CONFIG.clear_frames - 1 :] == [OK] * 6
    assert monitor.health().since == pytest.approx((index - 6) / 30)


def test_a_glitch_shorter_than_the_confirmation_window_is_never_declared() -> None:
    camera, monitor, index = warmed_up(seed=2)
    black = make_fault("black", np.random.default_rng(0))
    for step in range(60):
        frame = camera.read()
        glitch = step % 20 < CONFIG.confirm_failed_frames - 1  # 4 black frames out of 20
        health = monitor.update(black.apply(frame) if glitch else frame, (index + step) / 30)
        assert health.state == OK, f"frame {step}"


def test_a_persistent_fault_that_changes_kind_changes_reason() -> None:
    camera, monitor, index = warmed_up(seed=4)
    for fault in ("occlusion_60", "black"):
        injector = make_fault(fault, np.random.default_rng(0))
        for _ in range(15):
            health = monitor.update(injector.apply(camera.read()), index / 30)
            index += 1
        assert health.reason == expected_reason(fault)


def test_no_alarm_on_a_long_healthy_noisy_stream_with_lighting_drift() -> None:
    camera = SyntheticCamera(seed=11, lighting_amplitude=0.25, lighting_period=600, noise_sigma=4.0)
    monitor = HealthMonitor(CONFIG)
    for index in range(1000):
        health = monitor.update(camera.read(), index / 30)
        assert health.state == OK, f"frame {index}: {health}"
    assert health.confidence == 1.0


def test_no_alarm_on_a_healthy_stream_through_a_real_video_file(tmp_path: Path) -> None:
    path = tmp_path / "healthy.mp4"
    camera = SyntheticCamera(seed=12)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (640, 480))
    assert writer.isOpened()
    for _ in range(400):
        writer.write(cv2.cvtColor(camera.read(), cv2.COLOR_RGB2BGR))
    writer.release()
    capture = cv2.VideoCapture(str(path))
    monitor = HealthMonitor(CONFIG)
    frames = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        health = monitor.update(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), frames / 30)
        assert health.state == OK, f"frame {frames}: {health}"
        frames += 1
    assert frames == 400


def test_a_static_scene_with_sensor_noise_is_not_frozen() -> None:
    camera = SyntheticCamera(seed=6, moving_objects=0, lighting_amplitude=0.0)
    still = camera.read()
    monitor = HealthMonitor(CONFIG)
    rng = np.random.default_rng(0)
    for index in range(200):
        frame = add_sensor_noise(still, rng, sigma=1.0)  # fresh noise of one grey level
        assert monitor.update(frame, index / 30).state == OK, f"frame {index}"


def test_bit_identical_frames_are_frozen() -> None:
    camera, monitor, index = warmed_up(seed=6)
    held = camera.read()
    for step in range(CONFIG.confirm_failed_frames):
        health = monitor.update(held.copy(), (index + step) / 30)
        assert health.state == OK
    health = monitor.update(held.copy(), (index + 10) / 30)
    assert (health.state, health.reason) == (FAILED, "frozen")


def test_a_frozen_picture_with_codec_drift_is_frozen(tmp_path: Path) -> None:
    """A frozen camera through MPEG-4: each keyframe re-encodes the picture a little differently."""
    camera, monitor, index = warmed_up(seed=6)
    path = tmp_path / "frozen.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (640, 480))
    held = cv2.cvtColor(camera.read(), cv2.COLOR_RGB2BGR)
    for _ in range(60):
        writer.write(held)
    writer.release()
    capture = cv2.VideoCapture(str(path))
    states = []
    for step in range(60):
        ok, frame = capture.read()
        assert ok
        health = monitor.update(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), (index + step) / 30)
        states.append(health.state)
    assert (health.state, health.reason) == (FAILED, "frozen")
    assert states.index(FAILED) <= 2 * CONFIG.confirm_failed_frames


def test_frozen_injector_repeats_the_first_frame_bit_for_bit() -> None:
    camera = SyntheticCamera(seed=0, height=48, width=64)
    frozen = Frozen(np.random.default_rng(0))
    first = frozen.apply(camera.read())
    assert all(np.array_equal(first, frozen.apply(camera.read())) for _ in range(5))


def test_source_errors_are_declared_at_once_and_cleared_by_healthy_frames() -> None:
    camera, monitor, index = warmed_up(seed=8)
    health = monitor.report_source_error("disconnected", index / 30)
    assert (health.state, health.reason, health.since) == (FAILED, "disconnected", index / 30)
    for step in range(1, CONFIG.clear_frames + 1):
        health = monitor.update(camera.read(), (index + step) / 30)
    assert health.state == OK
    with pytest.raises(ConfigError, match="unknown source error"):
        monitor.report_source_error("on_fire", 0.0)


def test_no_frame_times_out_after_the_timeout_only() -> None:
    camera, monitor, index = warmed_up(seed=9)
    last = (index - 1) / 30
    assert monitor.update(None, last + CONFIG.timeout_s - 0.1).state == OK
    health = monitor.update(None, last + CONFIG.timeout_s + 0.1)
    assert (health.state, health.reason) == (FAILED, "timeout")
    for step in range(CONFIG.clear_frames):
        health = monitor.update(camera.read(), last + 3 + step / 30)
    assert health.state == OK


def test_a_camera_that_starts_black_learns_no_reference_from_it() -> None:
    camera = SyntheticCamera(seed=10)
    monitor = HealthMonitor(CONFIG)
    black = make_fault("black", np.random.default_rng(0))
    for index in range(30):
        health = monitor.update(black.apply(camera.read()), index / 30)
    assert (health.reason, monitor.reference) == ("black", None)
    for index in range(30, 30 + CONFIG.clear_frames + CONFIG.warmup_frames):
        health = monitor.update(camera.read(), index / 30)
    assert health.state == OK and monitor.reference is not None


def test_relearn_accepts_a_deliberately_re_aimed_camera() -> None:
    camera, monitor, index = warmed_up(seed=13)
    shift = make_fault("shift_25", np.random.default_rng(0))
    for _ in range(15):
        health = monitor.update(shift.apply(camera.read()), index / 30)
        index += 1
    assert health.reason == "redirected"
    monitor.relearn()
    for _ in range(CONFIG.clear_frames + CONFIG.warmup_frames + 30):
        health = monitor.update(shift.apply(camera.read()), index / 30)
        index += 1
    assert health.state == OK


@pytest.mark.parametrize("shape", [(64, 64, 3), (120, 160, 3), (720, 1280, 3), (481, 641, 3)])
def test_any_frame_size_is_judged_on_the_analysis_size(shape: tuple[int, int, int]) -> None:
    frame = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    assert downscale(frame).shape == (ANALYSIS_SIZE[1], ANALYSIS_SIZE[0], 3)
    assert HealthMonitor(CONFIG).update(frame, 0.0).state == OK  # one frame confirms nothing


def test_noise_estimate_follows_the_added_noise() -> None:
    flat = np.full((480, 640, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    for sigma in (3.0, 10.0):
        noisy = np.clip(flat + rng.normal(0, sigma, flat.shape), 0, 255).astype(np.uint8)
        assert noise_sigma(noisy) == pytest.approx(sigma, rel=0.25)


def test_bad_frames_and_configs_are_rejected() -> None:
    monitor = HealthMonitor(CONFIG)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        monitor.update(np.zeros((48, 64), np.uint8), 0.0)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        monitor.update(np.zeros((48, 64, 3), np.float32), 0.0)
    with pytest.raises(ConfigError, match="confirm_failed_frames"):
        HealthConfig(confirm_failed_frames=0)
    with pytest.raises(ConfigError, match="timeout_s"):
        HealthConfig(timeout_s=0)
    with pytest.raises(ConfigError, match="valid faults"):
        make_fault("gremlins", np.random.default_rng(0))


def test_reason_codes_are_the_wire_vocabulary() -> None:
    assert {ViewStatus(FAILED), ViewStatus(OBSTRUCTED), ViewStatus(OK)}
    assert set(FAILED_REASONS) <= {r.value for r in REASONS_BY_STATUS[ViewStatus.FAILED]}
    assert set(OBSTRUCTED_REASONS) <= {r.value for r in REASONS_BY_STATUS[ViewStatus.OBSTRUCTED]}
    for name in FAULTS:
        assert set(accepted_reasons(name)) <= set(FAILED_REASONS + OBSTRUCTED_REASONS)
        assert expected_reason(name) == accepted_reasons(name)[0]


@pytest.mark.parametrize("fraction", [0.3, 0.6, 1.0])
def test_occlusion_covers_the_requested_share_of_the_frame(fraction: float) -> None:
    frame = np.full((480, 640, 3), 255, np.uint8)
    occlusion = Occlusion(np.random.default_rng(3), fraction)
    occlusion.apply(frame)
    assert float(occlusion.mask.mean()) == pytest.approx(fraction, abs=0.02)


def _load_bench():
    """The benchmark script as a module (bench/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "bench" / "bench_health.py"
    spec = importlib.util.spec_from_file_location("bench_health", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_scorer_counts_delays_clearing_and_false_alarms() -> None:
    bench = _load_bench()
    scorer = bench.Scorer()
    timeline = (
        [(None, OK)] * 10  # healthy
        + [("black", OK)] * 4
        + [("black", FAILED)] * 6  # found after 4 frames
        + [(None, FAILED)] * 3
        + [(None, OK)] * 7  # cleared after 3 frames
        + [(None, OBSTRUCTED)] * 2
        + [(None, OK)] * 3  # one false alarm
        + [("blur_2", OK)] * 5  # missed
        + [(None, OK)] * 5
    )
    for label, state in timeline:
        scorer.add(label, state, None if state == OK else "some")
    black, blur = scorer.episodes
    assert (black["delay"], black["clear"]) == (4, 3)
    assert blur["delay"] is None
    assert sum(scorer.false_alarms.values()) == 1
    assert scorer.healthy_frames == 10 + 7 + 5 + 5
