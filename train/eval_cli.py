"""``mvld-eval``: measure imputation quality, speed and the bandwidth trade-off.

For every missing-view pattern: coherence, FID (real Inception weights), a Fréchet distance on
the classifier's features, PSNR/SSIM, NFE and seconds per frame set, for each sampler and the
baselines; then bytes per frame set against quality next to JPEG and WebP. A dataset without
labels is evaluated on PSNR/SSIM/FID only (coherence is skipped, and the outputs say so). Writes
``summary.json`` (docs/EVAL.md), ``summary.md``, PNG plots and image grids into ``--out``.
Progress goes to stderr. torch is imported after parsing, so ``--help`` works without it and a
missing extra is named in one line (exit codes: :mod:`mvld.common.exits`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from mvld.common.config_flags import add_gpu_flag, add_logging_flags, device_of, log_level_of
from mvld.common.errors import MVLDError
from mvld.common.exits import EXIT_USAGE, OPTIONAL_MODULES, command, output_folder

if TYPE_CHECKING:
    from mvld.train.evaluation import EvalConfig


class QuickPreset(TypedDict):
    """The ``--quick`` defaults."""

    frames: int
    fid_samples: int
    samplers: str
    throughput_batch: int


QUICK: QuickPreset = {
    "frames": 24,
    "fid_samples": 2,
    "samplers": "dpmpp_2m_sde:20,dpmpp_2m:20,euler_maruyama:250",
    "throughput_batch": 64,
}


def _default_samplers() -> str:
    """The default sampler list for the help text; without torch, where to read it."""
    try:
        from mvld.train.evaluation import DEFAULT_SAMPLERS
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in OPTIONAL_MODULES:
            raise
        return "the list in docs/EVAL.md"
    return DEFAULT_SAMPLERS


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``mvld-eval``."""
    parser = argparse.ArgumentParser(
        prog="mvld-eval",
        description="Evaluate imputation on the held-out scenes of a dataset for every "
        "missing-view pattern (coherence, FID, Fréchet distance on classifier features, "
        "PSNR/SSIM, baselines, NFE and time) and the bandwidth trade-off against JPEG/WebP, "
        "e.g. `mvld-eval --data DIR --model M --classifier C --out runs/eval`. Without "
        "labels.csv, coherence is skipped: PSNR/SSIM/FID only.",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="dataset folder in the format of docs/DATASETS.md (required)",
    )
    parser.add_argument(
        "--model", metavar="CKPT", help="MVLD checkpoint (default: the packaged model)"
    )
    parser.add_argument(
        "--classifier",
        metavar="CKPT",
        help="classifier checkpoint from `mvld-train classifier` "
        "(default: the packaged classifier; unused without labels)",
    )
    parser.add_argument(
        "--samplers",
        default=None,
        metavar="NAME:STEPS,...",
        help=f"comma-separated name:steps, or name:steps:meanK for the posterior mean of K "
        f"samples (the receiver's --samples K --posterior-mean); the first, one sample, is "
        f"the sampler the trade-off and grids use (default: {_default_samplers()})",
    )
    parser.add_argument(
        "--fid-samples",
        type=int,
        default=None,
        metavar="N",
        help="imputed views per method and pattern fed to Inception for FID "
        "(~0.3-0.8 s per view on a CPU; 0 skips FID) (default: 100)",
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        metavar="N",
        help="held-out frame sets evaluated, evenly spaced (default: 400)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="held-out tail of the dataset, as in training (default: 0.1)",
    )
    parser.add_argument(
        "--fit-data",
        default=None,
        metavar="DIR",
        help="dataset the baselines are fitted on (e.g. the model's training "
        "data); then every frame set of --data is held out (default: the "
        "training part of --data)",
    )
    parser.add_argument(
        "--fit-frames",
        type=int,
        default=10_000,
        metavar="N",
        help="at most this many frame sets of --fit-data, evenly spaced (default: 10000)",
    )
    parser.add_argument(
        "--out", default="runs/eval", metavar="DIR", help="output folder (default: runs/eval)"
    )
    parser.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help="torch device: cpu, cuda or cuda:N (default: cpu)",
    )
    add_gpu_flag(parser)
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (default: 0)")
    parser.add_argument(
        "--results",
        default=None,
        metavar="FILE.md",
        help="also write the imputation section of this markdown file (e.g. "
        "docs/RESULTS.md), replacing an earlier one",
    )
    outages = parser.add_argument_group(
        "camera outages (video-aware models, sequence datasets; docs/EVAL.md)"
    )
    outages.add_argument(
        "--outages",
        default=None,
        metavar="S,S,...",
        help="instead of the per-pattern evaluation: fail one or two cameras "
        "for each of these many seconds on every held-out scene and compare "
        "imputation with the cameras' memory against without, e.g. 1,5,30 "
        "(default: off)",
    )
    outages.add_argument(
        "--reference",
        default=None,
        metavar="CKPT",
        help="memoryless model the outages compare with (default: the packaged model)",
    )
    outages.add_argument(
        "--window",
        type=int,
        default=4,
        metavar="N",
        help="consecutive frames imputed at the end of each outage, for the "
        "flicker measure (default: 4)",
    )
    outages.add_argument(
        "--starts-per-scene",
        type=int,
        default=2,
        metavar="N",
        help="outage starts per scene, 1 s apart (default: 2)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small run for a smoke check: "
        + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items())
        + " unless given",
    )
    add_logging_flags(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Flags over the quick or full defaults, validated."""
    from mvld.train.evaluation import DEFAULT_SAMPLERS, EvalConfig, parse_samplers

    preset: Mapping[str, object] = QUICK if args.quick else {}

    def pick(name: str, full):
        given = getattr(args, name)
        return given if given is not None else preset.get(name, full)

    return EvalConfig(
        data=args.data,
        out=args.out,
        model=args.model,
        classifier=args.classifier,
        samplers=parse_samplers(pick("samplers", DEFAULT_SAMPLERS)),
        fid_samples=pick("fid_samples", 100),
        frames=pick("frames", 400),
        val_fraction=args.val_fraction,
        fit_data=args.fit_data,
        fit_frames=args.fit_frames,
        device=device_of(args.gpu, args.device),
        seed=args.seed,
        throughput_batch=QUICK["throughput_batch"] if args.quick else 64,
        quick=args.quick,
    )


def run_outages(args: argparse.Namespace) -> Path:
    """The camera-outage evaluation of ``--outages``; returns the summary's path."""
    from mvld.common.errors import ConfigError
    from mvld.train.evaluation import parse_samplers
    from mvld.train.outage_eval import OutageConfig, evaluate_outages, write_outage_outputs

    if args.model is None:
        raise ConfigError("--outages needs --model: a video-aware checkpoint")
    try:
        seconds = tuple(float(x) for x in args.outages.split(",") if x.strip())
    except ValueError as exc:
        raise ConfigError(f"--outages {args.outages!r}: write seconds, e.g. 1,5,30") from exc
    config = OutageConfig(
        data=args.data,
        model=args.model,
        reference=args.reference,
        classifier=args.classifier,
        outages_s=seconds,
        starts_per_scene=args.starts_per_scene,
        window=args.window,
        sampler=parse_samplers(args.samplers or "dpmpp_2m_sde:20")[0],
        fid_samples=100 if args.fid_samples is None else args.fid_samples,
        device=device_of(args.gpu, args.device),
        seed=args.seed,
    )
    output_folder(args.out)
    return write_outage_outputs(*evaluate_outages(config), args.out)


@command("mvld-eval", extras="train,eval")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld-eval``."""
    from mvld.common.logs import JsonLogFormatter

    args = build_parser().parse_args(argv)
    progress = logging.StreamHandler(sys.stderr)
    progress.setFormatter(
        JsonLogFormatter()
        if args.log_json
        else logging.Formatter("%(asctime)s %(name)s: %(message)s")
    )
    package_log = logging.getLogger("mvld")
    package_log.addHandler(progress)
    level, package_log.level = package_log.level, logging.getLevelName(log_level_of(args))
    try:
        from mvld.train.eval_report import results_section, update_results, write_outputs
        from mvld.train.evaluation import evaluate

        if args.outages is not None:
            print(run_outages(args))
            return 0
        config = config_from_args(args)
        output_folder(config.out)
        result = evaluate(config)
        path = write_outputs(result, config.out)
        if args.results:
            command = shlex.join(["mvld-eval", *(sys.argv[1:] if argv is None else argv)])
            section = results_section(result.summary, Path(config.out), Path(args.results), command)
            update_results(Path(args.results), section)
    except MVLDError as exc:
        sys.stderr.write(f"mvld-eval: error: {exc}\n")
        return EXIT_USAGE
    finally:
        package_log.removeHandler(progress)
        package_log.setLevel(level)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
