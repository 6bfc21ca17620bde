"""``mvld-receiver``: receive latents from edge nodes, impute missing views, run tasks.

Thin: the options are the fields of :class:`ReceiverConfig`, through
:mod:`mvld.common.config_flags` (defaults < ``--config FILE.toml`` < flags); run the
:class:`ReceiverService` until SIGINT/SIGTERM. Every option is documented in
``docs/RECEIVER.md``. The stop signals are
caught before anything heavy is imported (torch alone takes seconds), so a SIGTERM at any
moment of start-up ends the command with status 0 instead of the default 143; start-up
stops at the next stage boundary.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import TYPE_CHECKING

from mvld.common.config_flags import (
    ConfigOptions,
    Section,
    Values,
    add_logging_flags,
    log_level_of,
)
from mvld.common.errors import MVLDError
from mvld.common.exits import stop_event_on_signals
from mvld.common.logs import setup_logging

if TYPE_CHECKING:
    from mvld.receiver.cluster import ClusterReceiverService
    from mvld.receiver.config import ReceiverConfig
    from mvld.receiver.service import ReceiverService


def config_options() -> ConfigOptions:
    """The options of ``mvld-receiver``: the fields of :class:`ReceiverConfig` (imports torch)."""
    from mvld.receiver.config import ReceiverConfig

    return ConfigOptions([Section(ReceiverConfig)])


def build_parser() -> argparse.ArgumentParser:
    """The ``mvld-receiver`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="mvld-receiver",
        description="Receive latents from many edge nodes, impute the missing views with the "
        "diffusion model, decode every view and hand complete frame sets to "
        "downstream tasks, e.g. `mvld-receiver --gpu 0 --keys receiver.key_secret "
        "--allow keys/allowed/ --bind tcp://*:5555`. Options: defaults < --config "
        "FILE.toml < flags.",
    )
    config_options().add_to(parser)
    add_logging_flags(parser)
    return parser


def config_from_values(values: Values) -> ReceiverConfig:
    """Options -> validated config."""
    from mvld.receiver.config import ReceiverConfig

    return ReceiverConfig(**values[ReceiverConfig])


def config_from_args(args: argparse.Namespace) -> ReceiverConfig:
    """Flags (and the ``--config`` file they name) -> validated config."""
    return config_from_values(config_options().values(args))


def print_config(config: ReceiverConfig) -> None:
    """The effective options as TOML, the resolved default bind included."""
    from mvld.receiver.config import ReceiverConfig

    values: Values = {
        ReceiverConfig: {
            name: getattr(config, name) for name in ReceiverConfig.__dataclass_fields__
        }
    }
    sys.stdout.write(config_options().to_toml(values))


def main(argv: list[str] | None = None, stop: threading.Event | None = None) -> int:
    """Entry point of ``mvld-receiver``; ``stop`` is the event SIGINT/SIGTERM set (the console
    script sets it up before importing this module)."""
    stop = stop or stop_event_on_signals()  # first: start-up takes seconds
    args = build_parser().parse_args(argv)
    setup_logging(args.log_json, log_level_of(args))
    if stop.is_set():
        return 0
    try:
        config = config_from_args(args)
        if args.print_config:
            print_config(config)
            return 0
        if stop.is_set():
            return 0
        if config.workers > 0 or config.ray_address is not None:  # the stage on Ray
            from mvld.receiver.cluster import ClusterReceiverService

            service: ReceiverService | ClusterReceiverService = ClusterReceiverService(config)
        else:
            from mvld.receiver.service import ReceiverService

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
