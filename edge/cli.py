"""``mvld-edge``: run an edge node (capture, health, encode, stream).

Thin: the options come from the config dataclasses (:class:`~mvld.edge.node.EdgeConfig` and
the capture, transmit-policy and file-source sections) through
:mod:`mvld.common.config_flags`: defaults < ``--config FILE.toml`` < flags. Then set up
logging and signals and run :class:`~mvld.edge.node.EdgeNode`. Flags are documented in
``docs/EDGE.md``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from mvld.common.config_flags import (
    ConfigOptions,
    Section,
    Values,
    add_logging_flags,
    log_level_of,
    option,
)
from mvld.common.errors import MVLDError
from mvld.common.logs import setup_logging
from mvld.edge.capture import CaptureConfig
from mvld.edge.health import resolve_health_specs
from mvld.edge.node import EdgeConfig, EdgeNode, default_model_path
from mvld.edge.policy import TransmitPolicyConfig

EXAMPLE = "mvld-edge --cams 0,1,2 --connect tcp://RECEIVER:5555"


@dataclass(frozen=True)
class CameraChecks:
    """The node's camera health checks, as ``--health`` specs (resolved per camera)."""

    health: tuple[str, ...] = field(
        default=("default",),
        metadata=option(
            "camera health checks: default, off (source failures only, e.g. a replayed dataset) "
            "or a TOML file of thresholds (docs/HEALTH.md); CAM=... for one camera (cam1=off or "
            "1=off); repeatable, later ones win. SIGUSR1 re-learns every camera's reference",
            split=False,
            metavar="[CAM=]default|off|FILE.toml",
        ),
    )


@dataclass(frozen=True)
class FileSourceOptions:
    """Options of the file cameras (``file://PATH`` or a path)."""

    loop: bool = field(default=False, metadata=option("file sources: start again at the end"))
    realtime: bool = field(
        default=True,
        metadata=option(
            "file sources: pace at the video's own rate like a live camera; --no-realtime reads "
            "as fast as the node takes frames, decoding only the frames it uses"
        ),
    )


def config_options() -> ConfigOptions:
    """The options of ``mvld-edge``, in the order ``--help`` and ``--print-config`` show."""
    return ConfigOptions(
        [
            Section(EdgeConfig, defaults={"node_id": socket.gethostname()}),
            Section(CameraChecks),
            Section(TransmitPolicyConfig, "policy", "transmit policy [policy]"),
            Section(CaptureConfig, "capture", "camera reading [capture]"),
            Section(FileSourceOptions, "file", "file cameras [file]"),
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``mvld-edge``."""
    parser = argparse.ArgumentParser(
        prog="mvld-edge",
        description="Capture several cameras, detect failed or obstructed ones, encode the "
        f"usable views and stream their latents to a receiver, e.g. `{EXAMPLE}`. "
        "Options: defaults < --config FILE.toml < flags.",
    )
    config_options().add_to(parser)
    add_logging_flags(parser)
    return parser


def config_from_values(values: Values) -> EdgeConfig:
    """Validate the options into the node's config (the shipped model unless one is named)."""
    node = values[EdgeConfig]
    cameras = tuple(uri for uri in node["cameras"] if uri)
    camera_ids = tuple(f"cam{i}" for i in range(len(cameras)))
    return EdgeConfig(
        **(node | {"cameras": cameras, "model": node.get("model") or default_model_path()}),
        policy=TransmitPolicyConfig(**values[TransmitPolicyConfig]),
        capture=CaptureConfig(**values[CaptureConfig]),
        camera_health=resolve_health_specs(list(values[CameraChecks]["health"]), camera_ids),
        source_options={"file": dict(values[FileSourceOptions])},
    )


def config_from_args(args: argparse.Namespace) -> EdgeConfig:
    """The node's config from parsed arguments (and the ``--config`` file they name)."""
    return config_from_values(config_options().values(args))


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# What signal.signal and signal.getsignal return (None: a handler not installed from Python).
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def install_stop_signals(stop: threading.Event) -> dict[int, SignalHandler]:
    """SIGINT and SIGTERM end the node cleanly (cameras released, sockets closed).

    Returns the handlers they replace, so :func:`main` can put them back: called in-process
    (tests, an embedding program) it must not leave the process's signals changed.
    """

    def request_stop(signum: int, _frame: object) -> None:
        logging.getLogger("mvld.edge").info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    return {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}


def install_relearn_signal(node: EdgeNode) -> None:
    """SIGUSR1 re-learns every camera's reference (after re-aiming cameras on purpose)."""

    def request_relearn(signum: int, _frame: object) -> None:
        logging.getLogger("mvld.edge").info(
            "%s: re-learning every camera's reference", signal.Signals(signum).name
        )
        node.relearn()

    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, request_relearn)


def main(argv: list[str] | None = None, stop: threading.Event | None = None) -> int:
    """Entry point of ``mvld-edge``; ``stop`` is the event SIGINT/SIGTERM set (the console
    script sets it up before importing this module)."""
    stop = stop or threading.Event()
    previous = install_stop_signals(stop)  # before the encoder opens: a stop then is normal
    if hasattr(signal, "SIGUSR1"):  # _run installs the re-learn handler
        previous[signal.SIGUSR1] = signal.getsignal(signal.SIGUSR1)
    try:
        return _run(argv, stop)
    finally:
        for sig, handler in previous.items():  # None: one not set from Python, not restorable
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _run(argv: list[str] | None, stop: threading.Event) -> int:
    """Parse, build the node and run it until ``stop`` is set or the sources end."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_json, log_level_of(args))
    try:
        values = config_options().values(args)
        config = config_from_values(values)
        if args.print_config:
            sys.stdout.write(config_options().to_toml(values))
            return 0
        node = EdgeNode(config)
    except MVLDError as exc:
        print(f"mvld-edge: error: {exc}", file=sys.stderr)
        return 2
    install_relearn_signal(node)
    try:
        summary = node.run(stop)
    except MVLDError as exc:
        print(f"mvld-edge: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"mvld-edge: {summary.framesets} frame sets in {summary.seconds:.1f} s, "
        f"{summary.sent} sent, {summary.dropped} dropped, {summary.bytes_sent} bytes",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
