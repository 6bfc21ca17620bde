"""``mvld demo``: the fault-injecting source, the model check, and real short demo runs.

The short run starts the real receiver and edge processes on loopback with a tiny random model
(checkpoint and encoder.onnx in one folder, as the shipped default model is laid out).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_export_onnx import make_tiny_model

from mvld.common.default_model import DEFAULT_MODEL
from mvld.common.errors import ConfigError
from mvld.demo import DemoConfig, check_model, open_demo_fault, scene_tick
from mvld.edge.sources.base import SourceError
from mvld.export.onnx_export import ExportOptions, export_model
from mvld.model.checkpoint import checkpoint_paths, save_mvld_model
from mvld.sim.demo_source import write_fault_epoch


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the shipped model: last.json/.safetensors and encoder.onnx."""
    root = tmp_path_factory.mktemp("demo_model")
    checkpoint = save_mvld_model(root / "last", make_tiny_model())
    export_model(checkpoint, root, ExportOptions(exporter="torchscript", parts=("encoder",)))
    return root


def _run_demo(out: Path, *args: str, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mvld", "demo", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_fault_source_stops_inside_its_window_and_returns_after(tmp_path: Path) -> None:
    now = time.time()
    with pytest.raises(SourceError, match="stopped"):
        open_demo_fault(f"demofault://1?stop={now - 1}-{now + 60}&realtime=0")
    # The window opens 1 s after this point: a slow first render on a busy machine must not
    # push the first frame into it.
    now = time.time()
    window = f"stop={now + 1.0}-{now + 1.3}"
    source = open_demo_fault(f"demofault://1?{window}&fps=10", clock=str(tmp_path / "clock.json"))
    try:
        assert source.read(2.0) is not None  # before the window
        clock = json.loads((tmp_path / "clock.json").read_text())
        assert clock["fps"] == 10 and abs(clock["start_wall"] - now) < 2
        with pytest.raises(SourceError, match="stopped"):
            for _ in range(30):
                source.read(2.0)
    finally:
        source.close()
    time.sleep(max(0.0, now + 1.3 - time.time()))
    returned = open_demo_fault(f"demofault://1?{window}&fps=10")
    try:
        assert returned.read(2.0) is not None
    finally:
        returned.close()


def test_fault_windows_count_from_the_fault_clock_once_it_is_started(tmp_path: Path) -> None:
    epoch = tmp_path / "fault_clock.json"
    source = open_demo_fault(f"demofault://1?stop=0-60&realtime=0&epoch={epoch}")
    try:
        assert source.read(2.0) is not None  # inside 0-60 s of wall time, but no clock yet
        write_fault_epoch(epoch, time.time() + 30)
        assert source.read(2.0) is not None  # the clock started, the window is 30 s away
    finally:
        source.close()
    write_fault_epoch(epoch, time.time() - 1)
    with pytest.raises(SourceError, match="stopped"):  # a reopen inside the window fails
        open_demo_fault(f"demofault://1?stop=0-60&realtime=0&epoch={epoch}")
    epoch.write_text("{")
    with pytest.raises(ConfigError, match="fault clock"):
        open_demo_fault(f"demofault://1?stop=0-60&realtime=0&epoch={epoch}")


def test_fault_source_covers_the_view_inside_its_window() -> None:
    now = time.time()
    clean = open_demo_fault("demofault://2?realtime=0&seed=3")
    covered = open_demo_fault(f"demofault://2?realtime=0&seed=3&cover={now - 1}-{now + 60}")
    try:
        a, b = clean.read(1.0), covered.read(1.0)
        assert a is not None and b is not None and a.index == b.index
        changed = np.abs(a.image.astype(int) - b.image.astype(int)).max(axis=2) > 20
        assert 0.3 < changed.mean() < 0.9  # 60% of the view covered, with a soft edge
    finally:
        clean.close()
        covered.close()


def test_incomplete_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    save_mvld_model(tmp_path / "last", make_tiny_model())  # a checkpoint but no encoder.onnx
    with pytest.raises(ConfigError, match=r"encoder\.onnx"):
        check_model(tmp_path)
    done = _run_demo(tmp_path / "out", "--model", str(tmp_path), timeout_s=60)
    assert done.returncode == 2
    assert "encoder.onnx" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "index.html").exists()


@pytest.mark.skipif(
    checkpoint_paths(DEFAULT_MODEL)[0].is_file(), reason="the default model is installed"
)
def test_missing_default_model_is_a_clear_error(tmp_path: Path) -> None:
    done = _run_demo(tmp_path / "out", timeout_s=60)
    assert done.returncode == 2
    assert "default model" in done.stderr and "--model" in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_demo_options_are_refused() -> None:
    with pytest.raises(ConfigError):
        DemoConfig(seconds=1)
    with pytest.raises(ConfigError):
        DemoConfig(fps=100)


def _check_report(out: Path) -> dict:
    """The report folder is complete; return its summary."""
    for name in (
        "index.html",
        "views.png",
        "health.png",
        "latency.png",
        "bandwidth.png",
        "summary.json",
        "logs/edge.log",
        "logs/receiver.log",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    html = (out / "index.html").read_text()
    assert all(f"src='{name}'" in html for name in ("views.png", "health.png", "latency.png"))
    return json.loads((out / "summary.json").read_text())


def test_short_demo_with_a_tiny_model_writes_the_report(model_folder: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    done = _run_demo(
        tmp_path / "out", "--seconds", "8", "--model", str(model_folder), timeout_s=150
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "frame sets" in done.stdout and "report:" in done.stdout  # progress was shown
    summary = _check_report(tmp_path / "out")
    assert summary["framesets_received"] >= 20
    views = summary["views_by_camera_and_provenance"]
    assert views["cam1"].get("imputed", 0) >= 3  # the stopped camera was filled in
    assert views["cam1"].get("observed", 0) >= 10  # ... and came back
    assert views["cam0"].get("imputed", 0) == 0  # the healthy camera was never imputed
    assert summary["wire_bytes_per_s_mean"] < summary["raw_bytes_per_s"] / 10
    assert set(summary["psnr_vs_truth"]) >= {"observed", "imputed"}  # truth was replayed
    edge_log = (tmp_path / "out" / "logs" / "edge.log").read_text()
    assert "camera cam1: failed" in edge_log and "cam1: healthy again" in edge_log
    assert "camera cam2: obstructed (occluded)" in edge_log
    assert time.monotonic() - start < 120


def test_scene_tick_maps_capture_times_to_ticks() -> None:
    from mvld.demo import DemoRecord, FaultPlan

    record = DemoRecord(
        DemoConfig(), FaultPlan(), start_wall=0.0, scene_clock={"start_wall": 1000.0, "fps": 10.0}
    )
    result = {"views": [{"capture_time": None}, {"capture_time": 1001.2}, {"capture_time": 1001.1}]}
    assert scene_tick(record, result) == 12
    assert scene_tick(record, {"views": [{"capture_time": None}]}) is None


@pytest.mark.slow
@pytest.mark.skipif(
    not checkpoint_paths(DEFAULT_MODEL)[0].is_file(),
    reason="the default model is not installed yet (common/assets/default_model)",
)
def test_full_demo_with_the_shipped_model_in_under_three_minutes(tmp_path: Path) -> None:
    start = time.monotonic()
    done = _run_demo(tmp_path / "out", timeout_s=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = _check_report(tmp_path / "out")
    assert summary["views_by_camera_and_provenance"]["cam1"].get("imputed", 0) > 0
    assert time.monotonic() - start < 180
