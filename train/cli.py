"""``mvld-train``: train the autoencoder (``ae``), then the score model (``score``).

``classifier`` trains the downstream label classifier used to judge imputed views.

Options come from defaults, then an optional TOML file (``--config``), then flags. Under
``torchrun --nproc_per_node N`` the same command trains with DistributedDataParallel.
torch is imported after parsing: ``--help`` works without it, and a missing ``train`` extra
is named in one line (:mod:`mvld.common.exits`). SIGINT/SIGTERM save a checkpoint of the last
finished step (``--resume`` continues from it) and exit 130/143.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mvld.common.errors import MVLDError
from mvld.common.exits import EXIT_USAGE, command, output_folder
from mvld.train.config import (
    AETrainConfig,
    ClassifierTrainConfig,
    CommonTrainConfig,
    ScoreTrainConfig,
    add_config_flags,
    load_config,
)

if TYPE_CHECKING:
    from mvld.train.distributed import DistributedContext

STAGES: dict[str, tuple[type[CommonTrainConfig], str]] = {
    "ae": (AETrainConfig, "train the shared autoencoder on every view of a dataset folder"),
    "score": (ScoreTrainConfig, "train the score network on the latents of a trained autoencoder"),
    "classifier": (ClassifierTrainConfig,
                   "train the downstream label classifier on single real views"),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``mvld-train`` and its stages."""
    parser = argparse.ArgumentParser(
        prog="mvld-train",
        description="Train on a dataset folder: `mvld-train ae --data DIR`, then "
        "`mvld-train score --data DIR --ae runs/ae/last`. Options: defaults < --config "
        "TOML file (top level or [ae]/[score] table) < flags.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (cls, help_text) in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--config", help="TOML file with options")
        add_config_flags(stage, cls)
    return parser


def _train(stage: str, config: CommonTrainConfig, ctx: DistributedContext) -> Path:
    if stage == "ae":
        from mvld.train.autoencoder_training import train_autoencoder

        return train_autoencoder(config, ctx)
    if stage == "score":
        from mvld.train.score_training import train_score

        return train_score(config, ctx)
    from mvld.train.classifier_training import train_classifier

    return train_classifier(config, ctx)


@command("mvld-train", extras="train")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mvld-train``."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = vars(build_parser().parse_args(argv))
    stage, config_file = args.pop("stage"), args.pop("config")
    cls = STAGES[stage][0]
    try:
        config = load_config(cls, stage, config_file, args)
        import torch

        from mvld.train.distributed import setup_distributed, teardown_distributed

        if config.out:
            output_folder(config.out, "run folder")
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        ctx = setup_distributed(config.device)
        try:
            path = _train(stage, config, ctx)
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
