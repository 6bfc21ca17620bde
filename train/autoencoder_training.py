"""Stage 1: train the shared autoencoder on every present view (L1 loss, Adam).

MLD trains its deterministic autoencoders with a Laplace likelihood, i.e. an L1
reconstruction loss; views of all cameras are pooled, since one encoder serves them all.
An optional SSIM term (Zhao et al. 2017, "Loss functions for image restoration") weighs local
structure by its contrast, so small objects on a plain background count for more than their
share of pixels.
"""

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mvld.common.errors import ConfigError, DatasetError
from mvld.common.preprocess import PreprocessConfig, postprocess_images, preprocess_images
from mvld.model.autoencoder import Autoencoder, AutoencoderConfig
from mvld.model.checkpoint import checkpoint_paths, load_autoencoder, save_autoencoder
from mvld.train.config import AETrainConfig, config_to_dict
from mvld.train.distributed import DistributedContext
from mvld.train.frames import FrameArrays, evenly_spaced, load_frame_arrays, split_train_val
from mvld.train.image_quality import psnr, ssim_index
from mvld.train.loop import EpochSampler, autocast, run_loop, set_learning_rate
from mvld.train.state import (
    TrainingState,
    load_training_state,
    promote_to_best,
    save_training_state,
)

log = logging.getLogger(__name__)


def view_pairs(present: np.ndarray, frame_indices: np.ndarray) -> np.ndarray:
    """``[M, 2]`` (frame set, view) pairs of the present views among ``frame_indices``."""
    rows = present[frame_indices]
    frames, views = np.nonzero(rows)
    return np.stack([frame_indices[frames], views], axis=1)


def images_for(
    arrays: FrameArrays, pairs: np.ndarray, preprocess: PreprocessConfig
) -> torch.Tensor:
    """Preprocessed float images ``[M, 3, H, W]`` of the given (frame set, view) pairs."""
    return torch.from_numpy(preprocess_images(arrays.images[pairs[:, 0], pairs[:, 1]], preprocess))


@torch.no_grad()
def reconstruction_psnr(
    model: Autoencoder, images: torch.Tensor, preprocess: PreprocessConfig, batch: int = 256
) -> float:
    """Mean PSNR (dB) of the reconstructed views as uint8 images, as ``mvld-eval`` reports it."""
    model.eval()
    device = next(model.parameters()).device
    outputs = [model(images[i : i + batch].to(device)).cpu() for i in range(0, len(images), batch)]
    model.train()
    decoded = postprocess_images(torch.cat(outputs).numpy(), preprocess)
    return float(psnr(decoded, postprocess_images(images.numpy(), preprocess)).mean())


def reconstruction_loss(
    reconstruction: torch.Tensor,
    images: torch.Tensor,
    preprocess: PreprocessConfig,
    ssim_weight: float,
) -> torch.Tensor:
    """L1, plus ``ssim_weight * (1 - SSIM)`` on the preprocessing's value range."""
    loss = nn.functional.l1_loss(reconstruction, images)
    if ssim_weight > 0:
        low, span = preprocess.low, preprocess.high - preprocess.low
        similarity = ssim_index(reconstruction - low, images - low, span).mean()
        loss = loss + ssim_weight * (1 - similarity)
    return loss


def autoencoder_config_for(config: AETrainConfig) -> AutoencoderConfig:
    """The architecture a training config asks for (a spatial latent's size follows its grid)."""
    grid = config.image_size // 2 ** len(config.channels)
    latent_dim = config.latent_channels * grid**2 if config.latent_channels else config.latent_dim
    return AutoencoderConfig(
        image_size=config.image_size,
        latent_dim=latent_dim,
        channels=config.channels,
        res_blocks=config.res_blocks,
        latent_channels=config.latent_channels,
        encoder_res_blocks=config.encoder_res_blocks,
    )


def train_autoencoder(config: AETrainConfig, ctx: DistributedContext) -> Path:
    """Train stage 1 into ``config.out``; returns the path of the last checkpoint."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    preprocess = PreprocessConfig(height=config.image_size, width=config.image_size)
    arrays = load_frame_arrays(config.data, config.image_size, config.image_size, config.skip_bad)
    train_frames, val_frames = split_train_val(len(arrays.stems), config.val_fraction)
    train_pairs = view_pairs(arrays.present, train_frames)
    val_pairs = evenly_spaced(view_pairs(arrays.present, val_frames), config.val_images)
    if len(val_pairs) == 0:
        val_pairs = evenly_spaced(train_pairs, config.val_images)
    sampler = EpochSampler(len(train_pairs), config.batch_size, config.seed)
    if sampler.steps_per_epoch == 0:
        raise DatasetError(
            f"{config.data}: {len(train_pairs)} training views are fewer than "
            f"one batch of {config.batch_size}; lower --batch-size"
        )
    log.info(
        "autoencoder: %d training views, %d validation views", len(train_pairs), len(val_pairs)
    )

    torch.manual_seed(config.seed)
    arch = autoencoder_config_for(config)
    model = Autoencoder(arch).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start_step, best = _maybe_resume(config, model, optimizer, arch, preprocess)
    trained = ctx.wrap(model)
    val_images = images_for(arrays, val_pairs, preprocess)

    def train_step(step: int) -> float:
        set_learning_rate(optimizer, config.lr, config.lr_schedule, step, config.steps)
        pairs = ctx.shard(sampler.batch(step - 1)).numpy()
        images = images_for(arrays, train_pairs[pairs], preprocess).to(ctx.device)
        with autocast(ctx.device, config.precision):
            reconstruction = trained(images)
        loss = reconstruction_loss(reconstruction.float(), images, preprocess, config.ssim_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return ctx.mean(loss.item())

    def validate(step: int) -> dict[str, float]:
        return {"val_psnr": reconstruction_psnr(model, val_images, preprocess)}

    def save(step: int, metrics: dict[str, float]) -> None:
        nonlocal best
        extra = {"training": config_to_dict(config), "step": step, "metrics": metrics}
        save_autoencoder(out / "last", model, preprocess, extra)
        improved = metrics.get("val_psnr", -1.0) > best
        best = max(best, metrics.get("val_psnr", -1.0))
        save_training_state(
            out / "last",
            TrainingState(
                step=step, modules={}, optimizer=optimizer.state_dict(), info={"best": best}
            ),
        )
        if improved:
            promote_to_best(out)

    run_loop(
        ctx=ctx,
        start_step=start_step,
        steps=config.steps,
        samples_per_step=config.batch_size,
        val_every=config.val_every,
        checkpoint_every=config.checkpoint_every,
        out=out,
        progress=config.progress,
        desc="autoencoder",
        train_step=train_step,
        validate=validate,
        save=save,
    )
    return checkpoint_paths(out / "last")[0]


def _maybe_resume(
    config: AETrainConfig,
    model: Autoencoder,
    optimizer: torch.optim.Optimizer,
    arch: AutoencoderConfig,
    preprocess: PreprocessConfig,
) -> tuple[int, float]:
    """Load ``OUT/last`` into the model and optimiser when resuming; ``(step, best PSNR)``."""
    if not config.resume:
        return 0, -1.0
    loaded, loaded_preprocess, _ = load_autoencoder(Path(config.out) / "last")
    if loaded.config != arch or loaded_preprocess != preprocess:
        raise ConfigError(
            f"cannot resume {config.out}: its architecture differs from the "
            "requested one (pass the same options as the first run)"
        )
    model.load_state_dict(loaded.state_dict())
    state = load_training_state(Path(config.out) / "last")
    optimizer.load_state_dict(state.optimizer)
    log.info("resumed %s at step %d", config.out, state.step)
    return state.step, float(state.info.get("best", -1.0))
