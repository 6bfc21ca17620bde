"""Export the encoder, decoder and score network to self-contained ONNX files, parity-checked.

Each graph has a dynamic batch axis, is written as one file (no external data) beside a
``.sha256`` file, and carries in its ``metadata_props`` everything a consumer needs: which part
it is, the model's encoder fingerprint (the value the edge puts in every wire message), the
preprocessing config, the architecture and its own fingerprint. Before a file is written, ONNX
Runtime runs it on real inputs (camera frames from a dataset or the simulated rig, their
latents, and noised standardised latents for the score network) and the maximum absolute
difference to torch must stay within the tolerance, otherwise :class:`ParityError`. The ONNX
fingerprint is defined in ``mvld.export.onnx_files``. Beside the graphs, ``model.json`` (the
*model descriptor*, :data:`DESCRIPTOR_FILE`) tells a wire client written in any language what
the receiver of this model accepts: the encoder fingerprint in both wire forms, the latent
shape and dtypes, the camera ids, the image size and the preprocessing (docs/PROTOCOL.md).

Exporter: torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, the default since
torch 2.9, needs onnxscript) by default; the legacy TorchScript exporter stays selectable
(``exporter="torchscript"``, ~15x faster to run, deprecated by torch). Both pass parity here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from mvld.common.errors import ConfigError, MVLDError
from mvld.common.preprocess import PreprocessConfig, preprocess_images
from mvld.common.wire import (
    DEFAULT_LATENT_DTYPE,
    FINGERPRINT_BYTES,
    LATENT_DTYPES,
    SUPPORTED_VERSIONS,
    wire_fingerprint,
)
from mvld.edge.encoder import ORT_ERRORS
from mvld.export.onnx_files import (
    DEFAULT_OPSET,
    DEFAULT_TOLERANCE,
    EXPORT_FORMAT_VERSION,
    EXPORTERS,
    FINGERPRINT_KEY,
    GRAPHS,
    GraphSpec,
    model_fingerprint,
    ort_session,
    set_metadata,
)
from mvld.export.parity_frames import frames_from_dataset, frames_from_rig
from mvld.model.autoencoder import AutoencoderConfig
from mvld.model.checkpoint import (
    LatentStats,
    load_autoencoder,
    load_mvld_model,
    read_checkpoint,
)
from mvld.model.sde import VPSDE

log = logging.getLogger(__name__)

MAX_BATCH = 4096  # upper bound of the dynamic batch axis (dynamo needs one)
DESCRIPTOR_FILE = "model.json"
DESCRIPTOR_FORMAT, DESCRIPTOR_VERSION = "mvld-model-descriptor", 1


class ParityError(MVLDError):
    """ONNX Runtime and torch disagree beyond the tolerance (or the graph does not run)."""


class ExportError(MVLDError):
    """torch could not turn a module into an ONNX graph (e.g. an opset lacks an operator)."""


@dataclass(frozen=True)
class ExportedGraph:
    """What ``export_model`` wrote for one part."""

    part: str
    path: str
    fingerprint: str  # sha256 of the model without its fingerprint entry
    file_sha256: str  # sha256 of the file bytes (``sha256sum`` compatible)
    max_abs_error: float  # ORT vs torch on the parity inputs
    parity_batches: tuple[int, ...]
    opset: int


@dataclass
class ParityInputs:
    """Real inputs for the parity check, as float32 numpy arrays."""

    images: np.ndarray  # [N, 3, H, W] preprocessed camera frames
    latents: np.ndarray  # [N, D] encoder outputs of those frames
    noisy: np.ndarray | None  # [B, V, D] noised standardised latents (score network)
    tau: np.ndarray | None  # [B, V] per-view times, observed views 0


# ---------------------------------------------------------------- torch -> ONNX


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporters' deprecation notices and "torchvision is not installed" lines."""
    torch_onnx_log = logging.getLogger("torch.onnx")
    previous = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (
                DeprecationWarning,
                FutureWarning,
                UserWarning,
                torch.jit.TracerWarning,
            ):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        torch_onnx_log.setLevel(previous)


@contextmanager
def _export_errors(part: str, opset: int, exporter: str) -> Iterator[None]:
    """torch's exporter errors -> ``ExportError`` naming the part, opset and exporter."""
    try:
        yield
    except torch.onnx.errors.OnnxExporterError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"{part}: the {exporter} exporter failed at opset {opset}: {first} "
            "(try another --opset or --exporter)"
        ) from exc


def _to_onnx_bytes(
    module: nn.Module, example: tuple[torch.Tensor, ...], spec: GraphSpec, opset: int, exporter: str
) -> bytes:
    """Trace ``module`` into an in-memory ONNX model with a dynamic batch axis."""
    names = (*spec.inputs, *spec.outputs)
    # both exporters write to a path (torch documents no file objects); the bytes are read back
    with (
        tempfile.TemporaryDirectory(prefix="mvld-export-") as tmp,
        _quiet_exporter(),
        _export_errors(spec.part, opset, exporter),
    ):
        path = Path(tmp) / f"{spec.part}.onnx"
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            program = torch.onnx.export(
                module,
                example,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_shapes=tuple({0: batch} for _ in spec.inputs),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
            if program is None:
                raise ExportError(f"{spec.part}: the dynamo exporter returned no program")
            program.save(path, external_data=False)
        else:
            torch.onnx.export(
                module,
                example,
                path,
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes={n: {0: "batch"} for n in names},
                opset_version=opset,
                dynamo=False,
            )
        return path.read_bytes()


def check_parity(
    model_bytes: bytes,
    module: nn.Module,
    inputs: list[tuple[np.ndarray, ...]],
    spec: GraphSpec,
    tolerance: float,
) -> float:
    """Max abs error of ORT vs torch over ``inputs``; raise ``ParityError`` above ``tolerance``."""
    try:
        session = ort_session(model_bytes)
    except ORT_ERRORS as exc:
        raise ParityError(f"{spec.part}: ONNX Runtime cannot load the graph: {exc}") from exc
    worst = 0.0
    for arrays in inputs:
        feeds = dict(zip(spec.inputs, arrays, strict=True))
        try:
            got = session.run(list(spec.outputs), feeds)[0]
        except ORT_ERRORS as exc:
            raise ParityError(f"{spec.part}: ONNX Runtime failed to run: {exc}") from exc
        with torch.no_grad():
            want = module(*(torch.from_numpy(a) for a in arrays)).numpy()
        if got.shape != want.shape:
            raise ParityError(f"{spec.part}: ONNX output shape {got.shape} != torch {want.shape}")
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - want))))
    if not np.isfinite(worst) or worst > tolerance:
        raise ParityError(
            f"{spec.part}: ONNX Runtime differs from torch by max abs error "
            f"{worst:.3g} > tolerance {tolerance:.3g}"
        )
    return worst


# ---------------------------------------------------------------- parity inputs


def parity_inputs(
    encoder: nn.Module,
    preprocess: PreprocessConfig,
    views: int,
    stats: LatentStats | None,
    sde: VPSDE | None,
    *,
    frames: Path | None,
    sets: int = 4,
    seed: int = 0,
) -> ParityInputs:
    """Real frames -> preprocessed images, their latents and noised latents for the score net."""
    if frames is not None:
        raw = frames_from_dataset(frames, sets, views)
    else:
        raw = frames_from_rig(preprocess.image_size, sets, views, seed)
    images = preprocess_images(raw, preprocess)
    with torch.no_grad():
        latents = encoder(torch.from_numpy(images))
    noisy = tau = None
    if stats is not None and sde is not None:
        generator = torch.Generator().manual_seed(seed)
        usable = latents[: len(latents) // views * views].view(-1, views, latents.shape[1])
        z = stats.standardise(usable)
        t = torch.rand(z.shape[:2], generator=generator) * (1 - 1e-3) + 1e-3
        t[:, 0] = 0.0  # view 0 observed (clean), the others noised: the conditional case
        alpha, sigma = sde.marginal_coeffs(t)
        noise = torch.randn(z.shape, generator=generator)
        noisy_z = alpha[..., None].float() * z + sigma[..., None].float() * noise
        noisy, tau = noisy_z.numpy(), t.numpy().astype(np.float32)
    return ParityInputs(images=images, latents=latents.numpy(), noisy=noisy, tau=tau)


def _batches(arrays: tuple[np.ndarray, ...]) -> list[tuple[np.ndarray, ...]]:
    """The full batch and a batch of one: proves the batch axis is really dynamic."""
    return [arrays, tuple(a[:1] for a in arrays)]


# ---------------------------------------------------------------- the whole model


@dataclass(frozen=True)
class ExportOptions:
    """Knobs of ``mvld-export onnx`` (resolved once, then passed down as arguments)."""

    opset: int = DEFAULT_OPSET
    tolerance: float = DEFAULT_TOLERANCE
    exporter: str = "dynamo"
    frames: Path | None = None  # dataset folder for the parity frames; None: the simulated rig
    parity_sets: int = 4  # frame sets used for the parity check
    parts: tuple[str, ...] = tuple(GRAPHS)

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        if not 13 <= self.opset <= 23:
            raise ConfigError(f"opset {self.opset} outside the supported range 13..23")
        if not self.tolerance >= 0:
            raise ConfigError(f"tolerance must be >= 0, got {self.tolerance}")
        unknown = set(self.parts) - set(GRAPHS)
        if unknown or not self.parts:
            raise ConfigError(f"unknown parts {sorted(unknown)}; valid: {list(GRAPHS)}")
        if self.parity_sets < 1:
            raise ConfigError("parity_sets must be >= 1")


@dataclass
class _LoadedModel:
    """The torch modules and descriptions of a checkpoint of either kind."""

    encoder: nn.Module
    decoder: nn.Module
    score_net: nn.Module | None
    preprocess: PreprocessConfig
    fingerprint: str
    views: int
    description: dict[str, str]  # metadata shared by every exported part
    latent_shape: tuple[int, ...]  # one view's latent, AutoencoderConfig.latent_shape
    stats: LatentStats | None = None
    sde: VPSDE | None = None


def _load(checkpoint: Path) -> _LoadedModel:
    config, _ = read_checkpoint(checkpoint)
    shared = {"mvld.autoencoder": json.dumps(config["autoencoder"], sort_keys=True)}
    latent_shape = AutoencoderConfig.from_dict(config["autoencoder"]).latent_shape
    if config["kind"] == "autoencoder":
        autoencoder, preprocess, fingerprint = load_autoencoder(checkpoint)
        return _LoadedModel(
            autoencoder.encoder,
            autoencoder.decoder,
            None,
            preprocess,
            fingerprint,
            3,
            shared,
            latent_shape,
        )
    model = load_mvld_model(checkpoint)
    shared |= {
        "mvld.score_net": json.dumps(model.score_net.config.to_dict(), sort_keys=True),
        "mvld.sde": json.dumps(model.sde.to_dict(), sort_keys=True),
        "mvld.latent_stats": json.dumps(model.latent_stats.to_dict()),
    }
    return _LoadedModel(
        model.autoencoder.encoder,
        model.autoencoder.decoder,
        model.score_net,
        model.preprocess,
        model.fingerprint,
        model.num_views,
        shared,
        latent_shape,
        model.latent_stats,
        model.sde,
    )


def _part_arrays(part: str, inputs: ParityInputs) -> tuple[np.ndarray, ...]:
    if part == "encoder":
        return (inputs.images,)
    if part == "decoder":
        return (inputs.latents,)
    if inputs.noisy is None or inputs.tau is None:
        raise ExportError(f"{part}: this checkpoint holds no score network to feed")
    return (inputs.noisy, inputs.tau)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def export_part(
    loaded: _LoadedModel, part: str, inputs: ParityInputs, out_dir: Path, options: ExportOptions
) -> ExportedGraph:
    """Export one part, check ORT parity on the final bytes, then write it and its sha256."""
    spec = GRAPHS[part]
    module = {"encoder": loaded.encoder, "decoder": loaded.decoder, "score_net": loaded.score_net}[
        part
    ]
    if module is None:
        raise ExportError(
            f"{part}: the checkpoint has none (an autoencoder checkpoint holds "
            "only the encoder and the decoder)"
        )
    arrays = _part_arrays(part, inputs)
    example = tuple(torch.from_numpy(a[:2]) for a in arrays)
    proto = onnx.load_model_from_string(
        _to_onnx_bytes(module, example, spec, options.opset, options.exporter)
    )
    if any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        raise ExportError(f"{part}: the exported graph keeps weights outside the file")
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset != options.opset:
        log.warning(
            "%s: opset %d requested, the %s exporter wrote opset %d",
            part,
            options.opset,
            options.exporter,
            opset,
        )
    proto.doc_string = f"MVLD {part}: inputs {spec.inputs} -> outputs {spec.outputs}"
    set_metadata(
        proto,
        {
            **loaded.description,
            "mvld.format_version": str(EXPORT_FORMAT_VERSION),
            "mvld.part": part,
            "mvld.encoder_fingerprint": loaded.fingerprint,
            "mvld.preprocess": json.dumps(loaded.preprocess.to_dict(), sort_keys=True),
            "mvld.opset": str(opset),
            "mvld.exporter": options.exporter,
            "mvld.torch_version": torch.__version__,
            "mvld.parity_tolerance": repr(options.tolerance),
        },
    )
    fingerprint = model_fingerprint(proto)
    set_metadata(proto, {FINGERPRINT_KEY: fingerprint})
    data = proto.SerializeToString(deterministic=True)
    error = check_parity(data, module, _batches(arrays), spec, options.tolerance)
    path = out_dir / f"{part}.onnx"
    _write_atomic(path, data)
    _write_atomic(path.with_name(path.name + ".sha256"), f"{fingerprint}\n".encode())
    batches = tuple(len(a[0]) for a in _batches(arrays))
    log.info(
        "%s: %s (opset %d, %s exporter), ORT vs torch max abs error %.3g on batches %s",
        part,
        path,
        opset,
        options.exporter,
        error,
        batches,
    )
    return ExportedGraph(
        part, str(path), fingerprint, hashlib.sha256(data).hexdigest(), error, batches, opset
    )


def export_model(
    checkpoint: str | Path,
    out_dir: str | Path,
    options: ExportOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[ExportedGraph]:
    """Export every requested part of a checkpoint to ``out_dir`` plus ``manifest.json``."""
    options = options or ExportOptions()
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    report = progress or log.info
    report(f"loading checkpoint {checkpoint}")
    loaded = _load(checkpoint)
    parts = [p for p in options.parts if p != "score_net" or loaded.score_net is not None]
    if len(parts) < len(options.parts):
        report("the checkpoint holds an autoencoder only: the score network is not exported")
    source = options.frames or "the simulated rig"
    report(f"parity inputs: {options.parity_sets} frame sets from {source}")
    inputs = parity_inputs(
        loaded.encoder,
        loaded.preprocess,
        loaded.views,
        loaded.stats,
        loaded.sde,
        frames=options.frames,
        sets=options.parity_sets,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = []
    for part in parts:
        report(f"exporting {part} ({options.exporter} exporter, opset {options.opset})")
        exported.append(export_part(loaded, part, inputs, out_dir, options))
        report(
            f"{part}: max abs error {exported[-1].max_abs_error:.3g} "
            f"(tolerance {options.tolerance:.3g}) -> {exported[-1].path}"
        )
    _write_manifest(out_dir, checkpoint, loaded, exported, options)
    report(f"model descriptor -> {write_descriptor(out_dir, loaded, exported)}")
    return exported


def model_descriptor(loaded: _LoadedModel, exported: list[ExportedGraph]) -> dict[str, Any]:
    """What a wire client needs to know of this model, as plain JSON (docs/PROTOCOL.md 3.1).

    The camera ids are the receiver's defaults (``cam0`` ... in view order; an operator may
    rename them with ``mvld-receiver --cameras``, the edge's ``--cams`` order matches views).
    """
    shape = [int(d) for d in loaded.latent_shape]
    elements = int(np.prod(shape))
    files = {
        g.part: {
            "file": Path(g.path).name,
            "file_sha256": g.file_sha256,
            "onnx_fingerprint": g.fingerprint,
        }
        for g in exported
    }
    return {
        "format": DESCRIPTOR_FORMAT,
        "format_version": DESCRIPTOR_VERSION,
        "protocol_versions": list(SUPPORTED_VERSIONS),
        "encoder_fingerprint": loaded.fingerprint,
        "wire_fingerprint": wire_fingerprint(loaded.fingerprint),
        "wire_fingerprint_bytes": FINGERPRINT_BYTES,
        "num_views": loaded.views,
        "cameras": [f"cam{i}" for i in range(loaded.views)],
        "latent": {
            "shape": shape,
            "elements": elements,
            "v1_shape": [elements],
            "dtypes": sorted(LATENT_DTYPES),
            "default_dtype": DEFAULT_LATENT_DTYPE,
        },
        "image": {
            "height": loaded.preprocess.height,
            "width": loaded.preprocess.width,
            "channels": 3,
            "dtype": "uint8",
        },
        "preprocess": loaded.preprocess.to_dict(),
        "graphs": files,
    }


def write_descriptor(out_dir: Path, loaded: _LoadedModel, exported: list[ExportedGraph]) -> Path:
    """Write ``model.json`` beside the graphs (atomically, like every other export file)."""
    path = Path(out_dir) / DESCRIPTOR_FILE
    text = json.dumps(model_descriptor(loaded, exported), indent=1) + "\n"
    _write_atomic(path, text.encode())
    return path


def _write_manifest(
    out_dir: Path,
    checkpoint: Path,
    loaded: _LoadedModel,
    exported: list[ExportedGraph],
    options: ExportOptions,
) -> Path:
    manifest: dict[str, Any] = {
        "format": "mvld-onnx-export",
        "format_version": EXPORT_FORMAT_VERSION,
        "checkpoint": str(checkpoint),
        "encoder_fingerprint": loaded.fingerprint,
        "preprocess": loaded.preprocess.to_dict(),
        "num_views": loaded.views,
        "options": {**asdict(options), "frames": str(options.frames) if options.frames else None},
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        "graphs": {g.part: {**asdict(g), "path": Path(g.path).name} for g in exported},
    }
    path = out_dir / "manifest.json"
    _write_atomic(path, json.dumps(manifest, indent=1).encode())
    return path
