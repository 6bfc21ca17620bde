"""Self-describing model files: safetensors weights plus a JSON config beside them.

A checkpoint named ``P`` is the pair ``P.safetensors`` (weights, no pickle) and ``P.json``
(format version, kind, architecture, preprocessing, SDE parameters, latent statistics and
the encoder fingerprint), so the receiver rebuilds the model from the files alone. Two
kinds exist: ``autoencoder`` (stage 1) and ``mvld`` (autoencoder + score network: the
complete model). Any unreadable or incompatible file raises ``ConfigError`` naming it.
"""

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mvld.common.default_model import DEFAULT_MODEL
from mvld.common.errors import ConfigError
from mvld.common.preprocess import PreprocessConfig
from mvld.model.autoencoder import Autoencoder, AutoencoderConfig
from mvld.model.score_net import ScoreNetConfig, ScoreNetwork, make_score_net
from mvld.model.sde import VPSDE

log = logging.getLogger(__name__)

FORMAT = "mvld-checkpoint"
FORMAT_VERSION = 1
KINDS = ("autoencoder", "mvld")


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``(P.json, P.safetensors)`` for ``P``, ``P.json``, ``P.safetensors`` or a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "last"
    if path.suffix in (".json", ".safetensors"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".json"), path.with_name(path.name + ".safetensors")


def encoder_fingerprint(encoder: nn.Module) -> str:
    """sha256 over the encoder's weights (names, dtypes, shapes, little-endian bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}|{array.dtype.str}|{list(array.shape)}|".encode())
        digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()


@dataclass
class LatentStats:
    """Per-view, per-dimension mean and std of the training latents: ``[V, D]`` each."""

    mean: torch.Tensor
    std: torch.Tensor

    def standardise(self, latents: torch.Tensor) -> torch.Tensor:
        """``[..., V, D]`` raw latents -> standardised."""
        return (latents - self.mean.to(latents)) / self.std.to(latents)

    def destandardise(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of ``standardise``."""
        return z * self.std.to(z) + self.mean.to(z)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready lists (float32 values survive the float64 JSON round trip exactly)."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatentStats":
        """Rebuild from ``to_dict`` output."""
        mean = torch.tensor(data["mean"], dtype=torch.float32)
        std = torch.tensor(data["std"], dtype=torch.float32)
        if mean.ndim != 2 or mean.shape != std.shape or not bool((std > 0).all()):
            raise ConfigError("latent statistics must be two [V, D] arrays with std > 0")
        return cls(mean=mean, std=std)


@dataclass
class MVLDModel:
    """Everything the receiver needs: decoder/encoder, score network, SDE, statistics."""

    preprocess: PreprocessConfig
    autoencoder: Autoencoder
    score_net: ScoreNetwork  # the EMA weights
    sde: VPSDE
    latent_stats: LatentStats
    fingerprint: str

    @property
    def num_views(self) -> int:
        """Number of camera views the score network was trained for."""
        return self.score_net.config.num_views


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(
    path: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> Path:
    """Write ``P.safetensors`` then ``P.json`` (each atomically); return the JSON path."""
    json_path, weights_path = checkpoint_paths(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(weights_path, lambda p: save_file(cpu, str(p)))
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
    _atomic_write(json_path, lambda p: p.write_text(json.dumps(full, indent=1)))
    return json_path


def read_checkpoint(
    path: str | Path, kind: str | tuple[str, ...] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate the pair; ``kind`` restricts which checkpoint kinds are accepted."""
    json_path, weights_path = checkpoint_paths(path)
    for file in (json_path, weights_path):
        if not file.is_file():
            raise ConfigError(f"checkpoint file {file} does not exist")
    try:
        config = json.loads(json_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{json_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ConfigError(f"{json_path} is not an MVLD checkpoint (no format '{FORMAT}')")
    if config.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{json_path} has format version {config.get('format_version')}; "
            f"this release reads version {FORMAT_VERSION}"
        )
    kinds = (kind,) if isinstance(kind, str) else (kind or KINDS)
    if config.get("kind") not in kinds:
        raise ConfigError(
            f"{json_path} holds a {config.get('kind')!r} checkpoint; expected {' or '.join(kinds)}"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{weights_path} is corrupt or unreadable: {exc}") from exc
    return config, tensors


def _subset(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_weights(module: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise ConfigError(f"{where}: weights do not match the architecture: {first}") from exc


def _build_autoencoder(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
) -> tuple[Autoencoder, PreprocessConfig, str]:
    try:
        arch = AutoencoderConfig.from_dict(config["autoencoder"])
        preprocess = PreprocessConfig.from_dict(config["preprocess"])
        stored_fingerprint = config["encoder_fingerprint"]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: missing or malformed field {exc}") from exc
    if (preprocess.height, preprocess.width) != (arch.image_size, arch.image_size):
        raise ConfigError(f"{where}: preprocessing size does not match the autoencoder input")
    autoencoder = Autoencoder(arch)
    _load_weights(autoencoder, _subset(tensors, "autoencoder."), where)
    if encoder_fingerprint(autoencoder.encoder) != stored_fingerprint:
        raise ConfigError(
            f"{where}: encoder weights do not match the stored fingerprint (corrupt or edited file)"
        )
    return autoencoder.eval(), preprocess, stored_fingerprint


def autoencoder_config(autoencoder: Autoencoder, preprocess: PreprocessConfig) -> dict[str, Any]:
    """The JSON fields that describe an autoencoder checkpoint."""
    return {
        "kind": "autoencoder",
        "autoencoder": autoencoder.config.to_dict(),
        "preprocess": preprocess.to_dict(),
        "encoder_fingerprint": encoder_fingerprint(autoencoder.encoder),
    }


def save_autoencoder(
    path: str | Path,
    autoencoder: Autoencoder,
    preprocess: PreprocessConfig,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a stage-1 checkpoint; ``extra`` (e.g. training config, metrics) goes in the JSON."""
    config = {**autoencoder_config(autoencoder, preprocess), **(extra or {})}
    tensors = {f"autoencoder.{k}": v for k, v in autoencoder.state_dict().items()}
    return save_checkpoint(path, config, tensors)


def load_autoencoder(path: str | Path) -> tuple[Autoencoder, PreprocessConfig, str]:
    """``(autoencoder in eval mode, preprocessing, fingerprint)`` from either checkpoint kind."""
    config, tensors = read_checkpoint(path)
    return _build_autoencoder(config, tensors, str(checkpoint_paths(path)[0]))


def save_mvld_model(
    path: str | Path, model: MVLDModel, extra: dict[str, Any] | None = None
) -> Path:
    """Write the complete model (autoencoder + EMA score network) as one checkpoint."""
    config = {
        **autoencoder_config(model.autoencoder, model.preprocess),
        "kind": "mvld",
        "score_net": model.score_net.config.to_dict(),
        "sde": model.sde.to_dict(),
        "latent_stats": model.latent_stats.to_dict(),
        **(extra or {}),
    }
    tensors = {f"autoencoder.{k}": v for k, v in model.autoencoder.state_dict().items()}
    tensors |= {f"score_net.{k}": v for k, v in model.score_net.state_dict().items()}
    return save_checkpoint(path, config, tensors)


def load_mvld_model(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> MVLDModel:
    """Rebuild the complete model from its files; ``None`` loads the packaged default."""
    if path is None:
        if not checkpoint_paths(DEFAULT_MODEL)[0].is_file():
            raise ConfigError(
                "no default model is packaged in this installation; "
                "name a trained model (mvld-train score writes one)"
            )
        path = DEFAULT_MODEL
    where = str(checkpoint_paths(path)[0])
    config, tensors = read_checkpoint(path, kind="mvld")
    autoencoder, preprocess, fingerprint = _build_autoencoder(config, tensors, where)
    try:
        score_config = ScoreNetConfig.from_dict(config["score_net"])
        sde = VPSDE.from_dict(config["sde"])
        stats = LatentStats.from_dict(config["latent_stats"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: missing or malformed field {exc}") from exc
    expected = (score_config.num_views, autoencoder.config.latent_dim)
    if score_config.latent_dim != expected[1] or tuple(stats.mean.shape) != expected:
        raise ConfigError(
            f"{where}: score network, latent statistics and autoencoder disagree "
            f"on the latent shape (expected [V, D] = {list(expected)})"
        )
    if score_config.prior_sde and score_config.prior_sde != (sde.beta_min, sde.beta_max):
        raise ConfigError(
            f"{where}: the score network's regression prior is shifted with the SDE "
            f"{list(score_config.prior_sde)}, the model samples with "
            f"{[sde.beta_min, sde.beta_max]}"
        )
    score_net = make_score_net(score_config)
    _load_weights(score_net, _subset(tensors, "score_net."), where)
    return MVLDModel(
        preprocess=preprocess,
        autoencoder=autoencoder.to(device),
        score_net=score_net.eval().to(device),
        sde=sde,
        latent_stats=stats,
        fingerprint=fingerprint,
    )
