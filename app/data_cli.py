"""``mvld-data``: render, record or check a multi-camera dataset, or replay one end to end.

A thin layer: parse flags into a job dataclass, call the library (``mvld.sim.rig``,
``mvld.edge.sources.record``, ``mvld.common.dataset``, ``mvld.replay``), print results. Bad
input gives a one-line error and exit status 1 (2 for bad flags), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mvld.common.config_flags import add_logging_flags, setup_logging_of
from mvld.common.errors import MVLDError
from mvld.common.exits import command

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
# mvld.replay's IMPUTERS and HEALTH_CHOICES, spelled here so --help needs no import of it
REPLAY_IMPUTERS, REPLAY_HEALTH = ("diffusion", "ridge"), ("off", "default")
ResultT = TypeVar("ResultT")


class _LineProgress:
    """A progress line on stderr for when tqdm is not installed."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.start = self.last = time.monotonic()

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= 0.5 or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total} ({rate:.0f}/s)")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def _progress_bar(total: int, desc: str, enabled: bool):
    """tqdm if installed (it is not a core dependency), else a plain progress line."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="frame set", file=sys.stderr)


def _run_with_progress(
    total: int, desc: str, enabled: bool, work: Callable[[Callable[[int], None] | None], ResultT]
) -> ResultT:
    bar = _progress_bar(total, desc, enabled)
    try:
        return work(bar.update if bar else None)
    finally:
        if bar:
            bar.close()


def _size(text: str) -> tuple[int, int]:
    """``64`` -> (64, 64); ``48x64`` -> (48, 64) as (H, W)."""
    try:
        parts = [int(part) for part in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")
    return parts[0], parts[1]


def _cmd_render(args: argparse.Namespace) -> int:
    from mvld.sim.rig import RenderJob, RigConfig, ring_of_cameras

    rig = RigConfig(
        cameras=ring_of_cameras(
            args.cameras, elevation_deg=args.elevation, distance=args.distance, fov_deg=args.fov
        ),
        image_size=args.size,
        fps=args.fps,
        frames_per_episode=args.episode_frames,
        shadows=args.shadows,
    )
    job = RenderJob(
        out=Path(args.out), frames=args.frames, rig=rig, seed=args.seed, workers=args.workers
    )
    from mvld.sim.rig import render_dataset

    start = time.monotonic()
    _run_with_progress(
        job.frames, "render", not args.quiet, lambda progress: render_dataset(job, progress)
    )
    seconds = time.monotonic() - start
    views = job.frames * rig.num_cameras
    print(
        f"rendered {job.frames} frame sets x {rig.num_cameras} cameras into {job.out} "
        f"in {seconds:.1f} s ({views / seconds:.0f} views/s, {job.workers} workers)"
    )
    return EXIT_OK


def _cmd_record(args: argparse.Namespace) -> int:
    from mvld.edge.sources.record import RecordJob, record_dataset

    uris = tuple(uri.strip() for uri in args.cams.split(",") if uri.strip())
    job = RecordJob(
        uris=uris,
        out=Path(args.out),
        frames=args.frames,
        fps=args.fps,
        timeout_s=args.timeout,
        size=args.size,
    )
    result = _run_with_progress(
        job.frames, "record", not args.quiet, lambda progress: record_dataset(job, progress)
    )
    print(f"recorded {result.frame_sets} frame sets from {len(uris)} cameras into {job.out}")
    for v, (uri, missing) in enumerate(zip(uris, result.missing_per_camera, strict=True)):
        ended = " (stream ended)" if result.ended[v] else ""
        print(f"  cam{v} <- {uri}: {missing} missing views{ended}")
    return EXIT_OK


def _cmd_replay(args: argparse.Namespace) -> int:
    from mvld.replay import ReplayConfig, format_summary, run_replay

    missing = tuple(
        name.strip() for part in args.missing for name in part.split(",") if name.strip()
    )
    config = ReplayConfig(
        dataset=Path(args.dataset),
        out=Path(args.out),
        model=Path(args.model) if args.model else None,
        missing=missing,
        missing_random=args.missing_random,
        seed=args.seed,
        fps=args.fps,
        frames=args.frames,
        imputer=args.imputer,
        steps=args.steps,
        gpu=args.gpu,
        threads=args.threads,
        health=args.health,
        drain_timeout_s=args.drain_timeout,
    )
    summary = run_replay(config, lambda total: _progress_bar(total, "replay", not args.quiet))
    print(format_summary(summary))
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from mvld.common.dataset import FrameSetFolder

    with FrameSetFolder(args.dir, skip_bad=args.all_problems) as folder:
        summary = folder.check()
        if args.grid:
            _write_grid(folder, Path(args.grid), args.grid_rows)
            print(f"sample grid written to {args.grid}")
    height, width = summary.image_size
    print(f"dataset    {summary.root} ({summary.form})")
    print(f"cameras    {len(summary.cameras)}: {', '.join(summary.cameras)}")
    print(f"frame sets {summary.frame_sets}, images {height}x{width} (HxW)")
    print("missing views per camera:")
    for camera, missing in summary.missing_per_camera.items():
        print(f"  {camera:10s} {missing:8d}  ({100 * missing / summary.frame_sets:.1f}%)")
    if summary.label_histogram is None:
        print("labels     none (no labels.csv)")
    else:
        print(f"labels     {len(summary.label_histogram)} classes, {summary.unlabelled} unlabelled")
        for label, count in summary.label_histogram.items():
            print(f"  {label:10d} {count:8d}")
    if summary.skipped:
        print(f"INVALID: {len(summary.skipped)} problems:")
        for name, reason in summary.skipped:
            print(f"  {name}: {reason}")
        return EXIT_INVALID
    print("OK")
    return EXIT_OK


def _label_names(root: Path) -> list[str] | None:
    """Class names from a rendered dataset's render.json, if there is one."""
    import json

    try:
        return list(json.loads((root / "render.json").read_text())["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_grid(folder, path: Path, rows: int) -> None:
    """A PNG of ``rows`` frame sets spread over the dataset: one row each, one column per camera.

    Views are upscaled to at least 128 px; a missing view is a dark tile with a cross; the row
    caption is the stem and the label (with its class name for rendered datasets).
    """
    import cv2
    import numpy as np

    height, width = folder.image_size
    zoom = max(1, 128 // max(height, width))
    tile_h, tile_w, caption = height * zoom, width * zoom, 22
    names = _label_names(folder.root)
    picks = np.linspace(0, len(folder) - 1, num=min(rows, len(folder))).round().astype(int)
    grid = np.full(
        (len(picks) * (tile_h + caption), len(folder.cameras) * tile_w, 3), 255, np.uint8
    )
    for row, index in enumerate(picks):
        frame_set = folder[int(index)]
        top = row * (tile_h + caption)
        text = f"{frame_set.stem}  label {frame_set.label}"
        if names and frame_set.label is not None and frame_set.label < len(names):
            text += f" ({names[frame_set.label]})"
        cv2.putText(
            grid, text, (4, top + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA
        )
        for column, view in enumerate(frame_set.views):
            if view is None:
                tile = np.full((tile_h, tile_w, 3), 40, np.uint8)
                cv2.line(tile, (0, 0), (tile_w - 1, tile_h - 1), (200, 60, 60), 2)
                cv2.line(tile, (tile_w - 1, 0), (0, tile_h - 1), (200, 60, 60), 2)
            else:
                tile = cv2.resize(view, (tile_w, tile_h), interpolation=cv2.INTER_NEAREST)
            left = column * tile_w
            grid[top + caption : top + caption + tile_h, left : left + tile_w] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mvld-data`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="mvld-data",
        description="Render a simulated multi-camera dataset, record one from cameras, check "
        "a dataset folder (format: docs/DATASETS.md), or replay one through the real edge and "
        "receiver.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    render = sub.add_parser("render", help="render a labelled dataset with the simulated rig")
    render.add_argument(
        "--cameras", type=int, default=3, metavar="V", help="number of cameras V (default: 3)"
    )
    render.add_argument(
        "--frames", type=int, required=True, metavar="N", help="number of frame sets (required)"
    )
    render.add_argument(
        "--out", required=True, metavar="DIR", help="output folder, empty or new (required)"
    )
    render.add_argument(
        "--size",
        type=_size,
        default=(64, 64),
        metavar="N|HxW",
        help="view size, N or HxW (default: 64)",
    )
    render.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: 0)")
    render.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="parallel processes; the output is the same for any value (default: all cores)",
    )
    render.add_argument(
        "--episode-frames",
        type=int,
        default=20,
        metavar="N",
        help="consecutive frame sets of one scene before a new one (default: 20)",
    )
    render.add_argument(
        "--fps",
        type=float,
        default=10.0,
        metavar="F",
        help="scene frame sets per second (default: 10)",
    )
    render.add_argument(
        "--elevation",
        type=float,
        default=30.0,
        metavar="DEG",
        help="camera elevation in degrees (default: 30)",
    )
    render.add_argument(
        "--distance",
        type=float,
        default=0.5,
        metavar="M",
        help="camera distance in metres (default: 0.5)",
    )
    render.add_argument(
        "--fov",
        type=float,
        default=40.0,
        metavar="DEG",
        help="vertical field of view in degrees (default: 40)",
    )
    render.add_argument(
        "--shadows", action="store_true", help="cast shadows (about 1.5x slower per view)"
    )
    add_logging_flags(render, default="WARNING", quiet_also="hides the progress bar")
    render.set_defaults(func=_cmd_render)

    record = sub.add_parser(
        "record",
        help="record synchronised frame sets from sources",
        description="URIs: a video file or image folder (path or file://), "
        "sim://N (simulated rig camera N; options as a query, e.g. "
        "sim://0?fps=15&size=128).",
    )
    record.add_argument(
        "--cams",
        required=True,
        metavar="URI,...",
        help="comma-separated source URIs, one per camera (required)",
    )
    record.add_argument(
        "--out", required=True, metavar="DIR", help="output folder, empty or new (required)"
    )
    record.add_argument(
        "--frames", type=int, required=True, metavar="N", help="number of frame sets (required)"
    )
    record.add_argument(
        "--fps",
        type=float,
        default=None,
        metavar="F",
        help="frame sets per second (default: as fast as the sources deliver)",
    )
    record.add_argument(
        "--timeout",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds to wait for a camera before its view counts as missing (default: 1)",
    )
    record.add_argument(
        "--size",
        type=_size,
        default=None,
        metavar="N|HxW",
        help="resize views to N or HxW (default: as read)",
    )
    add_logging_flags(record, default="WARNING", quiet_also="hides the progress bar")
    record.set_defaults(func=_cmd_record)

    check = sub.add_parser("check", help="validate a dataset and print its statistics")
    check.add_argument("dir", help="dataset folder")
    check.add_argument(
        "--all-problems",
        action="store_true",
        help="list every bad file instead of stopping at the first",
    )
    check.add_argument("--grid", metavar="PNG", help="also write a PNG grid of sample frame sets")
    check.add_argument(
        "--grid-rows", type=int, default=8, metavar="N", help="frame sets in the grid (default: 8)"
    )
    add_logging_flags(check, default="WARNING")
    check.set_defaults(func=_cmd_check)

    replay = sub.add_parser(
        "replay",
        help="push a dataset through the real mvld-edge and mvld-receiver",
        description="Replay a dataset's complete frame sets through a real mvld-edge and "
        "mvld-receiver on loopback, with chosen cameras missing, and write the decoded views "
        "(OUT/received, a dataset folder), per frame set and view the provenance and PSNR "
        "(OUT/framesets.jsonl) and a summary (OUT/summary.json): docs/DATASETS.md, "
        "'Evaluating on your own recordings'.",
    )
    replay.add_argument("dataset", help="dataset folder (docs/DATASETS.md)")
    replay.add_argument(
        "--out", required=True, metavar="DIR", help="output folder, empty or new (required)"
    )
    replay.add_argument(
        "--model",
        metavar="DIR",
        default=None,
        help="model folder holding last.json, last.safetensors and "
        "encoder.onnx, or an mvld-train all run folder (score/best and "
        "export/) (default: the shipped default model)",
    )
    replay.add_argument(
        "--missing",
        action="append",
        default=[],
        metavar="CAM,...",
        help="cameras withheld in every frame set, by dataset name, wire id "
        "(cam1) or number; repeatable (default: none)",
    )
    replay.add_argument(
        "--missing-random",
        type=int,
        default=0,
        metavar="K",
        help="withhold K more cameras per frame set, drawn at random with --seed (default: 0)",
    )
    replay.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of --missing-random (default: 0)"
    )
    replay.add_argument(
        "--frames",
        type=int,
        default=None,
        metavar="N",
        help="replay the first N complete frame sets (default: all)",
    )
    replay.add_argument(
        "--fps",
        type=float,
        default=10.0,
        metavar="F",
        help="frame sets per second the edge sends; 0: as fast as it can, "
        "the receiver keeps what it has not imputed yet (default: 10)",
    )
    replay.add_argument(
        "--imputer",
        choices=REPLAY_IMPUTERS,
        default="diffusion",
        metavar="diffusion|ridge",
        help="how the receiver fills missing views (default: diffusion)",
    )
    replay.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="diffusion sampler steps (default: the receiver's, 20)",
    )
    replay.add_argument(
        "--health",
        choices=REPLAY_HEALTH,
        default="off",
        metavar="off|default",
        help="the edge's camera health checks: off takes the dataset's views "
        "as they are; default may judge views failed or obstructed "
        "(default: off)",
    )
    replay.add_argument(
        "--gpu", type=int, default=-1, metavar="N", help="receiver GPU; -1: the CPU (default: -1)"
    )
    replay.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU threads of the edge's encoder and the receiver (default: 1)",
    )
    replay.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds the receiver may go without finishing a frame set "
        "before the rest count as lost (default: 120)",
    )
    add_logging_flags(replay, default="INFO", quiet_also="hides the progress bar")
    replay.set_defaults(func=_cmd_replay)
    return parser


@command("mvld-data", extras="sim")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld-data`` (SIGINT 130, SIGTERM 143: :mod:`mvld.common.exits`)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    setup_logging_of(args, "%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MVLDError as exc:
        sys.stderr.write(f"mvld-data {args.command}: {exc}\n")
        return EXIT_INVALID
    except OSError as exc:  # a folder that cannot be created or written, a full disk
        sys.stderr.write(f"mvld-data {args.command}: {exc}\n")
        return EXIT_INVALID
