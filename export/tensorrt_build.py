"""Build TensorRT engines from the exported ONNX files, cache them, check parity against ORT.

Written against the TensorRT 10 and 11 Python API: ``trt.Builder``, ``create_network(flags)``
(EXPLICIT_BATCH is gone: networks are always explicit-batch in 10; ``STRONGLY_TYPED`` is
opt-in in 10 and always on in 11), ``trt.OnnxParser``, an optimisation profile over the batch
axis, ``set_memory_pool_limit(MemoryPoolType.WORKSPACE)``, a timing cache kept beside the
engines, and ``build_serialized_network``. Precision:

- TensorRT 10 (JetPack 6): fp32 builds the fp32 ONNX as is (TF32 disabled so fp32 means fp32);
  fp16 sets ``BuilderFlag.FP16`` (weak typing) on the fp32 ONNX, or builds an ONNX already
  converted to fp16 strongly typed.
- TensorRT 11: ``BuilderFlag.FP16`` was removed; networks are strongly typed, so fp16 needs an
  ONNX converted to fp16 first (NVIDIA's ModelOpt AutoCast) and this module says so otherwise.

Engines are cached under an :class:`~mvld.edge.tensorrt_runtime.EngineKey` (part, ONNX
fingerprint, precision, TensorRT version, GPU name and compute capability) and checked against
ONNX Runtime on real frames with a threshold per precision.

UNVERIFIED HERE: no TensorRT or GPU exists on the development and CI machines; everything that
calls ``tensorrt`` is untested, the pure-Python parts (profile defaults, precision plan, cache
key, thresholds) are tested.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx

from mvld.common.errors import ConfigError
from mvld.common.preprocess import PreprocessConfig, preprocess_images
from mvld.edge.tensorrt_runtime import (
    ENGINE_DIR,
    PRECISIONS,
    EngineKey,
    TensorRTError,
    TensorRTRunner,
    cuda_api,
    import_tensorrt,
    tensorrt_major,
    write_engine_sidecar,
)
from mvld.export.onnx_files import onnx_fingerprint, onnx_metadata, ort_session, read_onnx
from mvld.export.parity_frames import frames_from_dataset, frames_from_rig

log = logging.getLogger(__name__)

# Max abs error / max(1, max |reference|) allowed against ONNX Runtime fp32, per precision.
PARITY_THRESHOLDS = {"fp32": 1e-3, "fp16": 2e-2}
DEFAULT_WORKSPACE_MIB = 1024
DEFAULT_VIEWS = 3


class EngineParityError(TensorRTError):
    """The engine's outputs differ from ONNX Runtime beyond the precision's threshold."""


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile of the batch axis."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got "
                f"{self.min}/{self.opt}/{self.max}"
            )


def default_profile(
    views: int,
    min_batch: int | None = None,
    opt_batch: int | None = None,
    max_batch: int | None = None,
) -> BatchProfile:
    """min/opt/max default to 1 / V / 2V (one frame set of V views is the usual batch)."""
    if views < 1:
        raise ConfigError(f"views must be >= 1, got {views}")
    return BatchProfile(min_batch or 1, opt_batch or views, max_batch or 2 * views)


@dataclass(frozen=True)
class PrecisionPlan:
    """How the network is created and configured for a precision on a TensorRT version."""

    strongly_typed: bool  # create_network with STRONGLY_TYPED
    fp16_flag: bool  # BuilderFlag.FP16 (TensorRT 10 only)
    disable_tf32: bool  # fp32 means fp32, not TF32 matmuls/convolutions
    note: str


def precision_plan(
    precision: str, tensorrt_major_version: int, onnx_is_fp16: bool
) -> PrecisionPlan:
    """The build recipe for ``precision``; ``ConfigError`` where it cannot be honoured."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if tensorrt_major_version < 10:
        raise ConfigError(f"TensorRT {tensorrt_major_version}.x is not supported (need 10 or 11)")
    strong = tensorrt_major_version >= 11
    if precision == "fp32":
        if onnx_is_fp16:
            raise ConfigError(
                "fp32 requested but the ONNX holds fp16 weights; use the fp32 "
                "export from mvld-export onnx"
            )
        return PrecisionPlan(strong, False, True, "fp32 ONNX, fp32 kernels (TF32 off)")
    if onnx_is_fp16:
        return PrecisionPlan(True, False, False, "fp16 ONNX built strongly typed")
    if strong:
        raise ConfigError(
            "TensorRT 11 removed BuilderFlag.FP16: convert the ONNX to fp16 first, e.g. "
            "`python -m modelopt.onnx.autocast --onnx_path encoder.onnx --output_path "
            "encoder_fp16.onnx --low_precision_type fp16 --keep_io_types` (NVIDIA ModelOpt), "
            "then build that file with --precision fp16"
        )
    return PrecisionPlan(False, True, False, "fp32 ONNX with BuilderFlag.FP16 (TensorRT 10)")


def onnx_is_fp16(model: onnx.ModelProto) -> bool:
    """True when the graph's weights are mostly fp16 (a converted model)."""
    types = [t.data_type for t in model.graph.initializer]
    fp16 = sum(t == onnx.TensorProto.FLOAT16 for t in types)
    return fp16 > 0 and fp16 >= sum(t == onnx.TensorProto.FLOAT for t in types)


def parity_threshold(precision: str, override: float | None = None) -> float:
    """The relative max-error threshold for ``precision`` (or the user's override)."""
    if override is not None:
        if not override >= 0:
            raise ConfigError(f"tolerance must be >= 0, got {override}")
        return override
    return PARITY_THRESHOLDS[precision]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(1, max |want|): scale-aware, exact near zero."""
    scale = max(1.0, float(np.max(np.abs(want))))
    return float(np.max(np.abs(got.astype(np.float64) - want))) / scale


def views_of(metadata: dict[str, str]) -> int:
    """V from the export's metadata (the score network config), else the default 3."""
    if "mvld.score_net" in metadata:
        return int(json.loads(metadata["mvld.score_net"])["num_views"])
    log.info("no score network metadata: assuming %d views for the batch profile", DEFAULT_VIEWS)
    return DEFAULT_VIEWS


@dataclass(frozen=True)
class BuildOptions:
    """Knobs of ``mvld-export trt``."""

    precision: str = "fp16"
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    views: int | None = None  # None: from the ONNX metadata
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    cache_dir: Path | None = None  # None: ``engines/`` beside the ONNX
    tolerance: float | None = None  # None: PARITY_THRESHOLDS[precision]
    frames: Path | None = None  # dataset for the parity frames; None: the simulated rig
    gpu: int = 0
    force: bool = False  # rebuild even when the cache holds the engine

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.workspace_mib < 1:
            raise ConfigError("workspace must be at least 1 MiB")


@dataclass(frozen=True)
class BuildResult:
    """The engine and what was measured."""

    engine: Path
    key: EngineKey
    cached: bool
    build_seconds: float
    parity_error: float
    threshold: float


# ---------------------------------------------------------------- building (needs TensorRT)


def _network_flags(trt: ModuleType, plan: PrecisionPlan) -> int:
    if plan.strongly_typed:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # TensorRT 10: explicit batch is the only mode; EXPLICIT_BATCH is not needed


def _parse(trt: ModuleType, network: Any, logger: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors)}")
    return parser


def _configure(
    trt: ModuleType,
    builder: Any,
    network: Any,
    plan: PrecisionPlan,
    profile: BatchProfile,
    workspace_mib: int,
    timing: bytes,
) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.disable_tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    batch_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        batch_profile.set_shape(
            tensor.name, (profile.min, *rest), (profile.opt, *rest), (profile.max, *rest)
        )
    config.add_optimization_profile(batch_profile)
    config.set_timing_cache(config.create_timing_cache(timing), False)
    return config


def build_serialized(
    trt: ModuleType,
    onnx_path: Path,
    plan: PrecisionPlan,
    profile: BatchProfile,
    workspace_mib: int,
    timing_path: Path,
) -> bytes:
    """Parse and build; the timing cache at ``timing_path`` is read and updated."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plan))
    _parser = _parse(trt, network, logger, onnx_path)  # must outlive the build
    timing = timing_path.read_bytes() if timing_path.is_file() else b""
    config = _configure(trt, builder, network, plan, profile, workspace_mib, timing)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(
            f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)"
        )
    timing_path.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


# ---------------------------------------------------------------- parity against ORT


def parity_feeds(
    part: str,
    onnx_path: Path,
    metadata: dict[str, str],
    views: int,
    frames: Path | None,
    profile: BatchProfile,
) -> list[np.ndarray]:
    """Inputs of ``profile.opt`` rows: real frames (encoder), their latents (decoder), or
    standard-normal latents with per-view times (score network)."""
    sets = -(-profile.opt // views)
    preprocess = PreprocessConfig.from_dict(json.loads(metadata["mvld.preprocess"]))
    if part in ("encoder", "decoder"):
        raw = (
            frames_from_dataset(frames, sets, views)
            if frames is not None
            else frames_from_rig(preprocess.image_size, sets, views, seed=0)
        )
        images = preprocess_images(raw, preprocess)[: profile.opt]
        if part == "encoder":
            return [images]
        encoder = onnx_path.with_name("encoder.onnx")
        return [ort_session(str(encoder)).run(None, {"images": images})[0]]
    latent_dim = json.loads(metadata["mvld.autoencoder"])["latent_dim"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((profile.opt, views, latent_dim)).astype(np.float32)
    tau = rng.uniform(1e-3, 1.0, (profile.opt, views)).astype(np.float32)
    tau[:, 0] = 0.0
    return [x, tau]


def check_engine_parity(
    engine: Path, onnx_path: Path, feeds: list[np.ndarray], gpu: int, threshold: float
) -> float:
    """Relative max error of the engine against ONNX Runtime fp32; ``TensorRTError`` above."""
    session = ort_session(str(onnx_path))
    names = [i.name for i in session.get_inputs()]
    reference = session.run(None, dict(zip(names, feeds, strict=True)))[0]
    runner = TensorRTRunner(engine, gpu=gpu)
    try:
        got = runner.run(feeds)[0]
        one = runner.run([f[:1] for f in feeds])[0]  # the smallest batch of the profile
    finally:
        runner.close()
    error = max(relative_error(got, reference), relative_error(one, reference[:1]))
    if not np.isfinite(error) or error > threshold:
        raise EngineParityError(
            f"{engine.name}: TensorRT differs from ONNX Runtime by relative "
            f"max error {error:.3g} > threshold {threshold:.3g}"
        )
    return error


# ---------------------------------------------------------------- the command


def _build_into_cache(
    trt: ModuleType,
    onnx_path: Path,
    engine: Path,
    key: EngineKey,
    plan: PrecisionPlan,
    profile: BatchProfile,
    options: BuildOptions,
    metadata: dict[str, str],
) -> None:
    """Build, then write the engine atomically with its sidecar."""
    log.info(
        "building %s: %s; batch profile %s; workspace %d MiB",
        key.stem,
        plan.note,
        profile,
        options.workspace_mib,
    )
    major, minor = key.gpu.compute_capability
    timing = engine.parent / f"timing-trt{key.tensorrt_version}-sm{major}{minor}.cache"
    data = build_serialized(trt, onnx_path, plan, profile, options.workspace_mib, timing)
    tmp = engine.with_name(engine.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, engine)
    write_engine_sidecar(
        engine,
        key,
        metadata,
        {
            "onnx": str(onnx_path),
            "profile": vars(profile),
            "plan": vars(plan),
            "workspace_mib": options.workspace_mib,
        },
    )


def build_engine(onnx_path: str | Path, options: BuildOptions) -> BuildResult:
    """Build (or reuse from the cache) the engine for ``onnx_path`` and check its parity."""
    onnx_path = Path(onnx_path)
    model = read_onnx(onnx_path)
    metadata = {k: v for k, v in onnx_metadata(model).items() if k.startswith("mvld.")}
    if "mvld.part" not in metadata:
        raise ConfigError(f"{onnx_path} was not exported by mvld-export onnx (no mvld.part)")
    fingerprint = onnx_fingerprint(onnx_path)
    trt = import_tensorrt()
    cuda = cuda_api()
    if options.gpu >= cuda.device_count():
        raise TensorRTError(f"no CUDA GPU {options.gpu} on this machine")
    plan = precision_plan(options.precision, tensorrt_major(trt), onnx_is_fp16(model))
    views = options.views or views_of(metadata)
    profile = default_profile(views, options.min_batch, options.opt_batch, options.max_batch)
    key = EngineKey(
        metadata["mvld.part"],
        fingerprint,
        options.precision,
        trt.__version__,
        cuda.gpu(options.gpu),
    )
    cache_dir = options.cache_dir or onnx_path.parent / ENGINE_DIR
    cache_dir.mkdir(parents=True, exist_ok=True)
    engine = key.engine_path(cache_dir)
    cached = engine.is_file() and not options.force
    started = time.perf_counter()
    if cached:
        log.info("engine cache hit: %s", engine)
    else:
        _build_into_cache(trt, onnx_path, engine, key, plan, profile, options, metadata)
    seconds = time.perf_counter() - started
    threshold = parity_threshold(options.precision, options.tolerance)
    feeds = parity_feeds(key.part, onnx_path, metadata, views, options.frames, profile)
    error = check_engine_parity(engine, onnx_path, feeds, options.gpu, threshold)
    log.info(
        "%s: TensorRT vs ONNX Runtime relative max error %.3g (threshold %.3g)",
        engine.name,
        error,
        threshold,
    )
    return BuildResult(engine, key, cached, seconds, error, threshold)
