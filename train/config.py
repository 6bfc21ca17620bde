"""Training configurations: dataclasses filled from defaults, a TOML file, then flags.

Parsed and validated once here (config stops at the factory); the training functions take
the dataclass. A TOML file may hold the keys at top level or in an ``[ae]`` / ``[score]``
table; unknown keys are a ``ConfigError`` so a typo never silently falls back to a default.
Each field's ``option`` metadata makes its ``--flag`` and help line
(:mod:`mvld.common.config_flags`); the file merging stays here, for the stage tables.
"""

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mvld.common.config_flags import ConfigOptions, Section, option, tomllib
from mvld.common.errors import ConfigError

LR_SCHEDULES = ("constant", "cosine")
SCORE_KINDS = ("auto", "mlp", "conv")
SCORE_WIDTHS = {"mlp": (1024, 512, 256), "conv": (64, 128)}  # defaults of each kind
PRECISIONS = ("fp32", "bf16")


@dataclass
class CommonTrainConfig:
    """Options shared by both stages."""

    data: str = field(
        default="",
        metadata=option(
            "dataset folder in the format of docs/DATASETS.md", required=True, metavar="DIR"
        ),
    )
    out: str = field(
        default="", metadata=option("run folder: checkpoints, logs, caches", metavar="DIR")
    )
    device: str = field(
        default="cpu",
        metadata=option(
            "torch device: cpu, cuda or cuda:N (--gpu N is the same as cuda:N)", metavar="DEVICE"
        ),
    )
    seed: int = field(default=0, metadata=option("random seed", metavar="N"))
    batch_size: int = field(default=128, metadata=option("samples per step", metavar="N"))
    steps: int = field(default=2000, metadata=option("optimiser steps", metavar="N"))
    lr: float = field(default=1e-3, metadata=option("peak learning rate (Adam)"))
    lr_schedule: str = field(
        default="constant",
        metadata=option("constant, or cosine: decays to lr / 10 at the last step", metavar="NAME"),
    )
    val_fraction: float = field(
        default=0.1,
        metadata=option("held-out tail of the dataset used for validation", metavar="F"),
    )
    val_every: int = field(
        default=250, metadata=option("steps between validations (0: only at the end)", metavar="N")
    )
    checkpoint_every: int = field(
        default=250, metadata=option("steps between checkpoints (0: only at the end)", metavar="N")
    )
    resume: bool = field(
        default=False, metadata=option("continue from OUT/last (an interrupted run saves it)")
    )
    threads: int = field(
        default=0, metadata=option("torch intra-op threads (0: torch's default)", metavar="N")
    )
    precision: str = field(
        default="fp32",
        metadata=option(
            "fp32, or bf16: mixed-precision forward passes (AMX CPUs, GPUs)", metavar="NAME"
        ),
    )
    skip_bad: bool = field(
        default=False, metadata=option("skip unreadable files instead of failing")
    )
    progress: bool = field(default=True, metadata=option("show a tqdm progress bar"))


@dataclass
class AETrainConfig(CommonTrainConfig):
    """Stage 1: the autoencoder."""

    out: str = field(
        default="runs/ae", metadata=option("run folder: checkpoints, logs, caches", metavar="DIR")
    )
    batch_size: int = field(default=32, metadata=option("views per step", metavar="N"))
    steps: int = field(default=12000, metadata=option("optimiser steps", metavar="N"))
    lr_schedule: str = field(
        default="cosine",
        metadata=option("constant, or cosine: decays to lr / 10 at the last step", metavar="NAME"),
    )
    image_size: int = field(
        default=128,
        metadata=option("views are resized to this square size in pixels", metavar="PX"),
    )
    channels: tuple[int, ...] = field(
        default=(32, 64, 128, 128),
        metadata=option(
            "encoder channels, comma-separated: one stride-2 stage each", metavar="C,C,..."
        ),
    )
    latent_channels: int = field(
        default=8,
        metadata=option(
            "channels of a spatial latent (C x (size / 2^stages)^2 values); 0: a vector latent",
            metavar="N",
        ),
    )
    latent_dim: int = field(
        default=128,
        metadata=option("size of a vector latent (only when --latent-channels is 0)", metavar="N"),
    )
    res_blocks: int = field(
        default=1, metadata=option("residual blocks per decoder stage", metavar="N")
    )
    encoder_res_blocks: int = field(
        default=0,
        metadata=option(
            "residual blocks per encoder stage (the edge runs the encoder)", metavar="N"
        ),
    )
    ssim_weight: float = field(
        default=1.0,
        metadata=option("loss = L1 + w * (1 - SSIM): weighs structure, not level", metavar="W"),
    )
    val_every: int = field(
        default=500, metadata=option("steps between validations (0: only at the end)", metavar="N")
    )
    checkpoint_every: int = field(
        default=500, metadata=option("steps between checkpoints (0: only at the end)", metavar="N")
    )
    val_images: int = field(
        default=512, metadata=option("validation views used for PSNR", metavar="N")
    )


@dataclass
class ScoreTrainConfig(CommonTrainConfig):
    """Stage 2: the score network on cached, standardised latents."""

    ae: str = field(
        default="",
        metadata=option(
            "autoencoder checkpoint from mvld-train ae (e.g. runs/ae/last)",
            required=True,
            metavar="CKPT",
        ),
    )
    out: str = field(
        default="runs/score",
        metadata=option("run folder: checkpoints, logs, caches", metavar="DIR"),
    )
    batch_size: int = field(default=256, metadata=option("frame sets per step", metavar="N"))
    steps: int = field(default=16000, metadata=option("optimiser steps", metavar="N"))
    lr: float = field(default=5e-4, metadata=option("peak learning rate (Adam)"))
    lr_schedule: str = field(
        default="cosine",
        metadata=option("constant, or cosine: decays to lr / 10 at the last step", metavar="NAME"),
    )
    kind: str = field(
        default="auto",
        metadata=option(
            "score network: mlp, conv, or auto (conv for a spatial latent)", metavar="NAME"
        ),
    )
    widths: tuple[int, ...] = field(
        default=(),
        metadata=option(
            "layer widths, comma-separated",
            metavar="W,W,...",
            default_text="the kind's own: mlp 1024,512,256; conv 64,128",
        ),
    )
    blocks: int = field(default=2, metadata=option("conv: residual blocks per level", metavar="N"))
    attention_heads: int = field(
        default=4,
        metadata=option("conv: self-attention heads at the coarsest level; 0: none", metavar="N"),
    )
    init: str = field(
        default="",
        metadata=option(
            "warm start from this MVLD checkpoint (same encoder): its score network weights and "
            "latent statistics; layers it lacks (e.g. added attention, zero-initialised) keep "
            "their initialisation, so the warm-started net starts as the old one",
            metavar="CKPT",
            default_text="none: a fresh network",
        ),
    )
    time_dim: int = field(
        default=128, metadata=option("size of the diffusion-time embedding", metavar="N")
    )
    memory: bool = field(
        default=False,
        metadata=option(
            "video-aware: also condition on each camera's last observed latent and its age, drawn "
            "from earlier frame sets of the same scene (needs a sequence dataset, "
            "docs/DATASETS.md); conv networks only"
        ),
    )
    memory_drop: float = field(
        default=0.25,
        metadata=option(
            "with --memory: probability that a view has no memory in a training sample", metavar="P"
        ),
    )
    memory_max_age_s: float = field(
        default=30.0,
        metadata=option(
            "with --memory: oldest memory drawn, in seconds of the dataset's frame rate",
            metavar="S",
        ),
    )
    prior: bool = field(
        default=False,
        metadata=option(
            "residual diffusion: fit a ridge regression of the missing views on the observed "
            "ones (per presence pattern) on the training latents, store it in the score network "
            "and denoise what it misses (docs/MODEL.md, 'Regression prior'); conv networks only"
        ),
    )
    prior_alpha: float = field(
        default=1.0, metadata=option("with --prior: the ridge penalty", metavar="A")
    )
    refit_prior: bool = field(
        default=False,
        metadata=option(
            "with --prior and --init: fit the regression prior again on this data instead of "
            "keeping the warm-started network's (whose residuals it learned)"
        ),
    )
    cond_prob: float = field(
        default=0.5,
        metadata=option(
            "probability that a training sample is conditional (d in MLD)", metavar="P"
        ),
    )
    t_min: float = field(
        default=1e-3, metadata=option("smallest diffusion time sampled in training", metavar="T")
    )
    beta_min: float = field(
        default=0.1, metadata=option("VP-SDE noise schedule: beta at t = 0", metavar="B")
    )
    beta_max: float = field(
        default=20.0, metadata=option("VP-SDE noise schedule: beta at t = 1", metavar="B")
    )
    ema_decay: float = field(
        default=0.999,
        metadata=option(
            "decay of the weights' exponential moving average (the EMA weights are saved)",
            metavar="D",
        ),
    )
    val_every: int = field(
        default=1000, metadata=option("steps between validations (0: only at the end)", metavar="N")
    )
    checkpoint_every: int = field(
        default=1000, metadata=option("steps between checkpoints (0: only at the end)", metavar="N")
    )


@dataclass
class ClassifierTrainConfig(CommonTrainConfig):
    """The downstream label classifier on single views."""

    out: str = field(
        default="runs/classifier",
        metadata=option("run folder: checkpoints, logs, caches", metavar="DIR"),
    )
    image_size: int = field(
        default=64, metadata=option("views are resized to this square size in pixels", metavar="PX")
    )
    channels: tuple[int, ...] = field(
        default=(32, 64, 128, 128),
        metadata=option("channels per stage, comma-separated", metavar="C,C,..."),
    )
    convs_per_stage: int = field(
        default=2, metadata=option("3x3 convolutions per stage", metavar="N")
    )
    augment: bool = field(
        default=True,
        metadata=option("augment views: shifts, brightness/contrast, blur (mvld.train.augment)"),
    )
    mirror: bool = field(
        default=False,
        metadata=option("also mirror views; only where labels survive it (docs/DATASETS.md)"),
    )
    steps: int = field(default=4000, metadata=option("optimiser steps", metavar="N"))
    lr_schedule: str = field(
        default="cosine",
        metadata=option("constant, or cosine: decays to lr / 10 at the last step", metavar="NAME"),
    )


EXPORTERS = ("dynamo", "torchscript")


@dataclass
class MemoryPriorConfig:
    """``mvld-train memory``: fit a memory prior onto a trained model (no gradient steps)."""

    data: str = field(
        default="",
        metadata=option(
            "sequence dataset folder (frame order and scene cuts known, docs/DATASETS.md)",
            required=True,
            metavar="DIR",
        ),
    )
    model: str = field(
        default="",
        metadata=option(
            "the model to make video-aware; its score network needs a regression prior "
            "(`mvld-train score --prior`)",
            metavar="CKPT",
            default_text="the packaged model",
        ),
    )
    out: str = field(
        default="runs/memory",
        metadata=option(
            "run folder: the video-aware checkpoint (last), latent cache", metavar="DIR"
        ),
    )
    device: str = field(
        default="cpu",
        metadata=option(
            "torch device: cpu, cuda or cuda:N (--gpu N is the same as cuda:N)", metavar="DEVICE"
        ),
    )
    seed: int = field(default=0, metadata=option("random seed of the memory draws", metavar="N"))
    val_fraction: float = field(
        default=0.1,
        metadata=option("held-out tail: the fit's validation errors", metavar="F"),
    )
    max_age_s: float = field(
        default=30.0,
        metadata=option("oldest memory drawn, in seconds of the dataset's frame rate", metavar="S"),
    )
    alpha: float = field(default=1.0, metadata=option("the fit's ridge penalty", metavar="A"))
    threads: int = field(
        default=0, metadata=option("torch intra-op threads (0: torch's default)", metavar="N")
    )
    skip_bad: bool = field(
        default=False, metadata=option("skip unreadable files instead of failing")
    )
    progress: bool = field(default=True, metadata=option("show tqdm progress bars"))


@dataclass
class TrainAllConfig:
    """``mvld-train all``: every stage into one run folder (:mod:`mvld.train.pipeline`).

    Stage options beyond these come from the ``[ae]``, ``[score]`` and ``[classifier]``
    tables of ``--config``; ``budget`` then overrides their step counts.
    """

    data: str = field(
        default="",
        metadata=option(
            "dataset folder in the format of docs/DATASETS.md", required=True, metavar="DIR"
        ),
    )
    out: str = field(
        default="runs/all",
        metadata=option(
            "run folder: one sub-folder per stage, report.md, verdict.json", metavar="DIR"
        ),
    )
    device: str = field(
        default="cpu",
        metadata=option(
            "torch device: cpu, cuda or cuda:N (--gpu N is the same as cuda:N)", metavar="DEVICE"
        ),
    )
    seed: int = field(default=0, metadata=option("random seed", metavar="N"))
    resume: bool = field(
        default=False, metadata=option("continue an interrupted stage from its last checkpoint")
    )
    budget: str = field(
        default="",
        metadata=option(
            "wall-clock time for the whole run, e.g. 60m, 90s, 2h or 1h30m: each training "
            "stage's steps are sized from its measured step time",
            metavar="DURATION",
            default_text="none: the stages' own step counts",
        ),
    )
    val_fraction: float = field(
        default=0.1,
        metadata=option("held-out tail: validation, and the verdict's frame sets", metavar="F"),
    )
    eval_frames: int = field(
        default=200,
        metadata=option("held-out frame sets the verdict imputes (evenly spaced)", metavar="N"),
    )
    exporter: str = field(
        default="dynamo",
        metadata=option(
            "ONNX exporter: dynamo, or torchscript (faster, deprecated by torch)", metavar="NAME"
        ),
    )
    threads: int = field(
        default=0, metadata=option("torch intra-op threads (0: torch's default)", metavar="N")
    )
    skip_bad: bool = field(
        default=False, metadata=option("skip unreadable files instead of failing")
    )
    progress: bool = field(default=True, metadata=option("show tqdm progress bars"))


def _validate_all(config: TrainAllConfig) -> None:
    if not config.data:
        raise ConfigError("--data DIR is required (a dataset folder)")
    if config.exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {EXPORTERS}, got {config.exporter!r}")
    if not 0 < config.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {config.val_fraction}")
    if config.eval_frames < 2:
        raise ConfigError(f"eval_frames must be >= 2, got {config.eval_frames}")
    if config.budget:
        parse_budget(config.budget)


def parse_budget(text: str) -> float:
    """Seconds of a time budget written ``90s``, ``60m``, ``2h`` or ``1h30m``."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|m|min|s)", text.strip().lower())
    rebuilt = "".join(f"{number}{unit}" for number, unit in parts)
    if not parts or rebuilt != re.sub(r"\s+", "", text.strip().lower()):
        raise ConfigError(f"budget {text!r}: write a duration such as 60m, 90s, 2h or 1h30m")
    scale = {"h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0}
    seconds = sum(float(number) * scale[unit] for number, unit in parts)
    if seconds <= 0:
        raise ConfigError(f"budget {text!r} must be longer than zero")
    return seconds


def _validate(config: CommonTrainConfig | TrainAllConfig | MemoryPriorConfig) -> None:
    if isinstance(config, TrainAllConfig):
        _validate_all(config)
        return
    if isinstance(config, MemoryPriorConfig):
        if not config.data:
            raise ConfigError("--data DIR is required (a sequence dataset folder)")
        if not 0 < config.val_fraction < 1 or not config.max_age_s > 0 or config.alpha < 0:
            raise ConfigError(
                f"need 0 < val_fraction < 1, max_age_s > 0 and alpha >= 0; got "
                f"{config.val_fraction}, {config.max_age_s}, {config.alpha}"
            )
        return
    if not config.data:
        raise ConfigError("--data DIR is required (a dataset folder)")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule must be one of {LR_SCHEDULES}")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}")
    positive = {"batch_size": config.batch_size, "steps": config.steps, "lr": config.lr}
    if isinstance(config, ScoreTrainConfig):
        if not config.ae:
            raise ConfigError("--ae CKPT is required (an autoencoder checkpoint)")
        if not 0 <= config.cond_prob <= 1:
            raise ConfigError("cond_prob must be in [0, 1]")
        if not 0 < config.t_min < 1:
            raise ConfigError("t_min must be in (0, 1)")
        if config.kind not in SCORE_KINDS:
            raise ConfigError(f"kind must be one of {SCORE_KINDS}, got {config.kind!r}")
    if (
        isinstance(config, AETrainConfig)
        and min(
            config.ssim_weight, config.res_blocks, config.encoder_res_blocks, config.latent_channels
        )
        < 0
    ):
        raise ConfigError(
            "ssim_weight, res_blocks, encoder_res_blocks and latent_channels must be >= 0"
        )
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if config.val_every < 0 or config.checkpoint_every < 0:
        raise ConfigError("val_every and checkpoint_every must be >= 0")


def _coerce(name: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else value
            return tuple(int(v) for v in items)
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        return type(default)(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value {value!r} for {name}") from exc


def config_options(
    cls: type[CommonTrainConfig] | type[TrainAllConfig] | type[MemoryPriorConfig],
) -> ConfigOptions:
    """The command-line options of one stage: its config fields (help in their metadata)."""
    return ConfigOptions([Section(cls)])


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type[CommonTrainConfig] | type[TrainAllConfig] | type[MemoryPriorConfig],
) -> None:
    """``--config``, ``--print-config`` and one ``--flag`` per config field."""
    config_options(cls).add_to(parser)


def flags_given(
    cls: type[CommonTrainConfig] | type[TrainAllConfig] | type[MemoryPriorConfig],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The config fields set by flags (the others come from the file or the defaults)."""
    return config_options(cls).given(args)[cls]


ConfigT = TypeVar("ConfigT", bound=CommonTrainConfig | TrainAllConfig | MemoryPriorConfig)


def load_config(
    cls: type[ConfigT], section: str, config_file: str | None, flags: dict[str, Any]
) -> ConfigT:
    """Defaults < TOML file (top level or ``[section]``) < flags; validated."""
    values: dict[str, Any] = {}
    if config_file:
        try:
            document = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        table = document.get(section, {})
        values = {k: v for k, v in document.items() if not isinstance(v, dict)} | table
    values |= {k: v for k, v in flags.items() if v is not None}
    defaults = cls()
    known = {item.name for item in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown {section} option(s) {sorted(unknown)}; valid: {sorted(known)}")
    coerced = {k: _coerce(k, v, getattr(defaults, k)) for k, v in values.items()}
    config = cls(**coerced)
    _validate(config)
    return config


def stage_tables(config_file: str | None) -> dict[str, dict[str, Any]]:
    """The ``[ae]``, ``[score]`` and ``[classifier]`` tables of a TOML file (``mvld-train all``)."""
    if not config_file:
        return {}
    try:
        document = tomllib.loads(Path(config_file).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
    return {
        name: table
        for name, table in document.items()
        if name in ("ae", "score", "classifier") and isinstance(table, dict)
    }


def config_to_dict(
    config: CommonTrainConfig | TrainAllConfig | MemoryPriorConfig,
) -> dict[str, Any]:
    """JSON-ready form, saved beside every checkpoint."""
    values = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
