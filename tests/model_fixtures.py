"""Tiny multi-camera datasets and configs shared by the model and training tests."""

from pathlib import Path

import numpy as np

from mvld.common.dataset import FrameSetWriter
from mvld.model.score_net import ConvScoreNet, ScoreNetConfig
from mvld.train.config import AETrainConfig, ScoreTrainConfig

CAMERAS = ["cam0", "cam1", "cam2"]


def write_tiny_rig(
    root: Path, count: int = 64, size: int = 32, seed: int = 0, drop_every: int = 7
) -> Path:
    """A 3-camera dataset: one square seen from three shifted viewpoints, label = its colour.

    Every ``drop_every``-th frame set misses one view, as a failed camera would.
    """
    rng = np.random.default_rng(seed)
    with FrameSetWriter(root, CAMERAS) as writer:
        for i in range(count):
            label = i % 4
            x, y = rng.integers(4, size - 12, 2)
            views: list[np.ndarray | None] = []
            for v in range(len(CAMERAS)):
                image = np.zeros((size, size, 3), np.uint8)
                image[..., v] = 40
                left = (x + 3 * v) % (size - 8)
                image[y : y + 8, left : left + 8] = (60 * label + 40, 255 - 50 * v, 100)
                views.append(image)
            if drop_every and i % drop_every == 3:
                views[i % len(CAMERAS)] = None
            writer.write(f"{i:06d}", views, label)
    return root


def tiny_ae_config(data: Path, out: Path, **overrides) -> AETrainConfig:
    """An autoencoder run that takes about a second on one CPU core."""
    values = dict(
        data=str(data),
        out=str(out),
        image_size=32,
        latent_dim=16,
        channels=(8, 16),
        latent_channels=0,
        res_blocks=0,
        batch_size=16,
        steps=30,
        val_every=10,
        checkpoint_every=10,
        progress=False,
        lr_schedule="constant",
    )  # a cosine decay over 30-60 steps stalls the run
    return AETrainConfig(**(values | overrides))


def tiny_score_config(data: Path, ae: Path, out: Path, **overrides) -> ScoreTrainConfig:
    """A score-network run that takes about a second on one CPU core."""
    values = dict(
        data=str(data),
        ae=str(ae),
        out=str(out),
        widths=(32, 16),
        time_dim=16,
        batch_size=16,
        steps=30,
        val_every=10,
        checkpoint_every=10,
        lr=2e-3,
        progress=False,
        lr_schedule="constant",
    )  # as in tiny_ae_config
    return ScoreTrainConfig(**(values | overrides))


TINY_GRID = (2, 4, 4)  # latent (C, h, w) of tiny_conv_net: 32 values per view


def tiny_conv_net(memory: bool = False, prior: bool = False, seed: int = 0) -> ConvScoreNet:
    """An untrained 3-view conv score network over ``TINY_GRID`` latents, seeded."""
    import torch

    torch.manual_seed(seed)
    return ConvScoreNet(
        ScoreNetConfig(
            num_views=3,
            latent_dim=TINY_GRID[0] * TINY_GRID[1] * TINY_GRID[2],
            widths=(16, 16),
            time_dim=16,
            kind="conv",
            latent_shape=TINY_GRID,
            blocks=1,
            memory=memory,
            prior_sde=(0.1, 20.0) if prior else (),
        )
    )
