"""Fit a :class:`~mvld.model.memory_prior.MemoryPrior` on the latents of a sequence dataset.

Every training frame set is played with every presence pattern; each missing view gets a
memory from earlier in its scene (:class:`~mvld.train.memory.SceneMemory`, no drops: a view
without memory keeps the regression estimate and needs no fit). Per view, the least-squares
map of (hat-weighted) cell features onto the true latent's cells is solved in closed form
from accumulated normal equations, in float64; a small ridge keeps anchors with few samples
well posed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from mvld.common.dataset import Scenes, read_scenes
from mvld.common.default_model import DEFAULT_MODEL
from mvld.common.errors import ConfigError, DatasetError
from mvld.model.checkpoint import checkpoint_paths, load_mvld_model, save_mvld_model
from mvld.model.memory_prior import MEMORY_ANCHORS_S, MemoryPrior, anchor_weights, blend_features
from mvld.model.score_net import ConvScoreNet, RegressionPrior
from mvld.train.config import MemoryPriorConfig
from mvld.train.frames import load_frame_arrays, split_train_val
from mvld.train.latents import encode_frame_arrays, load_latent_cache, save_latent_cache
from mvld.train.memory import SceneMemory

__all__ = ["fit_memory_prior", "fit_memory_stage", "memory_prior_errors"]

log = logging.getLogger(__name__)


def _design(
    estimate: torch.Tensor, memory: torch.Tensor, age: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """``[B * cells, K*F]``: one view's blend features at every cell, spread over its age
    anchors (the maps are shared by all cells, so every cell is one more sample)."""
    cells = (len(estimate), shape[0], shape[1] * shape[2])
    features = blend_features(estimate.reshape(cells), memory.reshape(cells))  # [B, F, n]
    hats = anchor_weights(age)  # [B, K]
    spread = hats[:, None, :, None] * features.transpose(1, 2)[:, :, None, :]  # [B, n, K, F]
    return spread.reshape(-1, hats.shape[1] * features.shape[1])


@torch.no_grad()
def fit_memory_prior(
    memory_prior: MemoryPrior,
    prior: RegressionPrior,
    z: torch.Tensor,
    rows: torch.Tensor,
    memory: SceneMemory,
    *,
    alpha: float = 1.0,
    batch: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> None:
    """Fit and install the maps from the standardised latents ``z [N, V, D]`` at ``rows``
    (complete frame sets of the training split)."""
    views, shape = memory_prior.views, memory_prior.latent_shape
    channels, anchors = shape[0], len(MEMORY_ANCHORS_S)
    width = anchors * memory_prior.features
    gram = torch.zeros(views, width, width, dtype=torch.float64)
    cross = torch.zeros(views, width, channels, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    chunks = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    bar = tqdm(chunks, desc="memory prior", unit="batch", leave=False, disable=not progress)
    for chunk in bar:
        x = z[chunk]
        drawn = memory.draw(chunk, generator)
        for mask in prior.patterns:
            observed = torch.tensor(mask).expand(len(chunk), views)
            estimate = prior(x, observed)
            for v in (v for v in range(views) if not mask[v]):
                keep = torch.isfinite(drawn.age[:, v])
                design = _design(
                    estimate[keep, v], drawn.latents[keep, v], drawn.age[keep, v], shape
                ).double()
                target = x[keep, v].reshape(-1, channels, shape[1] * shape[2]).transpose(1, 2)
                gram[v] += design.T @ design
                cross[v] += design.T @ target.reshape(-1, channels).double()
    ridge = alpha * torch.eye(width, dtype=torch.float64)
    solved = torch.stack(  # [V, K*F, C]; normal equations + ridge are positive definite
        [
            torch.cholesky_solve(cross[v], torch.linalg.cholesky(gram[v] + ridge))
            for v in range(views)
        ]
    )
    fitted = solved.reshape(views, anchors, memory_prior.features, channels).transpose(2, 3)
    reached = gram.diagonal(dim1=1, dim2=2).reshape(views, anchors, -1).sum(2) > 0  # [V, K]
    maps = torch.where(reached[..., None, None], fitted.float(), memory_prior.maps)
    memory_prior.load_maps(maps)  # an anchor no sample reached keeps the identity
    log.info("memory prior fitted on %d frame sets x %d patterns", len(rows), len(prior.patterns))


@torch.no_grad()
def memory_prior_errors(
    memory_prior: MemoryPrior,
    prior: RegressionPrior,
    z: torch.Tensor,
    rows: torch.Tensor,
    memory: SceneMemory,
    *,
    seed: int = 1,
) -> dict[str, float]:
    """Mean squared error of the missing views' standardised latents over ``rows``, every
    pattern, with memories drawn as in training: regression estimate, memory as it is
    (hold last) and the blend."""
    views = memory_prior.views
    sums = {"regression": 0.0, "hold last": 0.0, "memory prior": 0.0}
    count = 0
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(rows), 512):
        chunk = rows[start : start + 512]
        x = z[chunk]
        drawn = memory.draw(chunk, generator)
        known = torch.isfinite(drawn.age)
        for mask in prior.patterns:
            observed = torch.tensor(mask).expand(len(chunk), views)
            estimate = prior(x, observed)
            blended = memory_prior(estimate, observed, drawn.latents, drawn.age)
            scored = (~observed) & known
            for name, guess in (
                ("regression", estimate),
                ("hold last", drawn.latents),
                ("memory prior", blended),
            ):
                sums[name] += float(((guess - x) ** 2).mean(2)[scored].sum())
            count += int(scored.sum())
    return {name: total / max(count, 1) for name, total in sums.items()}


def _failed_view_errors(
    memory_prior: MemoryPrior,
    prior: RegressionPrior,
    z: torch.Tensor,
    rows: torch.Tensor,
    scenes: Scenes,
    max_age_s: float,
) -> dict[str, dict[str, float]]:
    """:func:`memory_prior_errors` per band of memory ages (whole frames of the scenes)."""
    bands = {}
    position = torch.from_numpy(scenes.position())
    for low, high in ((0.0, 1.0), (1.0, 5.0), (5.0, max_age_s)):
        if high <= low:
            continue
        frames = max(1, round(high * scenes.fps))
        band_rows = rows[position[rows] >= frames]
        if not len(band_rows):
            continue
        present = torch.ones(len(z), z.shape[1], dtype=torch.bool)
        bank = SceneMemory(z, present, scenes, drop=0.0, max_age_s=high)
        bank.max_frames = frames
        bands[f"up to {high:g} s"] = memory_prior_errors(memory_prior, prior, z, band_rows, bank)
    return bands


def fit_memory_stage(config: MemoryPriorConfig) -> Path:
    """``mvld-train memory``: ``config.model`` with a memory prior fitted on ``config.data``,
    written to ``OUT/last``; the score network's weights are unchanged, its memory layers start
    at zero, so without memories it imputes exactly as before."""
    model = load_mvld_model(config.model or None, device=config.device)
    prior = getattr(model.score_net, "prior", None)
    if not isinstance(prior, RegressionPrior) or not isinstance(model.score_net, ConvScoreNet):
        raise ConfigError(
            f"{config.model or DEFAULT_MODEL}: the score network has no regression prior "
            "(train it with `mvld-train score --prior`)"
        )
    arrays = load_frame_arrays(
        config.data, model.preprocess.height, model.preprocess.width, config.skip_bad
    )
    scenes = read_scenes(config.data, arrays.stems)
    if scenes is None:
        raise DatasetError(
            f"{config.data}: a memory prior needs a sequence dataset (frame order and scene "
            "cuts in dataset.json or render.json, docs/DATASETS.md)"
        )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "latents.safetensors"
    cached = load_latent_cache(cache, model.fingerprint, config.data, len(arrays.stems))
    if cached is None:
        latents = encode_frame_arrays(
            model.autoencoder, model.preprocess, arrays, progress=config.progress
        )
        present = torch.from_numpy(arrays.present)
        save_latent_cache(cache, latents, present, model.fingerprint, config.data)
    else:
        latents, present = cached
    z = model.latent_stats.standardise(latents)
    train_rows, val_rows = (
        torch.as_tensor(part[present[torch.as_tensor(part)].all(1).numpy()])
        for part in split_train_val(len(arrays.stems), config.val_fraction)
    )
    if not len(train_rows):
        raise DatasetError(f"{config.data}: no complete frame set (every view present) to fit on")
    aware = ConvScoreNet(replace(model.score_net.config, memory=True)).to(config.device)
    missing, unexpected = aware.load_state_dict(model.score_net.state_dict(), strict=False)
    if unexpected or not set(missing) <= _MEMORY_TENSORS:
        raise ConfigError(f"{config.model}: its score network does not fit a memory network")
    assert aware.memory_prior is not None  # memory and a prior: the network has one
    bank = SceneMemory(z, present, scenes, drop=0.0, max_age_s=config.max_age_s)
    fit_memory_prior(
        aware.memory_prior,
        prior,
        z,
        train_rows,
        bank,
        alpha=config.alpha,
        seed=config.seed,
        progress=config.progress,
    )
    errors = _failed_view_errors(aware.memory_prior, prior, z, val_rows, scenes, config.max_age_s)
    for band, values in errors.items():
        log.info(
            "memory prior, held-out failed views, memories %s: latent MSE %s",
            band,
            ", ".join(f"{name} {value:.4f}" for name, value in values.items()),
        )
    model.score_net = aware.eval()
    path = out / "last"
    source = json.loads(checkpoint_paths(config.model or DEFAULT_MODEL)[0].read_text())
    kept = {key: source[key] for key in ("step", "metrics") if key in source}
    training = {
        **source.get("training", {}),  # how the network was trained, then the memory fit
        "memory_prior": {
            "data": str(config.data),
            "from": config.model or "the packaged model",
            "scenes": int(scenes.scene.max()) + 1,
            "fps": scenes.fps,
            "train_frame_sets": len(train_rows),
            "max_age_s": config.max_age_s,
            "alpha": config.alpha,
            "validation_latent_mse": errors,
        },
    }
    save_mvld_model(path, model, extra={**kept, "training": training})
    return path


_MEMORY_TENSORS = {
    "memory_input.weight",
    "memory_input.bias",
    "memory_embed.weight",
    "memory_embed.bias",
    "memory_prior.maps",
}
