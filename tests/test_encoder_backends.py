"""Edge encoder backends: ORT equals torch on real frames, fingerprints, auto choice, registry,
errors, and the ORT backend running in a process where torch cannot be imported."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_export_onnx import make_tiny_model

from mvld.common.errors import ConfigError
from mvld.edge.encoder import (
    EncoderBackend,
    EncoderError,
    OnnxRuntimeEncoder,
    TorchEncoder,
    backend_class,
    open_encoder,
    register_backend,
    registered_backends,
)
from mvld.export.onnx_export import ExportOptions, export_model
from mvld.model.checkpoint import save_mvld_model
from mvld.sim.rig import RigConfig, SimRig, ring_of_cameras


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoder")
    checkpoint = save_mvld_model(root / "model", make_tiny_model(seed=5))
    out = root / "onnx"
    export_model(
        checkpoint, out, ExportOptions(exporter="torchscript", parts=("encoder", "decoder"))
    )
    return {"checkpoint": checkpoint, "out": out, "root": root}


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Real camera frames: the simulated rig at 48x48 (the encoder's input is 32x32)."""
    config = RigConfig(cameras=ring_of_cameras(3), image_size=(48, 48))
    with SimRig(config) as rig:
        rig.reset(seed=7, episode=0)
        views = rig.render().views
        rig.advance()
        return views + rig.render().views


def test_onnxruntime_backend_equals_torch_on_real_frames(
    exported: dict[str, Path], frames: list[np.ndarray]
) -> None:
    with OnnxRuntimeEncoder(exported["out"], threads=1) as ort_encoder:
        ort_latents = ort_encoder.encode(frames)
    torch_latents = TorchEncoder(exported["checkpoint"]).encode(frames)
    assert ort_latents.shape == (len(frames), 16) and ort_latents.dtype == np.float32
    assert np.max(np.abs(ort_latents - torch_latents)) < 1e-4
    assert np.std(ort_latents, axis=0).mean() > 1e-3  # different frames, different latents


def test_fingerprint_is_the_checkpoints_encoder_fingerprint(exported: dict[str, Path]) -> None:
    stored = json.loads(exported["checkpoint"].read_text())["encoder_fingerprint"]
    assert OnnxRuntimeEncoder(exported["out"]).fingerprint == stored
    assert TorchEncoder(exported["checkpoint"]).fingerprint == stored


def test_one_batched_call_and_empty_input(
    exported: dict[str, Path], frames: list[np.ndarray]
) -> None:
    encoder = OnnxRuntimeEncoder(exported["out"] / "encoder.onnx")
    calls: list[int] = []
    inner = encoder.encode_preprocessed

    def counting(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return inner(images)

    encoder.encode_preprocessed = counting  # type: ignore[method-assign]
    encoder.encode(frames[:3])
    assert calls == [3]
    assert encoder.encode([]).shape == (0, 16)


def test_bgr_input_is_converted_like_training(
    exported: dict[str, Path], frames: list[np.ndarray]
) -> None:
    encoder = OnnxRuntimeEncoder(exported["out"])
    bgr = [np.ascontiguousarray(f[:, :, ::-1]) for f in frames[:3]]
    np.testing.assert_array_equal(
        encoder.encode(bgr, input_order="BGR"), encoder.encode(frames[:3])
    )


def test_auto_picks_onnxruntime_for_an_export_and_says_why(
    exported: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="mvld.edge.encoder"):
        encoder = open_encoder(exported["out"])
    assert encoder.name == "onnxruntime"
    assert "not tensorrt" in caplog.text and "TensorRT is not installed" in caplog.text
    assert "-> onnxruntime with ['CPUExecutionProvider']" in caplog.text


def test_auto_uses_torch_only_for_a_checkpoint(exported: dict[str, Path]) -> None:
    assert open_encoder(exported["checkpoint"]).name == "torch"
    assert open_encoder(exported["checkpoint"].with_suffix("")).name == "torch"
    assert open_encoder(exported["out"], backend="torch").name == "torch"  # via the manifest


def test_explicit_tensorrt_without_tensorrt_says_why(exported: dict[str, Path]) -> None:
    with pytest.raises(EncoderError, match="tensorrt backend unavailable: TensorRT is not"):
        open_encoder(exported["out"], backend="tensorrt")


def test_registry_rejects_duplicates_and_lists_valid_names() -> None:
    assert registered_backends() == ["onnxruntime", "tensorrt", "torch"]
    with pytest.raises(ConfigError, match="already registered"):
        register_backend("onnxruntime", OnnxRuntimeEncoder)
    with pytest.raises(ConfigError, match="valid: auto, onnxruntime, tensorrt, torch"):
        backend_class("openvino")
    assert issubclass(backend_class("torch"), EncoderBackend)


def test_bad_paths_give_clear_errors(exported: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        open_encoder(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no encoder ONNX"):
        open_encoder(tmp_path, backend="onnxruntime")
    with pytest.raises(ConfigError, match="holds the decoder, not the encoder"):
        open_encoder(exported["out"] / "decoder.onnx")
    plain = onnx.load_model(str(exported["out"] / "encoder.onnx"))
    del plain.metadata_props[:]
    onnx.save_model(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ConfigError, match=r"no mvld\.encoder_fingerprint"):
        open_encoder(tmp_path / "plain.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a loadable ONNX model"):
        open_encoder(tmp_path / "broken.onnx")


def test_bad_frames_are_rejected(exported: dict[str, Path]) -> None:
    encoder = OnnxRuntimeEncoder(exported["out"])
    with pytest.raises(ConfigError, match="HxWx3 uint8"):
        encoder.encode([np.zeros((32, 32), np.uint8)])


_WITHOUT_TORCH = """
import importlib.abc, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, BlockTorch())
import numpy as np
from mvld.edge.encoder import open_encoder
encoder = open_encoder(sys.argv[1], backend="auto")
latents = encoder.encode([np.full((40, 40, 3), 90, np.uint8)] * 3)
assert "torch" not in sys.modules
print(encoder.name, latents.shape, encoder.fingerprint)
"""


def test_the_edge_encodes_with_torch_blocked(exported: dict[str, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, str(exported["out"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    stored = json.loads(exported["checkpoint"].read_text())["encoder_fingerprint"]
    assert result.stdout.split() == ["onnxruntime", "(3,", "16)", stored]
