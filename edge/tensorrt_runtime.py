"""TensorRT engine execution for the edge: deserialise once, reuse pinned buffers on a stream.

Written against the TensorRT 10/11 Python API (named I/O tensors): ``Runtime
.deserialize_cuda_engine``, ``IExecutionContext.set_input_shape`` / ``set_tensor_address`` /
``execute_async_v3(stream)``. CUDA memory comes from cuda-python (``cuda.bindings.runtime``,
which NVIDIA's samples use since TensorRT 10.14; the older ``from cuda import cudart`` layout is
accepted too) or, as a fallback, pycuda (what many Jetson images carry). Host buffers are
page-locked and sized for the engine's maximum batch, allocated once and reused by every call.

Engines are tied to GPU, compute capability and TensorRT version: :class:`EngineKey` names a
cached engine by all of them plus precision and the ONNX fingerprint (as jetson-inference and
Holoscan do), and a JSON sidecar beside each engine carries the export's ``mvld.*`` metadata.

UNVERIFIED HERE: the development and CI machines have neither TensorRT nor a GPU (PyPI holds
only placeholder ``tensorrt`` packages), so the code below that touches ``tensorrt``, cuda-python
or pycuda has not been executed; the pure-Python parts (keys, sidecars, lookup) are tested.
"""

from __future__ import annotations

import ctypes
import json
import logging
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from mvld.common.errors import ConfigError, MVLDError

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32")  # preference order when the edge picks a cached engine
ENGINE_DIR = "engines"  # default cache folder beside the ONNX file


class TensorRTError(MVLDError):
    """TensorRT or CUDA is missing, or an engine failed to load or run."""


# ---------------------------------------------------------------- engine identity


@dataclass(frozen=True)
class GpuIdentity:
    """What an engine is tied to besides TensorRT: the GPU model and compute capability."""

    name: str
    compute_capability: tuple[int, int]


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on; two engines with one key are interchangeable."""

    part: str
    onnx_fingerprint: str
    precision: str
    tensorrt_version: str
    gpu: GpuIdentity

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not re.fullmatch(r"[0-9a-f]{16,64}", self.onnx_fingerprint):
            raise ConfigError(f"ONNX fingerprint {self.onnx_fingerprint!r} is not a hex digest")

    @property
    def stem(self) -> str:
        """File-name stem: readable and unique per key."""
        major, minor = self.gpu.compute_capability
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu.name.lower()).strip("-") or "gpu"
        return (
            f"{self.part}-{self.onnx_fingerprint[:16]}-{self.precision}"
            f"-trt{self.tensorrt_version}-sm{major}{minor}-{gpu}"
        )

    def engine_path(self, cache_dir: str | Path) -> Path:
        """Where the engine with this key lives in ``cache_dir``."""
        return Path(cache_dir) / f"{self.stem}.engine"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in the sidecar)."""
        data = asdict(self)
        data["gpu"]["compute_capability"] = list(self.gpu.compute_capability)
        return data


def sidecar_path(engine: str | Path) -> Path:
    """``X.engine`` -> ``X.engine.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def write_engine_sidecar(
    engine: Path, key: EngineKey, metadata: dict[str, str], extra: dict[str, Any]
) -> Path:
    """The sidecar: the key, the export's ``mvld.*`` metadata and build facts."""
    path = sidecar_path(engine)
    path.write_text(json.dumps({"key": key.to_dict(), "metadata": metadata, **extra}, indent=1))
    return path


def read_engine_sidecar(engine: str | Path) -> dict[str, str]:
    """The ``mvld.*`` metadata of the ONNX an engine was built from."""
    path = sidecar_path(engine)
    if not path.is_file():
        raise ConfigError(
            f"{engine}: no sidecar {path.name} (engines must be built by "
            "mvld-export trt, which writes it)"
        )
    try:
        metadata = json.loads(path.read_text())["metadata"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not an engine sidecar: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ConfigError(f"{path}: 'metadata' must be a map")
    return {str(k): str(v) for k, v in metadata.items()}


def onnx_fingerprint_beside(onnx_path: Path) -> str:
    """The ONNX fingerprint from the ``.sha256`` file that ``mvld-export onnx`` wrote."""
    path = onnx_path.with_name(onnx_path.name + ".sha256")
    if not path.is_file():
        raise ConfigError(f"{path} is missing (export with mvld-export onnx)")
    return path.read_text().split()[0]


def find_cached_engine(
    onnx_path: Path,
    part: str,
    tensorrt_version: str,
    gpu: GpuIdentity,
    cache_dir: Path | None = None,
) -> Path | None:
    """The cached engine for this ONNX, TensorRT and GPU, fp16 preferred; ``None`` if none."""
    cache_dir = cache_dir or onnx_path.parent / ENGINE_DIR
    fingerprint = onnx_fingerprint_beside(onnx_path)
    for precision in PRECISIONS:
        path = EngineKey(part, fingerprint, precision, tensorrt_version, gpu).engine_path(cache_dir)
        if path.is_file():
            return path
    return None


# ---------------------------------------------------------------- TensorRT and CUDA imports


def import_tensorrt() -> ModuleType:
    """``tensorrt``, or ``TensorRTError`` saying why it cannot be used here."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTError(
            f"TensorRT is not installed ({exc}); on Jetson it comes with "
            "JetPack (python3-libnvinfer), on x86 from NVIDIA's wheels"
        ) from exc
    if not hasattr(tensorrt, "Builder"):
        raise TensorRTError(
            "the installed 'tensorrt' is a placeholder package without the TensorRT libraries"
        )
    return tensorrt


def tensorrt_major(trt: ModuleType) -> int:
    """Major version of an imported ``tensorrt``."""
    return int(str(trt.__version__).split(".")[0])


class CudaPython:
    """CUDA runtime calls through cuda-python (``cuda.bindings.runtime``)."""

    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6 layout
        self.rt = cudart

    def _check(self, result: tuple) -> Any:
        err, *values = result
        if err != self.rt.cudaError_t.cudaSuccess:
            raise TensorRTError(f"CUDA runtime error {err}")
        return values[0] if len(values) == 1 else values

    def device_count(self) -> int:
        return int(self._check(self.rt.cudaGetDeviceCount()))

    def gpu(self, index: int) -> GpuIdentity:
        props = self._check(self.rt.cudaGetDeviceProperties(index))
        name = props.name.split(b"\0")[0].decode() if isinstance(props.name, bytes) else props.name
        return GpuIdentity(str(name), (int(props.major), int(props.minor)))

    def activate(self, index: int) -> None:
        self._check(self.rt.cudaSetDevice(index))

    def release(self) -> None:
        """Nothing to pop: the runtime API binds the primary context per thread."""

    def stream(self) -> Any:
        return self._check(self.rt.cudaStreamCreate())

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def host_empty(self, count: int, dtype: np.dtype) -> np.ndarray:
        nbytes = max(1, count * dtype.itemsize)
        pointer = self._check(self.rt.cudaMallocHost(nbytes))
        raw = (ctypes.c_byte * nbytes).from_address(int(pointer))
        return np.frombuffer(memoryview(raw), dtype=dtype, count=count)

    def device_alloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(1, nbytes))))

    def htod_async(self, device: int, host: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(device, host.ctypes.data, host.nbytes, kind, stream))

    def dtoh_async(self, host: np.ndarray, device: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, device, host.nbytes, kind, stream))

    def synchronize(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream))

    def free(self, host: list[np.ndarray], device: list[int], stream: Any) -> None:
        for array in host:
            self._check(self.rt.cudaFreeHost(array.ctypes.data))
        for pointer in device:
            self._check(self.rt.cudaFree(pointer))
        self._check(self.rt.cudaStreamDestroy(stream))


class PyCuda:
    """The same calls through pycuda (primary context pushed around every use)."""

    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as driver

        driver.init()
        self.driver = driver
        self._context: Any = None

    def device_count(self) -> int:
        return int(self.driver.Device.count())

    def gpu(self, index: int) -> GpuIdentity:
        device = self.driver.Device(index)
        return GpuIdentity(str(device.name()), tuple(device.compute_capability()))

    def activate(self, index: int) -> None:
        if self._context is None:
            self._context = self.driver.Device(index).retain_primary_context()
        self._context.push()

    def release(self) -> None:
        self.driver.Context.pop()

    def stream(self) -> Any:
        return self.driver.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def host_empty(self, count: int, dtype: np.dtype) -> np.ndarray:
        return self.driver.pagelocked_empty(max(1, count), dtype)[:count]

    def device_alloc(self, nbytes: int) -> Any:
        return self.driver.mem_alloc(max(1, nbytes))

    def htod_async(self, device: Any, host: np.ndarray, stream: Any) -> None:
        self.driver.memcpy_htod_async(device, host, stream)

    def dtoh_async(self, host: np.ndarray, device: Any, stream: Any) -> None:
        self.driver.memcpy_dtoh_async(host, device, stream)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def free(self, host: list[np.ndarray], device: list[Any], stream: Any) -> None:
        for allocation in device:
            allocation.free()
        host.clear()


def cuda_api() -> CudaPython | PyCuda:
    """cuda-python if importable (preferred), else pycuda; ``TensorRTError`` if neither."""
    errors = []
    for api in (CudaPython, PyCuda):
        try:
            return api()
        except ImportError as exc:
            errors.append(f"{api.name}: {exc}")
    raise TensorRTError(
        "no CUDA Python bindings: install cuda-python (pip install "
        f"cuda-python) or pycuda ({'; '.join(errors)})"
    )


def tensorrt_unavailable_reason(gpu: int = 0) -> str | None:
    """Why TensorRT cannot run here (no package, no CUDA bindings, no GPU), or ``None``."""
    try:
        import_tensorrt()
        cuda = cuda_api()
        count = cuda.device_count()
    except TensorRTError as exc:
        return str(exc)
    if gpu >= count:
        return f"GPU {gpu} requested but {count} CUDA device(s) present"
    return None


def engine_for_onnx(
    onnx_path: Path, gpu: int = 0, part: str = "encoder", cache_dir: Path | None = None
) -> tuple[Path | None, str]:
    """The cached engine for ``onnx_path`` on this GPU and TensorRT, or ``None`` and why."""
    trt = import_tensorrt()
    identity = cuda_api().gpu(gpu)
    engine = find_cached_engine(onnx_path, part, trt.__version__, identity, cache_dir)
    if engine is None:
        return None, (
            f"no engine for {onnx_path.name} built with TensorRT {trt.__version__} on "
            f"{identity.name}; build one on this device with `mvld-export trt "
            f"--onnx {onnx_path}`"
        )
    return engine, f"cached engine for TensorRT {trt.__version__} on {identity.name}"


# ---------------------------------------------------------------- execution


@dataclass
class _Binding:
    """One I/O tensor: its name, dtype, pinned host buffer and device buffer."""

    name: str
    dtype: np.dtype
    host: np.ndarray  # flat, sized for the maximum batch
    device: Any  # device pointer (int) or pycuda allocation


class TensorRTRunner:
    """Runs a serialized engine: inputs ``[n, ...]`` numpy -> outputs ``[n, ...]`` float32."""

    def __init__(self, engine_path: str | Path, gpu: int = 0) -> None:
        trt = import_tensorrt()
        self.cuda = cuda_api()
        self.gpu = gpu
        self.stream: Any = None
        self.inputs: list[_Binding] = []
        self.outputs: list[_Binding] = []
        self._lock = threading.Lock()
        self.cuda.activate(gpu)
        try:
            self._load(trt, Path(engine_path))
        finally:
            self.cuda.release()

    def _load(self, trt: ModuleType, path: Path) -> None:
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise TensorRTError(
                f"{path}: TensorRT could not deserialise the engine (built for "
                "another GPU or TensorRT version? rebuild with mvld-export trt)"
            )
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for name in input_names:  # maximum shapes of profile 0 size every buffer
            self.context.set_input_shape(
                name, tuple(self.engine.get_tensor_profile_shape(name, 0)[2])
            )
        self.max_batch = int(self.context.get_tensor_shape(input_names[0])[0])
        self.inputs = [self._binding(trt, n) for n in input_names]
        self.outputs = [self._binding(trt, n) for n in names if n not in input_names]

    def _binding(self, trt: ModuleType, name: str) -> _Binding:
        dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
        count = int(np.prod(tuple(self.context.get_tensor_shape(name))))
        host = self.cuda.host_empty(count, dtype)
        device = self.cuda.device_alloc(host.nbytes)
        self.context.set_tensor_address(name, int(device))
        return _Binding(name, dtype, host, device)

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """One batched execution; the batch is the first axis of every input."""
        batch = arrays[0].shape[0]
        if not 1 <= batch <= self.max_batch:
            raise TensorRTError(f"batch {batch} outside the engine's profile 1..{self.max_batch}")
        with self._lock:
            self.cuda.activate(self.gpu)
            try:
                return self._execute(arrays)
            finally:
                self.cuda.release()

    def _execute(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        for binding, array in zip(self.inputs, arrays, strict=True):
            staged = binding.host[: array.size]
            np.copyto(staged, array.reshape(-1), casting="same_kind")  # fp32 -> fp16 inputs too
            self.context.set_input_shape(binding.name, tuple(array.shape))
            self.cuda.htod_async(binding.device, staged, self.stream)
        if not self.context.execute_async_v3(self.cuda.stream_handle(self.stream)):
            raise TensorRTError("execute_async_v3 failed")
        shapes = []
        for binding in self.outputs:
            shape = tuple(self.context.get_tensor_shape(binding.name))
            shapes.append(shape)
            self.cuda.dtoh_async(binding.host[: int(np.prod(shape))], binding.device, self.stream)
        self.cuda.synchronize(self.stream)
        return [
            b.host[: int(np.prod(s))].reshape(s).astype(np.float32)
            for b, s in zip(self.outputs, shapes, strict=True)
        ]

    def close(self) -> None:
        """Free the buffers and the stream (the engine goes with the object); idempotent."""
        if self.stream is None:
            return
        bindings = self.inputs + self.outputs
        self.cuda.activate(self.gpu)
        try:
            self.cuda.free([b.host for b in bindings], [b.device for b in bindings], self.stream)
        finally:
            self.cuda.release()
        self.inputs, self.outputs, self.stream = [], [], None
