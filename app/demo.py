"""``mvld demo``: a receiver and an edge node as separate processes on loopback, with faults.

The edge streams three cameras of the simulated rig (``sim://0..2``) through the real
``mvld-edge`` code; camera 1 stops (its source fails and cannot be reopened for a while, then
returns) and camera 2 gets covered part-way (``Occlusion`` from :mod:`mvld.sim.faults`). The
edge CLI has no fault flags, so the edge process is ``python -m mvld.demo`` with extra argument
parsing: it registers the ``demofault://`` source scheme (a ``sim://`` camera with a fault
schedule in its query string) and then runs ``mvld.edge.cli.main`` unchanged.

The receiver is the real ``mvld-receiver`` with ``--task publish``; the demo subscribes to the
result stream, polls both processes' metrics endpoints, replays the (deterministic) simulated
scene to get the true views, and hands everything to :mod:`mvld.report`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import msgpack

from mvld.common.errors import ConfigError, MVLDError
from mvld.common.exits import output_folder
from mvld.demo_record import DemoConfig, DemoRecord, FaultPlan, scene_tick
from mvld.report import write_report
from mvld.sim.demo_source import DEMO_SCHEME, open_demo_fault, write_fault_epoch

log = logging.getLogger(__name__)

NODE_ID = "demo-node"
SIM_OPTIONS = {"episode_frames": 1_000_000, "seed": 0}  # one continuous scene, no scene cuts
# The cameras render at the model's input size, so the encoder sees detail it can keep; never
# below 64 px, where the health checks' sharpness reference is too coarse (a tiny test model
# gets its frames resized down by the edge instead).
MIN_SCENE_SIZE = 64
RECEIVER_START_TIMEOUT_S = 150.0
RESULT_HWM = 10_000
FAULT_CLOCK_DELAY_S = 1.0  # after the edge is up: its first frame sets arrive before any fault
# torch's intra-op threads spin-wait; on a small machine shared by the edge, the demo and other
# jobs, more than one thread made the receiver 2-3x slower (measured: 4.4 vs 10 frame sets/s)
RECEIVER_THREADS = os.environ.get("OMP_NUM_THREADS", "1")

Progress = Callable[[str], None]


# -- the edge process --------------------------------------------------------------------------


def edge_main(argv: list[str]) -> int:
    """``mvld-edge`` with the ``demofault://`` scheme registered (the demo's edge process)."""
    from mvld.edge.cli import main as edge_cli_main
    from mvld.edge.sources import register_source

    register_source(DEMO_SCHEME, open_demo_fault)
    return edge_cli_main(argv)


# -- the demo run ---------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> ``{"name{labels}": value}`` (comments skipped)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                continue
    return values


def read_metrics(port: int, timeout_s: float = 2.0) -> dict[str, float] | None:
    """The metrics a process serves on ``port``; None while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            return parse_metrics(r.read().decode())
    except (urllib.error.URLError, OSError):
        return None


class ResultCollector:
    """Subscribes to the receiver's result stream (``--task publish``) on its own thread."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, RESULT_HWM)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(endpoint)
        self.results: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-results", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._socket.poll(100):
                self.results.append(msgpack.unpackb(self._socket.recv(), raw=False))

    def close(self) -> None:
        """Stop the thread and close the socket."""
        self._stop.set()
        self._thread.join()
        self._socket.close()
        self._context.term()


def _python_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def _wait_for_metrics(
    process: subprocess.Popen, port: int, log_path: Path, what: str, timeout_s: float
) -> None:
    """Block until ``process`` serves metrics; MVLDError with its log if it exits or hangs."""
    deadline = time.monotonic() + timeout_s
    while read_metrics(port, 0.5) is None:
        if process.poll() is not None:
            raise MVLDError(f"{what} exited with status {process.returncode}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise MVLDError(f"{what} did not start within {timeout_s:.0f} s:\n{_tail(log_path)}")
        time.sleep(0.2)


def _stop_process(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it does not stop in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_report_dependencies() -> None:
    """ConfigError before anything starts when the report could not be drawn."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError('mvld demo draws its report with matplotlib: pip install "mvld[eval]"')


def check_model(model: Path | None) -> None:
    """ConfigError naming what is missing when the model (default or given) is incomplete."""
    from mvld.common.default_model import DEFAULT_MODEL
    from mvld.model.checkpoint import checkpoint_paths

    folder = model if model is not None else DEFAULT_MODEL
    missing = [
        path
        for path in (checkpoint_paths(folder)[0], folder / "encoder.onnx")
        if not path.is_file()
    ]
    if missing:
        where = "the shipped default model" if model is None else f"model folder {folder}"
        raise ConfigError(
            f"{where} is incomplete: missing {', '.join(str(p) for p in missing)}. "
            "Pass --model DIR (a folder holding last.json, last.safetensors and encoder.onnx, "
            "e.g. an mvld-train score run exported with mvld-export onnx into the same folder)."
        )


def scene_size(model: Path | None) -> int:
    """Side in pixels the demo's cameras render at: the model's input size, at least 64."""
    from mvld.common.default_model import DEFAULT_MODEL
    from mvld.model.checkpoint import checkpoint_paths

    meta = json.loads(
        checkpoint_paths(model if model is not None else DEFAULT_MODEL)[0].read_text()
    )
    return max(MIN_SCENE_SIZE, int(meta["preprocess"]["height"]))


class DemoProcesses:
    """The receiver and edge processes of one demo run, their ports and logs."""

    def __init__(self, config: DemoConfig, plan: FaultPlan) -> None:
        self.config, self.plan = config, plan
        self.size = scene_size(config.model)
        self.logs = config.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data_port, self.result_port = free_port(), free_port()
        self.receiver_metrics_port, self.edge_metrics_port = free_port(), free_port()
        self.clock_path = self.logs / "scene_clock.json"
        self.epoch_path = self.logs / "fault_clock.json"  # written once the edge is up
        self.receiver: subprocess.Popen | None = None
        self.edge: subprocess.Popen | None = None

    def _spawn(self, command: list[str], name: str, **env_extra: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "wb") as output:
            env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
            return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)

    def start_receiver(self) -> None:
        """The real mvld-receiver on the CPU, publishing its results with images."""
        model = ["--model", str(self.config.model)] if self.config.model else []
        self.receiver = self._spawn(
            _python_command(
                "mvld.receiver.cli",
                "--gpu",
                "-1",
                "--bind",
                f"tcp://127.0.0.1:{self.data_port}",
                "--task",
                f"publish:bind=tcp://127.0.0.1:{self.result_port},hwm={RESULT_HWM}",
                "--metrics-port",
                str(self.receiver_metrics_port),
                "--status-every",
                "5",
                "--max-age-ms",
                "3000",
                *model,
            ),
            "receiver",
            OMP_NUM_THREADS=RECEIVER_THREADS,
        )
        _wait_for_metrics(
            self.receiver,
            self.receiver_metrics_port,
            self.logs / "receiver.log",
            "mvld-receiver",
            RECEIVER_START_TIMEOUT_S,
        )

    def camera_uris(self) -> list[str]:
        """``demofault://`` URIs: camera 1 stops, camera 2 gets covered, camera 0 stays healthy;
        the fault windows count from the fault clock :meth:`start_fault_clock` starts."""
        fps = self.config.fps
        uris = []
        for camera in range(3):
            query: dict[str, object] = {**SIM_OPTIONS, "fps": fps, "size": self.size}
            if camera == self.plan.stop_camera:
                query["stop"] = "-".join(f"{s:.3f}" for s in self.plan.stop)
            if camera == self.plan.cover_camera:
                query["cover"] = "-".join(f"{s:.3f}" for s in self.plan.cover)
            if camera in (self.plan.stop_camera, self.plan.cover_camera):
                query["epoch"] = str(self.epoch_path)
            if camera == 0:
                query["clock"] = str(self.clock_path)
            uris.append(f"{DEMO_SCHEME}://{camera}?{urlencode(query)}")
        return uris

    def start_edge(self) -> None:
        """The real mvld-edge code (via ``python -m mvld.demo``) streaming to the receiver."""
        model = ["--model", str(self.config.model)] if self.config.model else []
        self.edge = self._spawn(
            _python_command(
                "mvld.demo",
                "--cams",
                ",".join(self.camera_uris()),
                "--connect",
                f"tcp://127.0.0.1:{self.data_port}",
                "--node-id",
                NODE_ID,
                "--fps",
                str(self.config.fps),
                "--max-age",
                str(max(0.25, 2.5 / self.config.fps)),
                "--metrics-port",
                str(self.edge_metrics_port),
                "--backoff-max",
                "1",
                "--status-every",
                "5",
                *model,
            ),
            "edge",
        )
        _wait_for_metrics(
            self.edge, self.edge_metrics_port, self.logs / "edge.log", "mvld-edge", 60.0
        )

    def start_fault_clock(self, delay_s: float) -> float:
        """Start the fault schedule ``delay_s`` from now (the edge is up); its POSIX time."""
        start_wall = time.time() + delay_s
        write_fault_epoch(self.epoch_path, start_wall)
        return start_wall

    def stop(self) -> None:
        """Stop the edge first (so the receiver sees the stream's end), then the receiver."""
        for process in (self.edge, self.receiver):
            if process is not None:
                _stop_process(process)


def _progress_line(elapsed: float, seconds: float, results: list[dict]) -> str:
    """One progress line: time, frame sets delivered, each camera's latest status/provenance."""
    line = f"[{elapsed:5.1f}/{seconds:.0f} s] {len(results)} frame sets"
    if results:
        last = results[-1]
        views = " ".join(
            f"{v['cam']}={v['status']}"
            f"{'(' + v['reason'] + ')' if v['status'] != 'ok' else ''}"
            f"->{v['provenance']}"
            for v in last["views"]
        )
        line += f" | {views} | latency {1000 * last['latency_s']:.0f} ms"
    return line


def _stream(
    processes: DemoProcesses, record: DemoRecord, collector: ResultCollector, progress: Progress
) -> None:
    """Let the stream run for the configured time, polling metrics and reporting progress."""
    seconds = record.config.seconds
    next_line = 0.0
    while (elapsed := time.time() - record.start_wall) < seconds:
        assert processes.edge is not None and processes.receiver is not None
        for process, name in ((processes.edge, "edge"), (processes.receiver, "receiver")):
            if process.poll() is not None:
                raise MVLDError(
                    f"mvld-{name} exited early with status {process.returncode}:\n"
                    + _tail(processes.logs / f"{name}.log")
                )
        metrics = read_metrics(processes.edge_metrics_port)
        if metrics is not None:
            record.edge_bytes.append((time.time(), metrics.get("mvld_edge_bytes_sent_total", 0)))
        if elapsed >= next_line:
            progress(_progress_line(elapsed, seconds, collector.results))
            next_line += 2.0
        time.sleep(0.5)


def replay_truth(record: DemoRecord, ticks: list[int], size: int) -> None:
    """Render the true views of ``ticks`` by replaying the deterministic simulated scene."""
    from mvld.sim.rig import SimRig
    from mvld.sim.source import SimOptions

    options = SimOptions(
        fps=record.config.fps,
        size=size,
        seed=SIM_OPTIONS["seed"],
        episode_frames=SIM_OPTIONS["episode_frames"],
    )
    wanted = set(ticks)
    with SimRig(options.rig_config()) as rig:
        rig.reset(options.seed, 0)
        for tick in range(max(wanted, default=-1) + 1):
            if tick > 0:
                rig.advance()
            if tick in wanted:
                record.truth[tick] = [view.copy() for view in rig.render().views]


def run_demo(config: DemoConfig, progress: Progress = log.info) -> Path:
    """Run the whole demo; return the path of the report's ``index.html``."""
    output_folder(config.out, "report folder")  # first: a typo must not wait for the model
    check_model(config.model)
    check_report_dependencies()
    plan = FaultPlan.for_duration(config.seconds)
    progress("starting mvld-receiver (loads the model; CPU) ...")
    processes = DemoProcesses(config, plan)
    collector: ResultCollector | None = None
    try:
        processes.start_receiver()
        collector = ResultCollector(f"tcp://127.0.0.1:{processes.result_port}")
        progress(
            f"starting mvld-edge: 3 simulated cameras at {config.fps:g} FPS; cam1 stops "
            f"at {plan.stop[0]:.0f}-{plan.stop[1]:.0f} s, cam2 is covered at "
            f"{plan.cover[0]:.0f}-{plan.cover[1]:.0f} s"
        )
        processes.start_edge()
        # the clock starts once the edge is up, however long its start took on a busy machine
        record = DemoRecord(config, plan, processes.start_fault_clock(FAULT_CLOCK_DELAY_S))
        time.sleep(max(0.0, record.start_wall - time.time()))
        _stream(processes, record, collector, progress)
        record.edge_metrics = read_metrics(processes.edge_metrics_port) or {}
        _finish(processes, record, collector)
    finally:
        if collector is not None:
            collector.close()
        processes.stop()
    progress(f"{len(record.results)} frame sets received; writing the report ...")
    if processes.clock_path.exists():
        record.scene_clock = json.loads(processes.clock_path.read_text())
    ticks = [t for t in (scene_tick(record, r) for r in record.results) if t is not None]
    replay_truth(record, sorted(set(ticks)), processes.size)
    return write_report(record, config.out)


def _finish(processes: DemoProcesses, record: DemoRecord, collector: ResultCollector) -> None:
    """Stop the edge, let the receiver drain, keep its final metrics and the results."""
    assert processes.edge is not None
    _stop_process(processes.edge)
    time.sleep(1.0)
    record.receiver_metrics = read_metrics(processes.receiver_metrics_port) or {}
    record.results = [r for r in collector.results if r["node"] == NODE_ID]
    record.results.sort(key=lambda r: r["seq"])


if __name__ == "__main__":
    sys.exit(edge_main(sys.argv[1:]))
