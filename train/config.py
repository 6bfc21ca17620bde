"""Training configurations: dataclasses filled from defaults, a TOML file, then flags.

Parsed and validated once here (config stops at the factory); the training functions take
the dataclass. A TOML file may hold the keys at top level or in an ``[ae]`` / ``[score]``
table; unknown keys are a ``ConfigError`` so a typo never silently falls back to a default.
"""

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from mvld.common.errors import ConfigError

LR_SCHEDULES = ("constant", "cosine")
SCORE_KINDS = ("auto", "mlp", "conv")
SCORE_WIDTHS = {"mlp": (1024, 512, 256), "conv": (64, 128)}  # defaults of each kind
PRECISIONS = ("fp32", "bf16")


@dataclass
class CommonTrainConfig:
    """Options shared by both stages."""

    data: str = ""  # dataset folder (required)
    out: str = ""  # run folder: checkpoints, logs, caches
    device: str = "cpu"
    seed: int = 0
    batch_size: int = 128
    steps: int = 2000
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": decays to lr / 10 at the last step
    val_fraction: float = 0.1
    val_every: int = 250  # steps between validations (0: only at the end)
    checkpoint_every: int = 250  # steps between checkpoints (0: only at the end)
    resume: bool = False  # continue from OUT/last
    threads: int = 0  # torch intra-op threads (0: torch's default)
    precision: str = "fp32"  # or "bf16": mixed-precision forward passes (AMX CPUs, GPUs)
    skip_bad: bool = False  # skip unreadable files instead of failing
    progress: bool = True  # tqdm progress bar


@dataclass
class AETrainConfig(CommonTrainConfig):
    """Stage 1: the autoencoder."""

    out: str = "runs/ae"
    batch_size: int = 32
    steps: int = 12000
    lr_schedule: str = "cosine"
    image_size: int = 128
    channels: tuple[int, ...] = field(default=(32, 64, 128, 128))  # one stride-2 stage each
    latent_channels: int = 8  # spatial latent: C x (size / 2^stages)^2 values; 0: a vector
    latent_dim: int = 128  # size of a vector latent (only when latent_channels is 0)
    res_blocks: int = 1  # residual blocks per decoder stage
    encoder_res_blocks: int = 0  # residual blocks per encoder stage (the edge runs it)
    ssim_weight: float = 1.0  # loss = L1 + ssim_weight * (1 - SSIM): weighs structure, not level
    val_every: int = 500
    checkpoint_every: int = 500
    val_images: int = 512  # validation views used for PSNR


@dataclass
class ScoreTrainConfig(CommonTrainConfig):
    """Stage 2: the score network on cached, standardised latents."""

    ae: str = ""  # autoencoder checkpoint (required)
    out: str = "runs/score"
    batch_size: int = 256
    steps: int = 16000
    lr: float = 5e-4
    lr_schedule: str = "cosine"
    kind: str = "auto"  # score network: "mlp", "conv", or "auto" (conv for a spatial latent)
    widths: tuple[int, ...] = field(default=())  # empty: the kind's default (SCORE_WIDTHS)
    blocks: int = 2  # conv: residual blocks per level
    time_dim: int = 128
    cond_prob: float = 0.5  # probability that a sample is conditional (d in MLD)
    t_min: float = 1e-3
    beta_min: float = 0.1
    beta_max: float = 20.0
    ema_decay: float = 0.999
    val_every: int = 1000
    checkpoint_every: int = 1000


@dataclass
class ClassifierTrainConfig(CommonTrainConfig):
    """The downstream label classifier on single views."""

    out: str = "runs/classifier"
    image_size: int = 64
    channels: tuple[int, ...] = field(default=(32, 64, 128, 128))
    convs_per_stage: int = 2
    augment: bool = True  # flips, shifts, brightness/contrast, blur (mvld.train.augment)
    steps: int = 4000
    lr_schedule: str = "cosine"


def _validate(config: CommonTrainConfig) -> None:
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
    if isinstance(config, AETrainConfig) and min(
            config.ssim_weight, config.res_blocks, config.encoder_res_blocks,
            config.latent_channels) < 0:
        raise ConfigError("ssim_weight, res_blocks, encoder_res_blocks and latent_channels "
                          "must be >= 0")
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


def add_config_flags(parser: argparse.ArgumentParser, cls: type[CommonTrainConfig]) -> None:
    """One ``--flag`` per config field; unset flags stay ``None`` (file/default wins)."""
    for item in dataclasses.fields(cls):
        flag = "--" + item.name.replace("_", "-")
        default = cls().__getattribute__(item.name)
        if isinstance(default, bool):
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction,
                                default=None, help=f"(default: {default})")
        else:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            parser.add_argument(flag, dest=item.name, default=None, metavar=item.name.upper(),
                                help=f"(default: {shown!r})")


def load_config(cls: type[CommonTrainConfig], section: str, config_file: str | None,
                flags: dict[str, Any]) -> CommonTrainConfig:
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


def config_to_dict(config: CommonTrainConfig) -> dict[str, Any]:
    """JSON-ready form, saved beside every checkpoint."""
    values = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
