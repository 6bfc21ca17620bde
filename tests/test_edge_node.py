"""The edge node end to end: real sources, a real ONNX encoder, a real ZeroMQ receiver socket.

Every message is received on a SUB socket bound on 127.0.0.1 and parsed with
``decode_frameset``. Faulty cameras are registered through the public ``register_source``:
a synthetic 30 FPS camera with a fault from ``mvld.sim.faults`` injected after N frames, and
one whose driver hangs.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pytest
from test_export_onnx import make_tiny_model

from mvld.common.errors import ConfigError
from mvld.common.keys import generate_keypair
from mvld.common.transport import CurveServerKeys, LatentSubscriber
from mvld.common.wire import (
    DEFAULT_LATENT_DTYPE,
    FrameSetMessage,
    ViewStatus,
    decode_frameset,
    latent_nbytes,
    wire_fingerprint,
)
from mvld.edge.capture import CaptureConfig
from mvld.edge.encoder import OnnxRuntimeEncoder
from mvld.edge.health import HealthConfig
from mvld.edge.node import EdgeConfig, EdgeNode, default_model_path
from mvld.edge.policy import TransmitPolicyConfig
from mvld.edge.sources import Frame, register_source, registered_schemes
from mvld.edge.sources.base import Pacer
from mvld.edge.sources.files import FileSource
from mvld.export.onnx_export import ExportOptions, export_model
from mvld.model.checkpoint import save_mvld_model
from mvld.sim.faults import SyntheticCamera, accepted_reasons, make_fault

ANY_PORT = "tcp://127.0.0.1:*"
FPS = 30.0

VIEW_BYTES = latent_nbytes(16, DEFAULT_LATENT_DTYPE)  # one 16-d latent as the edge sends it


class InjectedCamera:
    """A synthetic 160x120 camera at 30 FPS; from frame ``after`` on, ``fault`` is applied.

    ``hang_after`` makes the read block like a stuck driver (only in the first source opened
    for a URI); ``fault_log`` records the capture time of the first faulty frame.
    """

    opened: ClassVar[dict[str, int]] = {}
    fault_log: ClassVar[dict[str, float]] = {}
    release = threading.Event()

    def __init__(
        self, uri: str, fault: str = "", after: int = 0, hang_after: int = 0, seed: int = 0
    ) -> None:
        self.uri = uri
        self.camera = SyntheticCamera(height=120, width=160, seed=int(seed))
        self.fault = make_fault(fault, np.random.default_rng(1)) if fault else None
        self.after, self.index = int(after), 0
        self.opened[uri] = self.opened.get(uri, 0) + 1
        self.hang_after = int(hang_after) if self.opened[uri] == 1 else 0
        self.pacer = Pacer(FPS)

    def read(self, timeout_s: float = 1.0) -> Frame | None:
        if self.hang_after and self.index == self.hang_after:
            self.release.wait()
        if not self.pacer.wait(self.index, timeout_s):
            return None
        image = self.camera.read()
        timestamp = time.time()
        if self.fault is not None and self.index >= self.after:
            image = self.fault.apply(image)
            self.fault_log.setdefault(self.uri, timestamp)
        frame = Frame(image, self.uri, timestamp, self.index)
        self.index += 1
        return frame

    def close(self) -> None:
        pass

    def __enter__(self) -> InjectedCamera:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_injected(uri: str) -> InjectedCamera:
    """``synthetic://NAME?fault=black&after=40&hang_after=0&seed=0``."""
    from urllib.parse import parse_qsl, urlsplit

    return InjectedCamera(uri, **dict(parse_qsl(urlsplit(uri).query)))


if "synthetic" not in registered_schemes():
    register_source("synthetic", open_injected)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model exported to ONNX (encoder only): 32x32 input, 16-d latent."""
    root = tmp_path_factory.mktemp("edge_model")
    checkpoint = save_mvld_model(root / "model", make_tiny_model(seed=11))
    export_model(
        checkpoint, root / "onnx", ExportOptions(exporter="torchscript", parts=("encoder",))
    )
    return root / "onnx"


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 30 FPS MJPG video of a moving synthetic scene (60 frames, 160x120)."""
    path = tmp_path_factory.mktemp("edge_video") / "cam.avi"
    camera = SyntheticCamera(height=120, width=160, seed=4)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (160, 120))
    for _ in range(60):
        writer.write(cv2.cvtColor(camera.read(), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def config(model: Path, endpoint: str, cameras: tuple[str, ...], **overrides: object) -> EdgeConfig:
    values: dict[str, object] = dict(
        cameras=cameras,
        connect=(endpoint,),
        model=model,
        node_id="node-a",
        fps=FPS,
        capture=CaptureConfig(
            read_timeout_s=0.1, watchdog_s=0.5, backoff_initial_s=0.1, backoff_max_s=0.5
        ),
        source_options={"file": {"loop": True, "realtime": True}},
    )
    return EdgeConfig(**(values | overrides))


class Running:
    """An edge node streaming in a background thread until the context ends."""

    def __init__(self, cfg: EdgeConfig) -> None:
        self.node = EdgeNode(cfg)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.node.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> EdgeNode:
        self.thread.start()
        return self.node

    def __exit__(self, *exc_info: object) -> None:
        if self.node.config.max_framesets is None:
            self.stop.set()
        self.thread.join(5.0)
        assert not self.thread.is_alive(), "the node did not stop"


def receive(
    sub: LatentSubscriber,
    count: int,
    timeout_s: float = 10.0,
    until: Callable[[FrameSetMessage], bool] | None = None,
) -> list[FrameSetMessage]:
    """Decode messages until ``count`` arrived (or ``until`` holds for one)."""
    messages: list[FrameSetMessage] = []
    deadline = time.monotonic() + timeout_s
    while len(messages) < count and time.monotonic() < deadline:
        data = sub.recv(100)
        if data is None:
            continue
        messages.append(decode_frameset(data))
        if until is not None and until(messages[-1]):
            break
    return messages


def view(message: FrameSetMessage, camera: str):
    return next(v for v in message.views if v.camera_id == camera)


def test_streams_sim_and_file_sources_into_a_real_receiver(model: Path, video: Path) -> None:
    with LatentSubscriber(ANY_PORT, latest_only=False) as sub:
        cfg = config(
            model,
            sub.endpoints[0],
            ("sim://0?fps=30", "sim://1?fps=30", str(video)),
            max_framesets=45,
            latent_dtype="float32",
        )  # exact latents to compare
        with Running(cfg) as node:  # the receiver socket must be serviced while the node runs
            messages = receive(sub, 45)
        summary = node.summary
    assert summary.framesets == 45 and summary.sent >= 40 and len(messages) == summary.sent
    seqs = [m.seq for m in messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    with OnnxRuntimeEncoder(model) as encoder:
        fingerprint = encoder.fingerprint
        with FileSource(str(video)) as source:
            video_latents = encoder.encode([source.read().image for _ in range(60)])
    assert all(
        m.node_id == "node-a" and m.encoder_fingerprint == wire_fingerprint(fingerprint)
        for m in messages
    )  # protocol v2 carries the fingerprint's first 8 bytes
    late = messages[-20:]  # after start-up every camera streams
    for message in late:
        assert [v.camera_id for v in message.views] == ["cam0", "cam1", "cam2"]
        for record in message.views:
            assert record.status is ViewStatus.OK, record
            assert record.latent.shape == (16,) and record.latent.dtype == np.float32
            assert message.send_time - record.capture_time < cfg.max_age_s + 0.1
        # The file camera's latent is the encoder's output for one of the video's frames.
        distances = np.abs(video_latents - view(message, "cam2").latent).max(axis=1)
        assert distances.min() < 1e-4
    sim_latents = np.stack([view(m, "cam0").latent for m in late])
    assert np.std(sim_latents, axis=0).mean() > 1e-4  # the scene moves: latents change


@pytest.mark.parametrize("fault", ["black", "frozen", "occlusion_100"])
def test_injected_fault_appears_as_its_status_within_the_stated_delay(
    model: Path, fault: str
) -> None:
    health = HealthConfig()
    after = health.warmup_frames + 15  # learn the reference first, then break the camera
    uri = f"synthetic://{fault}?fault={fault}&after={after}&seed=2"
    with (
        LatentSubscriber(ANY_PORT, latest_only=False) as sub,
        Running(config(model, sub.endpoints[0], (uri, "sim://0?fps=30"))),
    ):
        messages = receive(
            sub, 200, until=lambda m: view(m, "cam0").reason.value in accepted_reasons(fault)
        )
    first = messages[-1]
    record = view(first, "cam0")
    assert record.reason.value in accepted_reasons(fault), [view(m, "cam0") for m in messages]
    assert record.latent is None and record.status in (ViewStatus.FAILED, ViewStatus.OBSTRUCTED)
    confirm = (
        health.confirm_obstructed_frames
        if record.status is ViewStatus.OBSTRUCTED
        else health.confirm_failed_frames
    )
    stated_delay = (confirm + 1) / FPS + 0.25  # hysteresis frames + one tick + max frame age
    delay = first.send_time - InjectedCamera.fault_log[uri]
    assert 0 < delay <= stated_delay, f"{fault}: {delay:.3f} s > {stated_delay:.3f} s"
    before = [m for m in messages if m.send_time < InjectedCamera.fault_log[uri]]
    assert before and view(before[-1], "cam0").status is ViewStatus.OK
    assert all(view(m, "cam1").status is ViewStatus.OK for m in messages[-10:])


def test_stuck_camera_is_abandoned_and_reopened_while_the_others_keep_streaming(
    model: Path, video: Path
) -> None:
    uri = "synthetic://stuck?hang_after=20"
    cfg = config(model, "tcp://127.0.0.1:1", (uri, str(video)), health=HealthConfig(clear_frames=5))
    with (
        LatentSubscriber(ANY_PORT, latest_only=False) as sub,
        Running(replace(cfg, connect=(sub.endpoints[0],))) as node,
    ):
        # an opening camera is reported failed/timeout too: wait for it to stream first
        receive(sub, 200, until=lambda m: view(m, "cam0").status is ViewStatus.OK)
        failed = receive(sub, 200, until=lambda m: view(m, "cam0").reason.value == "timeout")
        recovered = receive(sub, 200, until=lambda m: view(m, "cam0").status is ViewStatus.OK)
        snapshot = node.capture.snapshots()[0]
    InjectedCamera.release.set()
    assert view(failed[-1], "cam0").status is ViewStatus.FAILED
    assert view(recovered[-1], "cam0").status is ViewStatus.OK
    assert snapshot.abandoned == 1 and snapshot.reopens == 1 and InjectedCamera.opened[uri] == 2
    # The file camera streamed the whole time: stale would mean it waited for the stuck one.
    assert all(view(m, "cam1").status is ViewStatus.OK for m in failed[-20:] + recovered)
    gaps = np.diff([m.send_time for m in failed + recovered])
    assert gaps.max() < 0.2  # the node never paused


def test_receiver_that_dies_and_comes_back_gets_the_stream_again(model: Path) -> None:
    first = LatentSubscriber(ANY_PORT, latest_only=False)
    endpoint = first.endpoints[0]
    cfg = config(model, endpoint, ("sim://0?fps=30", "sim://1?fps=30"))
    with Running(cfg) as node:
        before = receive(first, 10)
        first.close()  # the receiver dies
        time.sleep(0.5)
        dropped_while_away = node.summary.dropped
        with LatentSubscriber(endpoint, latest_only=False) as second:
            after = receive(second, 10)
    assert len(before) == 10 and len(after) == 10
    assert after[0].seq > before[-1].seq + 5  # the node kept going meanwhile
    assert dropped_while_away > 0  # ... and counted what it could not send


def test_node_stops_by_itself_when_every_file_has_ended(model: Path, video: Path) -> None:
    with LatentSubscriber(ANY_PORT, latest_only=False) as sub:
        cfg = config(
            model,
            sub.endpoints[0],
            (str(video), f"file://{video}"),
            source_options={"file": {"realtime": True}},
        )
        node = EdgeNode(cfg)
        thread = threading.Thread(target=node.run, daemon=True)
        thread.start()
        messages = receive(
            sub, 200, until=lambda m: all(v.reason.value == "end_of_stream" for v in m.views)
        )
        thread.join(5.0)
    assert not thread.is_alive(), "the node kept running after every source ended"
    assert all(v.status is ViewStatus.FAILED for v in messages[-1].views)
    ok = sum(v.status is ViewStatus.OK for m in messages for v in m.views)
    assert ok >= 2 * 50  # the 60-frame videos were streamed at their own pace first


def test_edge_never_blocks_without_a_receiver(model: Path) -> None:
    cfg = config(model, "tcp://127.0.0.1:1", ("sim://0?fps=30",), max_framesets=30)
    node = EdgeNode(cfg)
    started = time.monotonic()
    summary = node.run()
    elapsed = time.monotonic() - started
    assert summary.framesets == 30 and summary.sent == 0 and summary.dropped == 30
    assert elapsed < 30 / FPS + 1.0


@pytest.mark.parametrize(
    "policy", [TransmitPolicyConfig(max_views=1), TransmitPolicyConfig(budget_bytes=2 * VIEW_BYTES)]
)
def test_withheld_views_are_marked_per_policy(model: Path, policy: TransmitPolicyConfig) -> None:
    limit = policy.max_views or 2
    with LatentSubscriber(ANY_PORT, latest_only=False) as sub:
        cfg = config(
            model,
            sub.endpoints[0],
            tuple(f"sim://{i}?fps=30" for i in range(3)),
            policy=policy,
            max_framesets=40,
        )
        with Running(cfg):
            messages = receive(sub, 40)
    full = [
        m
        for m in messages
        if all(v.status in (ViewStatus.OK, ViewStatus.WITHHELD) for v in m.views)
    ][-9:]
    assert len(full) == 9
    for message in full:
        sent = [v for v in message.views if v.status is ViewStatus.OK]
        withheld = [v for v in message.views if v.status is ViewStatus.WITHHELD]
        assert len(sent) == limit and len(withheld) == 3 - limit
        assert all(v.reason.value == "policy" and v.latent is None for v in withheld)
        assert all(v.capture_time is not None for v in withheld)
    # Round robin: every camera is sent regularly.
    sent_by_camera = {
        c: sum(view(m, c).status is ViewStatus.OK for m in full) for c in ("cam0", "cam1", "cam2")
    }
    assert min(sent_by_camera.values()) >= 2, sent_by_camera


def test_a_slow_camera_s_repeated_frame_is_not_encoded_again(model: Path) -> None:
    cfg = config(model, "tcp://127.0.0.1:1", ("sim://0?fps=10",), max_age_s=0.3)
    with (
        LatentSubscriber(ANY_PORT, latest_only=False) as sub,
        Running(replace(cfg, connect=(sub.endpoints[0],), max_framesets=45)) as node,
    ):
        messages = receive(sub, 45)
    ok = [m.views[0] for m in messages if m.views[0].status is ViewStatus.OK]
    by_capture: dict[float, list[np.ndarray]] = {}
    for record in ok:
        by_capture.setdefault(record.capture_time, []).append(record.latent)
    assert len(ok) >= 30 and len(by_capture) <= len(ok) / 2  # a 10 FPS camera at 30 sets/s
    for latents in by_capture.values():  # the same frame, the same latent
        assert all(np.array_equal(latents[0], latent) for latent in latents)
    encoder_calls = node.metrics.encode_seconds.count()
    assert encoder_calls <= len(by_capture) + 1


def test_curve_keys_encrypt_and_authenticate_the_stream(model: Path, tmp_path: Path) -> None:
    _, node_secret = generate_keypair(tmp_path, "node")
    receiver_public, receiver_secret = generate_keypair(tmp_path, "receiver")
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "node.key").write_text((tmp_path / "node.key").read_text())
    keys = CurveServerKeys.from_files(receiver_secret, allow)
    with LatentSubscriber(ANY_PORT, curve=keys, latest_only=False) as sub:
        cfg = config(
            model,
            sub.endpoints[0],
            ("sim://0?fps=30",),
            key_secret=node_secret,
            server_key=receiver_public,
        )
        with Running(cfg):
            messages = receive(sub, 5)
    assert len(messages) == 5


def test_config_errors_are_clear(model: Path) -> None:
    with pytest.raises(ConfigError, match="both --keys"):
        config(model, "tcp://127.0.0.1:1", ("sim://0",), key_secret=Path("x"))
    with pytest.raises(ConfigError, match="unknown source scheme"):
        EdgeNode(config(model, "tcp://127.0.0.1:1", ("nosuch://0",)))
    with pytest.raises(ConfigError, match="camera"):
        config(model, "tcp://127.0.0.1:1", ())


# -- the command line ---------------------------------------------------------------------------


RUN_CLI = "import sys; from mvld.edge.cli import main; sys.exit(main())"


def edge_command(model: Path, endpoint: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        RUN_CLI,
        "--cams",
        "sim://0?fps=30,sim://1?fps=30",
        "--connect",
        endpoint,
        "--model",
        str(model),
        "--node-id",
        "cli-node",
        "--status-every",
        "0.5",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cli_streams_serves_metrics_and_stops_cleanly_on_sigterm(model: Path) -> None:
    with LatentSubscriber(ANY_PORT, latest_only=False) as sub:
        port = free_port()
        process = subprocess.Popen(
            edge_command(model, sub.endpoints[0], "--metrics-port", str(port)),
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            messages = receive(sub, 20, timeout_s=20.0)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                metrics = r.read().decode()
            time.sleep(0.6)
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, stderr
    assert len(messages) == 20 and messages[0].node_id == "cli-node"
    assert 'mvld_edge_frames_captured_total{camera="cam0"}' in metrics
    assert "mvld_edge_encode_seconds_bucket" in metrics
    assert 'mvld_edge_source_streaming{camera="cam1"} 1' in metrics
    assert 'mvld_edge_camera_state{camera="cam0",state="ok"} 1' in metrics
    assert "sets/s" in stderr and "cam0=ok" in stderr  # the periodic status line
    assert "SIGTERM: stopping" in stderr and "stopped" in stderr


def test_cli_stops_after_frames_and_explains_a_missing_model(model: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        edge_command(model, "tcp://127.0.0.1:1", "--frames", "10", "--log-json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    *log_lines, summary = result.stderr.strip().splitlines()
    assert "10 frame sets" in summary and "10 dropped" in summary
    records = [json.loads(line) for line in log_lines if line.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("stopped: 10 frame sets" in r["message"] for r in records)
    missing = subprocess.run(
        edge_command(tmp_path / "none", "tcp://127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    try:
        default_model_path()
    except ConfigError:
        no_model = subprocess.run(
            [sys.executable, "-c", RUN_CLI, "--cams", "sim://0", "--connect", "tcp://127.0.0.1:1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert no_model.returncode == 2 and "pass --model" in no_model.stderr
