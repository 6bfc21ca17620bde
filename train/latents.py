"""Encode a dataset once and cache its latents; per-view, per-dimension statistics.

The score network trains on cached latents (as MLD does for CelebA) instead of running the
encoder every step. Statistics are taken over the WHOLE training split (MLD used one batch).
The cache records the encoder fingerprint and is rebuilt when the encoder changes.
"""

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mvld.common.errors import DatasetError
from mvld.common.preprocess import PreprocessConfig, preprocess_images
from mvld.model.autoencoder import Autoencoder
from mvld.model.checkpoint import LatentStats, MVLDModel
from mvld.train.frames import FrameArrays, load_frame_arrays

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_frame_arrays(
    autoencoder: Autoencoder,
    preprocess: PreprocessConfig,
    arrays: FrameArrays,
    batch: int = 512,
    progress: bool = True,
    rows: np.ndarray | None = None,
) -> torch.Tensor:
    """Latents ``[N, V, D]`` of every present view (zeros where a view is missing).

    With ``rows`` only those frame sets are encoded (the others stay zero). A progress bar
    (stderr) when there is more than one batch: at 128x128 a dataset of tens of thousands of
    frame sets takes minutes to encode on a CPU.
    """
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    present = arrays.present
    if rows is not None:
        present = np.zeros_like(present)
        present[rows] = arrays.present[rows]
    frames, views = np.nonzero(present)
    latents = torch.zeros(len(arrays.stems), arrays.num_views, autoencoder.config.latent_dim)
    starts = range(0, len(frames), batch)
    for start in tqdm(
        starts, desc="encode", unit="batch", disable=not progress or len(starts) < 2, leave=False
    ):
        rows, cols = frames[start : start + batch], views[start : start + batch]
        images = torch.from_numpy(preprocess_images(arrays.images[rows, cols], preprocess))
        latents[rows, cols] = autoencoder.encoder(images.to(device)).float().cpu()
    return latents


def encode_complete_frame_sets(
    model: MVLDModel, data: str | Path, limit: int | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Raw latents ``[N, V, D]`` and uint8 views ``[N, V, H, W, 3]`` of the complete frame
    sets among up to ``limit`` evenly spaced ones of ``data``, at the model's size."""
    arrays = load_frame_arrays(data, model.preprocess.height, model.preprocess.width, limit=limit)
    complete = np.flatnonzero(arrays.present.all(1))
    latents = encode_frame_arrays(model.autoencoder, model.preprocess, arrays, rows=complete)
    return latents[complete], arrays.images[complete]


def latent_stats(
    latents: torch.Tensor, present: torch.Tensor, min_std: float = 1e-4
) -> LatentStats:
    """Mean and std ``[V, D]`` per view and dimension over the present views (float64 sums)."""
    weights = present.to(torch.float64)[..., None]  # [N, V, 1]
    counts = weights.sum(0)  # [V, 1]
    if bool((counts == 0).any()):
        raise DatasetError("a camera has no present view in the training split")
    x = latents.double()
    mean = (x * weights).sum(0) / counts
    var = (((x - mean) ** 2) * weights).sum(0) / counts.clamp(min=2)
    std = var.sqrt().clamp(min=min_std)
    return LatentStats(mean=mean.float(), std=std.float())


def save_latent_cache(
    path: Path, latents: torch.Tensor, present: torch.Tensor, fingerprint: str, data: str
) -> None:
    """Write the cache with the encoder fingerprint and dataset path as metadata."""
    meta = {"fingerprint": fingerprint, "data": str(Path(data).resolve())}
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {"latents": latents.contiguous(), "present": present.contiguous()},
        str(tmp),
        metadata={"mvld_latent_cache": json.dumps(meta)},
    )
    tmp.replace(path)


def load_latent_cache(
    path: Path, fingerprint: str, data: str, count: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached ``(latents, present)``, or ``None`` when absent or made for another input."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["mvld_latent_cache"])
            latents, present = handle.get_tensor("latents"), handle.get_tensor("present")
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable latent cache %s: %s", path, exc)
        return None
    expected = {"fingerprint": fingerprint, "data": str(Path(data).resolve())}
    if meta != expected or latents.shape[0] != count:
        log.info("latent cache %s is for another encoder or dataset; re-encoding", path)
        return None
    return latents, present
