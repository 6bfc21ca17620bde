"""Training of the downstream label classifier (:mod:`mvld.model.classifier`) on real views.

Training views are augmented (``mvld.train.augment``) so that the yardstick judges content,
not the last bit of sharpness; mirroring only where the dataset's labels survive it.
"""

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mvld.common.errors import ConfigError, DatasetError
from mvld.common.preprocess import PreprocessConfig
from mvld.model.checkpoint import checkpoint_paths
from mvld.model.classifier import ClassifierConfig, ViewClassifier, accuracy, save_classifier
from mvld.train.augment import augment_for_dataset, augment_views
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
    classifier = ViewClassifier(
        ClassifierConfig(
            num_classes=int(arrays.labels.max()) + 1,
            image_size=config.image_size,
            channels=config.channels,
            convs_per_stage=config.convs_per_stage,
        )
    ).to(ctx.device)
    augment = augment_for_dataset(config.data, config.mirror) if config.augment else None
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
        save_classifier(
            out / "last",
            classifier,
            preprocess,
            {
                "training": config_to_dict(config),
                "step": step,
                "metrics": metrics,
                "label_counts": np.bincount(arrays.labels[labelled]).tolist(),
            },
        )

    run_loop(
        ctx=ctx,
        start_step=0,
        steps=config.steps,
        samples_per_step=config.batch_size,
        val_every=config.val_every,
        checkpoint_every=config.checkpoint_every,
        out=out,
        progress=config.progress,
        desc="classifier",
        train_step=train_step,
        validate=validate,
        save=save,
    )
    return checkpoint_paths(out / "last")[0]
