"""Task hooks: --task parsing, discovery (built-in, entry point, dotted path), failure isolation,
the built-in tasks on real results, and a pip-installed third-party hook package in a real
receiver process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
import torch
import zmq
from receiver_fixtures import (
    CAMERAS,
    connected_publisher,
    frame_set,
    make_tiny_model,
    save_tiny_model,
    wait_until,
    wire,
)

from mvld.common.errors import ConfigError
from mvld.model.classifier import ClassifierConfig, ViewClassifier, save_classifier
from mvld.receiver.hooks import HookRunner, available_tasks, build_hooks, parse_task
from mvld.receiver.ingest import CameraLayout, RejectionError, assemble
from mvld.receiver.observability import ReceiverMetrics
from mvld.receiver.results import FrameSetResult, Provenance
from mvld.receiver.service import ReceiverConfig, ReceiverService
from mvld.receiver.tasks.publish import encode_result

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "mvld-hook-example"


@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


@pytest.fixture(scope="module")
def results(model) -> list[FrameSetResult]:
    """Real results: frame sets with cam1 failed, imputed and decoded by the receiver."""
    service = ReceiverService(ReceiverConfig(bind=("tcp://127.0.0.1:0",), gpu=-1), model=model)
    try:
        layout = service.layout
        items = [
            assemble(frame_set(model, "node-a", seq), layout, time.time(), None) for seq in range(3)
        ]
        return service.process(items)
    finally:
        service.close()


def test_parse_task_names_options_and_dotted_paths() -> None:
    assert parse_task("jsonl").name == "jsonl"
    spec = parse_task("save:dir=out/x,format=mp4")
    assert (spec.name, spec.options) == ("save", {"dir": "out/x", "format": "mp4"})
    spec = parse_task("publish:bind=tcp://*:5600")
    assert spec.options == {"bind": "tcp://*:5600"}, "values may contain colons"
    spec = parse_task("pkg.mod:Hook:level=3")
    assert (spec.name, spec.options) == ("pkg.mod:Hook", {"level": "3"})
    assert parse_task("pkg.mod:Hook").name == "pkg.mod:Hook"
    for bad in ("", "save:dir=a,dir=b", "=x", "save:1x=2"):
        with pytest.raises(ConfigError):
            parse_task(bad)


def test_unknown_task_lists_valid_names_and_duplicates_are_rejected() -> None:
    metrics = ReceiverMetrics()
    with pytest.raises(ConfigError, match=r"unknown task 'nope'; valid: .*classify.*jsonl"):
        build_hooks(["nope"], metrics)
    with pytest.raises(ConfigError, match="more than once"):
        build_hooks(["jsonl", "jsonl:path=-"], metrics)
    for bad in ("no_such_module_xyz:Hook", "save:dir"):  # "save:dir" is no key=value option
        with pytest.raises(ConfigError, match="cannot load task"):
            build_hooks([bad], metrics)
    assert {"save", "classify", "jsonl", "publish"} <= set(available_tasks())


def test_classify_without_checkpoint_is_a_clear_startup_error() -> None:
    with pytest.raises(ConfigError, match="classify needs checkpoint=PATH"):
        build_hooks(["classify"], ReceiverMetrics())
    with pytest.raises(ConfigError, match="does not exist"):
        build_hooks(["classify:checkpoint=/nonexistent/model"], ReceiverMetrics())


def _write_distribution(root: Path, name: str, entry_points: str) -> None:
    """An installed-distribution folder (dist-info) with the given entry_points.txt."""
    info = root / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


def test_entry_point_taking_a_builtin_name_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_distribution(tmp_path, "clashing_hooks", "[mvld.tasks]\nsave = json:dumps\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="registered twice"):
        build_hooks(["jsonl"], ReceiverMetrics())


def test_dotted_path_hook_and_raising_hook_is_counted_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, results: list[FrameSetResult]
) -> None:
    (tmp_path / "my_hooks.py").write_text(
        textwrap.dedent("""
        class Seen:
            def __init__(self, prefix="x"):
                self.prefix, self.seen, self.closed = prefix, [], False
            def __call__(self, result):
                self.seen.append(f"{self.prefix}{result.seq}")
            def close(self):
                self.closed = True

        class Broken:
            def __call__(self, result):
                raise RuntimeError("downstream bug")

        class NoLicence:
            def __init__(self):
                raise RuntimeError("licence server unreachable")
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    metrics = ReceiverMetrics()
    with pytest.raises(ConfigError, match="failed to start: RuntimeError: licence"):
        build_hooks(["my_hooks:NoLicence"], metrics)
    runner = build_hooks(["my_hooks:Broken", "my_hooks:Seen:prefix=s"], metrics)
    for result in results:
        runner(result)
    seen = runner.hooks[1][1]
    assert seen.seen == ["s0", "s1", "s2"], "the hook after a raising one still runs"
    assert metrics.hook_errors.value(task="my_hooks:Broken") == len(results)
    runner.close()
    assert seen.closed


def test_results_have_every_view_with_imputed_cam1(results: list[FrameSetResult]) -> None:
    for result in results:
        assert [v.camera_id for v in result.views] == list(CAMERAS)
        assert [v.provenance for v in result.views] == [
            Provenance.OBSERVED,
            Provenance.IMPUTED,
            Provenance.OBSERVED,
        ]
        assert result.imputed_cameras == ["cam1"]
        assert all(v.image.shape == (32, 32, 3) and v.image.dtype == np.uint8 for v in result.views)


def test_save_png_and_mp4(tmp_path: Path, results: list[FrameSetResult]) -> None:
    runner = build_hooks(
        [
            f"save:dir={tmp_path / 'png'}",
        ],
        ReceiverMetrics(),
    )
    for result in results:
        runner(result)
    runner.close()
    png = tmp_path / "png" / "node-a" / "cam1" / "00000002.png"
    image = cv2.imread(str(png))[:, :, ::-1]
    assert np.array_equal(image, results[2].view("cam1").image), "PNG holds the decoded view"
    runner = build_hooks([f"save:dir={tmp_path / 'mp4'},format=mp4,fps=10"], ReceiverMetrics())
    for result in results:
        runner(result)
    runner.close()
    for camera in CAMERAS:
        video = cv2.VideoCapture(str(tmp_path / "mp4" / "node-a" / f"{camera}.mp4"))
        frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
        video.release()
        assert frames == len(results)
    with pytest.raises(ConfigError, match="format"):
        build_hooks([f"save:dir={tmp_path},format=gif"], ReceiverMetrics())


def test_classify_then_jsonl_logs_labels(tmp_path: Path, results: list[FrameSetResult]) -> None:
    torch.manual_seed(0)
    classifier = ViewClassifier(ClassifierConfig(num_classes=4, image_size=32, channels=(8, 16)))
    checkpoint = save_classifier(
        tmp_path / "classifier", classifier.eval(), make_tiny_model().preprocess
    )
    log_path = tmp_path / "log.jsonl"
    runner = build_hooks(
        [f"classify:checkpoint={checkpoint}", f"jsonl:path={log_path}"], ReceiverMetrics()
    )
    for result in results:
        runner(result)
    runner.close()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [line["seq"] for line in lines] == [0, 1, 2]
    labels = lines[0]["annotations"]["classify"]
    assert set(labels["views"]) == set(CAMERAS)
    for entry in [*labels["views"].values(), labels["fused"]]:
        assert 0 <= entry["label"] < 4 and 0.25 <= entry["confidence"] <= 1.0
    assert lines[0]["views"][1]["provenance"] == "imputed"


def test_publish_sends_msgpack_results(results: list[FrameSetResult]) -> None:
    runner = build_hooks(["publish:bind=tcp://127.0.0.1:0"], ReceiverMetrics())
    endpoint = runner.hooks[0][1].endpoint
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        received = None
        deadline = time.monotonic() + 5
        while received is None and time.monotonic() < deadline:  # PUB/SUB joins asynchronously
            runner(results[0])
            if socket.poll(50):
                received = msgpack.unpackb(socket.recv(), raw=False)
        assert received is not None, "no result published"
        assert received["node"] == "node-a" and received["v"] == 1
        view = received["views"][1]
        assert view["provenance"] == "imputed"
        image = np.frombuffer(view["image"]["b"], np.uint8).reshape(view["image"]["sh"])
        assert np.array_equal(image, results[0].view("cam1").image)
        latent = np.frombuffer(view["latent"]["b"], "<f4")
        assert np.array_equal(latent, results[0].view("cam1").latent)
    finally:
        socket.close()
        context.term()
        runner.close()
    assert len(encode_result(results[0], images=False)) < len(encode_result(results[0]))


def test_hook_runner_rejects_duplicate_names() -> None:
    with pytest.raises(ConfigError):
        HookRunner([("a", print), ("a", print)], ReceiverMetrics())


def test_pip_installed_example_hook_is_discovered_and_runs(tmp_path: Path) -> None:
    """pip install the example package into a folder, run mvld-receiver with it on PYTHONPATH."""
    source = shutil.copytree(
        EXAMPLE, tmp_path / "src", ignore=shutil.ignore_patterns("build", "*.egg-info")
    )
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    checkpoint = save_tiny_model(tmp_path)
    out = tmp_path / "imputed.tsv"
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mvld.receiver.cli",
            "--gpu",
            "-1",
            "--model",
            str(checkpoint),
            "--bind",
            f"tcp://127.0.0.1:{port}",
            "--task",
            f"imputed-views:out={out}",
            "--max-age-ms",
            "60000",
        ],  # a cold first imputation on a busy machine may take > 1 s
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        model = make_tiny_model()
        with connected_publisher(f"tcp://127.0.0.1:{port}", timeout_s=30) as publisher:
            for seq in range(3):
                publisher.send(wire(model, "edge-1", seq))
                time.sleep(0.05)
            wait_until(
                lambda: out.exists() and len(out.read_text().splitlines()) >= 3,
                15,
                "the example hook's output",
            )
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    assert process.returncode == 0, stderr
    assert out.read_text().splitlines()[0] == "edge-1\t0\tcam1"
    assert "imputed-views" in stderr, "the start-up log names the task"


def _free_port() -> int:
    with zmq.Context() as context, context.socket(zmq.REP) as socket:
        port = socket.bind_to_random_port("tcp://127.0.0.1")
        socket.unbind(f"tcp://127.0.0.1:{port}")
        return port


def test_layout_with_other_camera_names_refuses_frame_sets(model) -> None:
    layout = CameraLayout(("left", "centre", "right"), 16)
    with pytest.raises(RejectionError, match="not one of the model") as caught:
        assemble(frame_set(model, "n", 0), layout, time.time(), None)
    assert caught.value.reason == "unknown_camera"
