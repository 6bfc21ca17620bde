"""``mvld-receiver``: receive latents from edge nodes, impute missing views, run tasks.

Thin: parse flags into a :class:`ReceiverConfig`, run the :class:`ReceiverService` until
SIGINT/SIGTERM. Every option is documented in ``docs/RECEIVER.md``. The stop signals are
caught before anything heavy is imported (torch alone takes seconds), so a SIGTERM at any
moment of start-up ends the command with status 0 instead of the default 143; start-up
stops at the next stage boundary.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import TYPE_CHECKING

from mvld.common.errors import MVLDError
from mvld.common.logs import setup_logging

if TYPE_CHECKING:
    from mvld.receiver.service import ReceiverConfig


def build_parser() -> argparse.ArgumentParser:
    """The ``mvld-receiver`` argument parser."""
    from mvld.receiver.imputation import DEFAULT_SAMPLER, DEFAULT_STEPS  # imports torch
    from mvld.receiver.ingest import CLOCK_WINDOW_S

    parser = argparse.ArgumentParser(
        prog="mvld-receiver",
        description="Receive latents from many edge nodes, impute the missing views with the "
                    "diffusion model, decode every view and hand complete frame sets to "
                    "downstream tasks, e.g. `mvld-receiver --gpu 0 --bind tcp://*:5555`.")
    add = parser.add_argument
    add("--gpu", type=int, default=0, help="CUDA device index; -1 = CPU (no CUDA: CPU, logged)")
    add("--bind", action="append", help="ZeroMQ endpoint to bind, repeatable "
                                        "(default tcp://*:5555)")
    add("--model", help="model checkpoint (P, P.json or a run folder); default: packaged model")
    add("--keys", metavar="RECEIVER.key_secret", help="CurveZMQ secret key of this receiver")
    add("--allow", metavar="DIR", help="folder of allowed edge public keys (*.key)")
    add("--task", action="append", default=[], metavar="NAME[:key=value,...]",
        help="downstream task, repeatable: save, classify, jsonl, publish, an installed "
             "mvld.tasks entry point or a dotted path module:Name")
    add("--sampler", default=DEFAULT_SAMPLER, help=f"imputation sampler (default "
                                                   f"{DEFAULT_SAMPLER})")
    add("--steps", type=int, default=DEFAULT_STEPS, help="sampler steps")
    add("--samples", type=int, default=1, help="samples per frame set; >1 gives uncertainty")
    add("--max-batch", type=int, default=64, help="frame sets per imputation call")
    add("--max-wait-ms", type=float, default=10.0, help="longest wait to fill a batch")
    add("--backlog", type=int, default=4, help="frame sets kept per node, newest first")
    add("--max-age-ms", type=float, default=1000.0, help="older frame sets are dropped")
    add("--max-nodes", type=int, default=256, help="edge nodes tracked at once")
    add("--max-rate", type=float, default=120.0,
        help="frame sets per second accepted from one node (its CurveZMQ key, else its node "
             "id); faster ones are dropped and counted; 0 = no limit (default 120)")
    add("--cameras", help="comma-separated camera id per model view (default cam0,cam1,...)")
    add("--clock-window", type=float, default=CLOCK_WINDOW_S, metavar="S",
        help="frame sets whose send or capture times are more than S seconds off this "
             f"machine's clock are counted and kept out of the latency figures (default "
             f"{CLOCK_WINDOW_S:g})")
    add("--threads", type=int, help="torch CPU threads (default: all cores; on a busy CPU "
                                    "1 is often faster)")
    add("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    add("--status-every", type=float, default=10.0, metavar="S", help="status line period")
    add("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add("--log-json", action="store_true", help="log one JSON object per line (with fields)")
    return parser


def config_from_args(args: argparse.Namespace) -> ReceiverConfig:
    """Flags -> validated config."""
    from mvld.receiver.service import ReceiverConfig

    return ReceiverConfig(
        bind=tuple(args.bind or ["tcp://*:5555"]), model=args.model, gpu=args.gpu,
        keys=args.keys, allow=args.allow, tasks=tuple(args.task), sampler=args.sampler,
        steps=args.steps, samples=args.samples, max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms, backlog_per_node=args.backlog, max_age_ms=args.max_age_ms,
        max_nodes=args.max_nodes,
        cameras=tuple(c.strip() for c in args.cameras.split(",")) if args.cameras else (),
        metrics_port=args.metrics_port, status_every_s=args.status_every, threads=args.threads,
        max_rate=args.max_rate, clock_window_s=args.clock_window)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld-receiver``."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # first: start-up takes seconds
        signal.signal(signum, lambda *_: stop.set())
    args = build_parser().parse_args(argv)
    setup_logging(args.log_json, args.log_level)
    if stop.is_set():
        return 0
    from mvld.receiver.service import ReceiverService

    try:
        config = config_from_args(args)
        if stop.is_set():
            return 0
        service = ReceiverService(config)
        if stop.is_set():
            service.close()
            return 0
        service.run(stop)
    except MVLDError as exc:
        print(f"mvld-receiver: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
