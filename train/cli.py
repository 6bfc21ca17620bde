"""``mvld-train``: train the autoencoder (``ae``), then the score model (``score``).

``classifier`` trains the downstream label classifier used to judge imputed views; ``memory``
makes a trained model video-aware (:mod:`mvld.train.memory_prior`). ``all``
runs every stage, the ONNX export and a verdict against the baselines in one resumable
command (:mod:`mvld.train.pipeline`, docs/TRAINING.md).

Options come from defaults, then an optional TOML file (``--config``), then flags;
``--print-config`` prints them as such a file, and ``--gpu N`` is ``--device cuda:N``. Under
``torchrun --nproc_per_node N`` the same command trains with DistributedDataParallel.
torch is imported after parsing: ``--help`` works without it, and a missing ``train`` extra
is named in one line (:mod:`mvld.common.exits`). SIGINT/SIGTERM save a checkpoint of the last
finished step (``--resume`` continues from it) and exit 130/143.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mvld.common.config_flags import add_gpu_flag, add_logging_flags, device_of, log_level_of
from mvld.common.errors import MVLDError
from mvld.common.exits import EXIT_USAGE, command, output_folder
from mvld.common.logs import setup_logging
from mvld.train.config import (
    AETrainConfig,
    ClassifierTrainConfig,
    CommonTrainConfig,
    MemoryPriorConfig,
    ScoreTrainConfig,
    TrainAllConfig,
    add_config_flags,
    config_options,
    config_to_dict,
    flags_given,
    load_config,
    stage_tables,
)

if TYPE_CHECKING:
    from mvld.train.distributed import DistributedContext

STAGES: dict[
    str, tuple[type[CommonTrainConfig] | type[TrainAllConfig] | type[MemoryPriorConfig], str]
] = {
    "ae": (AETrainConfig, "train the shared autoencoder on every view of a dataset folder"),
    "score": (ScoreTrainConfig, "train the score network on the latents of a trained autoencoder"),
    "classifier": (
        ClassifierTrainConfig,
        "train the downstream label classifier on single real views",
    ),
    "memory": (
        MemoryPriorConfig,
        "make a trained model video-aware: fit a memory prior (each failed camera's estimate "
        "corrected by its own last good view) on a sequence dataset; minutes, no gradient steps",
    ),
    "all": (
        TrainAllConfig,
        "every stage into one run folder, the ONNX export and a verdict "
        "against the baselines; resumable, with an optional --budget (docs/TRAINING.md)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``mvld-train`` and its stages."""
    parser = argparse.ArgumentParser(
        prog="mvld-train",
        description="Train on a dataset folder: `mvld-train ae --data DIR`, then "
        "`mvld-train score --data DIR --ae runs/ae/last`. Options: defaults < --config "
        "TOML file (top level or [ae]/[score]/[classifier] table) < flags. "
        "`mvld-train STAGE --help` lists a stage's options.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (cls, help_text) in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        add_config_flags(stage, cls)
        add_gpu_flag(stage)
        add_logging_flags(stage)
    return parser


def _train(
    config: CommonTrainConfig | TrainAllConfig | MemoryPriorConfig,
    ctx: DistributedContext,
    config_file: str | None,
) -> Path:
    """Run the stage ``config`` belongs to (its class names it, as in ``STAGES``)."""
    from mvld.train.pipeline import run_pipeline, train_stage

    if isinstance(config, MemoryPriorConfig):
        from mvld.train.memory_prior import fit_memory_stage

        return fit_memory_stage(config)
    if isinstance(config, TrainAllConfig):
        result = run_pipeline(config, ctx, stage_tables(config_file))
        print(result.report)
        return result.model
    return train_stage(config, ctx)


def _stage_tables_toml(config: TrainAllConfig, config_file: str | None) -> str:
    """The effective options of every stage of ``all``, as the ``[ae]``, ``[score]`` and
    ``[classifier]`` tables its ``--config`` reads (the run's own options win over them)."""
    from mvld.common.config_flags import ConfigOptions, Section
    from mvld.train.pipeline import stage_configs

    shared = ", ".join(
        ("data", "device", "seed", "val_fraction", "threads", "skip_bad", "progress")
    )
    text = ""
    for name, stage_config in stage_configs(config, stage_tables(config_file)).items():
        stage_cls = type(stage_config)
        from_run = shared + (", ae" if name == "score" else "") + ", out and resume"
        text += (
            f"\n# the {name} stage, as `mvld-train all` runs it: {from_run} come from the "
            "run" + (", steps from --budget" if config.budget else "") + "\n"
        )
        text += ConfigOptions([Section(stage_cls, name)]).to_toml(
            {stage_cls: config_to_dict(stage_config)}
        )
    return text


@command("mvld-train", extras="train")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld-train``."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_json, log_level_of(args))
    stage, config_file = args.stage, args.config
    cls = STAGES[stage][0]
    try:
        flags = flags_given(cls, args)
        if args.gpu is not None:
            flags["device"] = device_of(args.gpu, flags.get("device"))
        config = load_config(cls, stage, config_file, flags)
        if args.print_config:
            sys.stdout.write(config_options(cls).to_toml({cls: config_to_dict(config)}))
            if isinstance(config, TrainAllConfig):
                sys.stdout.write(_stage_tables_toml(config, config_file))
            return 0
        import torch

        from mvld.train.distributed import setup_distributed, teardown_distributed

        if config.out:
            output_folder(config.out, "run folder")
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        ctx = setup_distributed(config.device)
        try:
            path = _train(config, ctx, config_file)
        finally:
            teardown_distributed()
    except MVLDError as exc:
        sys.stderr.write(f"mvld-train {stage}: {exc}\n")
        return EXIT_USAGE
    if ctx.is_main:
        print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
