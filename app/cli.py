"""``mvld``: the umbrella command (version, keys, demo)."""

import argparse
import importlib.util
import logging
import platform
import sys

from mvld import __version__
from mvld.common.config_flags import add_logging_flags, setup_logging_of
from mvld.common.exits import EXIT_USAGE, command, output_folder

_OPTIONAL_PACKAGES = ("torch", "onnxruntime", "onnx", "pybullet", "tensorrt", "cuda")


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"mvld {__version__} (Python {platform.python_version()}, {platform.machine()})")
    if args.verbose:
        for name in _OPTIONAL_PACKAGES:
            found = importlib.util.find_spec(name) is not None
            print(f"  {name:12s} {'available' if found else 'not installed'}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from mvld.common.errors import ConfigError
    from mvld.common.keys import generate_keypair

    try:
        output_folder(args.dir, "key folder")
        public, secret = generate_keypair(args.dir, args.name)
    except ConfigError as exc:
        sys.stderr.write(f"mvld keys: {exc}\n")
        return EXIT_USAGE
    print(f"public key (share it): {public}")
    print(f"secret key (keep it, mode 0600): {secret}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mvld.common.errors import MVLDError
    from mvld.demo import DemoConfig, run_demo

    try:
        config = DemoConfig(
            out=Path(args.out),
            seconds=args.seconds,
            fps=args.fps,
            model=Path(args.model) if args.model else None,
        )
        index = run_demo(config, progress=print)
    except MVLDError as exc:
        sys.stderr.write(f"mvld demo: error: {exc}\n")
        return EXIT_USAGE
    print(f"report: {index}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mvld`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="mvld",
        description="MVLD umbrella command. The stage commands are mvld-edge, "
        "mvld-receiver, mvld-train, mvld-eval, mvld-export and mvld-data.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    version = sub.add_parser("version", help="print the version (and optional backends with -v)")
    version.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also list the optional packages and whether they are installed",
    )
    version.set_defaults(func=_cmd_version)

    keys = sub.add_parser(
        "keys",
        help="generate a CurveZMQ key pair for a node or a receiver",
        description="Write NAME.key (public, share it) and NAME.key_secret (secret, mode "
        "0600) into DIR. Copy each edge node's NAME.key into the receiver's allow-list "
        "folder and the receiver's public key onto every node.",
    )
    keys.add_argument("name", help="key name, e.g. node1 or receiver")
    keys.add_argument("--dir", default="keys", help="output folder (default: ./keys)")
    add_logging_flags(keys)
    keys.set_defaults(func=_cmd_keys)

    demo = sub.add_parser(
        "demo",
        help="run an edge and a receiver on loopback with simulated cameras and faults",
        description="Start mvld-receiver and mvld-edge as separate processes on 127.0.0.1 "
        "with three simulated cameras; camera 1 stops for a while and camera 2 is covered "
        "part-way. Writes OUT/index.html with figures (views over time, health timeline, "
        "latency, bandwidth). No camera or GPU needed.",
    )
    demo.add_argument(
        "--out", default="mvld-demo", metavar="DIR", help="report folder (default ./mvld-demo)"
    )
    demo.add_argument(
        "--seconds",
        type=float,
        default=40.0,
        metavar="S",
        help="seconds of streaming (default: 40)",
    )
    demo.add_argument(
        "--fps", type=float, default=10.0, metavar="F", help="frame sets per second (default: 10)"
    )
    demo.add_argument(
        "--model",
        metavar="DIR",
        help="model folder with last.json, last.safetensors and encoder.onnx "
        "(default: the shipped default model)",
    )
    add_logging_flags(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


@command("mvld", extras="edge,sim,receiver,eval")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld`` (exit codes: :mod:`mvld.common.exits`)."""
    args = build_parser().parse_args(argv)
    if hasattr(args, "log_level"):
        setup_logging_of(args, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:  # mvld version: its -v means "list the backends"
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    return args.func(args)
