"""The downstream label classifier on single views: the yardstick of imputed views.

Trained on real views (:mod:`mvld.train.classifier_training`), it predicts the frame-set
label from any one view; its accuracy on real views is the ceiling that reconstructed or
imputed views are compared with (MLD's coherence). The receiver's ``classify`` task runs it.
Saved as a ``classifier`` checkpoint (safetensors + JSON, like the model).
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mvld.common.errors import ConfigError
from mvld.common.preprocess import PreprocessConfig
from mvld.model.checkpoint import checkpoint_paths, read_checkpoint, save_checkpoint


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
                layers += [
                    nn.Conv2d(previous, width, 3, stride=2 if index == 0 else 1, padding=1),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                ]
                previous = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(previous, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@torch.no_grad()
def accuracy(
    classifier: ViewClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 256
) -> float:
    """Fraction of ``images`` whose predicted label equals ``labels``."""
    classifier.eval()
    device = next(classifier.parameters()).device
    predictions = torch.cat(
        [
            classifier(images[i : i + batch].to(device)).argmax(1).cpu()
            for i in range(0, len(images), batch)
        ]
    )
    return float((predictions == labels).float().mean())


def save_classifier(
    path: str | Path,
    classifier: ViewClassifier,
    preprocess: PreprocessConfig,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a ``classifier`` checkpoint."""
    config = {
        "kind": "classifier",
        "classifier": classifier.config.to_dict(),
        "preprocess": preprocess.to_dict(),
        **(extra or {}),
    }
    return save_checkpoint(path, config, dict(classifier.state_dict()))


def load_classifier(path: str | Path) -> tuple[ViewClassifier, PreprocessConfig]:
    """``(classifier in eval mode, preprocessing)`` from a ``classifier`` checkpoint."""
    config, tensors = read_checkpoint(path, kind="classifier")
    try:
        arch = config["classifier"]
        classifier = ViewClassifier(
            ClassifierConfig(
                num_classes=int(arch["num_classes"]),
                image_size=int(arch["image_size"]),
                channels=tuple(arch["channels"]),
                convs_per_stage=int(arch.get("convs_per_stage", 1)),
            )
        )
        preprocess = PreprocessConfig.from_dict(config["preprocess"])
        classifier.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{checkpoint_paths(path)[0]}: invalid classifier: {exc}") from exc
    return classifier.eval(), preprocess
