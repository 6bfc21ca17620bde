"""The imputation API: a batch of frame sets with missing views in, complete latents out.

Raw encoder latents ``[B, V, D]`` and a presence mask ``[B, V]`` go in; the missing views'
latents are sampled from the conditional diffusion model (MLD conditioning, see
``mvld.receiver.sampler``) in standardised space and destandardised with the model's
``LatentStats``. Observed views are returned bit for bit. With ``samples=K`` every frame set
gets K samples and a per-view uncertainty (mean over dims of the std across the samples, in
standardised units: 0 = certain, about 1 = as uncertain as the data itself). A frame set with
every view missing is generated jointly and flagged ``unconditioned``.

:func:`log_model_verdict` logs, at start-up, what ``mvld-train all`` found about the model
(``verdict.json`` beside the checkpoint): whether the diffusion imputer beats the baselines on
its held-out data, and which imputer does best. ``mvld.receiver.ridge_imputer`` serves the
deterministic ridge alternative.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mvld.common.errors import ConfigError
from mvld.model.checkpoint import LatentStats, MVLDModel, checkpoint_paths
from mvld.model.sde import VPSDE
from mvld.receiver.precision import inference_context, prepare_module, resolve_precision
from mvld.receiver.sampler import EpsModel, RowGenerators, sampler_info

log = logging.getLogger(__name__)

DEFAULT_SAMPLER, DEFAULT_STEPS = "dpmpp_2m_sde", 20  # 20 NFE; see docs/SAMPLERS.md
IMPUTERS = ("diffusion", "ridge")  # the receiver's --imputer choices
VERDICT_FILE = "verdict.json"  # written beside the checkpoint by `mvld-train all`


class Provenance(str, Enum):
    """Where a view's latent in an ``Imputation`` comes from."""

    OBSERVED = "observed"  # sent by the edge, returned unchanged
    IMPUTED = "imputed"  # sampled given at least one observed view
    UNCONDITIONED = "unconditioned"  # sampled with no view observed (joint generation)


@dataclass
class Imputation:
    """Result of one ``Imputer`` call; ``uncertainty`` is None when ``samples == 1``."""

    latents: torch.Tensor  # [B, V, D] raw latents: observed as given, the first sample elsewhere
    samples: torch.Tensor  # [B, K, V, D] every sample (observed views repeated)
    provenance: list[list[Provenance]]  # [B][V]
    uncertainty: torch.Tensor | None  # [B, V] float32, 0 for observed views
    nfe: int  # eps-model evaluations of the (single, batched) sampler run
    seconds: float

    def posterior_mean(self) -> torch.Tensor:
        """``[B, V, D]``: the mean of the K samples for missing views, observed views as given.

        The mean is closer to the truth on average than any one sample (higher PSNR/SSIM) and
        blurrier: it averages away detail the samples disagree on (docs/RECEIVER.md).
        """
        observed = torch.tensor(
            [[p is Provenance.OBSERVED for p in row] for row in self.provenance],
            device=self.latents.device,
        )
        mean = self.samples.float().mean(1).to(self.latents.dtype)
        return torch.where(observed[..., None], self.latents, mean)

    @property
    def unconditioned(self) -> torch.Tensor:
        """``[B]`` bool: frame sets generated with no view observed."""
        return torch.tensor([Provenance.UNCONDITIONED in row for row in self.provenance])


class ScoreNetEps:
    """Adapts a ScoreNet to the sampler's eps contract: inference mode, the net's dtype.

    ``compute_dtype`` (bf16/fp16) runs the network under autocast on its device; the sampler's
    arithmetic between evaluations stays float32 either way.
    """

    def __init__(self, score_net: nn.Module, *, compute_dtype: torch.dtype | None = None) -> None:
        self.score_net = score_net.eval()
        parameter = next(score_net.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device
        self.compute_dtype = compute_dtype or self.dtype

    @property
    def uses_memory(self) -> bool:
        """Whether the network is video-aware (takes camera memories)."""
        return bool(getattr(getattr(self.score_net, "config", None), "memory", False))

    def __call__(
        self,
        x: torch.Tensor,
        tau: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_age: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with torch.inference_mode(), inference_context(self.device, self.compute_dtype):
            if memory is None:
                return self.score_net(x.to(self.dtype), tau.to(self.dtype)).to(x.dtype)
            return self.score_net(
                x.to(self.dtype), tau.to(self.dtype), memory.to(self.dtype), memory_age
            ).to(x.dtype)


class Imputer:
    """Imputes missing views with one registered sampler; device-agnostic (cpu or cuda)."""

    def __init__(
        self,
        eps_model: EpsModel,
        latent_stats: LatentStats,
        sde: VPSDE,
        *,
        sampler: str = DEFAULT_SAMPLER,
        steps: int = DEFAULT_STEPS,
        device: torch.device | str = "cpu",
        **sampler_options: Any,
    ) -> None:
        info = sampler_info(sampler)
        unknown = set(sampler_options) - set(info.options)
        if unknown:
            raise ConfigError(
                f"sampler {sampler!r} has no option {sorted(unknown)}; "
                f"valid: {', '.join(sorted(info.options))}"
            )
        self.sample = info.sample
        self.eps_model, self.sde, self.steps = eps_model, sde, steps
        self._memory_model = (
            eps_model if isinstance(eps_model, ScoreNetEps) and eps_model.uses_memory else None
        )
        self.name, self.options, self.device = sampler, sampler_options, torch.device(device)
        self.stats = LatentStats(
            latent_stats.mean.to(self.device), latent_stats.std.to(self.device)
        )

    @classmethod
    def from_model(
        cls, model: MVLDModel, *, precision: str | None = None, **kwargs: Any
    ) -> Imputer:
        """An imputer on the device of the model's score network.

        ``precision`` (``mvld.receiver.precision.PRECISIONS``) serves a tuned inference copy of
        the network (channels-last on the CPU, autocast where the hardware has bf16/fp16);
        None uses the network as it is.
        """
        device = next(model.score_net.parameters()).device
        if precision is None:
            eps_model = ScoreNetEps(model.score_net)
        else:
            dtype = resolve_precision(precision, device)
            eps_model = ScoreNetEps(prepare_module(model.score_net), compute_dtype=dtype)
            log.info("score network: %s on %s", str(dtype).removeprefix("torch."), device)
        return cls(eps_model, model.latent_stats, model.sde, device=device, **kwargs)

    def _check(self, latents: torch.Tensor, present: torch.Tensor, samples: int) -> None:
        shape = tuple(self.stats.mean.shape)
        if latents.ndim != 3 or tuple(latents.shape[1:]) != shape:
            raise ValueError(
                f"latents must be [B, {shape[0]}, {shape[1]}]; got {list(latents.shape)}"
            )
        if present.dtype != torch.bool or present.shape != latents.shape[:2]:
            raise ValueError(
                f"present must be a bool [B, V] mask; got {list(present.shape)} {present.dtype}"
            )
        if samples < 1:
            raise ConfigError(f"samples must be >= 1; got {samples}")

    @property
    def uses_memory(self) -> bool:
        """Whether the score network takes camera memories (a video-aware model)."""
        return self._memory_model is not None

    def __call__(
        self,
        latents: torch.Tensor,
        present: torch.Tensor,
        *,
        samples: int = 1,
        seed: int | Sequence[int] = 0,
        memory: torch.Tensor | None = None,
        memory_age: torch.Tensor | None = None,
    ) -> Imputation:
        """Impute the views with ``present == False``; deterministic for a ``seed``.

        A sequence of seeds gives each frame set its own noise (:class:`RowGenerators`):
        the receiver seeds by node, so a camera's consecutive imputations stay steady.

        ``memory [B, V, D]`` (raw latents) and ``memory_age [B, V]`` (seconds, inf = none):
        each camera's last observed latent, used by a video-aware model and ignored otherwise.
        """
        self._check(latents, present, samples)
        if not self.uses_memory or memory is None or memory_age is None:
            memory = memory_age = None
        start = time.perf_counter()
        batch, views, _ = latents.shape
        out = latents[:, None].repeat(1, samples, 1, 1)  # [B, K, V, D]
        uncertainty = torch.zeros(batch, views) if samples > 1 else None
        rows = (~present).any(1).nonzero().squeeze(1)  # frame sets with a missing view
        nfe = 0
        if len(rows):
            remembered = (
                None if memory is None or memory_age is None else (memory[rows], memory_age[rows])
            )
            row_seed = seed if isinstance(seed, int) else [seed[r] for r in rows.tolist()]
            drawn, nfe = self._sample(
                latents[rows], present[rows], samples, row_seed, remembered
            )  # standardised
            if uncertainty is not None:
                spread = drawn.std(dim=1).mean(-1).float().cpu()  # [R, V]
                uncertainty[rows.cpu()] = torch.where(present[rows].cpu(), 0.0, spread)
            raw = self.stats.destandardise(drawn).to(latents.device, latents.dtype)
            keep = present[rows][:, None, :, None]
            out[rows] = torch.where(keep, latents[rows][:, None], raw)
        seconds = time.perf_counter() - start
        provenance = [[provenance_of(bool(p), bool(row.any())) for p in row] for row in present]
        log.debug("imputed %d of %d frame sets, %d NFE, %.3f s", len(rows), batch, nfe, seconds)
        return Imputation(out[:, 0], out, provenance, uncertainty, nfe, seconds)

    def _sample(
        self,
        latents: torch.Tensor,
        present: torch.Tensor,
        samples: int,
        seed: int | list[int],
        memory: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """``[R, K, V, D]`` standardised samples of the rows given, and the NFE spent."""
        present = present.to(self.device)
        z = self.stats.standardise(latents.to(self.device, torch.float32))
        z = torch.where(present[..., None], z, torch.zeros_like(z))  # missing: any value, even NaN
        z, present_k = z.repeat_interleave(samples, 0), present.repeat_interleave(samples, 0)
        generator: torch.Generator | RowGenerators = (
            torch.Generator(self.device).manual_seed(seed)
            if isinstance(seed, int)
            else RowGenerators([s * samples + k for s in seed for k in range(samples)], self.device)
        )
        eps_model = self.eps_model
        if memory is not None and self._memory_model is not None:
            known = torch.isfinite(memory[1]).to(self.device)[..., None]
            recalled = self.stats.standardise(memory[0].to(self.device, torch.float32))
            recalled = torch.where(known, recalled, torch.zeros_like(recalled))
            eps_model = partial(
                self._memory_model,
                memory=recalled.repeat_interleave(samples, 0),
                memory_age=memory[1].to(self.device).repeat_interleave(samples, 0),
            )
        result = self.sample(
            eps_model,
            z,
            present_k,
            sde=self.sde,
            steps=self.steps,
            generator=generator,
            **self.options,
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return result.x.reshape(len(latents), samples, *latents.shape[1:]), result.nfe


def provenance_of(is_present: bool, any_present: bool) -> Provenance:
    """Where a view's latent comes from, given its presence and its frame set's."""
    if is_present:
        return Provenance.OBSERVED
    return Provenance.IMPUTED if any_present else Provenance.UNCONDITIONED


def log_model_verdict(checkpoint: str | Path) -> dict | None:
    """Log the verdict beside ``checkpoint`` (a warning when the imputer loses); return it.

    ``None`` (logged at INFO) when there is none: checkpoints trained by the stage commands
    have no verdict, and the receiver serves them as before.
    """
    path = checkpoint_paths(checkpoint)[0].parent / VERDICT_FILE
    if not path.is_file():
        log.info("no model verdict beside %s (mvld-train all writes %s)", checkpoint, VERDICT_FILE)
        return None
    try:
        verdict = json.loads(path.read_text())
        sentence, wins = str(verdict["sentence"]), bool(verdict["imputer_wins"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("model verdict %s is unreadable: %s", path, exc)
        return None
    best = ", ".join(f"{k} missing: {m}" for k, m in verdict.get("best_psnr", {}).items())
    extra = {"verdict": {"path": str(path), "imputer_wins": wins, "sentence": sentence}}
    if wins:
        log.info("model verdict (%s): %s", path, sentence, extra=extra)
    else:
        log.warning(
            "model verdict (%s): %s Best PSNR on its held-out data: %s; "
            "--imputer ridge serves the ridge baseline",
            path,
            sentence,
            best or "not recorded",
            extra=extra,
        )
    return verdict
