"""Stage 2: multi-time masked training of the score network on standardised latents.

Per sample (MLD draws once per batch): with probability ``cond_prob`` a random non-empty
proper subset of views is observed, kept clean with tau = 0, and the missing views share
one t; otherwise all views are noised with one t (joint). Epsilon matching covers only the
missing dimensions, rescaled by D / D_missing, i.e. the mean over the missing dimensions.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mvld.common.dataset import read_scenes
from mvld.common.errors import ConfigError, DatasetError
from mvld.model.autoencoder import AutoencoderConfig
from mvld.model.checkpoint import (
    MVLDModel,
    checkpoint_paths,
    load_autoencoder,
    load_mvld_model,
    save_mvld_model,
)
from mvld.model.score_net import RegressionPrior, ScoreNetConfig, make_score_net
from mvld.model.sde import VPSDE
from mvld.train.baselines import RidgeRegressor
from mvld.train.config import SCORE_WIDTHS, ScoreTrainConfig, config_to_dict
from mvld.train.distributed import DistributedContext
from mvld.train.ema import ExponentialMovingAverage
from mvld.train.frames import load_frame_arrays, split_train_val
from mvld.train.latents import (
    encode_frame_arrays,
    latent_stats,
    load_latent_cache,
    save_latent_cache,
)
from mvld.train.loop import (
    EpochSampler,
    autocast,
    run_loop,
    set_learning_rate,
    step_generator,
)
from mvld.train.memory import MemoryDraw, SceneMemory
from mvld.train.memory_prior import fit_memory_prior, memory_prior_errors
from mvld.train.state import (
    TrainingState,
    load_training_state,
    promote_to_best,
    save_training_state,
)

log = logging.getLogger(__name__)


def draw_observed_masks(
    batch: int, views: int, cond_prob: float, generator: torch.Generator
) -> torch.Tensor:
    """bool ``[B, V]``: per sample, all False (joint) or a random non-empty proper subset."""
    conditional = torch.rand(batch, generator=generator) < cond_prob  # [B]
    count = torch.randint(1, views, (batch,), generator=generator)  # observed views, 1..V-1
    ranks = torch.rand(batch, views, generator=generator).argsort(1).argsort(1)  # random ranks
    return (ranks < count[:, None]) & conditional[:, None]


def multi_time_loss(
    score_net: nn.Module,
    sde: VPSDE,
    z0: torch.Tensor,
    observed: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    memory: MemoryDraw | None = None,
) -> torch.Tensor:
    """Per-sample loss ``[B]``: mean squared epsilon error over the missing dimensions only.

    ``z0 [B, V, D]`` clean latents, ``observed [B, V]`` bool, ``t [B]`` time of the missing
    views, ``noise [B, V, D]``. Observed views stay clean with tau = 0. ``memory`` conditions
    a video-aware network on the cameras' earlier latents.
    """
    tau = torch.where(observed, torch.zeros_like(t)[:, None], t[:, None])  # [B, V]
    mean, std = sde.marginal(z0, tau)
    keep = observed[..., None]  # [B, V, 1]
    zt = torch.where(keep, z0, mean + std * noise)
    eps = score_net(zt, tau) if memory is None else score_net(zt, tau, memory.latents, memory.age)
    missing = (~keep).to(z0.dtype).expand_as(z0)  # [B, V, D]
    squared = (eps - noise) ** 2 * missing
    return squared.flatten(1).sum(1) / missing.flatten(1).sum(1)


def score_net_config_for(
    config: ScoreTrainConfig, views: int, ae: AutoencoderConfig
) -> ScoreNetConfig:
    """The score network a training config asks for, shaped by the autoencoder's latent."""
    kind = config.kind if config.kind != "auto" else ("conv" if ae.latent_channels else "mlp")
    if kind == "conv" and not ae.latent_channels:
        raise ConfigError("a conv score network needs a spatial latent (latent_channels > 0)")
    return ScoreNetConfig(
        num_views=views,
        latent_dim=ae.latent_dim,
        widths=config.widths or SCORE_WIDTHS[kind],
        time_dim=config.time_dim,
        kind=kind,
        latent_shape=ae.latent_shape if kind == "conv" else (),
        blocks=config.blocks,
        attention_heads=config.attention_heads if kind == "conv" else 0,
        memory=config.memory,
        prior_sde=(config.beta_min, config.beta_max) if config.prior else (),
    )


@dataclass
class PreparedLatents:
    """What stage 2 trains on: standardised latents of the complete frame sets, split."""

    shell: MVLDModel
    z_train: torch.Tensor  # [N, V, D]
    z_val: torch.Tensor
    train_rows: torch.Tensor  # int64 [N]: rows of the whole dataset (for memories)
    val_rows: torch.Tensor
    memory: SceneMemory | None  # video-aware training only


def _prepare_latents(config: ScoreTrainConfig, ctx: DistributedContext) -> PreparedLatents:
    """Encode (or load cached) latents, split them and, with --memory, index the scenes."""
    autoencoder, preprocess, fingerprint = load_autoencoder(config.ae)
    autoencoder.to(ctx.device)
    arrays = load_frame_arrays(config.data, preprocess.height, preprocess.width, config.skip_bad)
    cache = Path(config.out) / "latents.safetensors"
    cached = load_latent_cache(cache, fingerprint, config.data, len(arrays.stems))
    if cached is None:
        latents = encode_frame_arrays(autoencoder, preprocess, arrays)
        present = torch.from_numpy(arrays.present)
        if ctx.is_main:
            save_latent_cache(cache, latents, present, fingerprint, config.data)
    else:
        latents, present = cached
    split_train, split_val = split_train_val(len(arrays.stems), config.val_fraction)
    stats = latent_stats(latents[split_train], present[split_train])
    complete = present.all(1)
    train_idx = [i for i in split_train if complete[i]]
    val_idx = [i for i in split_val if complete[i]] or train_idx[-256:]
    if not train_idx:
        raise DatasetError(f"{config.data}: no complete frame set (every view present) to train on")
    log.info("score: %d complete training frame sets, %d validation", len(train_idx), len(val_idx))
    arch = score_net_config_for(config, arrays.num_views, autoencoder.config)
    sde = VPSDE(beta_min=config.beta_min, beta_max=config.beta_max)
    torch.manual_seed(config.seed)
    shell = MVLDModel(
        preprocess=preprocess,
        autoencoder=autoencoder.cpu(),
        score_net=make_score_net(arch),
        sde=sde,
        latent_stats=stats,
        fingerprint=fingerprint,
    )
    if config.init:
        _warm_start(config.init, shell)
    z = shell.latent_stats.standardise(latents)
    prior = getattr(shell.score_net, "prior", None)
    if prior is not None and _keeps_prior(config, prior):
        log.info("score: keeping the regression prior of %s", config.init)
    elif prior is not None:
        fit = RidgeRegressor(z[torch.as_tensor(train_idx)], config.prior_alpha)
        prior.load_fits({mask: fit.fit(mask) for mask in prior.patterns})
        log.info("score: regression prior fitted on %d frame sets", len(train_idx))
    memory = None
    if config.memory:
        scenes = read_scenes(config.data, arrays.stems)
        if scenes is None:
            raise DatasetError(
                f"{config.data}: --memory needs a sequence dataset (frame order "
                f"and scene cuts in dataset.json or render.json, "
                f"docs/DATASETS.md)"
            )
        memory = SceneMemory(
            z, present, scenes, drop=config.memory_drop, max_age_s=config.memory_max_age_s
        )
        log.info(
            "score: video-aware, %d scenes at %.3g fps, memories up to %.3g s",
            int(scenes.scene.max()) + 1,
            scenes.fps,
            config.memory_max_age_s,
        )
        memory_prior = getattr(shell.score_net, "memory_prior", None)
        if memory_prior is not None and prior is not None:
            every_view = SceneMemory(
                z, present, scenes, drop=0.0, max_age_s=config.memory_max_age_s
            )
            fit_memory_prior(
                memory_prior,
                prior,
                z,
                torch.as_tensor(train_idx),
                every_view,
                seed=config.seed,
                progress=config.progress,
            )
            errors = memory_prior_errors(
                memory_prior, prior, z, torch.as_tensor(val_idx), every_view
            )
            log.info(
                "score: memory prior, validation latent MSE of failed views: %s",
                ", ".join(f"{name} {value:.4f}" for name, value in errors.items()),
            )
    train_rows, val_rows = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    return PreparedLatents(shell, z[train_rows], z[val_rows], train_rows, val_rows, memory)


def _keeps_prior(config: ScoreTrainConfig, prior: RegressionPrior) -> bool:
    """Whether the prior warm-started from ``--init`` is kept: it was fitted there (its
    network learned the residuals around it) and ``--refit-prior`` was not asked for."""
    fitted = any(bool(w.abs().sum()) for _, _, w in prior.fits().values())
    return bool(config.init) and not config.refit_prior and fitted


def _warm_start(path: str, shell: MVLDModel) -> None:
    """Copy the score network and latent statistics of checkpoint ``path`` into ``shell``.

    Only layers the new network adds may be missing from the checkpoint, and none may differ
    in shape: anything else is a different network and a ConfigError.
    """
    previous = load_mvld_model(path)
    if previous.fingerprint != shell.fingerprint:
        raise ConfigError(f"--init {path}: trained on another autoencoder")
    try:
        missing, unexpected = shell.score_net.load_state_dict(
            previous.score_net.state_dict(), strict=False
        )
    except RuntimeError as exc:  # a tensor of another shape
        raise ConfigError(f"--init {path}: another score network: {exc}") from exc
    if unexpected:
        raise ConfigError(
            f"--init {path}: layers the new score network lacks: {sorted(unexpected)[:5]}"
        )
    shell.latent_stats = previous.latent_stats
    log.info("warm start from %s (%d new tensors keep their initialisation)", path, len(missing))


@torch.no_grad()
def validation_losses(
    score_net: nn.Module,
    sde: VPSDE,
    z: torch.Tensor,
    t_min: float,
    seed: int,
    memory: MemoryDraw | None = None,
) -> dict[str, float]:
    """Joint and conditional (one random observed subset per sample) losses, fixed noise.

    With ``memory`` (one draw per sample) the conditional loss is also measured without it
    (``val_cond_no_memory``): the gap is what the cameras' past is worth.
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(score_net.parameters()).device
    z = z.to(device)
    batch, views = z.shape[:2]
    if memory is not None:
        memory = MemoryDraw(memory.latents.to(device), memory.age.to(device))
    results = {}
    for name, prob in (("val_joint", 0.0), ("val_cond", 1.0)):
        observed = draw_observed_masks(batch, views, prob, generator).to(device)
        t = (t_min + (1 - t_min) * torch.rand(batch, generator=generator)).to(device)
        noise = torch.randn(z.shape, generator=generator).to(device)
        results[name] = multi_time_loss(score_net, sde, z, observed, t, noise, memory).mean().item()
        if memory is not None and name == "val_cond":
            results["val_cond_no_memory"] = (
                multi_time_loss(score_net, sde, z, observed, t, noise).mean().item()
            )
    return results


def train_score(config: ScoreTrainConfig, ctx: DistributedContext) -> Path:
    """Train stage 2 into ``config.out``; returns the path of the last (complete) checkpoint."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = _prepare_latents(config, ctx)
    model, z_train, z_val, memory = (
        prepared.shell,
        prepared.z_train,
        prepared.z_val,
        prepared.memory,
    )
    val_memory = (
        None
        if memory is None
        else memory.draw(prepared.val_rows, torch.Generator().manual_seed(config.seed + 1))
    )
    sampler = EpochSampler(len(z_train), config.batch_size, config.seed)
    if sampler.steps_per_epoch == 0:
        raise DatasetError(
            f"{len(z_train)} complete frame sets are fewer than one batch of "
            f"{config.batch_size}; lower --batch-size"
        )
    score_net = model.score_net.to(ctx.device)
    optimizer = torch.optim.Adam(score_net.parameters(), lr=config.lr)
    ema = ExponentialMovingAverage(score_net, config.ema_decay)
    start_step, best = _maybe_resume(config, model, score_net, optimizer, ema)
    trained = ctx.wrap(score_net)
    views, sde = z_train.shape[1], model.sde

    def train_step(step: int) -> float:
        set_learning_rate(optimizer, config.lr, config.lr_schedule, step, config.steps)
        # Draw the whole global batch on every rank, then keep this rank's slice.
        generator = step_generator(config.seed, step)
        rows = sampler.batch(step - 1)
        z0 = z_train[rows]
        observed = draw_observed_masks(len(z0), views, config.cond_prob, generator)
        t = config.t_min + (1 - config.t_min) * torch.rand(len(z0), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        z0, observed, t, noise = (ctx.shard(x).to(ctx.device) for x in (z0, observed, t, noise))
        drawn = None
        if memory is not None:
            full = memory.draw(prepared.train_rows[rows], generator)
            drawn = MemoryDraw(
                ctx.shard(full.latents).to(ctx.device), ctx.shard(full.age).to(ctx.device)
            )
        with autocast(ctx.device, config.precision):
            loss = multi_time_loss(trained, sde, z0, observed, t, noise, drawn).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(score_net, step)
        return ctx.mean(loss.item())

    def validate(step: int) -> dict[str, float]:
        return validation_losses(ema.shadow, sde, z_val, config.t_min, config.seed, val_memory)

    def save(step: int, metrics: dict[str, float]) -> None:
        nonlocal best
        model.score_net = ema.shadow
        extra = {"training": config_to_dict(config), "step": step, "metrics": metrics}
        save_mvld_model(out / "last", model, extra)
        score = metrics.get("val_cond", float("inf"))
        improved, best = score < best, min(best, score)
        save_training_state(
            out / "last",
            TrainingState(
                step=step,
                modules={"score_net": score_net.state_dict()},
                optimizer=optimizer.state_dict(),
                info={"best": best},
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
        desc="score",
        train_step=train_step,
        validate=validate,
        save=save,
    )
    return checkpoint_paths(out / "last")[0]


def _maybe_resume(
    config: ScoreTrainConfig,
    model: MVLDModel,
    score_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: ExponentialMovingAverage,
) -> tuple[int, float]:
    """Load ``OUT/last`` (EMA weights) and its training state; ``(step, best val loss)``."""
    if not config.resume:
        return 0, float("inf")
    previous = load_mvld_model(Path(config.out) / "last")
    if previous.score_net.config != score_net.config or previous.fingerprint != model.fingerprint:
        raise ConfigError(f"cannot resume {config.out}: different score network or encoder")
    ema.shadow.load_state_dict(previous.score_net.state_dict())
    state = load_training_state(Path(config.out) / "last")
    score_net.load_state_dict(state.modules["score_net"])
    optimizer.load_state_dict(state.optimizer)
    log.info("resumed %s at step %d", config.out, state.step)
    return state.step, float(state.info.get("best", float("inf")))
