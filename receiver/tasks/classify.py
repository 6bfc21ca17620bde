"""``--task classify:checkpoint=PATH[,device=cpu]``: the downstream label of every frame set.

Runs the single-view classifier trained with ``mvld-train classifier`` on each decoded view
(observed and imputed alike) and fuses the views by averaging their class probabilities. The
result goes to ``result.annotations["classify"]``::

    {"views": {"cam0": {"label": 2, "confidence": 0.91}, ...},
     "fused": {"label": 2, "confidence": 0.87}}

so later tasks (jsonl, publish) carry it. Without ``checkpoint=`` the receiver refuses to start.
"""

from __future__ import annotations

import numpy as np
import torch

from mvld.common.errors import ConfigError
from mvld.common.preprocess import preprocess_images
from mvld.model.classifier import load_classifier
from mvld.receiver.results import FrameSetResult

__all__ = ["ClassifyViews"]


class ClassifyViews:
    """Label per view and fused, with the classifier's softmax confidence."""

    def __init__(self, checkpoint: str | None = None, device: str = "cpu") -> None:
        if not checkpoint:
            raise ConfigError(
                "task classify needs checkpoint=PATH, a classifier trained with "
                "`mvld-train classifier` (e.g. --task classify:checkpoint=RUN/last)"
            )
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"task classify: bad device {device!r}: {exc}") from exc
        classifier, self.preprocess = load_classifier(checkpoint)
        self.classifier = classifier.to(self.device).eval()

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB ``[N, H, W, 3]`` -> class probabilities ``[N, C]``."""
        inputs = torch.from_numpy(preprocess_images(list(images), self.preprocess, "RGB"))
        with torch.inference_mode():
            logits = self.classifier(inputs.to(self.device))
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def __call__(self, result: FrameSetResult) -> None:
        probs = self.probabilities(np.stack([view.image for view in result.views]))
        fused = probs.mean(axis=0)
        result.annotations["classify"] = {
            "views": {
                view.camera_id: _label(p) for view, p in zip(result.views, probs, strict=True)
            },
            "fused": _label(fused),
        }


def _label(probabilities: np.ndarray) -> dict[str, float | int]:
    best = int(np.argmax(probabilities))
    return {"label": best, "confidence": float(probabilities[best])}
