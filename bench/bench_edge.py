"""Edge node speed: 3 cameras at 30 FPS from video files, the shipped default model, one core.

For each encoder backend (ONNX Runtime, the CPU default; torch, development only) the real
``mvld-edge`` runs in a child process pinned to ONE CPU core, reading three looping video
files paced in real time, and streams to a receiver socket in this process. Reported:

- sustained frame-set rate (from the messages' send times), and whether 3 x 30 FPS held;
- CPU use of the edge process in steady state (``/proc/PID/stat`` between the first and
  the last message: start-up imports are left out), in cores, and the headroom
  (one core / CPU used; the target is at least 2x);
- capture-to-send latency p50 / p99 over every sent view (message send time minus the
  view's capture time, both written by the node). A frame set samples each camera's newest
  frame, so half a camera frame period (~17 ms at 30 FPS) of waiting is in the median.

The machine is shared: CPU use is what the edge process consumed (not wall time), so other
load on the pinned core lowers the achievable rate but not the measured CPU cost.

Usage: ``python bench/bench_edge.py [--seconds 20] [--out bench/results/edge.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from mvld.common.default_model import DEFAULT_MODEL
from mvld.common.transport import LatentSubscriber
from mvld.common.wire import decode_frameset
from mvld.hardware import cpu_name
from mvld.model.checkpoint import checkpoint_paths, load_mvld_model
from mvld.sim.faults import SyntheticCamera

CAMERAS = 3
FPS = 30
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
RUN_CLI = "import sys; from mvld.edge.cli import main; sys.exit(main())"


def model_under_test(folder: Path) -> tuple[Path, Path, int, str]:
    """The model the edge runs: (checkpoint, ONNX folder, encoder parameters, description).

    The shipped default model unless ``--model`` names another folder holding a checkpoint
    and its ``encoder.onnx`` (as ``mvld-export onnx`` writes them).
    """
    model = load_mvld_model(folder)
    config = model.autoencoder.config
    params = sum(p.numel() for p in model.autoencoder.encoder.parameters())
    latent = (
        "x".join(map(str, config.latent_shape))
        if config.latent_channels
        else str(config.latent_dim)
    )
    what = f"{folder} ({model.preprocess.width}x{model.preprocess.height}, latent {latent})"
    return checkpoint_paths(folder)[0], folder, params, what


def write_videos(work: Path, width: int, height: int, frames: int) -> list[Path]:
    """One MJPG video per camera of a moving synthetic scene (they loop in the benchmark)."""
    paths = []
    for cam in range(CAMERAS):
        path = work / f"cam{cam}.avi"
        camera = SyntheticCamera(height=height, width=width, seed=cam)
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (width, height))
        for _ in range(frames):
            writer.write(cv2.cvtColor(camera.read(), cv2.COLOR_RGB2BGR))
        writer.release()
        paths.append(path)
    return paths


def stage_costs(videos: list[Path], onnx_dir: Path, checkpoint: Path, sets: int = 90) -> dict:
    """CPU milliseconds per frame set of each stage, in this process on one thread."""
    from mvld.edge.encoder import open_encoder
    from mvld.edge.health import HealthMonitor
    from mvld.edge.sources.files import FileSource

    sources = [FileSource(str(path), loop=True) for path in videos]
    monitors = [HealthMonitor() for _ in videos]
    encoders = {
        "onnxruntime": open_encoder(onnx_dir, "onnxruntime", threads=1),
        "torch": open_encoder(checkpoint, "torch", threads=1),
    }
    totals = dict.fromkeys(["decode", "health", *[f"encode_{n}" for n in encoders]], 0.0)
    for _ in range(sets):
        started = time.process_time()
        images = [source.read().image for source in sources]
        totals["decode"] += time.process_time() - started
        started = time.process_time()
        for monitor, image in zip(monitors, images, strict=True):
            monitor.update(image, time.time())
        totals["health"] += time.process_time() - started
        for name, encoder in encoders.items():
            started = time.process_time()
            encoder.encode(images)  # preprocessing included, one batched call
            totals[f"encode_{name}"] += time.process_time() - started
    for source in sources:
        source.close()
    return {
        f"{stage}_ms_per_frameset": round(1e3 * total / sets, 2) for stage, total in totals.items()
    }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


def run_edge(model: Path, backend: str, videos: list[Path], *, core: int, seconds: float) -> dict:
    """One mvld-edge run pinned to ``core``; measured from the messages it sends."""
    frames = int(seconds * FPS)
    with LatentSubscriber("tcp://127.0.0.1:*", latest_only=False, recv_hwm=100000) as sub:
        command = [
            sys.executable,
            "-c",
            RUN_CLI,
            "--cams",
            ",".join(map(str, videos)),
            "--connect",
            sub.endpoints[0],
            "--model",
            str(model),
            "--backend",
            backend,
            "--threads",
            "1",
            "--fps",
            str(FPS),
            "--frames",
            str(frames),
            "--status-every",
            "5",
            "--loop",
            "--realtime",
        ]
        process = subprocess.Popen(
            command,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, {core}),
        )
        received, cpu_marks = [], []
        deadline = time.monotonic() + seconds * 3 + 60
        while process.poll() is None and time.monotonic() < deadline:
            data = sub.recv(100)
            if data is None:
                continue
            received.append(decode_frameset(data))
            if len(received) == 1 or len(received) % 30 == 0:
                try:
                    cpu_marks.append((time.monotonic(), process_cpu_seconds(process.pid)))
                except (FileNotFoundError, ProcessLookupError):
                    break
        _, stderr = process.communicate(timeout=30)
    if process.returncode != 0 or len(received) < 10:
        raise RuntimeError(f"edge run failed ({process.returncode}): {stderr[-2000:]}")
    return summarise(received, cpu_marks, frames)


def summarise(messages: list, cpu_marks: list[tuple[float, float]], frames: int) -> dict:
    """Rate, CPU and latency statistics of one run."""
    steady = messages[len(messages) // 10 :]  # leave out start-up (health warm-up, imports)
    times = np.array([m.send_time for m in steady])
    rate = (len(steady) - 1) / (times[-1] - times[0])
    latencies = [
        m.send_time - v.capture_time for m in steady for v in m.views if v.latent is not None
    ]
    ok_views = sum(v.latent is not None for m in steady for v in m.views)
    first, last = cpu_marks[len(cpu_marks) // 10], cpu_marks[-1]
    cores = (last[1] - first[1]) / (last[0] - first[0])
    return {
        "framesets_requested": frames,
        "framesets_received": len(messages),
        "framesets_per_s": round(rate, 2),
        "ok_view_fraction": round(ok_views / (CAMERAS * len(steady)), 3),
        "cpu_cores": round(cores, 3),
        "headroom_on_one_core": round(1.0 / cores, 2) if cores > 0 else None,
        "capture_to_send_ms_p50": round(1e3 * float(np.percentile(latencies, 50)), 2),
        "capture_to_send_ms_p99": round(1e3 * float(np.percentile(latencies, 99)), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument(
        "--core",
        type=int,
        default=max(os.sched_getaffinity(0)),
        help="the CPU core the edge process is pinned to",
    )
    parser.add_argument("--backends", default="onnxruntime,torch")
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="model folder with a checkpoint and encoder.onnx (default: the shipped model)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/edge.json"))
    args = parser.parse_args(argv)

    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint, onnx_dir, params, model_text = model_under_test(args.model)
        videos = write_videos(work, args.width, args.height, frames=3 * FPS)
        torch.set_num_threads(1)
        stages = stage_costs(videos, onnx_dir, checkpoint)
        for backend in args.backends.split(","):
            model = onnx_dir if backend != "torch" else checkpoint
            print(f"running {backend} for {args.seconds:.0f} s ...", flush=True)
            result = run_edge(model, backend, videos, core=args.core, seconds=args.seconds)
            results.append({"backend": backend, "mode": f"{CAMERAS}x{FPS}fps", **result})

    report = {
        "benchmark": "bench/bench_edge.py",
        "hardware": {
            "cpu": cpu_name(),
            "pinned_core": args.core,
            "cores_visible": os.cpu_count(),
            "load_average_1min_before_after": [
                round(load_before[0], 2),
                round(os.getloadavg()[0], 2),
            ],
        },
        "setup": {
            "cameras": CAMERAS,
            "camera_fps": FPS,
            "frame_size": [args.width, args.height],
            "model": model_text,
            "encoder_parameters": params,
            "encoder_threads": 1,
            "seconds": args.seconds,
            "sources": "MJPG video files, looping, paced in real time (3x30fps mode)",
        },
        "versions": {
            "python": platform.python_version(),
            "opencv": cv2.__version__,
            "numpy": np.__version__,
            "torch": torch.__version__,
        },
        "results": results,
        "stage_cpu_ms_per_frameset_3_cameras": stages,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(results)
    print("CPU ms per frame set of 3 cameras, by stage:", json.dumps(stages))
    print(f"written to {args.out}")
    return 0


def print_table(results: list[dict]) -> None:
    """The results as a fixed-width table."""
    header = (
        f"{'backend':<12} {'mode':<9} {'sets/s':>7} {'ok views':>8} {'CPU cores':>9} "
        f"{'headroom':>8} {'p50 ms':>7} {'p99 ms':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['backend']:<12} {r['mode']:<9} {r['framesets_per_s']:>7.1f} "
            f"{r['ok_view_fraction']:>8.2f} {r['cpu_cores']:>9.2f} "
            f"{r['headroom_on_one_core']:>7.1f}x {r['capture_to_send_ms_p50']:>7.1f} "
            f"{r['capture_to_send_ms_p99']:>7.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
