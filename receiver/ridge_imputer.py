"""A deterministic imputer for the receiver: ridge regression from the observed views.

On some data (little of it, or a short training budget) the diffusion imputer loses to a
linear regression of the missing latents on the observed ones, and ``mvld-train all`` says so
in its verdict. This imputer serves that regression: one linear map per presence pattern, in
the model's standardised latent space, fitted on the complete training frame sets by training
(``mvld.train.pipeline``) and saved beside the checkpoint as :data:`RIDGE_FILE`, or carried
by a score network trained with a regression prior (``--prior``), which is the same fit. The
receiver never fits anything and imports no training code: it reads the weights, checks they
belong to the model's encoder and applies them. Frame sets with no observed view get the
training mean and are flagged ``unconditioned``, like the diffusion imputer's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mvld.common.errors import ConfigError
from mvld.model.checkpoint import LatentStats, MVLDModel, checkpoint_paths
from mvld.model.memory_prior import MemoryPrior
from mvld.model.score_net import RegressionPrior, pattern_key
from mvld.receiver.imputation import Imputation, provenance_of

RIDGE_FILE = "ridge.safetensors"
Pattern = tuple[bool, ...]
Fit = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x_mean, y_mean, W


def ridge_path(checkpoint: str | Path) -> Path:
    """Where the ridge weights of ``checkpoint`` lie: its folder's :data:`RIDGE_FILE`."""
    return checkpoint_paths(checkpoint)[0].parent / RIDGE_FILE


def save_ridge_weights(
    path: str | Path, fits: dict[Pattern, Fit], fingerprint: str, alpha: float
) -> Path:
    """Write one ``(x_mean, y_mean, W)`` per presence pattern, atomically."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for mask, (x_mean, y_mean, weights) in fits.items():
        key = pattern_key(mask)
        tensors |= {f"{key}.x_mean": x_mean, f"{key}.y_mean": y_mean, f"{key}.weights": weights}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    meta = {"fingerprint": fingerprint, "alpha": alpha, "patterns": sorted(map(pattern_key, fits))}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"mvld_ridge": json.dumps(meta)})
    tmp.replace(path)
    return path


def load_ridge_weights(path: str | Path) -> tuple[dict[Pattern, Fit], dict]:
    """``(fits, metadata)`` of a file written by :func:`save_ridge_weights`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--imputer ridge: {path} does not exist (mvld-train all writes it "
            "beside the checkpoint)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["mvld_ridge"])
            fits = {}
            for key in meta["patterns"]:
                fits[tuple(c == "1" for c in key)] = tuple(
                    handle.get_tensor(f"{key}.{name}") for name in ("x_mean", "y_mean", "weights")
                )
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--imputer ridge: {path} is unreadable: {exc}") from exc
    return fits, meta


def has_ridge(checkpoint: str | Path, model: MVLDModel) -> bool:
    """Whether ``--imputer ridge`` can serve ``model``: a ridge file beside ``checkpoint`` or
    a regression prior in its score network."""
    prior = getattr(model.score_net, "prior", None)
    return ridge_path(checkpoint).is_file() or prior is not None


class RidgeImputer:
    """Same call and result as :class:`~mvld.receiver.imputation.Imputer`, deterministic."""

    name = "ridge"

    def __init__(
        self,
        fits: dict[Pattern, Fit],
        latent_stats: LatentStats,
        device: torch.device | str = "cpu",
        memory_prior: MemoryPrior | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.fits = {
            m: tuple(t.to(self.device, torch.float32) for t in fit) for m, fit in fits.items()
        }
        self.stats = LatentStats(
            latent_stats.mean.to(self.device), latent_stats.std.to(self.device)
        )
        self.memory_prior = memory_prior.to(self.device) if memory_prior is not None else None

    @property
    def uses_memory(self) -> bool:
        """Whether failed cameras' estimates are corrected by their memories (a video-aware
        model's fitted :class:`~mvld.model.memory_prior.MemoryPrior`)."""
        return self.memory_prior is not None

    @classmethod
    def beside(cls, checkpoint: str | Path, model: MVLDModel) -> RidgeImputer:
        """The ridge imputer saved beside ``checkpoint``, checked against ``model``'s encoder;
        without that file, the regression prior the score network carries (the same fit,
        stored once: the shipped model has no separate ridge file)."""
        path = ridge_path(checkpoint)
        device = next(model.score_net.parameters()).device
        memory_prior = getattr(model.score_net, "memory_prior", None)
        if memory_prior is not None and not memory_prior.fitted:
            memory_prior = None
        if not has_ridge(checkpoint, model):
            raise ConfigError(
                f"--imputer ridge: {path} does not exist and the model's score network has no "
                "regression prior (mvld-train all writes the file beside the checkpoint)"
            )
        if not path.is_file():
            prior = model.score_net.prior
            assert isinstance(prior, RegressionPrior)  # has_ridge: a prior when no file
            views, dim = prior.views, prior.dim
            fits = dict(prior.fits())  # nothing observed: the training mean (0, standardised)
            fits[(False,) * views] = (
                torch.zeros(0),
                torch.zeros(views * dim),
                torch.zeros(0, views * dim),
            )
            return cls(fits, model.latent_stats, device, memory_prior)
        fits, meta = load_ridge_weights(path)
        if meta["fingerprint"] != model.fingerprint:
            raise ConfigError(
                f"--imputer ridge: {path} was fitted for another encoder "
                f"({meta['fingerprint'][:12]}, the model's is "
                f"{model.fingerprint[:12]})"
            )
        return cls(fits, model.latent_stats, device, memory_prior)

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
        """Fill the views with ``present == False``; ``seed`` is ignored (nothing is drawn).

        ``memory [B, V, D]`` (raw latents) and ``memory_age [B, V]`` (seconds, inf = none)
        correct the estimates of failed cameras when the model has a memory prior."""
        if samples != 1:
            raise ConfigError("the ridge imputer is deterministic: use --samples 1")
        start = time.perf_counter()
        dim = latents.shape[2]
        z = self.stats.standardise(latents.to(self.device, torch.float32))
        out = z.clone()
        for mask in {tuple(row) for row in present.tolist()}:
            if all(mask):
                continue
            if mask not in self.fits:
                raise ConfigError(
                    f"the ridge weights have no fit for the pattern {pattern_key(mask)}"
                )
            rows = (present.cpu() == torch.tensor(mask)).all(1).nonzero().squeeze(1)
            observed = torch.tensor(mask, device=self.device)
            x_mean, y_mean, weights = self.fits[mask]
            x = z[rows][:, observed].flatten(1)
            y = y_mean + (x - x_mean) @ weights if x.shape[1] else y_mean.expand(len(rows), -1)
            filled = out[rows]
            filled[:, ~observed] = y.reshape(len(rows), -1, dim)
            out[rows] = filled
        if self.memory_prior is not None and memory is not None and memory_age is not None:
            with torch.no_grad():
                out = self.memory_prior(
                    out,
                    present.to(self.device),
                    self.stats.standardise(memory.to(self.device, torch.float32)),
                    memory_age.to(self.device, torch.float32),
                )
        raw = self.stats.destandardise(out).to(latents.device, latents.dtype)
        raw = torch.where(present[..., None].to(latents.device), latents, raw)
        provenance = [[provenance_of(bool(p), bool(row.any())) for p in row] for row in present]
        return Imputation(raw, raw[:, None], provenance, None, 0, time.perf_counter() - start)
