"""Rendering speed of the simulated rig (issue 3, item 5: at least 500 views/s on 2 cores).

Three measurements, each reported in views/s of wall-clock time (one view = one camera image)
and in views per CPU-second (this process and its workers), which does not depend on how busy
the machine is: on N free cores the wall-clock rate approaches N times the CPU rate.

- ``render only``: ``SimRig.render`` in one process, scene already built (TinyRenderer alone);
- ``dataset, 1 process``: ``render_dataset`` end to end (scene building, physics, rendering,
  PNG encoding, labels), one process;
- ``dataset, N processes``: the same with N worker processes (process start-up included).

    python bench/bench_render.py                          # 600 frame sets x 3 cameras, 64x64
    python bench/bench_render.py --frames 3000 --workers 1 2 --size 128 --shadows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

from mvld.sim.rig import RenderJob, RigConfig, SimRig, render_dataset, ring_of_cameras


def cpu_seconds() -> float:
    """CPU time of this process plus its finished child processes."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_render_only(rig: RigConfig, frame_sets: int) -> tuple[float, float]:
    """(views/s, views per CPU-second) of rendering alone (a new scene every 20 frame sets)."""
    with SimRig(rig) as sim:
        elapsed = cpu = 0.0
        for index in range(frame_sets):
            if index % 20 == 0:
                sim.reset(0, index // 20)
            start, start_cpu = time.perf_counter(), time.process_time()
            sim.render()
            elapsed += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
    views = frame_sets * rig.num_cameras
    return views / elapsed, views / cpu


def time_dataset(
    rig: RigConfig, frame_sets: int, workers: int, scratch: Path
) -> tuple[float, float]:
    """(views/s, views per CPU-second) of ``render_dataset`` with ``workers`` processes."""
    out = scratch / f"w{workers}"
    start, start_cpu = time.perf_counter(), cpu_seconds()
    render_dataset(RenderJob(out=out, frames=frame_sets, rig=rig, seed=0, workers=workers))
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    shutil.rmtree(out)
    views = frame_sets * rig.num_cameras
    return views / elapsed, views / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=600, help="frame sets per measurement")
    parser.add_argument("--cameras", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="square image size")
    parser.add_argument("--shadows", action="store_true")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="bench/results/render.json", help="JSON results path")
    args = parser.parse_args()

    rig = RigConfig(
        cameras=ring_of_cameras(args.cameras),
        image_size=(args.size, args.size),
        shadows=args.shadows,
    )
    load_before = os.getloadavg()[0]
    results = {"render only, 1 process": time_render_only(rig, args.frames)}
    with tempfile.TemporaryDirectory() as scratch:
        for workers in args.workers:
            name = f"dataset, {workers} process{'es' if workers > 1 else ''}"
            results[name] = time_dataset(rig, args.frames, workers, Path(scratch))

    report = {
        "frame_sets": args.frames,
        "cameras": args.cameras,
        "image_size": [args.size, args.size],
        "shadows": args.shadows,
        "views_per_s": {name: round(wall, 1) for name, (wall, _) in results.items()},
        "views_per_cpu_s": {name: round(cpu, 1) for name, (_, cpu) in results.items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1min_before_after": [load_before, os.getloadavg()[0]],
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{args.frames} frame sets x {args.cameras} cameras, {args.size}x{args.size}, shadows "
        f"{'on' if args.shadows else 'off'}, load average {load_before:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'measurement':28s} {'views/s':>9s} {'views/CPU-s':>12s}")
    for name, (wall, cpu) in results.items():
        print(f"{name:28s} {wall:9.0f} {cpu:12.0f}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
