"""Every output of the edge tells the same truth about its cameras, and the node knows when to stop.

Real ``EdgeNode`` objects with real capture threads, a real ONNX encoder and real files; a
real ``mvld-edge`` process for the re-learn signal. Cameras that never open, that hang while
opening, that fail and that are healthy are registered through the public
``register_source``.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_export_onnx import make_tiny_model

from mvld.common.transport import LatentSubscriber
from mvld.common.wire import FrameSetMessage, ViewStatus, decode_frameset
from mvld.edge.capture import CaptureConfig
from mvld.edge.health import HealthConfig
from mvld.edge.node import EdgeConfig, EdgeNode
from mvld.edge.sources import Frame, register_source, registered_schemes
from mvld.edge.sources.base import Pacer, SourceError
from mvld.export.onnx_export import ExportOptions, export_model
from mvld.model.checkpoint import save_mvld_model
from mvld.sim.faults import SyntheticCamera, make_fault

FPS = 30.0
ANY_PORT = "tcp://127.0.0.1:*"
HANG = threading.Event()  # set at the end of a test to let hanging opens return


class PacedCamera:
    """A synthetic 160x120 camera at 30 FPS; ``fault`` (e.g. black) applied from ``after`` on."""

    def __init__(self, uri: str, fault: str = "", after: int = 0) -> None:
        self.uri = uri
        self.camera = SyntheticCamera(height=120, width=160, seed=5)
        self.fault = make_fault(fault, np.random.default_rng(0)) if fault else None
        self.after, self.index = int(after), 0
        self.pacer = Pacer(FPS)

    def read(self, timeout_s: float = 1.0) -> Frame | None:
        if not self.pacer.wait(self.index, timeout_s):
            return None
        image = self.camera.read()
        if self.fault is not None and self.index >= self.after:
            image = self.fault.apply(image)
        frame = Frame(image, self.uri, time.time(), self.index)
        self.index += 1
        return frame

    def close(self) -> None:
        pass

    def __enter__(self) -> PacedCamera:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_paced(uri: str) -> PacedCamera:
    """``paced://NAME?fault=black&after=20``."""
    from urllib.parse import parse_qsl, urlsplit

    return PacedCamera(uri, **dict(parse_qsl(urlsplit(uri).query)))


def open_never(uri: str) -> PacedCamera:
    """A camera whose driver refuses every open (unplugged, wrong address)."""
    raise SourceError(f"{uri}: no such device")


def open_hanging(uri: str) -> PacedCamera:
    """A camera whose driver blocks in open (an RTSP server that never answers)."""
    HANG.wait()
    raise SourceError(f"{uri}: gave up")


for _scheme, _factory in (
    ("paced", open_paced),
    ("neveropen", open_never),
    ("hangopen", open_hanging),
):
    if _scheme not in registered_schemes():
        register_source(_scheme, _factory)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model exported to ONNX (encoder only)."""
    root = tmp_path_factory.mktemp("truth_model")
    checkpoint = save_mvld_model(root / "model", make_tiny_model(seed=11))
    export_model(
        checkpoint, root / "onnx", ExportOptions(exporter="torchscript", parts=("encoder",))
    )
    return root / "onnx"


def node_config(model: Path, cameras: tuple[str, ...], **overrides: object) -> EdgeConfig:
    values: dict[str, object] = dict(
        cameras=cameras,
        connect=("tcp://127.0.0.1:1",),
        model=model,
        node_id="truth",
        fps=FPS,
        health=HealthConfig(clear_frames=5),
        capture=CaptureConfig(
            read_timeout_s=0.1, watchdog_s=0.5, backoff_initial_s=0.1, backoff_max_s=0.5
        ),
    )
    return EdgeConfig(**(values | overrides))


STATE_SAMPLE = re.compile(r'mvld_edge_camera_state\{camera="(\w+)",state="(\w+)"\} 1(\.0)?$')
STATUS_CAMERA = re.compile(r"(cam\d+)=(\w+)(?:\((\w+)\))?")


def outputs(node: EdgeNode, message: FrameSetMessage) -> dict[str, tuple]:
    """Per camera: (wire status, wire reason), metrics state, status-line (state, reason)."""
    metrics = {
        m.group(1): m.group(2)
        for line in node.registry.render().splitlines()
        if (m := STATE_SAMPLE.match(line))
    }
    now = time.monotonic()
    line = node.status_line(now, (now - 1.0, 0)).split("|")[1]
    status = {m.group(1): (m.group(2), m.group(3)) for m in STATUS_CAMERA.finditer(line)}
    wire = {
        v.camera_id: (v.status.value, None if v.reason.value == "none" else v.reason.value)
        for v in message.views
    }
    return {camera: (wire[camera], metrics.get(camera), status.get(camera)) for camera in wire}


def test_status_line_metrics_and_wire_agree_for_every_camera(model: Path) -> None:
    cameras = (
        "neveropen://cam",
        "hangopen://cam",
        "paced://bad?fault=black&after=20",
        "paced://good",
    )
    node = EdgeNode(node_config(model, cameras))
    node.capture.start()
    seen: dict[str, set[tuple]] = {f"cam{i}": set() for i in range(len(cameras))}
    try:
        for _ in range(90):
            message = node.step()
            assert message is not None
            for camera, (wire, metric, status) in outputs(node, message).items():
                assert metric == wire[0], (camera, wire, metric)
                assert status == wire, (camera, wire, status)
                seen[camera].add(wire)
            time.sleep(1 / FPS)
    finally:
        HANG.set()
        node.close()
    assert seen["cam0"] == {("failed", "disconnected")}  # never opened: never ok
    assert ("failed", "timeout") in seen["cam1"] and ("ok", None) not in seen["cam1"]
    assert ("failed", "black") in seen["cam2"]  # delivered, then failed
    assert ("ok", None) in seen["cam3"]
    assert all(wire[1] != "stale" for wires in seen.values() for wire in wires)


def write_video(path: Path, frames: int) -> Path:
    camera = SyntheticCamera(height=120, width=160, seed=4)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (160, 120))
    for _ in range(frames):
        writer.write(cv2.cvtColor(camera.read(), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_node_stops_when_one_file_is_missing_and_the_other_ended(
    model: Path, tmp_path: Path
) -> None:
    short = write_video(tmp_path / "short.avi", 20)
    missing = tmp_path / "missing.avi"
    with LatentSubscriber(ANY_PORT, latest_only=False) as sub:
        cfg = node_config(
            model,
            (str(missing), str(short)),
            connect=(sub.endpoints[0],),
            source_options={"file": {"realtime": True}},
        )
        node = EdgeNode(cfg)
        thread = threading.Thread(target=node.run, daemon=True)
        thread.start()
        messages: list[FrameSetMessage] = []
        deadline = time.monotonic() + 15.0
        while thread.is_alive() and time.monotonic() < deadline:
            data = sub.recv(100)
            if data is not None:
                messages.append(decode_frameset(data))
        thread.join(5.0)
    assert not thread.is_alive(), "the node kept running with every file missing or ended"
    last = {v.camera_id: (v.status, v.reason.value) for v in messages[-1].views}
    assert last == {
        "cam0": (ViewStatus.FAILED, "disconnected"),
        "cam1": (ViewStatus.FAILED, "end_of_stream"),
    }
    assert any(v.status is ViewStatus.OK for m in messages for v in m.views)


def test_node_relearn_gives_every_camera_a_fresh_reference(model: Path) -> None:
    node = EdgeNode(node_config(model, ("paced://a", "paced://b")))
    node.capture.start()
    try:
        for _ in range(40):
            node.step()
            time.sleep(1 / FPS)
        before = [monitor.reference for monitor in node.monitors]
        assert all(r is not None and r.frames >= node.config.health.warmup_frames for r in before)
        node.relearn(("cam1",))
        node.step()
        after = [monitor.reference for monitor in node.monitors]
    finally:
        node.close()
    assert after[0] is before[0]
    assert after[1] is not before[1] and after[1].frames == 1  # learning again from this frame


@pytest.mark.slow
def test_sigusr1_relearns_a_running_node(model: Path) -> None:
    command = [
        sys.executable,
        "-c",
        "import sys; from mvld.edge.cli import main; sys.exit(main())",
        "--cams",
        "sim://0?fps=30&episode_frames=1000000",
        "--connect",
        "tcp://127.0.0.1:1",
        "--model",
        str(model),
        "--node-id",
        "relearn",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def collect() -> None:
        assert process.stderr is not None
        lines.extend(process.stderr)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30.0
        while not any("reference learned" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            time.sleep(0.1)
        process.send_signal(signal.SIGUSR1)
        while sum("reference learned" in line for line in lines) < 2:
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(5.0)
    text = "".join(lines)
    assert process.returncode == 0, text
    assert "SIGUSR1: re-learning every camera's reference" in text
    assert "camera cam0: re-learning its reference" in text
    assert "obstructed" not in text and "failed (" not in text
