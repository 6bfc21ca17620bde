"""Field benchmark of the camera health monitor: moving cameras, light changes, passers-by.

Field cameras move. This benchmark renders cameras that pan, sway, shake, ride a vehicle,
hunt for exposure, see lights switched on and off and people and vehicles walk by
(``mvld.sim.motion``), each looking into a still canvas larger than its 640x480 view: a
textured synthetic scene (``textured``) or a 2x2 mosaic of pybullet rig renders (``rig``,
large flat table tops and white background). Two sets:

- **healthy**: long streams of every motion kind (plus ``cuts``: a new unrelated view every
  frame, like an image folder of unrelated pictures). A false alarm is a switch from ``ok``
  to a fault; the rate is given per hour of video at 30 FPS (frames are judged as fast as
  they are made, the hours are counted in frames, not waited for);
- **faults**: every fault of ``mvld.sim.faults`` injected on top of the moving view (the
  camera keeps moving under the fault), each for 60 frames (40 in ``--quick``) after a
  warm-up and followed by 60 (50) healthy frames; recall, the first declared reason, the
  delay from the fault's first frame to the declaration and the time to clear after it.

    python bench/bench_health_field.py --quick     # about 1-2 minutes
    python bench/bench_health_field.py             # the full run (about 10 minutes)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from mvld.edge.health import OK, HealthConfig, HealthMonitor, load_health_configs
from mvld.sim.faults import FAULTS, accepted_reasons
from mvld.sim.motion import MOTIONS, MovingCamera, rig_canvas, textured_canvas

FPS = 30.0
FRAME = (480, 640)  # height, width
HEALTHY_KINDS = (*MOTIONS, "cuts")
TARGET_FAULTS = ("black", "frozen", "noise", "occlusion_100", "blur_8", "shift_25")


def _bench_health():
    """bench/bench_health.py as a module (its scorer and schedule; bench/ is not a package)."""
    path = Path(__file__).resolve().parent / "bench_health.py"
    spec = importlib.util.spec_from_file_location("bench_health", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench_health()


@dataclass(frozen=True)
class Plan:
    """How much of each set to run."""

    healthy_frames: int  # per motion kind and canvas
    fault_motions: tuple[str, ...]
    fault_seeds: int  # fault streams per motion kind and canvas
    warmup: int
    fault: int
    recovery: int


QUICK = Plan(
    healthy_frames=900,
    fault_motions=("static", "pan", "shake", "sway"),
    fault_seeds=1,
    warmup=60,
    fault=40,
    recovery=50,
)
FULL = Plan(
    healthy_frames=12000, fault_motions=MOTIONS, fault_seeds=1, warmup=60, fault=60, recovery=60
)


class CutCamera:
    """Unrelated views, one per frame (an image folder of unrelated pictures)."""

    def __init__(self, canvas: np.ndarray, seed: int) -> None:
        self.camera = MovingCamera(canvas, "static", seed=seed)
        self.rng = np.random.default_rng(seed)
        height, width = canvas.shape[:2]
        self.limits = (width - FRAME[1], height - FRAME[0])

    def read(self) -> np.ndarray:
        x, y = (int(self.rng.integers(limit + 1)) for limit in self.limits)
        view = np.ascontiguousarray(self.camera.canvas[y : y + FRAME[0], x : x + FRAME[1]])
        if self.rng.random() < 0.5:
            view = np.ascontiguousarray(view[:, ::-1])
        noise = self.camera._noise[: FRAME[0], : FRAME[1] * 3].reshape(view.shape)
        return cv2.add(view, noise, dtype=cv2.CV_8U)


@dataclass
class Timing:
    """Thread CPU time of every ``update`` (blind to other processes on the machine)."""

    cpu_ms: list[float]

    def judge(self, monitor: HealthMonitor, frame: np.ndarray, timestamp: float):
        started = time.thread_time()
        health = monitor.update(frame, timestamp)
        self.cpu_ms.append(1e3 * (time.thread_time() - started))
        return health


def canvases(seed: int) -> dict[str, np.ndarray]:
    """The two scenes every camera looks into."""
    return {"textured": textured_canvas(seed), "rig": rig_canvas(seed + 1)}


def run_healthy(
    plan: Plan,
    scenes: dict[str, np.ndarray],
    config: HealthConfig,
    timing: Timing,
    seed: int,
    kinds: tuple[str, ...] = HEALTHY_KINDS,
) -> dict[str, dict]:
    """False alarms per motion kind over ``plan.healthy_frames`` per canvas."""
    table: dict[str, dict] = {}
    for kind in kinds:
        frames = alarms = unusable = 0
        reasons: Counter = Counter()
        for index, (name, canvas) in enumerate(scenes.items()):
            camera_seed = seed + 1000 * index + HEALTHY_KINDS.index(kind)
            camera = (
                CutCamera(canvas, camera_seed)
                if kind == "cuts"
                else MovingCamera(canvas, kind, seed=camera_seed)
            )
            monitor = HealthMonitor(config, camera=f"{name}-{kind}")
            was_ok = True
            for frame_index in range(plan.healthy_frames):
                health = timing.judge(monitor, camera.read(), frame_index / FPS)
                ok = health.state == OK
                if was_ok and not ok:
                    alarms += 1
                    reasons[f"{name}:{health.reason}"] += 1
                unusable += not ok
                was_ok = ok
            frames += plan.healthy_frames
        hours = frames / FPS / 3600
        table[kind] = {
            "frames": frames,
            "hours": round(hours, 3),
            "false_alarms": alarms,
            "per_hour": alarms / hours,
            "withheld_share": unusable / frames,
            "reasons": dict(reasons),
        }
        logging.info("healthy %-9s %d frames, %d false alarms", kind, frames, alarms)
    return table


def run_healthy_long(
    hours: float,
    chunk_frames: int,
    config: HealthConfig,
    timing: Timing,
    seed: int,
    kinds: tuple[str, ...],
    out: Path,
    wall_limit_s: float | None,
    report: dict,
) -> dict[str, dict]:
    """Hours of healthy moving video, written to ``out`` after every chunk (a partial run counts).

    Rounds over every motion kind and both canvases, ``chunk_frames`` frames per camera, each
    chunk a fresh camera (new motion parameters, new passers-by, a fresh monitor that warms
    up), each round new canvases; until ``hours`` of video (all kinds but ``cuts``) are judged
    or ``wall_limit_s`` has passed. Frames are judged as fast as they are rendered.
    """
    counted = tuple(kind for kind in kinds if kind != "cuts")
    table = {
        kind: {
            "frames": 0,
            "hours": 0.0,
            "false_alarms": 0,
            "per_hour": 0.0,
            "withheld_share": 0.0,
            "reasons": {},
            "chunks": 0,
        }
        for kind in kinds
    }
    withheld: Counter = Counter()
    started = time.perf_counter()
    round_index = 0
    while True:
        scenes = canvases(seed + 7919 * round_index)
        for kind in kinds:
            for canvas_index, (name, canvas) in enumerate(scenes.items()):
                camera_seed = (
                    seed + 100_000 * round_index + 1000 * canvas_index + HEALTHY_KINDS.index(kind)
                )
                camera = (
                    CutCamera(canvas, camera_seed)
                    if kind == "cuts"
                    else MovingCamera(canvas, kind, seed=camera_seed)
                )
                monitor = HealthMonitor(config, camera=f"{name}-{kind}-{round_index}")
                row, was_ok = table[kind], True
                for frame_index in range(chunk_frames):
                    health = timing.judge(monitor, camera.read(), frame_index / FPS)
                    ok = health.state == OK
                    if was_ok and not ok:
                        row["false_alarms"] += 1
                        key = f"{name}:{health.reason}"
                        row["reasons"][key] = row["reasons"].get(key, 0) + 1
                        logging.warning(
                            "false alarm: %s %s round %d frame %d: %s",
                            name,
                            kind,
                            round_index,
                            frame_index,
                            health.reason,
                        )
                    withheld[kind] += not ok
                    was_ok = ok
                row["frames"] += chunk_frames
                row["chunks"] += 1
                row["hours"] = round(row["frames"] / FPS / 3600, 4)
                row["per_hour"] = row["false_alarms"] / (row["frames"] / FPS / 3600)
                row["withheld_share"] = withheld[kind] / row["frames"]
            total_hours = sum(table[k]["frames"] for k in counted) / FPS / 3600
            wall = time.perf_counter() - started
            _write_long_report(out, report, table, counted, timing, wall)
            logging.info(
                "round %d %-9s done: %.2f h of healthy video in %.0f s, %d false alarms",
                round_index,
                kind,
                total_hours,
                wall,
                sum(table[k]["false_alarms"] for k in counted),
            )
            if total_hours >= hours or (wall_limit_s is not None and wall >= wall_limit_s):
                return table
        round_index += 1


def _write_long_report(
    out: Path,
    report: dict,
    table: dict[str, dict],
    counted: tuple[str, ...],
    timing: Timing,
    wall_s: float,
) -> None:
    """The long healthy run so far, with the false-alarm rate's 95% upper bound."""
    frames = sum(table[kind]["frames"] for kind in counted)
    alarms = sum(table[kind]["false_alarms"] for kind in counted)
    hours = frames / FPS / 3600
    cpu = np.asarray(timing.cpu_ms)
    report = {
        **report,
        "healthy": table,
        "wall_s": wall_s,
        "summary": {
            "healthy_hours": round(hours, 3),
            "healthy_false_alarms": alarms,
            "false_alarms_per_10h": 10 * alarms / hours if hours else None,
            "false_alarm_rate_95_upper_per_10h": (
                10 * _poisson_upper_95(alarms) / hours if hours else None
            ),
            "hours_needed_for_1_per_10h_with_no_alarm": 30.0,
            "cpu_mean_ms": float(cpu.mean()) if cpu.size else None,
            "cpu_p99_ms": float(np.percentile(cpu, 99)) if cpu.size else None,
            "updates": int(cpu.size),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(report, indent=2))
    partial.replace(out)  # a reader never sees half a file


def _poisson_upper_95(count: int) -> float:
    """One-sided 95% upper bound of a Poisson mean after ``count`` events (3.0 for none)."""
    bounds = (3.0, 4.74, 6.30, 7.75, 9.15, 10.51, 11.84, 13.15, 14.43, 15.71, 16.96)
    if count < len(bounds):
        return bounds[count]
    return count + 1.645 * math.sqrt(count) + 1.0  # normal approximation beyond ten


def run_faults(
    plan: Plan, scenes: dict[str, np.ndarray], config: HealthConfig, timing: Timing, seed: int
) -> tuple[list[dict], dict[str, object]]:
    """Every fault once per (motion, canvas, seed) stream, in a shuffled order.

    Also the false alarms of the healthy stretches between faults (once the camera is ``ok``
    again): an alarm there is one that a fault left behind.
    """
    recovery = {"frames": 0, "false_alarms": 0, "reasons": Counter()}
    bench_plan = BENCH.Plan(
        warmup=plan.warmup,
        fault=plan.fault,
        recovery=plan.recovery,
        video_fault_streams=0,
        video_healthy_frames=0,
        sim_fault_runs=0,
        sim_healthy_sets=0,
    )
    episodes = []
    for motion in plan.fault_motions:
        for index, (name, canvas) in enumerate(scenes.items()):
            for repeat in range(plan.fault_seeds):
                stream_seed = seed + 100 * index + 10 * MOTIONS.index(motion) + repeat
                rng = np.random.default_rng(stream_seed)
                labels = BENCH.schedule(bench_plan, rng, list(FAULTS))
                faulted = BENCH.FaultedCamera(labels, rng)
                camera = MovingCamera(canvas, motion, seed=stream_seed)
                monitor = HealthMonitor(config, camera=f"{name}-{motion}")
                scorer = BENCH.Scorer()
                for frame_index, label in enumerate(labels):
                    frame = faulted.apply(frame_index, camera.read())
                    health = timing.judge(monitor, frame, frame_index / FPS)
                    scorer.add(label, health.state, health.reason)
                for episode in scorer.episodes:
                    episodes.append({**episode, "motion": motion, "canvas": name})
                recovery["frames"] += scorer.healthy_frames
                recovery["false_alarms"] += sum(scorer.false_alarms.values())
                recovery["reasons"].update(
                    {
                        f"{name}:{motion}:{reason}": count
                        for reason, count in scorer.false_alarms.items()
                    }
                )
        logging.info("faults on %s cameras: done", motion)
    recovery["reasons"] = dict(recovery["reasons"])
    return episodes, recovery


def fault_table(episodes: list[dict]) -> dict[str, dict]:
    """Per fault: recall, reason accuracy, delay and clearing (frames at 30 FPS)."""
    by_fault: dict[str, list[dict]] = defaultdict(list)
    for episode in episodes:
        by_fault[episode["fault"]].append(episode)
    table = {}
    for name in FAULTS:
        rows = by_fault[name]
        found = [e for e in rows if e["delay"] is not None]
        delays = [e["delay"] for e in found]
        clears = [e["clear"] for e in found if e["clear"] is not None]
        table[name] = {
            "target": name in TARGET_FAULTS,
            "episodes": len(rows),
            "recall": len(found) / len(rows) if rows else None,
            "reason_accuracy": (
                sum(e["reason"] in accepted_reasons(name) for e in found) / len(found)
                if found
                else None
            ),
            "delay_mean": float(np.mean(delays)) if delays else None,
            "delay_max": int(max(delays)) if delays else None,
            "clear_mean": float(np.mean(clears)) if clears else None,
            "clear_max": int(max(clears)) if clears else None,
            "not_cleared": len(found) - len(clears),
            "reasons": dict(Counter(e["reason"] for e in found)),
            "missed_on": sorted(
                {f"{e['canvas']}:{e['motion']}" for e in rows if e["delay"] is None}
            ),
        }
    return table


def targets(
    faults: dict[str, dict],
    healthy: dict[str, dict],
    cpu_p99: float,
    delay_limit: int = 10,
    clear_limit: int = 60,
) -> dict[str, object]:
    """The issue's targets, each with the measured value and whether it holds."""
    strong = [faults[name] for name in TARGET_FAULTS if faults[name]["episodes"]]
    frames = sum(row["frames"] for kind, row in healthy.items() if kind != "cuts")
    alarms = sum(row["false_alarms"] for kind, row in healthy.items() if kind != "cuts")
    hours = frames / FPS / 3600
    worst_clear = max((row["clear_max"] or 0) for row in faults.values())
    return {
        "strong_recall_min": min((row["recall"] or 0.0 for row in strong), default=None),
        "strong_recall_ok": all((row["recall"] or 0.0) >= 0.95 for row in strong),
        "strong_delay_max": max((row["delay_max"] or 0 for row in strong), default=None),
        "strong_delay_ok": all((row["delay_max"] or 0) <= delay_limit for row in strong),
        "healthy_hours": round(hours, 2),
        "healthy_false_alarms": alarms,
        "false_alarms_per_10h": 10 * alarms / hours if hours else None,
        # With no alarm in H hours, a rate above 3/H per hour is ruled out at 95%.
        "false_alarm_rate_95_upper_per_10h": 10 * max(alarms, 3) / hours if hours else None,
        "clear_max_frames": worst_clear,
        "clear_ok": worst_clear <= clear_limit,
        "cpu_p99_ms": cpu_p99,
        "cpu_ok": cpu_p99 < 2.0,
    }


def print_report(report: dict) -> None:
    """Human-readable tables."""
    print(
        f"{'fault':14s} {'n':>3s} {'recall':>6s} {'reason':>6s} {'delay':>5s} {'max':>4s} "
        f"{'clear':>5s} {'max':>4s}  reasons / missed on"
    )
    for name, row in report["faults"].items():

        def cell(key: str, spec: str, row: dict = row) -> str:
            return "-" if row[key] is None else format(row[key], spec)

        star = "*" if row["target"] else " "
        print(
            f"{name + star:14s} {row['episodes']:3d} {cell('recall', '.2f'):>6s} "
            f"{cell('reason_accuracy', '.2f'):>6s} {cell('delay_mean', '.1f'):>5s} "
            f"{cell('delay_max', 'd'):>4s} {cell('clear_mean', '.1f'):>5s} "
            f"{cell('clear_max', 'd'):>4s}  {row['reasons']} {row['missed_on'] or ''}"
        )
    print("* strong fault (target: recall >= 0.95, delay <= 10 frames); frames at 30 FPS")
    for kind, row in report["healthy"].items():
        print(
            f"healthy {kind:9s}: {row['false_alarms']} false alarms in {row['hours']:.2f} h "
            f"({row['frames']} frames), withheld {100 * row['withheld_share']:.2f}% "
            f"{row['reasons'] or ''}"
        )
    between = report["between_faults"]
    print(
        f"between faults: {between['false_alarms']} false alarms in {between['frames']} healthy "
        f"frames {between['reasons'] or ''}"
    )
    timing = report["timing"]
    print(
        f"update at 640x480, one thread: CPU mean {timing['cpu_mean_ms']:.3f} ms, p99 "
        f"{timing['cpu_p99_ms']:.3f} ms over {timing['updates']} updates"
    )
    print("targets:", json.dumps(report["targets"]))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write the JSON report, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about 1-2 minutes)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/health_field.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--health",
        default="default",
        help="default, off or a TOML file of HealthConfig fields (docs/HEALTH.md)",
    )
    parser.add_argument(
        "--motions",
        help="comma-separated motion kinds to run (default: all "
        f"of the plan; {', '.join(HEALTHY_KINDS)})",
    )
    parser.add_argument("--no-faults", action="store_true", help="the healthy set only")
    parser.add_argument(
        "--healthy-frames", type=int, help="frames per motion kind and canvas (overrides the plan)"
    )
    parser.add_argument(
        "--healthy-hours",
        type=float,
        help="a long healthy run instead: this many hours of video over all "
        "motion kinds, fresh cameras every --chunk-frames, JSON rewritten after "
        "every chunk (no fault streams)",
    )
    parser.add_argument(
        "--chunk-frames",
        type=int,
        default=9000,
        help="frames per camera in a --healthy-hours run (default 9000: 5 min)",
    )
    parser.add_argument(
        "--max-wall-s",
        type=float,
        help="stop a --healthy-hours run after this many seconds (the JSON "
        "then holds what was judged)",
    )
    args = parser.parse_args(argv)
    if args.healthy_hours is not None and (args.healthy_hours <= 0 or args.chunk_frames < 1):
        parser.error("--healthy-hours and --chunk-frames must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("mvld.edge.health").setLevel(logging.ERROR)
    cv2.setNumThreads(1)
    plan = QUICK if args.quick else FULL
    if args.healthy_frames:
        plan = replace(plan, healthy_frames=args.healthy_frames)
    kinds = HEALTHY_KINDS
    if args.motions:
        kinds = tuple(kind.strip() for kind in args.motions.split(",") if kind.strip())
        unknown = sorted(set(kinds) - set(HEALTHY_KINDS))
        if unknown:
            parser.error(f"unknown motion kind(s) {unknown}; valid: {', '.join(HEALTHY_KINDS)}")
        plan = replace(plan, fault_motions=tuple(k for k in kinds if k in MOTIONS))
    if args.no_faults:
        plan = replace(plan, fault_motions=())
    config = load_health_configs(args.health, ("bench",))["bench"]
    if args.healthy_hours is not None:
        out = (
            args.out
            if args.out != parser.get_default("out")
            else Path("bench/results/health_field_long.json")
        )
        base = {
            "command": "python bench/bench_health_field.py " + " ".join(argv or sys.argv[1:]),
            "seed": args.seed,
            "chunk_frames": args.chunk_frames,
            "target_hours": args.healthy_hours,
            "config": config.__dict__,
        }
        timing = Timing([])
        table = run_healthy_long(
            args.healthy_hours,
            args.chunk_frames,
            config,
            timing,
            args.seed,
            kinds,
            out,
            args.max_wall_s,
            base,
        )
        summary = json.loads(out.read_text())["summary"]
        for kind, row in table.items():
            print(
                f"healthy {kind:9s}: {row['false_alarms']} false alarms in {row['hours']:.2f} h "
                f"{row['reasons'] or ''}"
            )
        print("summary:", json.dumps(summary))
        print(f"wrote {out}")
        return 0
    started = time.perf_counter()
    scenes = canvases(args.seed)
    timing = Timing([])
    healthy = run_healthy(plan, scenes, config, timing, args.seed, kinds)
    episodes, recovery = run_faults(plan, scenes, config, timing, args.seed)
    faults = fault_table(episodes)
    cpu = np.asarray(timing.cpu_ms)
    timing_row = {
        "updates": int(cpu.size),
        "cpu_mean_ms": float(cpu.mean()),
        "cpu_p50_ms": float(np.percentile(cpu, 50)),
        "cpu_p99_ms": float(np.percentile(cpu, 99)),
        "cpu_max_ms": float(cpu.max()),
    }
    by_motion = {
        motion: fault_table([e for e in episodes if e["motion"] == motion])
        for motion in plan.fault_motions
    }
    report = {
        "command": "python bench/bench_health_field.py " + " ".join(argv or sys.argv[1:]),
        "plan": {**plan.__dict__, "fault_motions": list(plan.fault_motions)},
        "seed": args.seed,
        "canvases": list(scenes),
        "targets": targets(faults, healthy, timing_row["cpu_p99_ms"]),
        "faults": faults,
        "healthy": healthy,
        "timing": timing_row,
        "between_faults": recovery,
        "strong_faults_by_motion": {
            motion: {
                name: {
                    "recall": table[name]["recall"],
                    "delay_max": table[name]["delay_max"],
                    "reason_accuracy": table[name]["reason_accuracy"],
                }
                for name in TARGET_FAULTS
            }
            for motion, table in by_motion.items()
        },
        "config": config.__dict__,
        "wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"wrote {args.out} in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
