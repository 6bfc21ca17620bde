"""Camera-fault benchmark of the edge health monitor (issue 6, item 4).

Streams, every frame 640x480 RGB as a field camera would deliver it:

- ``video``: a synthetic textured scene with moving objects, lighting drift and sensor noise
  (``mvld.sim.faults.SyntheticCamera``), faults injected *before* encoding, written to a real
  video file with OpenCV (MPEG-4 part 2 or Motion JPEG, so codec artefacts are part of the
  test) and read back with ``cv2.VideoCapture``;
- ``sim``: the pybullet tabletop rig (``mvld.sim.rig``), every camera of the rig one
  stream, rendered frames upscaled to 640x480 with sensor noise, faults injected after.

Each faulty stream is a warm-up, then one episode per fault in a shuffled order, each
followed by a healthy recovery stretch. Reported per fault: recall (the camera left ``ok``
during the episode), reason accuracy (the first declared reason is an accepted one),
detection delay in frames, and the frames taken to clear after the fault ends. Healthy-only
streams and the recovery stretches (once the camera is ``ok`` again) give false alarms per
10,000 healthy frames. Every ``update`` call is timed (OpenCV on one thread).

    python bench/bench_health.py --quick            # ~1-2 minutes
    python bench/bench_health.py                    # the full run, a few minutes
"""

import argparse
import json
import logging
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from mvld.edge.health import OK, HealthConfig, HealthMonitor
from mvld.sim.faults import (
    FAULTS,
    FULL_FAULTS,
    SyntheticCamera,
    accepted_reasons,
    add_sensor_noise,
    make_fault,
)

FRAME_SIZE = (640, 480)  # width, height delivered to the monitor
CODECS = {"mp4v": ".mp4", "MJPG": ".avi"}
Label = str | None  # the fault injected into a frame, None when healthy


@dataclass(frozen=True)
class Plan:
    """How long each part of a faulty stream lasts, and how many streams of each kind."""

    warmup: int
    fault: int
    recovery: int
    video_fault_streams: int
    video_healthy_frames: int
    sim_fault_runs: int
    sim_healthy_sets: int


QUICK = Plan(
    warmup=60,
    fault=40,
    recovery=50,
    video_fault_streams=2,
    video_healthy_frames=2400,
    sim_fault_runs=1,
    sim_healthy_sets=300,
)
FULL = Plan(
    warmup=60,
    fault=60,
    recovery=60,
    video_fault_streams=6,
    video_healthy_frames=24000,
    sim_fault_runs=3,
    sim_healthy_sets=3000,
)


def schedule(plan: Plan, rng: np.random.Generator, faults: list[str]) -> list[Label]:
    """Per-frame labels: warm-up, then each fault once (shuffled) with a recovery after it."""
    labels: list[Label] = [None] * plan.warmup
    for name in rng.permutation(faults):
        labels += [str(name)] * plan.fault + [None] * plan.recovery
    return labels


class FaultedCamera:
    """Applies the scheduled fault episodes to a stream of healthy frames."""

    def __init__(self, labels: list[Label], rng: np.random.Generator) -> None:
        self.labels = labels
        self.rng = rng
        self.injector = None
        self.previous: Label = None

    def apply(self, index: int, frame: np.ndarray) -> np.ndarray:
        """Frame ``index`` with its scheduled fault (a fresh injector per episode)."""
        label = self.labels[index]
        if label != self.previous:
            self.injector = make_fault(label, self.rng) if label else None
            self.previous = label
        return self.injector.apply(frame) if self.injector else frame


@dataclass
class Scorer:
    """Turns (label, health) pairs of one stream into episodes and false alarms."""

    episodes: list[dict] = field(default_factory=list)
    healthy_frames: int = 0
    false_alarms: Counter = field(default_factory=Counter)
    _label: Label = None
    _frame: int = 0
    _episode: dict | None = None
    _recovering: dict | None = None
    _was_ok: bool = True

    def add(self, label: Label, state: str, reason: str | None) -> None:
        """Score one frame."""
        if label != self._label:
            self._begin(label)
        ok = state == OK
        if self._episode is not None:
            if not ok and self._episode["delay"] is None:
                self._episode["delay"] = self._frame - self._episode["start"]
                self._episode["reason"] = reason
        else:
            if self._recovering is not None and ok:
                self._recovering["clear"] = self._frame - self._recovering["end"]
                self._recovering = None
            if self._recovering is None:
                self.healthy_frames += 1
                if self._was_ok and not ok:
                    self.false_alarms[reason] += 1
        self._was_ok = ok
        self._frame += 1

    def _begin(self, label: Label) -> None:
        """A new segment starts at the current frame."""
        if self._episode is not None:
            self._episode["end"] = self._frame
            self._recovering = self._episode if self._episode["delay"] is not None else None
        self._episode = None
        if label is not None:
            self._recovering = None
            self._episode = {
                "fault": label,
                "start": self._frame,
                "delay": None,
                "reason": None,
                "clear": None,
            }
            self.episodes.append(self._episode)
        self._label = label


class TrackedCamera:
    """One camera under test: its monitor, its scorer and the timing of every update."""

    def __init__(self, kind: str, config: HealthConfig, timings: "Timings") -> None:
        self.kind = kind
        self.monitor = HealthMonitor(config, camera=kind)
        self.scorer = Scorer()
        self.timings = timings
        self.frames = 0

    def feed(self, label: Label, frame: np.ndarray) -> None:
        """Judge one frame (30 FPS timestamps) and score the answer."""
        wall, cpu = time.perf_counter(), time.thread_time()
        health = self.monitor.update(frame, self.frames / 30.0)
        self.timings.cpu_ms.append(1e3 * (time.thread_time() - cpu))
        self.timings.wall_ms.append(1e3 * (time.perf_counter() - wall))
        self.scorer.add(label, health.state, health.reason)
        self.frames += 1


@dataclass
class Timings:
    """Per-update cost: wall clock, and CPU time of the thread (blind to other processes)."""

    wall_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)


@dataclass
class Run:
    """Everything measured over all streams."""

    config: HealthConfig
    cameras: list[TrackedCamera] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)

    def camera(self, kind: str) -> TrackedCamera:
        """A fresh camera under test."""
        tracked = TrackedCamera(kind, self.config, self.timings)
        self.cameras.append(tracked)
        return tracked


# -- streams ----------------------------------------------------------------------------------


def run_video_stream(run: Run, labels: list[Label], seed: int, codec: str, folder: Path) -> None:
    """Render the scheduled stream into a video file, then judge its decoded frames."""
    rng = np.random.default_rng(seed)
    camera = SyntheticCamera(*FRAME_SIZE[::-1], seed=seed)
    faulted = FaultedCamera(labels, rng)
    path = folder / f"stream{seed}{CODECS[codec]}"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), 30.0, FRAME_SIZE)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {codec} video here")
    for index in range(len(labels)):
        writer.write(cv2.cvtColor(faulted.apply(index, camera.read()), cv2.COLOR_RGB2BGR))
    writer.release()
    tracked = run.camera(f"video-{codec}")
    capture = cv2.VideoCapture(str(path))
    for label in labels:
        ok, frame = capture.read()
        if not ok:
            raise RuntimeError(f"{path} ended early")
        tracked.feed(label, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    path.unlink()


def run_sim_streams(run: Run, camera_labels: list[list[Label]], seed: int) -> None:
    """Render the rig (one stream per camera), upscale with sensor noise, inject, judge."""
    from mvld.sim.rig import RigConfig, SimRig, ring_of_cameras

    config = RigConfig(cameras=ring_of_cameras(len(camera_labels)), image_size=(128, 128), fps=30.0)
    rng = np.random.default_rng(seed)
    faulted = [FaultedCamera(labels, rng) for labels in camera_labels]
    tracked = [run.camera("sim") for _ in camera_labels]
    with SimRig(config) as rig:
        rig.reset(seed, 0)
        for index in range(len(camera_labels[0])):
            if index:
                rig.advance()
            for view, rendered in enumerate(rig.render().views):
                frame = cv2.resize(rendered, FRAME_SIZE, interpolation=cv2.INTER_LINEAR)
                frame = faulted[view].apply(index, add_sensor_noise(frame, rng, 2.0))
                tracked[view].feed(camera_labels[view][index], frame)


# -- the benchmark ------------------------------------------------------------------------------


def run_benchmark(plan: Plan, config: HealthConfig, seed: int, sim: bool = True) -> Run:
    """All streams of the plan; returns the raw measurements."""
    run = Run(config)
    faults = list(FAULTS)
    codecs = list(CODECS)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for stream in range(plan.video_fault_streams):
            codec = codecs[stream % len(codecs)]
            labels = schedule(plan, np.random.default_rng(seed + stream), faults)
            logging.info("video stream %d (%s): %d frames", stream, codec, len(labels))
            run_video_stream(run, labels, seed + stream, codec, folder)
        for part in range(4):
            codec = codecs[part % len(codecs)]
            labels = [None] * (plan.video_healthy_frames // 4)
            logging.info("healthy video %d (%s): %d frames", part, codec, len(labels))
            run_video_stream(run, labels, seed + 100 + part, codec, folder)
    if not sim:
        return run
    for sim_run in range(plan.sim_fault_runs):
        rng = np.random.default_rng(seed + 200 + sim_run)
        labels = [schedule(plan, rng, faults) for _ in range(3)]
        logging.info("sim run %d: 3 cameras x %d frames", sim_run, len(labels[0]))
        run_sim_streams(run, labels, seed + 200 + sim_run)
    logging.info("sim healthy: 3 cameras x %d frames", plan.sim_healthy_sets)
    run_sim_streams(run, [[None] * plan.sim_healthy_sets] * 3, seed + 300)
    return run


# -- report -------------------------------------------------------------------------------------


def fault_table(cameras: list[TrackedCamera]) -> dict[str, dict]:
    """Per fault: episodes, recall, reason accuracy, detection and clearing delays."""
    episodes: dict[str, list[dict]] = defaultdict(list)
    for tracked in cameras:
        for episode in tracked.scorer.episodes:
            episodes[episode["fault"]].append(episode)
    table = {}
    for name in FAULTS:
        found = [e for e in episodes[name] if e["delay"] is not None]
        delays = [e["delay"] for e in found]
        clears = [e["clear"] for e in found if e["clear"] is not None]
        count = len(episodes[name])
        table[name] = {
            "full_fault": name in FULL_FAULTS,
            "accepted_reasons": list(accepted_reasons(name)),
            "episodes": count,
            "recall": len(found) / count if count else None,
            "reason_accuracy": (
                sum(e["reason"] in accepted_reasons(name) for e in found) / len(found)
                if found
                else None
            ),
            "reasons": dict(Counter(e["reason"] for e in found)),
            "delay_frames_mean": float(np.mean(delays)) if delays else None,
            "delay_frames_max": int(max(delays)) if delays else None,
            "clear_frames_mean": float(np.mean(clears)) if clears else None,
            "not_cleared": len(found) - len(clears),
        }
    return table


def false_alarm_table(cameras: list[TrackedCamera]) -> dict[str, dict]:
    """Per stream kind: healthy frames judged, false alarms and the rate per 10,000."""
    table: dict[str, dict] = {}
    for kind in [*sorted({c.kind for c in cameras}), "all"]:
        chosen = [c for c in cameras if kind in ("all", c.kind)]
        frames = sum(c.scorer.healthy_frames for c in chosen)
        alarms: Counter = Counter()
        for tracked in chosen:
            alarms.update(tracked.scorer.false_alarms)
        total = sum(alarms.values())
        table[kind] = {
            "healthy_frames": frames,
            "false_alarms": total,
            "per_10000": 1e4 * total / frames if frames else None,
            "by_reason": dict(alarms),
        }
    return table


def timing_table(timings: Timings) -> dict[str, float]:
    """Cost of one ``update`` at 640x480 input, OpenCV on one thread."""
    wall, cpu = np.asarray(timings.wall_ms), np.asarray(timings.cpu_ms)
    return {
        "updates": int(wall.size),
        "input": f"{FRAME_SIZE[0]}x{FRAME_SIZE[1]}",
        "wall_mean_ms": float(wall.mean()),
        "wall_p50_ms": float(np.percentile(wall, 50)),
        "wall_p99_ms": float(np.percentile(wall, 99)),
        "cpu_mean_ms": float(cpu.mean()),
        "cpu_p99_ms": float(np.percentile(cpu, 99)),
    }


def _fmt(value: float | None, spec: str) -> str:
    """A table cell: '-' for a missing value."""
    return "-" if value is None else format(value, spec)


def print_report(report: dict) -> None:
    """The tables of the report, human-readable."""
    print(
        f"{'fault':15s} {'episodes':>8s} {'recall':>7s} {'reason':>7s} {'delay':>6s} "
        f"{'max':>4s} {'clear':>6s}  reasons"
    )
    for name, row in report["faults"].items():
        cells = [
            _fmt(row["recall"], ".2f"),
            _fmt(row["reason_accuracy"], ".2f"),
            _fmt(row["delay_frames_mean"], ".1f"),
            _fmt(row["delay_frames_max"], "d"),
            _fmt(row["clear_frames_mean"], ".1f"),
        ]
        star = "*" if row["full_fault"] else " "
        print(
            f"{name + star:15s} {row['episodes']:8d} {cells[0]:>7s} {cells[1]:>7s} "
            f"{cells[2]:>6s} {cells[3]:>4s} {cells[4]:>6s}  {row['reasons']}"
        )
    print("* full fault (target recall >= 0.95); delays in frames")
    for kind, table in report["faults_by_stream"].items():
        recalls = " ".join(
            f"{name}={_fmt(row['recall'], '.2f')}"
            for name, row in table.items()
            if row["recall"] is not None and row["recall"] < 1.0
        )
        print(f"recall below 1 on {kind}: {recalls or 'none'}")
    for kind, row in report["false_alarms"].items():
        print(
            f"false alarms {kind:11s}: {row['false_alarms']} in {row['healthy_frames']} healthy "
            f"frames = {_fmt(row['per_10000'], '.2f')} per 10,000 {row['by_reason']}"
        )
    timing = report["timing"]
    print(
        f"update at {timing['input']} over {timing['updates']} updates, OpenCV on 1 thread: "
        f"wall mean {timing['wall_mean_ms']:.3f} ms, p50 {timing['wall_p50_ms']:.3f} ms, "
        f"p99 {timing['wall_p99_ms']:.3f} ms; thread CPU mean {timing['cpu_mean_ms']:.3f} ms, "
        f"p99 {timing['cpu_p99_ms']:.3f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write the JSON report and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about 1-2 minutes)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/health.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sim", action="store_true", help="skip the pybullet rig streams")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("mvld.edge.health").setLevel(logging.ERROR)
    cv2.setNumThreads(1)
    plan, config = (QUICK if args.quick else FULL), HealthConfig()
    started = time.perf_counter()
    run = run_benchmark(plan, config, args.seed, sim=not args.no_sim)
    report = {
        "command": "python bench/bench_health.py" + (" --quick" if args.quick else ""),
        "plan": plan.__dict__,
        "config": config.__dict__,
        "seed": args.seed,
        "faults": fault_table(run.cameras),
        "false_alarms": false_alarm_table(run.cameras),
        "faults_by_stream": {
            kind: fault_table([c for c in run.cameras if c.kind == kind])
            for kind in sorted({c.kind for c in run.cameras})
        },
        "timing": timing_table(run.timings),
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"wrote {args.out} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
