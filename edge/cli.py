"""``mvld-edge``: run an edge node (capture, health, encode, stream).

Thin: parse the arguments into an :class:`~mvld.edge.node.EdgeConfig`, set up logging and
signals, run :class:`~mvld.edge.node.EdgeNode`. Flags are documented in ``docs/EDGE.md``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from pathlib import Path

from mvld.common.errors import ConfigError, MVLDError
from mvld.common.logs import setup_logging
from mvld.common.wire import DEFAULT_LATENT_DTYPE, LATENT_DTYPES
from mvld.edge.capture import CaptureConfig
from mvld.edge.encoder import registered_backends
from mvld.edge.health import resolve_health_specs
from mvld.edge.node import EdgeConfig, EdgeNode, default_model_path
from mvld.edge.policy import RULES, TransmitPolicyConfig

EXAMPLE = "mvld-edge --cams 0,1,2 --connect tcp://RECEIVER:5555"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``mvld-edge``."""
    parser = argparse.ArgumentParser(
        prog="mvld-edge",
        description="Capture several cameras, detect failed or obstructed ones, encode the "
                    f"usable views and stream their latents to a receiver, e.g. `{EXAMPLE}`.")
    add = parser.add_argument
    add("--cams", required=True, help="comma-separated source URIs: 0, v4l2:///dev/video0, "
        "csi://0, rtsp://..., file://PATH or a path, sim://N")
    add("--connect", required=True, action="append",
        help="receiver endpoint, e.g. tcp://HOST:5555 (repeat for several receivers)")
    add("--node-id", default=socket.gethostname(), help="this node's id on the wire")
    add("--fps", type=float, default=30.0, help="frame sets per second (default 30)")
    add("--max-age", type=float, default=0.25,
        help="seconds after which a camera's newest frame is stale (default 0.25)")
    add("--model", type=Path, help="mvld-export folder, encoder .onnx, TensorRT .engine or "
        "checkpoint (default: the shipped default model)")
    add("--backend", default="auto", choices=["auto", *registered_backends()])
    add("--threads", type=int, default=1, help="encoder threads (default 1)")
    add("--gpu", type=int, default=0, help="GPU index for TensorRT / CUDA (default 0)")
    add("--max-views", type=int, help="send at most k usable views per frame set")
    add("--budget-bytes", type=int, help="latent bytes per frame set at most")
    add("--latent-dtype", default=DEFAULT_LATENT_DTYPE, choices=sorted(LATENT_DTYPES),
        help="latent precision on the wire: int8 (1 byte per value plus a per-view scale), "
             f"float16 or float32 (default {DEFAULT_LATENT_DTYPE})")
    add("--withhold-rule", default="round_robin", choices=RULES,
        help="which usable views to withhold under a budget (default round_robin)")
    add("--priority", default="",
        help="camera numbers kept first by --withhold-rule priority, e.g. 0,2")
    add("--keys", type=Path, help="this node's NODE.key_secret (CurveZMQ)")
    add("--server-key", type=Path, help="the receiver's public RECEIVER.key (CurveZMQ)")
    add("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    add("--status-every", type=float, default=10.0, help="seconds between status lines")
    add("--frames", type=int, help="stop after N frame sets")
    add("--loop", action="store_true", help="file sources: start again at the end")
    add("--realtime", action=argparse.BooleanOptionalAction, default=True,
        help="file sources: pace at the video's own rate like a live camera (default; "
             "--no-realtime reads as fast as frames decode)")
    add("--watchdog", type=float, default=3.0,
        help="seconds after which a stuck camera read is abandoned (default 3)")
    add("--backoff-max", type=float, default=10.0,
        help="longest wait between reopen attempts of a failed camera (default 10 s)")
    add("--health", action="append", metavar="[CAM=]default|off|FILE.toml",
        help="camera health checks: default, off (source failures only, e.g. a replayed "
             "dataset) or a TOML file of thresholds (docs/HEALTH.md); CAM=... for one camera "
             "(cam1=off or 1=off); repeatable. SIGUSR1 re-learns every camera's reference")
    add("--log-json", action="store_true", help="log one JSON object per line")
    add("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def config_from_args(args: argparse.Namespace) -> EdgeConfig:
    """Validate the arguments into the node's config."""
    cameras = tuple(uri.strip() for uri in args.cams.split(",") if uri.strip())
    file_options = {"loop": args.loop, "realtime": args.realtime}
    camera_ids = tuple(f"cam{i}" for i in range(len(cameras)))
    return EdgeConfig(
        cameras=cameras,
        connect=tuple(args.connect),
        model=args.model or default_model_path(),
        node_id=args.node_id,
        backend=args.backend,
        threads=args.threads,
        gpu=args.gpu,
        fps=args.fps,
        max_age_s=args.max_age,
        policy=TransmitPolicyConfig(max_views=args.max_views, budget_bytes=args.budget_bytes,
                                    rule=args.withhold_rule, priority=_numbers(args.priority)),
        capture=CaptureConfig(watchdog_s=args.watchdog, backoff_max_s=args.backoff_max),
        camera_health=resolve_health_specs(args.health, camera_ids),
        key_secret=args.keys,
        server_key=args.server_key,
        metrics_port=args.metrics_port,
        status_every_s=args.status_every,
        max_framesets=args.frames,
        source_options={"file": file_options},
        latent_dtype=args.latent_dtype,
    )


def _numbers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"--priority expects camera numbers like 0,2, got {text!r}") from exc


def install_stop_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM end the node cleanly (cameras released, sockets closed)."""
    def request_stop(signum: int, _frame: object) -> None:
        logging.getLogger("mvld.edge").info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)


def install_relearn_signal(node: EdgeNode) -> None:
    """SIGUSR1 re-learns every camera's reference (after re-aiming cameras on purpose)."""
    def request_relearn(signum: int, _frame: object) -> None:
        logging.getLogger("mvld.edge").info("%s: re-learning every camera's reference",
                                            signal.Signals(signum).name)
        node.relearn()

    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, request_relearn)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld-edge``."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_json, logging.DEBUG if args.verbose else logging.INFO)
    stop = threading.Event()
    try:
        node = EdgeNode(config_from_args(args))
    except MVLDError as exc:
        print(f"mvld-edge: error: {exc}", file=sys.stderr)
        return 2
    install_stop_signals(stop)
    install_relearn_signal(node)
    try:
        summary = node.run(stop)
    except MVLDError as exc:
        print(f"mvld-edge: error: {exc}", file=sys.stderr)
        return 2
    print(f"mvld-edge: {summary.framesets} frame sets in {summary.seconds:.1f} s, "
          f"{summary.sent} sent, {summary.dropped} dropped, {summary.bytes_sent} bytes",
          file=sys.stderr)
    return 0
