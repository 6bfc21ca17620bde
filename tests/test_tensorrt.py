"""TensorRT: the pure-Python parts everywhere; engine build, cache and parity where TensorRT runs.

TensorRT cannot be installed on the development and CI machines (PyPI holds placeholders
only), so the tests marked ``tensorrt`` skip there with the reason; they run on a GPU machine
with TensorRT 10 or 11 and cuda-python or pycuda.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_export_onnx import make_tiny_model

from mvld.common.errors import ConfigError
from mvld.edge.encoder import OnnxRuntimeEncoder, TensorRTEncoder, open_encoder
from mvld.edge.tensorrt_runtime import (
    EngineKey,
    GpuIdentity,
    find_cached_engine,
    read_engine_sidecar,
    tensorrt_unavailable_reason,
    write_engine_sidecar,
)
from mvld.export.cli import EXIT_UNAVAILABLE
from mvld.export.cli import main as export_main
from mvld.export.onnx_export import ExportOptions, export_model
from mvld.export.onnx_files import onnx_metadata, read_onnx
from mvld.export.tensorrt_build import (
    BuildOptions,
    build_engine,
    default_profile,
    onnx_is_fp16,
    parity_threshold,
    precision_plan,
    relative_error,
    views_of,
)
from mvld.model.checkpoint import save_mvld_model

ORIN = GpuIdentity("Orin (nvgpu)", (8, 7))
FINGERPRINT = "ab" * 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trt")
    checkpoint = save_mvld_model(root / "model", make_tiny_model(seed=2))
    export_model(checkpoint, root / "onnx", ExportOptions(exporter="torchscript"))
    return root / "onnx"


# ---------------------------------------------------------------- pure Python (always run)


def test_profile_defaults_to_one_v_two_v() -> None:
    profile = default_profile(3)
    assert (profile.min, profile.opt, profile.max) == (1, 3, 6)
    custom = default_profile(3, max_batch=64)
    assert (custom.min, custom.opt, custom.max) == (1, 3, 64)
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        default_profile(4, max_batch=2)
    with pytest.raises(ConfigError, match="views"):
        default_profile(0)


def test_views_come_from_the_score_network_metadata(exported: Path) -> None:
    assert views_of(onnx_metadata(read_onnx(exported / "encoder.onnx"))) == 3
    assert views_of({}) == 3


def test_precision_plan_for_tensorrt_10() -> None:
    fp32 = precision_plan("fp32", 10, onnx_is_fp16=False)
    assert not fp32.fp16_flag and not fp32.strongly_typed and fp32.disable_tf32
    fp16 = precision_plan("fp16", 10, onnx_is_fp16=False)
    assert fp16.fp16_flag and not fp16.strongly_typed  # BuilderFlag.FP16 exists in 10
    converted = precision_plan("fp16", 10, onnx_is_fp16=True)
    assert converted.strongly_typed and not converted.fp16_flag


def test_precision_plan_for_tensorrt_11_is_strongly_typed() -> None:
    assert precision_plan("fp32", 11, onnx_is_fp16=False).strongly_typed
    plan = precision_plan("fp16", 11, onnx_is_fp16=True)
    assert plan.strongly_typed and not plan.fp16_flag  # no BuilderFlag.FP16 in 11
    with pytest.raises(ConfigError, match=r"TensorRT 11 removed BuilderFlag\.FP16"):
        precision_plan("fp16", 11, onnx_is_fp16=False)
    with pytest.raises(ConfigError, match="fp16 weights"):
        precision_plan("fp32", 11, onnx_is_fp16=True)
    with pytest.raises(ConfigError, match="not supported"):
        precision_plan("fp16", 8, onnx_is_fp16=False)
    with pytest.raises(ConfigError, match="precision"):
        precision_plan("int8", 10, onnx_is_fp16=False)


def test_fp16_onnx_is_detected(exported: Path) -> None:
    model = read_onnx(exported / "encoder.onnx")
    assert not onnx_is_fp16(model)
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            half = onnx.numpy_helper.to_array(tensor).astype(np.float16)
            tensor.CopyFrom(onnx.numpy_helper.from_array(half, tensor.name))
    assert onnx_is_fp16(model)


def test_engine_key_names_every_dependency() -> None:
    key = EngineKey("encoder", FINGERPRINT, "fp16", "10.3.0", ORIN)
    assert key.stem == f"encoder-{FINGERPRINT[:16]}-fp16-trt10.3.0-sm87-orin-nvgpu"
    variants = [
        EngineKey("encoder", "cd" * 32, "fp16", "10.3.0", ORIN),
        EngineKey("encoder", FINGERPRINT, "fp32", "10.3.0", ORIN),
        EngineKey("encoder", FINGERPRINT, "fp16", "10.7.0", ORIN),
        EngineKey("encoder", FINGERPRINT, "fp16", "10.3.0", GpuIdentity("Orin (nvgpu)", (7, 2))),
        EngineKey("encoder", FINGERPRINT, "fp16", "10.3.0", GpuIdentity("NVIDIA H100", (8, 7))),
        EngineKey("decoder", FINGERPRINT, "fp16", "10.3.0", ORIN),
    ]
    assert len({key.stem, *(v.stem for v in variants)}) == 1 + len(variants)
    with pytest.raises(ConfigError, match="precision"):
        EngineKey("encoder", FINGERPRINT, "int8", "10.3.0", ORIN)
    with pytest.raises(ConfigError, match="hex digest"):
        EngineKey("encoder", "../../etc", "fp16", "10.3.0", ORIN)


def test_cache_lookup_prefers_fp16_and_matches_the_onnx(exported: Path, tmp_path: Path) -> None:
    onnx_path = exported / "encoder.onnx"
    fingerprint = (exported / "encoder.onnx.sha256").read_text().strip()
    assert find_cached_engine(onnx_path, "encoder", "10.3.0", ORIN, tmp_path) is None
    for precision in ("fp32", "fp16"):
        key = EngineKey("encoder", fingerprint, precision, "10.3.0", ORIN)
        key.engine_path(tmp_path).write_bytes(b"engine")
        write_engine_sidecar(key.engine_path(tmp_path), key, {"mvld.part": "encoder"}, {})
    found = find_cached_engine(onnx_path, "encoder", "10.3.0", ORIN, tmp_path)
    assert found is not None and "-fp16-" in found.name
    assert read_engine_sidecar(found) == {"mvld.part": "encoder"}
    assert find_cached_engine(onnx_path, "encoder", "10.7.0", ORIN, tmp_path) is None


def test_a_bare_engine_without_sidecar_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.engine").write_bytes(b"engine")
    with pytest.raises(ConfigError, match="no sidecar"):
        read_engine_sidecar(tmp_path / "x.engine")


def test_parity_thresholds_per_precision() -> None:
    assert parity_threshold("fp32") < parity_threshold("fp16")
    assert parity_threshold("fp16", override=0.5) == 0.5
    want = np.array([10.0, -20.0])
    assert relative_error(want + 0.2, want) == pytest.approx(0.01)
    assert relative_error(np.array([0.001]), np.array([0.0])) == pytest.approx(0.001)


def test_cli_without_tensorrt_exits_with_a_clear_message(
    exported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are present here")
    code = export_main(["trt", "--onnx", str(exported / "encoder.onnx"), "--precision", "fp16"])
    assert code == EXIT_UNAVAILABLE
    assert "cannot build here: TensorRT is not installed" in capsys.readouterr().err


# ---------------------------------------------------------------- real TensorRT (GPU machines)


@pytest.fixture(scope="module")
def tensorrt_ready() -> None:
    reason = tensorrt_unavailable_reason()
    if reason:
        pytest.skip(f"TensorRT unusable here: {reason}")


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_caches_and_matches_onnxruntime(
    tensorrt_ready: None, exported: Path, tmp_path: Path, precision: str
) -> None:
    options = BuildOptions(precision=precision, cache_dir=tmp_path)
    try:
        first = build_engine(exported / "encoder.onnx", options)
    except ConfigError as exc:  # TensorRT 11 needs a converted ONNX for fp16
        pytest.skip(str(exc))
    assert first.engine.is_file() and not first.cached
    assert first.parity_error <= first.threshold
    again = build_engine(exported / "encoder.onnx", options)
    assert again.cached and again.engine == first.engine


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_encoder_matches_onnxruntime_on_frames(
    tensorrt_ready: None, exported: Path
) -> None:
    build_engine(exported / "encoder.onnx", BuildOptions(precision="fp32", max_batch=8))
    frames = [np.random.default_rng(i).integers(0, 255, (40, 40, 3), np.uint8) for i in range(5)]
    encoder = open_encoder(exported)
    assert isinstance(encoder, TensorRTEncoder)
    reference = OnnxRuntimeEncoder(exported).encode(frames)
    for _ in range(3):  # buffers are reused across calls
        assert relative_error(encoder.encode(frames), reference) < 1e-3
        assert relative_error(encoder.encode(frames[:1]), reference[:1]) < 1e-3
    assert encoder.fingerprint == OnnxRuntimeEncoder(exported).fingerprint
    encoder.close()


_TRT_WITHOUT_TORCH = """
import importlib.abc, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, BlockTorch())
from mvld.export.cli import main
code = main(["trt", "--onnx", sys.argv[1], "--precision", "fp16"])
assert "torch" not in sys.modules
sys.exit(code)
"""


def test_engine_building_needs_no_torch(exported: Path) -> None:
    """A Jetson builds its engines without torch: ``mvld-export trt`` must not import it."""
    result = subprocess.run(
        [sys.executable, "-c", _TRT_WITHOUT_TORCH, str(exported / "encoder.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    reason = tensorrt_unavailable_reason()
    assert result.returncode == (EXIT_UNAVAILABLE if reason else 0), result.stderr
    if reason:
        assert "cannot build here" in result.stderr
