"""The downstream label classifier on single views: the yardstick of imputed views.

Trained on real views, it predicts the frame-set label from any one view; its accuracy on
real views is the ceiling that reconstructed or imputed views are compared with (MLD's
coherence). Saved as a ``classifier`` checkpoint (safetensors + JSON, like the model).
Training views are augmented (``mvld.train.augment``) so that the yardstick judges content,
not the last bit of sharpness.
"""

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mvld.common.checkpoint import checkpoint_paths, read_checkpoint, save_checkpoint
from mvld.common.errors import ConfigError, DatasetError
from mvld.common.preprocess import PreprocessConfig
from mvld.train.augment import AugmentConfig, augment_views
from mvld.train.autoencoder_training import images_for, view_pairs
from mvld.train.config import ClassifierTrainConfig, config_to_dict
from mvld.train.distributed import DistributedContext
from mvld.train.frames import NO_LABEL, load_frame_arrays, split_train_val
from mvld.train.loop import (
    EpochSampler,
    autocast,
    run_loop,
    set_learning_rate,
    step_generator,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of the classifier; stored in its checkpoint."""

    num_classes: int
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    convs_per_stage: int = 1  # the first halves the resolution, the others keep it

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "channels": list(self.channels)}


class ViewClassifier(nn.Module):
    """Images ``[N, 3, H, W]`` (preprocessed) -> logits ``[N, num_classes]``."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        previous = 3
        for width in config.channels:
            for index in range(config.convs_per_stage):
                layers += [nn.Conv2d(previous, width, 3, stride=2 if index == 0 else 1, padding=1),
                           nn.BatchNorm2d(width), nn.ReLU()]
                previous = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(previous, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@torch.no_grad()
def accuracy(classifier: ViewClassifier, images: torch.Tensor, labels: torch.Tensor,
             batch: int = 256) -> float:
    """Fraction of ``images`` whose predicted label equals ``labels``."""
    classifier.eval()
    device = next(classifier.parameters()).device
    predictions = torch.cat([classifier(images[i:i + batch].to(device)).argmax(1).cpu()
                             for i in range(0, len(images), batch)])
    return float((predictions == labels).float().mean())


def save_classifier(path: str | Path, classifier: ViewClassifier, preprocess: PreprocessConfig,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a ``classifier`` checkpoint."""
    config = {"kind": "classifier", "classifier": classifier.config.to_dict(),
              "preprocess": preprocess.to_dict(), **(extra or {})}
    return save_checkpoint(path, config, dict(classifier.state_dict()))


def load_classifier(path: str | Path) -> tuple[ViewClassifier, PreprocessConfig]:
    """``(classifier in eval mode, preprocessing)`` from a ``classifier`` checkpoint."""
    config, tensors = read_checkpoint(path, kind="classifier")
    try:
        arch = config["classifier"]
        classifier = ViewClassifier(ClassifierConfig(
            num_classes=int(arch["num_classes"]), image_size=int(arch["image_size"]),
            channels=tuple(arch["channels"]),
            convs_per_stage=int(arch.get("convs_per_stage", 1))))
        preprocess = PreprocessConfig.from_dict(config["preprocess"])
        classifier.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{checkpoint_paths(path)[0]}: invalid classifier: {exc}") from exc
    return classifier.eval(), preprocess


def train_classifier(config: ClassifierTrainConfig, ctx: DistributedContext) -> Path:
    """Train on every labelled present view; validation accuracy on the held-out tail."""
    if config.resume:
        raise ConfigError("the classifier trains in minutes and has no --resume")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    preprocess = PreprocessConfig(height=config.image_size, width=config.image_size)
    arrays = load_frame_arrays(config.data, config.image_size, config.image_size, config.skip_bad)
    labelled = arrays.labels != NO_LABEL
    if not labelled.any():
        raise DatasetError(f"{config.data}: no labels.csv or no labelled frame set")
    train_frames, val_frames = split_train_val(len(arrays.stems), config.val_fraction)
    train_pairs = view_pairs(arrays.present & labelled[:, None], train_frames)
    val_pairs = view_pairs(arrays.present & labelled[:, None], val_frames)
    sampler = EpochSampler(len(train_pairs), config.batch_size, config.seed)
    if sampler.steps_per_epoch == 0:
        raise DatasetError(f"{len(train_pairs)} labelled views are fewer than one batch")
    torch.manual_seed(config.seed)
    classifier = ViewClassifier(ClassifierConfig(
        num_classes=int(arrays.labels.max()) + 1, image_size=config.image_size,
        channels=config.channels, convs_per_stage=config.convs_per_stage)).to(ctx.device)
    augment = AugmentConfig() if config.augment else None
    optimizer = torch.optim.Adam(classifier.parameters(), lr=config.lr)
    trained = ctx.wrap(classifier)
    labels = torch.from_numpy(arrays.labels)
    val_images = images_for(arrays, val_pairs, preprocess)
    val_labels = labels[val_pairs[:, 0]] if len(val_pairs) else labels[:0]

    def train_step(step: int) -> float:
        set_learning_rate(optimizer, config.lr, config.lr_schedule, step, config.steps)
        pairs = train_pairs[ctx.shard(sampler.batch(step - 1)).numpy()]
        images = images_for(arrays, pairs, preprocess)
        if augment is not None:
            images = augment_views(images, augment, step_generator(config.seed, step))
        images = images.to(ctx.device)
        classifier.train()
        with autocast(ctx.device, config.precision):
            logits = trained(images)
        loss = nn.functional.cross_entropy(logits.float(), labels[pairs[:, 0]].to(ctx.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return ctx.mean(loss.item())

    def validate(step: int) -> dict[str, float]:
        if len(val_images) == 0:
            return {}
        return {"val_accuracy": accuracy(classifier, val_images, val_labels)}

    def save(step: int, metrics: dict[str, float]) -> None:
        save_classifier(out / "last", classifier, preprocess,
                        {"training": config_to_dict(config), "step": step, "metrics": metrics,
                         "label_counts": np.bincount(arrays.labels[labelled]).tolist()})

    run_loop(ctx=ctx, start_step=0, steps=config.steps, samples_per_step=config.batch_size,
             val_every=config.val_every, checkpoint_every=config.checkpoint_every, out=out,
             progress=config.progress, desc="classifier", train_step=train_step,
             validate=validate, save=save)
    return checkpoint_paths(out / "last")[0]
