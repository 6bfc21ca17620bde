"""``mvld-export``: export a trained model to ONNX, or build a TensorRT engine from the ONNX.

``mvld-export onnx --out DIR [--model CKPT]`` (default: the shipped model) writes
``encoder.onnx``, ``decoder.onnx`` and ``score_net.onnx`` (dynamic batch, one self-contained
file each, ``.sha256`` beside, metadata embedded, ORT parity checked) plus ``manifest.json``.
``mvld-export trt --onnx FILE`` builds a cached TensorRT engine on this machine's GPU and
checks it against ONNX Runtime.

Exit status: 0 success, 1 invalid input (missing or wrong checkpoint, bad file), 2 bad flags,
3 TensorRT or a GPU is absent, 4 parity above the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mvld.common.config_flags import add_logging_flags, setup_logging_of
from mvld.common.default_model import DEFAULT_MODEL
from mvld.common.errors import MVLDError

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_PARITY = 0, 1, 2, 3, 4


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _verbosity() -> argparse.ArgumentParser:
    """The logging flags every command spells alike; ``-q`` also hides the progress lines."""
    shared = argparse.ArgumentParser(add_help=False)
    add_logging_flags(shared, default="WARNING", quiet_also="hides the progress lines")
    return shared


def _add_onnx(commands: argparse._SubParsersAction) -> None:
    from mvld.export.onnx_files import DEFAULT_OPSET, DEFAULT_TOLERANCE, EXPORTERS, GRAPHS

    onnx = commands.add_parser(
        "onnx",
        parents=[_verbosity()],
        help="export encoder, decoder and score network to ONNX with a parity check",
        description="Export a checkpoint to self-contained ONNX files; ONNX Runtime must match "
        "torch within --tolerance on real frames, else exit status 4.",
    )
    onnx.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        metavar="PATH",
        help="checkpoint (P, P.json or a run folder holding last.json) "
        "(default: the shipped default model)",
    )
    onnx.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output folder (required)"
    )
    onnx.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        metavar="N",
        help=f"ONNX opset (default: {DEFAULT_OPSET})",
    )
    onnx.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        metavar="X",
        help=f"max abs error ORT vs torch (default: {DEFAULT_TOLERANCE:g})",
    )
    onnx.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="dynamo",
        help="torch.onnx exporter (default: dynamo)",
    )
    onnx.add_argument(
        "--frames",
        type=Path,
        default=None,
        metavar="DIR",
        help="dataset folder for the parity frames (default: the simulated rig)",
    )
    onnx.add_argument(
        "--parts",
        nargs="+",
        choices=list(GRAPHS),
        default=list(GRAPHS),
        metavar="PART",
        help=f"which graphs to export: {', '.join(GRAPHS)} (default: all)",
    )
    onnx.set_defaults(func=_run_onnx)


def _add_trt(commands: argparse._SubParsersAction) -> None:
    from mvld.edge.tensorrt_runtime import PRECISIONS
    from mvld.export.tensorrt_build import DEFAULT_WORKSPACE_MIB

    trt = commands.add_parser(
        "trt",
        parents=[_verbosity()],
        help="build a TensorRT engine from an exported ONNX file (on the target GPU)",
        description="Build (or reuse from the cache) a TensorRT engine and check it against "
        "ONNX Runtime. Batch profile defaults: min 1, opt V, max 2V (V views).",
    )
    trt.add_argument(
        "--onnx",
        required=True,
        type=Path,
        metavar="FILE",
        help="an ONNX file from mvld-export onnx (required)",
    )
    trt.add_argument(
        "--precision", choices=PRECISIONS, default="fp16", help="engine precision (default: fp16)"
    )
    trt.add_argument(
        "--min", dest="min_batch", type=_positive, metavar="N", help="minimum batch (default: 1)"
    )
    trt.add_argument(
        "--opt", dest="opt_batch", type=_positive, metavar="N", help="optimal batch (default: V)"
    )
    trt.add_argument(
        "--max", dest="max_batch", type=_positive, metavar="N", help="maximum batch (default: 2V)"
    )
    trt.add_argument(
        "--views",
        type=_positive,
        metavar="V",
        help="camera views V (default: from the ONNX metadata)",
    )
    trt.add_argument(
        "--workspace",
        type=_positive,
        default=DEFAULT_WORKSPACE_MIB,
        metavar="MIB",
        help=f"builder workspace limit in MiB (default: {DEFAULT_WORKSPACE_MIB})",
    )
    trt.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="engine cache folder (default: engines/ beside the ONNX)",
    )
    trt.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="X",
        help="relative max error vs ORT (default: 1e-3 fp32, 2e-2 fp16)",
    )
    trt.add_argument(
        "--frames",
        type=Path,
        default=None,
        metavar="DIR",
        help="dataset folder for the parity frames (default: the simulated rig)",
    )
    trt.add_argument(
        "--gpu", type=int, metavar="N", default=0, help="CUDA device index (default: 0)"
    )
    trt.add_argument("--force", action="store_true", help="rebuild even on a cache hit")
    trt.set_defaults(func=_run_trt)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mvld-export``."""
    parser = argparse.ArgumentParser(prog="mvld-export", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_onnx(commands)
    _add_trt(commands)
    return parser


def _run_onnx(args: argparse.Namespace) -> int:
    from mvld.export.onnx_export import DESCRIPTOR_FILE, ExportOptions, ParityError, export_model

    options = ExportOptions(
        opset=args.opset,
        tolerance=args.tolerance,
        exporter=args.exporter,
        frames=args.frames,
        parts=tuple(args.parts),
    )
    say = (lambda _: None) if args.quiet else (lambda m: print(f"mvld-export: {m}", flush=True))
    try:
        exported = export_model(args.model, args.out, options, progress=say)
    except ParityError as exc:
        sys.stderr.write(f"mvld-export onnx: parity check FAILED: {exc}\n")
        return EXIT_PARITY
    for graph in exported:
        print(
            f"{graph.part}: {graph.path} opset {graph.opset} max_abs_error "
            f"{graph.max_abs_error:.3g} onnx_fingerprint {graph.fingerprint} "
            f"file_sha256 {graph.file_sha256}"
        )
    descriptor = json.loads((args.out / DESCRIPTOR_FILE).read_text())
    print(
        f"encoder fingerprint (wire v1 enc, checked by the receiver) "
        f"{descriptor['encoder_fingerprint']}"
    )
    print(
        f"wire v2 enc (its first {descriptor['wire_fingerprint_bytes']} bytes) "
        f"{descriptor['wire_fingerprint']}; latent shape {descriptor['latent']['shape']}; "
        f"descriptor {args.out / DESCRIPTOR_FILE}"
    )
    return EXIT_OK


def _run_trt(args: argparse.Namespace) -> int:
    from mvld.edge.tensorrt_runtime import TensorRTError, tensorrt_unavailable_reason
    from mvld.export.tensorrt_build import BuildOptions, EngineParityError, build_engine

    options = BuildOptions(
        precision=args.precision,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        views=args.views,
        workspace_mib=args.workspace,
        cache_dir=args.cache,
        tolerance=args.tolerance,
        frames=args.frames,
        gpu=args.gpu,
        force=args.force,
    )
    reason = tensorrt_unavailable_reason(args.gpu)
    if reason:
        sys.stderr.write(f"mvld-export trt: cannot build here: {reason}\n")
        return EXIT_UNAVAILABLE
    try:
        result = build_engine(args.onnx, options)
    except EngineParityError as exc:
        sys.stderr.write(f"mvld-export trt: parity check FAILED: {exc}\n")
        return EXIT_PARITY
    except TensorRTError as exc:
        sys.stderr.write(f"mvld-export trt: {exc}\n")
        return EXIT_UNAVAILABLE
    state = "cache hit" if result.cached else f"built in {result.build_seconds:.1f} s"
    print(
        f"{result.engine} ({state}); relative max error vs ONNX Runtime "
        f"{result.parity_error:.3g} <= {result.threshold:.3g}"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld-export``."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    setup_logging_of(args, "%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except MVLDError as exc:
        sys.stderr.write(f"mvld-export {args.command}: {exc}\n")
        return EXIT_INVALID
    except KeyboardInterrupt:
        sys.stderr.write(f"mvld-export {args.command}: interrupted\n")
        return 130
