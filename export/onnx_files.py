"""Reading exported ONNX files without torch: fingerprints, ``mvld.*`` metadata, ORT sessions.

The ONNX fingerprint of an export is the sha256 of the serialized model *without* its own
``mvld.onnx_sha256`` metadata entry (a file cannot contain the hash of itself);
``mvld-export onnx`` embeds it in the metadata and writes it beside the file (``X.onnx.sha256``).
Torch-free, so ``mvld-export trt`` runs on a Jetson that has no torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from mvld.common.errors import ConfigError

FINGERPRINT_KEY = "mvld.onnx_sha256"
DEFAULT_OPSET = 18
DEFAULT_TOLERANCE = 1e-4
EXPORTERS = ("dynamo", "torchscript")
EXPORT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class GraphSpec:
    """Names of one exported graph's inputs and outputs (the ONNX contract)."""

    part: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


GRAPHS = {
    "encoder": GraphSpec("encoder", ("images",), ("latents",)),  # [N,3,H,W] -> [N,D]
    "decoder": GraphSpec("decoder", ("latents",), ("images",)),  # [N,D] -> [N,3,H,W]
    "score_net": GraphSpec("score_net", ("x", "tau"), ("eps",)),  # [B,V,D],[B,V] -> [B,V,D]
}


def _without_fingerprint(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [p for p in copy.metadata_props if p.key != FINGERPRINT_KEY]
    del copy.metadata_props[:]
    copy.metadata_props.extend(kept)
    return copy


def model_fingerprint(model: onnx.ModelProto) -> str:
    """sha256 of the serialized model with its own fingerprint entry left out."""
    data = _without_fingerprint(model).SerializeToString(deterministic=True)
    return hashlib.sha256(data).hexdigest()


def read_onnx(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file or raise ``ConfigError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable ONNX model: {exc}") from exc
    if not model.graph.node:
        raise ConfigError(f"{path} is not a readable ONNX model: it holds no graph")
    return model


def onnx_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The ``metadata_props`` of a model as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def onnx_fingerprint(path: str | Path, verify: bool = True) -> str:
    """The ONNX fingerprint of a file; ``verify`` checks it against the embedded value."""
    model = read_onnx(path)
    actual = model_fingerprint(model)
    embedded = onnx_metadata(model).get(FINGERPRINT_KEY)
    if verify and embedded is not None and embedded != actual:
        raise ConfigError(
            f"{path}: contents do not match the embedded fingerprint (corrupt or edited file)"
        )
    return actual


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    existing = {p.key: p.value for p in model.metadata_props}
    existing.update(values)
    del model.metadata_props[:]
    for key in sorted(existing):
        model.metadata_props.add(key=key, value=existing[key])


def ort_session(model_bytes: bytes | str, threads: int = 1) -> ort.InferenceSession:
    """A CPU ONNX Runtime session (the parity reference)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
