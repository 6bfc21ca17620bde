"""The edge encoder: camera frames -> latents through one of several backends.

Every backend does the shared preprocessing (``mvld.common.preprocess``, exactly as in
training) and then ONE batched call for all usable views of a frame set. Backends:

- ``tensorrt``: a serialized TensorRT engine built on this device by ``mvld-export trt``
  (``mvld.edge.tensorrt_runtime``); Jetson / GPU machines.
- ``onnxruntime``: the exported ``encoder.onnx``; the CPU default, CUDA provider where present.
- ``torch``: the checkpoint itself, for development only (torch is imported lazily: the edge
  package never imports torch at module level).

``open_encoder(path, backend="auto")`` picks the best available backend and logs why. The
``fingerprint`` of every backend is the model's encoder fingerprint (the value written in every
wire message), read from the export's metadata, the engine's sidecar or the checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from mvld.common.errors import ConfigError, MVLDError
from mvld.common.preprocess import PreprocessConfig, preprocess_images
from mvld.common.registry import Registry

log = logging.getLogger(__name__)

# ONNX Runtime raises these (pybind classes deriving from Exception only) for bad models/inputs.
ORT_ERRORS: tuple[type[Exception], ...] = (
    _ort_state.Fail,
    _ort_state.InvalidGraph,
    _ort_state.InvalidArgument,
    _ort_state.InvalidProtobuf,
    _ort_state.NoSuchFile,
    _ort_state.NotImplemented,
    _ort_state.RuntimeException,
    _ort_state.EPFail,
)
ENCODER_ONNX = "encoder.onnx"
ENGINE_SUFFIXES = (".engine", ".plan")
CHECKPOINT_SUFFIXES = (".json", ".safetensors")


class EncoderError(MVLDError):
    """A backend could not be opened or failed to encode."""


@dataclass(frozen=True)
class EncoderInfo:
    """What the edge must know about an encoder besides its weights."""

    fingerprint: str  # the model's encoder fingerprint, sent in every wire message
    preprocess: PreprocessConfig
    latent_dim: int
    latent_shape: tuple[int, ...] = ()  # one view's latent on the wire (sh); () = (latent_dim,)

    def __post_init__(self) -> None:
        shape = tuple(self.latent_shape) or (self.latent_dim,)
        if int(np.prod(shape)) != self.latent_dim:
            raise ConfigError(f"latent shape {list(shape)} does not hold {self.latent_dim} values")
        object.__setattr__(self, "latent_shape", shape)


class EncoderBackend(ABC):
    """``encode(frames) -> [N, D] float32``: shared preprocessing then one batched call."""

    name: ClassVar[str]

    def __init__(self, info: EncoderInfo) -> None:
        self.info = info

    @classmethod
    @abstractmethod
    def open(cls, path: Path, *, threads: int = 1, gpu: int = 0) -> EncoderBackend:
        """Open this backend for the model at ``path`` (what ``open_encoder`` calls)."""

    @property
    def fingerprint(self) -> str:
        """The model's encoder fingerprint (for the wire)."""
        return self.info.fingerprint

    @property
    def preprocess(self) -> PreprocessConfig:
        """The preprocessing the model was trained with."""
        return self.info.preprocess

    @property
    def latent_dim(self) -> int:
        """D, the latent size per view."""
        return self.info.latent_dim

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One view's latent as the model shapes it (``(D,)`` or ``(C, h, w)``): the wire ``sh``."""
        return self.info.latent_shape

    def encode(self, frames: list[np.ndarray], input_order: str = "RGB") -> np.ndarray:
        """``N`` HxWx3 uint8 frames (``input_order``) -> latents ``[N, D]`` float32."""
        if not frames:
            return np.zeros((0, self.latent_dim), dtype=np.float32)
        images = preprocess_images(list(frames), self.preprocess, input_order)
        latents = self.encode_preprocessed(images)
        if latents.shape != (len(frames), self.latent_dim):
            raise EncoderError(
                f"{self.name}: output shape {latents.shape}, expected "
                f"{(len(frames), self.latent_dim)}"
            )
        return latents

    @abstractmethod
    def encode_preprocessed(self, images: np.ndarray) -> np.ndarray:
        """float32 ``[N, 3, H, W]`` -> ``[N, D]`` float32 in one call."""

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release the backend's resources (sessions, GPU buffers)."""

    def __enter__(self) -> EncoderBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------- registry

_BACKENDS: Registry[type[EncoderBackend]] = Registry("encoder backend")


def register_backend(name: str, backend: type[EncoderBackend]) -> None:
    """Register a backend class under ``name``; a second registration is an error."""
    _BACKENDS.add(name, backend)


def registered_backends() -> list[str]:
    """Names ``open_encoder`` accepts besides ``auto``, sorted."""
    return _BACKENDS.names()


def backend_class(name: str) -> type[EncoderBackend]:
    """The class registered as ``name``; an unknown name lists the valid ones (and ``auto``)."""
    if name not in _BACKENDS:
        valid = ", ".join(["auto", *registered_backends()])
        raise ConfigError(f"unknown encoder backend {name!r}; valid: {valid}")
    return _BACKENDS.get(name)


# ---------------------------------------------------------------- ONNX Runtime


def _json_field(metadata: dict[str, str], key: str, where: str) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{where}: missing or malformed metadata {key!r} (not exported by mvld-export onnx?)"
        ) from exc


def latent_shape_of(architecture: dict[str, Any]) -> tuple[int, ...]:
    """``AutoencoderConfig.latent_shape`` from its dict, without torch (the edge has none)."""
    channels = int(architecture.get("latent_channels") or 0)
    if not channels:
        return (int(architecture["latent_dim"]),)
    side = int(architecture["image_size"]) // 2 ** len(architecture["channels"])
    return (channels, side, side)


def encoder_info_from_metadata(metadata: dict[str, str], where: str) -> EncoderInfo:
    """Rebuild ``EncoderInfo`` from the ``mvld.*`` metadata of an exported encoder."""
    if metadata.get("mvld.part", "encoder") != "encoder":
        raise ConfigError(f"{where} holds the {metadata['mvld.part']}, not the encoder")
    fingerprint = metadata.get("mvld.encoder_fingerprint")
    if not fingerprint:
        raise ConfigError(f"{where}: no mvld.encoder_fingerprint in its metadata")
    preprocess = PreprocessConfig.from_dict(_json_field(metadata, "mvld.preprocess", where))
    architecture = _json_field(metadata, "mvld.autoencoder", where)
    try:
        shape = latent_shape_of(architecture)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: malformed metadata 'mvld.autoencoder'") from exc
    return EncoderInfo(fingerprint, preprocess, int(architecture["latent_dim"]), shape)


def ort_providers(device: str) -> list[str]:
    """Execution providers for ``device`` ("cpu", "cuda" or "auto")."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise EncoderError(f"ONNX Runtime has no CUDA provider here (available: {available})")
    return ["CPUExecutionProvider"]


class OnnxRuntimeEncoder(EncoderBackend):
    """``encoder.onnx`` in ONNX Runtime; threads and provider configurable."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int = 1, providers: str = "auto") -> None:
        path = resolve_onnx(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        chosen = ort_providers(providers)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=chosen)
        except ORT_ERRORS as exc:
            raise ConfigError(f"{path} is not a loadable ONNX model: {exc}") from exc
        metadata = self.session.get_modelmeta().custom_metadata_map
        super().__init__(encoder_info_from_metadata(metadata, str(path)))
        self.path = path
        self.providers = self.session.get_providers()
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    @classmethod
    def open(cls, path: Path, *, threads: int = 1, gpu: int = 0) -> EncoderBackend:
        return cls(path, threads=threads)

    def encode_preprocessed(self, images: np.ndarray) -> np.ndarray:
        try:
            (latents,) = self.session.run([self._output], {self._input: images})
        except ORT_ERRORS as exc:
            raise EncoderError(f"onnxruntime: encoding failed: {exc}") from exc
        return np.asarray(latents, dtype=np.float32)


# ---------------------------------------------------------------- TensorRT


class TensorRTEncoder(EncoderBackend):
    """A TensorRT engine built by ``mvld-export trt`` (its sidecar JSON holds the metadata)."""

    name = "tensorrt"

    def __init__(self, path: str | Path, *, gpu: int = 0) -> None:
        from mvld.edge.tensorrt_runtime import TensorRTRunner, read_engine_sidecar

        path = Path(path)
        super().__init__(encoder_info_from_metadata(read_engine_sidecar(path), str(path)))
        self.runner = TensorRTRunner(path, gpu=gpu)
        self.path = path

    @classmethod
    def open(cls, path: Path, *, threads: int = 1, gpu: int = 0) -> EncoderBackend:
        engine, reason = find_engine(path, gpu)
        if engine is None:
            raise EncoderError(f"tensorrt backend unavailable: {reason}")
        return cls(engine, gpu=gpu)

    def encode_preprocessed(self, images: np.ndarray) -> np.ndarray:
        (latents,) = self.runner.run([images])
        return latents

    def close(self) -> None:
        self.runner.close()


# ---------------------------------------------------------------- torch (development only)


class TorchEncoder(EncoderBackend):
    """The checkpoint's encoder in torch eager mode (development only; imports torch lazily)."""

    name = "torch"

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import torch

        from mvld.model.checkpoint import load_autoencoder

        autoencoder, preprocess, fingerprint = load_autoencoder(resolve_checkpoint(path))
        super().__init__(
            EncoderInfo(
                fingerprint,
                preprocess,
                autoencoder.config.latent_dim,
                autoencoder.config.latent_shape,
            )
        )
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.module = autoencoder.encoder.eval()

    @classmethod
    def open(cls, path: Path, *, threads: int = 1, gpu: int = 0) -> EncoderBackend:
        return cls(path, threads=threads)

    def encode_preprocessed(self, images: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.module(self._torch.from_numpy(images)).numpy().astype(np.float32)


register_backend("onnxruntime", OnnxRuntimeEncoder)
register_backend("tensorrt", TensorRTEncoder)
register_backend("torch", TorchEncoder)


# ---------------------------------------------------------------- locating artifacts


def resolve_onnx(path: str | Path) -> Path:
    """An ``.onnx`` file, or the export folder holding ``encoder.onnx``."""
    path = Path(path)
    candidate = path / ENCODER_ONNX if path.is_dir() else path
    if not candidate.is_file():
        raise ConfigError(f"no encoder ONNX at {candidate} (run `mvld-export onnx` first)")
    if candidate.suffix != ".onnx":
        raise ConfigError(f"{candidate} is not an .onnx file")
    return candidate


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint path, or the export folder whose manifest names the checkpoint."""
    path = Path(path)
    manifest = path / "manifest.json"
    if path.is_dir() and manifest.is_file():
        try:
            return Path(json.loads(manifest.read_text())["checkpoint"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{manifest} is not an mvld-export manifest") from exc
    return path


def find_engine(path: str | Path, gpu: int = 0) -> tuple[Path | None, str]:
    """The engine to use for ``path`` on this GPU, or ``None`` and the reason why not."""
    from mvld.edge.tensorrt_runtime import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason:
        return None, reason
    path = Path(path)
    if path.suffix in ENGINE_SUFFIXES:
        return (path, "engine file given") if path.is_file() else (None, f"{path} is missing")
    from mvld.edge.tensorrt_runtime import engine_for_onnx

    return engine_for_onnx(resolve_onnx(path), gpu=gpu)


def is_checkpoint(path: Path) -> bool:
    """True for a checkpoint (``P``, ``P.json``, ``P.safetensors`` or a run folder)."""
    if path.suffix in CHECKPOINT_SUFFIXES:
        return True
    if path.is_dir():
        return not (path / ENCODER_ONNX).is_file() and (path / "last.json").is_file()
    return not path.exists() and path.with_name(path.name + ".json").is_file()


def _auto(path: Path, threads: int, gpu: int) -> EncoderBackend:
    """Best available: a TensorRT engine, else ONNX Runtime, else torch (checkpoints only)."""
    if is_checkpoint(path):
        log.info(
            "encoder backend auto -> torch: %s is a checkpoint, not an export "
            "(development only; export it with mvld-export onnx for the edge)",
            path,
        )
        return TorchEncoder(path, threads=threads)
    engine, reason = find_engine(path, gpu)
    if engine is not None:
        log.info("encoder backend auto -> tensorrt: %s (%s)", engine, reason)
        return TensorRTEncoder(engine, gpu=gpu)
    log.info("encoder backend auto: not tensorrt (%s)", reason)
    backend = OnnxRuntimeEncoder(path, threads=threads)
    log.info("encoder backend auto -> onnxruntime with %s", backend.providers)
    return backend


def open_encoder(
    path: str | Path, backend: str = "auto", *, threads: int = 1, gpu: int = 0
) -> EncoderBackend:
    """Open the encoder at ``path`` (export folder, .onnx, .engine or checkpoint)."""
    path = Path(path)
    if not path.exists() and not is_checkpoint(path):
        raise ConfigError(f"encoder model {path} does not exist")
    started = time.perf_counter()
    if backend == "auto":
        encoder = _auto(path, threads, gpu)
    else:
        encoder = backend_class(backend).open(path, threads=threads, gpu=gpu)
    log.info(
        "encoder %s opened in %.0f ms (fingerprint %s..., latent %s)",
        encoder.name,
        1e3 * (time.perf_counter() - started),
        encoder.fingerprint[:12],
        "x".join(map(str, encoder.latent_shape)),
    )
    return encoder
