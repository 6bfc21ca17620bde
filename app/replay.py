"""``mvld-data replay``: push a dataset folder through the real ``mvld-edge`` -> ``mvld-receiver``.

Evaluating the whole system on one's own recordings needs the real processes, not the library
calls ``mvld-eval`` makes: the edge's encoder and int8 wire latents, the receiver's admission,
batching, imputation and decoding. The replay

1. picks the dataset's complete frame sets (a view missing in the dataset has no truth to
   compare against) and links them, in order, into one image folder per camera;
2. starts ``mvld-receiver`` on a free loopback port with the ``save`` and ``jsonl`` tasks and
   a backlog and age limit that hold a whole replay (nothing is dropped for being slow);
3. starts ``mvld-edge`` on those folders with ``--no-realtime --lockstep --frames N``, so frame
   set ``i`` holds frame ``i`` of every camera, and ``--withhold`` / ``--withhold-rule random``
   for the cameras that should be missing;
4. waits until the edge has made every frame set and the receiver has delivered or counted
   each one, stops both (SIGTERM; Ctrl-C reaches both as well), and
5. writes ``OUT/received/CAMERA/STEM.png`` (a dataset folder again), ``OUT/framesets.jsonl``
   (per frame set and view: status, provenance, PSNR against the dataset) and
   ``OUT/summary.json`` (sent, received, dropped by reason, imputed views, PSNR).

The process handling (ports, start-up waits, metrics scrapes, stopping) is the demo's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from mvld.common.dataset import FrameSetFolder, natural_key
from mvld.common.errors import ConfigError, MVLDError
from mvld.common.exits import output_folder
from mvld.demo import (
    _python_command,
    _stop_process,
    _tail,
    _wait_for_metrics,
    check_model,
    free_port,
    read_metrics,
)

log = logging.getLogger(__name__)

NODE_ID = "replay"
RECEIVER_START_TIMEOUT_S = 150.0
POLL_S = 0.25
AS_FAST_AS_POSSIBLE_FPS = 1000.0  # --fps 0: the edge's ticker needs a rate; this never limits
EDGE_LINE = re.compile(r"mvld-edge: (\d+) frame sets in [\d.]+ s, (\d+) sent, (\d+) dropped")
DROP_METRIC = re.compile(r'^mvld_receiver_dropped_total\{reason="([^"]+)"\}$')
WITHHELD_METRIC = re.compile(r'^mvld_receiver_framesets_withheld_total\{reason="([^"]+)"\}$')

IMPUTERS = ("diffusion", "ridge")  # mvld-receiver --imputer
HEALTH_CHOICES = ("off", "default")  # mvld-edge --health, for every camera

Progress = Callable[[int], object]


class ProgressBar(Protocol):
    """What :func:`run_replay` needs of a progress bar (tqdm has it)."""

    def update(self, n: int) -> object: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ReplayConfig:
    """One replay job, validated by :func:`plan_replay` against the dataset and the model."""

    dataset: Path
    out: Path
    model: Path | None = None  # see ReplayModel.of; None: the shipped default model
    missing: tuple[str, ...] = ()  # dataset camera names, wire ids (cam1) or numbers
    missing_random: int = 0  # further cameras withheld per frame set, drawn with ``seed``
    seed: int = 0
    fps: float = 10.0  # 0: as fast as the edge can
    frames: int | None = None  # the first N complete frame sets; None: all
    imputer: str = "diffusion"
    steps: int | None = None  # None: the receiver's default
    gpu: int = -1
    threads: int = 1
    health: str = "off"
    drain_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.fps < 0:
            raise ConfigError(f"--fps must be >= 0 (0: as fast as possible), got {self.fps}")
        if self.frames is not None and self.frames < 1:
            raise ConfigError(f"--frames must be at least 1, got {self.frames}")
        if self.missing_random < 0:
            raise ConfigError(f"--missing-random must be >= 0, got {self.missing_random}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if not self.drain_timeout_s > 0:
            raise ConfigError(f"--drain-timeout must be > 0, got {self.drain_timeout_s}")
        if self.imputer not in IMPUTERS:
            raise ConfigError(
                f"--imputer must be one of {', '.join(IMPUTERS)}, got {self.imputer!r}"
            )
        if self.health not in HEALTH_CHOICES:
            raise ConfigError(
                f"--health must be one of {', '.join(HEALTH_CHOICES)}, got {self.health!r}"
            )


@dataclass(frozen=True)
class ReplayPlan:
    """What will be replayed: the frame sets (dataset rows, in order) and the edge's cameras."""

    cameras: tuple[str, ...]  # dataset camera names, in wire order (cam0, cam1, ...)
    rows: tuple[int, ...]  # dataset rows of the frame sets sent, frame set i = rows[i]
    stems: tuple[str, ...]
    skipped_incomplete: int  # complete frame sets only: these had a view missing in the dataset
    withheld: tuple[str, ...]  # wire ids always withheld
    image_size: tuple[int, int]


@dataclass
class ReplaySummary:
    """``OUT/summary.json``: every frame set sent is received or dropped with a reason."""

    dataset: str
    model: str
    cameras: list[str]
    missing: list[str]
    missing_random: int
    seed: int
    imputer: str
    sent: int
    received: int
    dropped: dict[str, int]
    skipped_incomplete: int
    views: dict[str, int]  # by provenance
    imputed_views: int
    psnr_db: dict[str, dict[str, float | int | None]]  # "all" and per camera: observed/imputed
    seconds: float
    outputs: dict[str, str] = field(default_factory=dict)


def _camera_number(name: str, cameras: tuple[str, ...]) -> int | None:
    """A dataset camera name, a wire id ``camN`` or a number -> its index; None if unknown."""
    if name in cameras:
        return cameras.index(name)
    if name.startswith("cam") and name[3:].isdigit():
        name = name[3:]
    if name.isdigit() and int(name) < len(cameras):
        return int(name)
    return None


@dataclass(frozen=True)
class ReplayModel:
    """The receiver's checkpoint and the edge's encoder (None: the shipped default model)."""

    checkpoint: Path | None
    encoder: Path | None

    @classmethod
    def of(cls, model: Path | None) -> ReplayModel:
        """A folder laid out like the shipped model (last.json, last.safetensors and
        encoder.onnx), or an ``mvld-train all`` run (``score/best`` and ``export/``)."""
        if model is None:
            check_model(None)
            return cls(None, None)
        run_checkpoint, run_export = model / "score" / "best", model / "export"
        if (model / "score" / "best.json").is_file() and (run_export / "encoder.onnx").is_file():
            return cls(run_checkpoint, run_export)
        check_model(model)
        return cls(model, model)


def model_shape(model: Path | None) -> tuple[int, tuple[int, int]]:
    """``(views, (height, width))`` the model works on, from its checkpoint's JSON."""
    from mvld.common.default_model import DEFAULT_MODEL
    from mvld.model.checkpoint import checkpoint_paths

    meta = json.loads(
        checkpoint_paths(model if model is not None else DEFAULT_MODEL)[0].read_text()
    )
    return (
        int(meta["score_net"]["num_views"]),
        (int(meta["preprocess"]["height"]), int(meta["preprocess"]["width"])),
    )


def plan_replay(config: ReplayConfig, folder: FrameSetFolder) -> ReplayPlan:
    """Check the job against the dataset and the model; ConfigError saying what to change."""
    cameras = tuple(folder.cameras)
    views, size = model_shape(ReplayModel.of(config.model).checkpoint)
    if views != len(cameras):
        raise ConfigError(
            f"the model works on {views} cameras, the dataset {folder.root} has "
            f"{len(cameras)} ({', '.join(cameras)})"
        )
    if tuple(folder.image_size) != size:
        h, w = folder.image_size
        raise ConfigError(
            f"the model works on {size[0]}x{size[1]} views, the dataset's are {h}x{w} (HxW); "
            f"resize it first, e.g. mvld-data record --cams {folder.root}/{cameras[0]},... "
            f"--size {size[0]}x{size[1]} --out DIR --frames N"
        )
    numbers = []
    for name in config.missing:
        number = _camera_number(name, cameras)
        if number is None:
            raise ConfigError(
                f"--missing: unknown camera {name!r}; the dataset's cameras are "
                f"{', '.join(cameras)} (or cam0-cam{len(cameras) - 1}, "
                f"0-{len(cameras) - 1})"
            )
        numbers.append(number)
    withheld = tuple(f"cam{n}" for n in sorted(set(numbers)))
    if len(withheld) + config.missing_random >= len(cameras):
        raise ConfigError(
            f"--missing and --missing-random leave no camera to send: "
            f"{len(withheld)} + {config.missing_random} of {len(cameras)}"
        )
    complete = np.flatnonzero(folder.presence().all(axis=1))
    if not len(complete):
        raise ConfigError(
            f"{folder.root}: no frame set has every view; a replay compares "
            "decoded views with the dataset's and needs complete frame sets"
        )
    rows = complete if config.frames is None else complete[: config.frames]
    if config.frames is not None and len(rows) < config.frames:
        log.warning(
            "%s has %d complete frame sets; replaying those, not %d",
            folder.root,
            len(rows),
            config.frames,
        )
    if folder.form == "videos" and len(rows) and rows[-1] != len(rows) - 1:
        raise ConfigError(f"{folder.root}: video datasets replay from frame 0 on")
    return ReplayPlan(
        cameras=cameras,
        rows=tuple(int(r) for r in rows),
        stems=tuple(folder.stems[int(r)] for r in rows),
        skipped_incomplete=int(len(folder) - len(complete)),
        withheld=withheld,
        image_size=size,
    )


def _camera_files(root: Path, camera: str) -> dict[str, Path]:
    """stem -> image file of one camera folder."""
    from mvld.common.dataset import IMAGE_SUFFIXES

    return {
        p.stem: p
        for p in (root / camera).iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    }


def stage_sources(folder: FrameSetFolder, plan: ReplayPlan, staging: Path) -> list[str]:
    """The edge's source per camera: a folder of links to the planned frames, in order.

    Links are named by position, so the file source's name order is the replay order whatever
    the stems look like; a video dataset is read as it is.
    """
    from mvld.common.dataset import VIDEO_SUFFIXES

    root = folder.root.resolve()
    if folder.form == "videos":
        return [
            str(
                next(
                    p
                    for p in sorted(root.iterdir(), key=lambda p: natural_key(p.name))
                    if p.stem == camera and p.suffix.lower() in VIDEO_SUFFIXES
                )
            )
            for camera in plan.cameras
        ]
    uris = []
    for camera in plan.cameras:
        files = _camera_files(root, camera)
        target = staging / camera
        target.mkdir(parents=True)
        for position, stem in enumerate(plan.stems):
            source = files[stem]
            (target / f"{position:08d}{source.suffix.lower()}").symlink_to(source)
        uris.append(str(target.resolve()))
    return uris


class ReplayProcesses:
    """The receiver and edge processes of one replay, their ports, logs and output paths."""

    def __init__(self, config: ReplayConfig, plan: ReplayPlan, out: Path) -> None:
        self.config, self.plan, self.out = config, plan, out
        self.model = ReplayModel.of(config.model)
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.raw = out / ".receiver-save"  # the save task's layout: NODE/cam0/SEQ.png
        self.results = self.logs / "results.jsonl"
        self.data_port, self.metrics_port = free_port(), free_port()
        self.receiver: subprocess.Popen | None = None
        self.edge: subprocess.Popen | None = None

    def _spawn(self, command: list[str], name: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "wb") as output:
            threads = str(self.config.threads)
            env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads)
            return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)

    def start_receiver(self) -> None:
        """The real mvld-receiver, keeping every frame set of the replay until it is imputed."""
        config, sent = self.config, len(self.plan.rows)
        checkpoint = self.model.checkpoint
        extra = ["--model", str(checkpoint.resolve())] if checkpoint else []
        if config.steps is not None:
            extra += ["--steps", str(config.steps)]
        self.receiver = self._spawn(
            _python_command(
                "mvld.receiver.cli",
                "--gpu",
                str(config.gpu),
                "--bind",
                f"tcp://127.0.0.1:{self.data_port}",
                "--task",
                f"save:dir={self.raw.resolve()}",
                "--task",
                f"jsonl:path={self.results.resolve()}",
                "--metrics-port",
                str(self.metrics_port),
                "--status-every",
                "5",
                "--imputer",
                config.imputer,
                "--threads",
                str(config.threads),
                "--backlog",
                str(max(4, sent)),
                "--max-age-ms",
                str(365 * 86400e3),
                "--max-rate",
                "0",
                *extra,
            ),
            "receiver",
        )
        _wait_for_metrics(
            self.receiver,
            self.metrics_port,
            self.logs / "receiver.log",
            "mvld-receiver",
            RECEIVER_START_TIMEOUT_S,
        )

    def start_edge(self, uris: list[str]) -> None:
        """The real mvld-edge reading the staged folders in lockstep, one frame set per row."""
        config, plan = self.config, self.plan
        fps = config.fps or AS_FAST_AS_POSSIBLE_FPS
        encoder = self.model.encoder
        extra = ["--model", str(encoder.resolve())] if encoder else []
        if plan.withheld:
            extra += ["--withhold", ",".join(plan.withheld)]
        if config.missing_random:
            extra += [
                "--max-views",
                str(len(plan.cameras) - len(plan.withheld) - config.missing_random),
                "--withhold-rule",
                "random",
                "--withhold-seed",
                str(config.seed),
            ]
        self.edge = self._spawn(
            _python_command(
                "mvld.edge.cli",
                "--cams",
                ",".join(uris),
                "--connect",
                f"tcp://127.0.0.1:{self.data_port}",
                "--node-id",
                NODE_ID,
                "--fps",
                str(fps),
                "--frames",
                str(len(plan.rows)),
                "--lockstep",
                "--no-realtime",
                "--health",
                config.health,
                "--send-hwm",
                str(max(2, len(plan.rows))),
                "--threads",
                str(config.threads),
                "--status-every",
                "5",
                *extra,
            ),
            "edge",
        )

    def stop(self) -> None:
        """Stop the edge first, then the receiver (SIGTERM, SIGKILL if it hangs)."""
        for process in (self.edge, self.receiver):
            if process is not None:
                _stop_process(process)


@dataclass
class ReceiverCounts:
    """What the receiver's metrics say about the replay so far."""

    completed: int = 0  # imputed and decoded; the tasks may still be writing them
    delivered: int = 0  # lines the jsonl task wrote: the save task, before it, is done too
    dropped: dict[str, int] = field(default_factory=dict)  # by reason
    withheld: dict[str, int] = field(default_factory=dict)  # by reason

    @classmethod
    def of(cls, metrics: dict[str, float], delivered: int) -> ReceiverCounts:
        counts = cls(int(metrics.get("mvld_receiver_framesets_completed_total", 0)), delivered)
        for name, value in metrics.items():
            for pattern, into in (
                (DROP_METRIC, counts.dropped),
                (WITHHELD_METRIC, counts.withheld),
            ):
                match = pattern.match(name)
                if match and value:
                    into[match.group(1)] = int(value)
        return counts

    @property
    def accounted(self) -> int:
        """Frame sets the tasks have written, or the receiver counted as dropped or withheld.

        Not ``completed``: the receiver counts a frame set before its tasks run, and stopping
        it then could cut the last ones short.
        """
        return self.delivered + sum(self.dropped.values()) + sum(self.withheld.values())


def _count_lines(path: Path) -> int:
    """Complete lines in a file the jsonl task appends to (0 before it exists)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _check_running(processes: ReplayProcesses, edge_done: bool) -> None:
    for process, name in ((processes.edge, "edge"), (processes.receiver, "receiver")):
        if process is None or (name == "edge" and edge_done):
            continue
        if process.poll() is not None and (name == "receiver" or process.returncode != 0):
            raise MVLDError(
                f"mvld-{name} exited with status {process.returncode}:\n"
                + _tail(processes.logs / f"{name}.log")
            )


def stream(
    processes: ReplayProcesses,
    progress: Progress | None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[int, int, ReceiverCounts]:
    """Wait for the edge to finish and the receiver to drain; ``(made, edge_dropped, counts)``.

    The receiver has drained once it delivered or counted every frame set the edge queued, or
    when its counters stood still for ``drain_timeout_s`` (the rest counts as lost).
    """
    assert processes.edge is not None
    counts, shown, edge_done = ReceiverCounts(), 0, False
    made = edge_dropped = queued = 0
    last_change = clock()
    while True:
        _check_running(processes, edge_done)
        metrics = read_metrics(processes.metrics_port)
        if metrics is not None:
            new = ReceiverCounts.of(metrics, _count_lines(processes.results))
            if new.accounted != counts.accounted:
                last_change = clock()
            counts = new
        if progress is not None and counts.accounted > shown:
            progress(counts.accounted - shown)
            shown = counts.accounted
        if not edge_done and processes.edge.poll() is not None:
            edge_done = True
            lines = EDGE_LINE.findall(_tail(processes.logs / "edge.log", 20000))
            if not lines:
                raise MVLDError(
                    "mvld-edge ended without its summary line:\n"
                    + _tail(processes.logs / "edge.log")
                )
            made, queued, edge_dropped = (int(g) for g in lines[-1])
            last_change = clock()
        if edge_done and (
            counts.accounted >= queued or clock() - last_change > processes.config.drain_timeout_s
        ):
            if counts.accounted < queued:
                log.warning(
                    "the receiver accounted for %d of %d frame sets in time; the rest "
                    "count as lost",
                    counts.accounted,
                    queued,
                )
            return made, edge_dropped, counts
        time.sleep(POLL_S)


def _read_results(path: Path) -> dict[int, dict]:
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                if result["node"] == NODE_ID:
                    results[int(result["seq"])] = result
    return results


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 3) if values else None


def collect(
    folder: FrameSetFolder, plan: ReplayPlan, processes: ReplayProcesses, results: dict[int, dict]
) -> tuple[list[dict], dict[str, dict]]:
    """Move the decoded views to ``OUT/received/CAMERA/STEM.png`` and score them.

    Returns one record per frame set sent (for ``framesets.jsonl``) and the PSNR table.
    """
    import cv2

    from mvld.train.image_quality import psnr

    received = processes.out / "received"
    scores: dict[str, dict[str, list[float]]] = {
        name: {"observed": [], "imputed": []} for name in ("all", *plan.cameras)
    }
    records = []
    for seq, (row, stem) in enumerate(zip(plan.rows, plan.stems, strict=True)):
        result = results.get(seq)
        record: dict = {"stem": stem, "seq": seq, "received": result is not None, "views": []}
        if result is not None:
            truth = folder[row].views
            for v, view in enumerate(result["views"]):
                camera = plan.cameras[v]
                raw = processes.raw / NODE_ID / view["cam"] / f"{seq:08d}.png"
                target = received / camera / f"{stem}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                entry = {
                    "camera": camera,
                    "cam": view["cam"],
                    "status": view["status"],
                    "reason": view["reason"],
                    "provenance": view["provenance"],
                    "psnr_db": None,
                }
                if raw.exists():
                    raw.replace(target)
                    decoded = cv2.imread(str(target))
                    if decoded is None:
                        raise MVLDError(f"{target}: the receiver's PNG cannot be read back")
                    expected = truth[v]
                    if expected is None:  # the dataset lacks this view: nothing to score against
                        record["views"].append(entry)
                        continue
                    image = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
                    value = float(psnr(image[None], expected[None])[0])
                    entry["psnr_db"] = round(value, 3)
                    kind = "observed" if view["provenance"] == "observed" else "imputed"
                    scores["all"][kind].append(value)
                    scores[camera][kind].append(value)
                record["views"].append(entry)
        records.append(record)
    table = {
        name: {
            "observed": _mean(s["observed"]),
            "observed_views": len(s["observed"]),
            "imputed": _mean(s["imputed"]),
            "imputed_views": len(s["imputed"]),
        }
        for name, s in scores.items()
    }
    return records, table


def _empty_output(out: Path) -> Path:
    folder = output_folder(out, "replay output folder")
    if any(not p.name.startswith(".mvld-write-test") for p in folder.iterdir()):
        raise ConfigError(f"replay output folder {folder} is not empty; give a new or empty one")
    return folder


def run_replay(
    config: ReplayConfig, progress_bar: Callable[[int], ProgressBar | None] | None = None
) -> ReplaySummary:
    """Replay ``config.dataset`` through the real edge and receiver; write and return the
    summary. ``progress_bar(total)`` makes an object with ``update(n)`` and ``close()``."""
    if not config.dataset.is_dir():
        raise ConfigError(f"dataset {config.dataset} does not exist or is not a folder")
    ReplayModel.of(config.model)  # before the dataset is read: a wrong path costs one line
    started = time.monotonic()
    with FrameSetFolder(config.dataset) as folder:
        plan = plan_replay(config, folder)
        out = _empty_output(config.out)
        processes = ReplayProcesses(config, plan, out)
        staging = out / ".sources"
        bar, streamed = None, False
        try:
            uris = stage_sources(folder, plan, staging)
            log.info("starting mvld-receiver (loads the model) ...")
            processes.start_receiver()
            log.info(
                "starting mvld-edge: %d frame sets of %s, withheld %s, %d random",
                len(plan.rows),
                ", ".join(plan.cameras),
                ", ".join(plan.withheld) or "none",
                config.missing_random,
            )
            processes.start_edge(uris)
            bar = progress_bar(len(plan.rows)) if progress_bar else None  # None: no bar
            made, edge_dropped, counts = stream(processes, bar.update if bar else None)
            processes.stop()
            _check_stopped(processes)
            streamed = True
        finally:
            if bar is not None:
                bar.close()
            processes.stop()
            shutil.rmtree(staging, ignore_errors=True)
            if not streamed:  # an error or Ctrl-C: only the logs stay, no half-written views
                shutil.rmtree(processes.raw, ignore_errors=True)
        results = _read_results(processes.results)
        records, table = collect(folder, plan, processes, results)
        shutil.rmtree(processes.raw, ignore_errors=True)
    summary = _summary(
        config, plan, made, edge_dropped, counts, records, table, time.monotonic() - started
    )
    summary.outputs = {
        "received": str(out / "received"),
        "framesets": str(out / "framesets.jsonl"),
        "logs": str(processes.logs),
    }
    with open(out / "framesets.jsonl", "w", encoding="utf-8") as lines:
        for record in records:
            lines.write(json.dumps(record, separators=(",", ":")) + "\n")
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def _check_stopped(processes: ReplayProcesses) -> None:
    """A receiver that failed while stopping may not have written its last results."""
    for process, name in ((processes.edge, "edge"), (processes.receiver, "receiver")):
        if process is not None and process.returncode not in (0, None):
            raise MVLDError(
                f"mvld-{name} exited with status {process.returncode}:\n"
                + _tail(processes.logs / f"{name}.log")
            )


def _summary(
    config: ReplayConfig,
    plan: ReplayPlan,
    made: int,
    edge_dropped: int,
    counts: ReceiverCounts,
    records: list[dict],
    table: dict,
    seconds: float,
) -> ReplaySummary:
    """Every frame set sent is received or has a drop reason; ``lost`` is what no counter
    explains (a message lost between the processes, or one still in the receiver)."""
    sent = len(plan.rows)
    received = sum(record["received"] for record in records)
    dropped = {f"receiver_{reason}": n for reason, n in sorted(counts.dropped.items())}
    dropped |= {f"receiver_withheld_{reason}": n for reason, n in sorted(counts.withheld.items())}
    if edge_dropped:
        dropped["edge_not_queued"] = edge_dropped
    if made < sent:
        dropped["edge_not_made"] = sent - made
    unexplained = sent - received - sum(dropped.values())
    if unexplained > 0:
        dropped["lost"] = unexplained
    elif unexplained < 0:  # a frame set counted by the receiver yet delivered: trust delivery
        log.warning(
            "the receiver's drop counters exceed the frame sets missing by %d", -unexplained
        )
    views = Counter(view["provenance"] for record in records for view in record["views"])
    return ReplaySummary(
        dataset=str(config.dataset),
        model=str(config.model or "the shipped default model"),
        cameras=list(plan.cameras),
        missing=[plan.cameras[int(cam[3:])] for cam in plan.withheld],
        missing_random=config.missing_random,
        seed=config.seed,
        imputer=config.imputer,
        sent=sent,
        received=received,
        dropped=dropped,
        skipped_incomplete=plan.skipped_incomplete,
        views=dict(sorted(views.items())),
        imputed_views=sum(n for p, n in views.items() if p != "observed"),
        psnr_db=table,
        seconds=round(seconds, 1),
    )


def format_summary(summary: ReplaySummary) -> str:
    """The lines ``mvld-data replay`` prints."""
    dropped = ", ".join(f"{reason} {n}" for reason, n in summary.dropped.items()) or "none"
    lines = [
        f"replayed {summary.sent} frame sets of {summary.dataset} in {summary.seconds} s: "
        f"{summary.received} received, dropped: {dropped}",
        f"views: {', '.join(f'{p} {n}' for p, n in summary.views.items()) or 'none'}",
    ]
    if summary.skipped_incomplete:
        lines.append(
            f"skipped {summary.skipped_incomplete} frame sets with a view missing in the dataset"
        )
    lines.append("PSNR (dB)     observed   imputed")
    for name, row in summary.psnr_db.items():
        observed = "-" if row["observed"] is None else f"{row['observed']:.2f}"
        imputed = "-" if row["imputed"] is None else f"{row['imputed']:.2f}"
        lines.append(f"  {name:10s} {observed:>9s} {imputed:>9s}")
    lines.append(
        f"written: {summary.outputs.get('received')}, "
        f"{Path(summary.outputs.get('framesets', '')).parent / 'summary.json'}"
    )
    return "\n".join(lines)
