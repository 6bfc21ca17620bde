"""A client written only from docs/PROTOCOL.md, checked against the project in both directions.

The first half ("doc client") uses nothing but msgpack, pyzmq, numpy and json and follows the
document: the model descriptor (3.1), field names and types, duplicate keys and float widths
(2), the dtype table and the int8 scale (4.2), byte order, the receiver's model checks, clock
window and sequence rules (3, 8), the socket table, the subscription wait, multipart, the
receiver's handshake properties and CurveZMQ roles (10-11), key files (11), and the encoder
fingerprint recomputed from the weights file (3). The second half pits it against the real
edge node, the real receiver (ingest and service) and ``mvld.common.wire`` over real
tcp://127.0.0.1 sockets with CURVE, checks the document's hex examples, and runs the minimal
client of section 12 exactly as printed. Each numbered item of issue 18 has a case here; the
doc client and the project must reach the same verdict on every one, in memory and over real
sockets. The real edge's status line is checked against real receivers that refuse it (issue
17 item 6).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

# ---- doc client: msgpack + pyzmq + numpy + json only ----------------------------------------

DOC_DTYPES = {
    1: {"float32": "<f4", "float16": "<f2"},
    2: {"float32": "<f4", "float16": "<f2", "int8": "i1"},
}  # section 4.2
DOC_REASONS = {
    "ok": {"none"},
    "failed": {
        "timeout", "disconnected", "read_error", "end_of_stream", "stale",
        "frozen", "black", "uniform", "noise", "unknown",
    },
    "obstructed": {"occluded", "defocused", "dirty", "redirected", "unknown"},
    "withheld": {"policy"},
}  # fmt: skip
TOP_KEYS = {"v", "node", "seq", "t", "enc", "views"}
VIEW_KEYS = {"cam", "st", "why", "tc", "lat"}
CLOCK_WINDOW_S = 60.0  # section 8, item 6


class DocRejection(Exception):  # noqa: N818 - a verdict, named for what it is
    """A message the document says a receiver drops; ``reason`` is the section 8 label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def malformed(detail: str) -> DocRejection:
    return DocRejection("malformed", detail)


class Float32(float):
    """A value that was a msgpack float 32 (section 2: version 2 times must be float 64)."""


def _read(unpacker: msgpack.Unpacker, data: bytes, depth: int) -> Any:
    """One msgpack value; maps are read key by key so a repeated key is seen (section 2)."""
    position = unpacker.tell()
    if position >= len(data):
        raise malformed("truncated")
    first = data[position]
    container = 0x80 <= first <= 0x9F or first in (0xDC, 0xDD, 0xDE, 0xDF)
    if container and depth > 5:  # section 6: maps and arrays nest 5 deep at most
        raise malformed("nested too deep")
    if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
        count = unpacker.read_map_header()
        if count > 8:
            raise malformed("map too large")
        out: dict[str, Any] = {}
        for _ in range(count):
            key = _read(unpacker, data, depth + 1)
            if not isinstance(key, str):
                raise malformed("map key not a str")
            if key in out:
                raise malformed(f"duplicate key {key!r}")
            out[key] = _read(unpacker, data, depth + 1)
        return out
    if 0x90 <= first <= 0x9F or first in (0xDC, 0xDD):
        count = unpacker.read_array_header()
        if count > 64:
            raise malformed("array too large")
        return [_read(unpacker, data, depth + 1) for _ in range(count)]
    value = unpacker.unpack()
    return Float32(value) if first == 0xCA else value


def doc_unpack(data: bytes) -> Any:
    """Sections 2 and 6: one bounded msgpack map, no ext types, nothing after it."""
    if not isinstance(data, bytes) or len(data) > 1 << 20:
        raise malformed("not bytes or too large")
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_str_len=128,
        max_bin_len=4 * 65536,
        max_array_len=64,
        max_map_len=8,
        max_ext_len=0,
    )
    unpacker.feed(data)
    try:
        value = _read(unpacker, data, 1)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise malformed(f"not valid msgpack ({exc})") from exc
    if unpacker.tell() != len(data):
        raise malformed("trailing bytes")
    return value


def _exact_keys(obj: Any, keys: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != keys:
        raise malformed(f"expected a map with keys {sorted(keys)}")
    return obj


def _doc_time(value: Any, version: int) -> float:
    if version == 2 and type(value) is not float:  # float 64 only
        raise malformed("a version 2 time must be a float 64")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise malformed("time must be a number")
    if not math.isfinite(value) or value < 0:
        raise malformed("time must be finite and >= 0")
    return float(value)


def _doc_latent(lat: Any, version: int) -> tuple[np.ndarray, tuple[str, tuple[int, ...]]]:
    """Section 4.2: dt, sh, (s,) b; values as float32, int8 as q * s in binary64."""
    if not isinstance(lat, dict) or lat.get("dt") not in DOC_DTYPES[version]:
        raise malformed("bad dt")
    dt = lat["dt"]
    _exact_keys(lat, {"dt", "sh", "s", "b"} if dt == "int8" else {"dt", "sh", "b"})
    shape = lat["sh"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4:
        raise malformed("bad sh")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise malformed("bad sh")
    count = math.prod(shape)
    dtype = np.dtype(DOC_DTYPES[version][dt])
    if count > 65536 or not isinstance(lat["b"], bytes) or len(lat["b"]) != count * dtype.itemsize:
        raise malformed("bad b")
    raw = np.frombuffer(lat["b"], dtype=dtype).reshape(shape)
    if dt == "int8":
        scale = lat["s"]
        if not isinstance(scale, float) or not math.isfinite(scale) or not scale > 0:
            raise malformed("bad s")
        with np.errstate(over="ignore"):
            values = (raw.astype(np.float64) * scale).astype(np.float32)
    else:
        values = raw.astype(np.float32)
    if not np.isfinite(values).all():
        raise malformed("values not finite")
    return values, (dt, tuple(shape))


def doc_decode(data: bytes) -> dict[str, Any]:
    """Sections 2-6 with the default limits; plain dicts, latents as float32 arrays."""
    top = _exact_keys(doc_unpack(data), TOP_KEYS)
    version = top["v"]
    if type(version) is not int or version not in (1, 2):
        raise malformed("unsupported version")
    if not isinstance(top["node"], str) or not top["node"]:
        raise malformed("bad node")
    if version == 2 and (not isinstance(top["enc"], bytes) or len(top["enc"]) != 8):
        raise malformed("version 2 enc is a bin of 8 bytes")
    if version == 1 and (not isinstance(top["enc"], str) or not top["enc"]):
        raise malformed("version 1 enc is a str")
    if type(top["seq"]) is not int or not 0 <= top["seq"] < 2**64:
        raise malformed("bad seq")
    top["t"] = _doc_time(top["t"], version)
    views = top["views"]
    if not isinstance(views, list) or not views:
        raise malformed("bad views")
    layouts = set()
    for view in views:
        _exact_keys(view, VIEW_KEYS)
        if not isinstance(view["cam"], str) or not view["cam"]:
            raise malformed("bad cam")
        if view["why"] not in DOC_REASONS.get(view["st"], set()):
            raise malformed("bad status/reason")
        if (view["lat"] is not None) != (view["st"] == "ok"):
            raise malformed("latent iff ok")
        view["tc"] = None if view["tc"] is None else _doc_time(view["tc"], version)
        if view["st"] == "ok" and view["tc"] is None:
            raise malformed("an ok view needs tc")
        if view["lat"] is not None:
            view["lat"], layout = _doc_latent(view["lat"], version)
            layouts.add(layout)
    if len({v["cam"] for v in views}) != len(views) or len(layouts) > 1:
        raise malformed("camera ids not unique or latents of several layouts")
    return top


def doc_admit(
    top: dict[str, Any], descriptor: dict[str, Any], receive_time: float, last_seq: dict[str, int]
) -> bool:
    """Section 8, items 3-7, from the model descriptor; True if within the clock window."""
    version = top["v"]
    expected = (
        bytes.fromhex(descriptor["wire_fingerprint"])
        if version == 2
        else descriptor["encoder_fingerprint"]
    )
    if top["enc"] != expected:
        raise DocRejection("fingerprint", "another encoder")
    shape = descriptor["latent"]["shape"] if version == 2 else descriptor["latent"]["v1_shape"]
    for view in top["views"]:
        if view["cam"] not in descriptor["cameras"]:
            raise DocRejection("unknown_camera", view["cam"])
        if view["lat"] is not None and list(view["lat"].shape) != shape:
            raise DocRejection("latent_shape", str(view["lat"].shape))
    times = [top["t"], *(v["tc"] for v in top["views"] if v["tc"] is not None)]
    in_window = all(abs(t - receive_time) <= CLOCK_WINDOW_S for t in times)
    if last_seq.get(top["node"]) == top["seq"]:
        raise DocRejection("duplicate", f"seq {top['seq']} again")
    last_seq[top["node"]] = top["seq"]
    return in_window


def doc_quantize(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Section 4.2, the reference rule: s = max|x| / 127, q = round(x / s), binary64."""
    wide = np.asarray(x, dtype=np.float64)
    peak = float(np.abs(wide).max())
    scale = peak / 127 if peak > 0 else 1.0
    return np.clip(np.rint(wide / scale), -127, 127).astype("i1"), scale


def doc_latent_map(latent: np.ndarray, dt: str) -> dict[str, Any]:
    if dt == "int8":
        q, scale = doc_quantize(latent)
        return {"dt": dt, "sh": list(latent.shape), "s": scale, "b": q.tobytes()}
    return {
        "dt": dt,
        "sh": list(latent.shape),
        "b": np.asarray(latent).astype(DOC_DTYPES[2][dt]).tobytes(),
    }


def doc_encode(
    node: str, seq: int, t: float, enc: bytes | str, views: list[dict[str, Any]], version: int = 2
) -> bytes:
    """Sections 3-4: views are dicts with cam, st, why, tc and a latent map (or None)."""
    wire_views = [
        {"cam": v["cam"], "st": v["st"], "why": v["why"], "tc": v["tc"], "lat": v.get("lat")}
        for v in views
    ]
    message = {"v": version, "node": node, "seq": seq, "t": t, "enc": enc, "views": wire_views}
    return msgpack.packb(message, use_bin_type=True)


def _subscription_notice(sock: zmq.Socket, deadline: float) -> zmq.Frame | None:
    """The first ``\\x01`` notice before ``deadline``, or None."""
    while sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        notice = sock.recv(copy=False)
        if notice.bytes == b"\x01":
            return notice
    return None


def doc_publisher(
    ctx: zmq.Context,
    endpoint: str,
    keys: tuple[bytes, bytes, bytes] | None,
    timeout_s: float = 30.0,
    attempt_s: float = 5.0,
) -> tuple[zmq.Socket, dict[str, Any]]:
    """Sections 10-12: XPUB, connect, CURVE client, wait for the subscription notice ``\\x01``;
    also the receiver's handshake properties of section 10.2 (those it sends). A notice that
    does not come within ``attempt_s`` (a loaded machine) is asked for again on a new socket."""
    deadline = time.monotonic() + timeout_s
    while True:
        sock = ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 100)
        if keys is not None:
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys
        sock.connect(endpoint)
        notice = _subscription_notice(sock, min(deadline, time.monotonic() + attempt_s))
        if notice is not None:
            break
        sock.close()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no subscription from {endpoint} within {timeout_s:.0f} s")
    announced: dict[str, Any] = {}
    for name in ("X-MVLD-Enc", "X-MVLD-Cameras"):
        try:
            announced[name] = notice.get(name)
        except zmq.ZMQError:
            continue
    if "X-MVLD-Cameras" in announced:
        announced["X-MVLD-Cameras"] = json.loads(announced["X-MVLD-Cameras"])
    return sock, announced


def doc_receiver(
    ctx: zmq.Context, public: bytes, secret: bytes, allowed: set[bytes]
) -> tuple[ThreadAuthenticator, zmq.Socket, str]:
    """Sections 10-11: SUB, bind, subscribe to everything, CURVE server with a ZAP allow-list."""

    class AllowList:
        def callback(self, domain: str, key: bytes) -> bool:
            return key in allowed

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=AllowList())
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1000)
    sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return auth, sock, f"tcp://127.0.0.1:{port}"


def doc_read_key_file(path: Path) -> tuple[str | None, str | None]:
    """Section 11: skip lines whose first non-blank is #, split key lines at the first =."""
    public = secret = None
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, equals, value = stripped.partition("=")
        value = value.strip()
        if not equals or len(value) < 2 or value[0] != '"' or value[-1] != '"':
            continue
        if name.strip() == "public-key":
            public = value[1:-1]
        elif name.strip() == "secret-key":
            secret = value[1:-1]
    return public, secret


SAFETENSORS_DTYPES = {
    "F32": "<f4",
    "F16": "<f2",
    "F64": "<f8",
    "I64": "<i8",
    "I32": "<i4",
    "I8": "|i1",
    "U8": "|u1",
    "BOOL": "|b1",
}  # section 3, step 3


def doc_encoder_fingerprint(weights: Path) -> str:
    """Section 3, steps 1-4, reading P.safetensors by its published layout (a little-endian
    u64 header length, a JSON header of dtype, shape and data_offsets, then the data)."""
    data = weights.read_bytes()
    (header_len,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + header_len])
    start = 8 + header_len
    prefix = "autoencoder.encoder."
    tensors = sorted(
        (name[len(prefix) :], entry) for name, entry in header.items() if name.startswith(prefix)
    )
    digest = hashlib.sha256()
    for name, entry in tensors:
        shape = "[" + ", ".join(str(d) for d in entry["shape"]) + "]"
        digest.update(f"{name}|{SAFETENSORS_DTYPES[entry['dtype']]}|{shape}|".encode())
        begin, end = entry["data_offsets"]
        digest.update(data[start + begin : start + end])
    return digest.hexdigest()


# ---- checks against the project --------------------------------------------------------------

import torch  # noqa: E402  (kept below the doc client on purpose)
from receiver_fixtures import wait_until  # noqa: E402

from mvld.common.errors import ProtocolError  # noqa: E402
from mvld.common.keys import load_public_key, load_secret_key  # noqa: E402
from mvld.common.preprocess import PreprocessConfig  # noqa: E402
from mvld.common.transport import CurveClientKeys, LatentPublisher, LatentSubscriber  # noqa: E402
from mvld.common.wire import (  # noqa: E402
    FrameSetMessage,
    QuantizedLatent,
    ViewRecord,
    decode_frameset,
    encode_frameset,
    quantize_latent,
)
from mvld.edge.capture import CaptureConfig  # noqa: E402
from mvld.edge.encoder import OnnxRuntimeEncoder  # noqa: E402
from mvld.edge.node import EdgeConfig, EdgeNode  # noqa: E402
from mvld.edge.sources import Frame, register_source, registered_schemes  # noqa: E402
from mvld.edge.sources.base import Pacer  # noqa: E402
from mvld.export.onnx_export import ExportOptions, export_model  # noqa: E402
from mvld.export.onnx_files import onnx_metadata, read_onnx  # noqa: E402
from mvld.model.autoencoder import Autoencoder, AutoencoderConfig  # noqa: E402
from mvld.model.checkpoint import (  # noqa: E402
    LatentStats,
    MVLDModel,
    encoder_fingerprint,
    load_mvld_model,
    save_mvld_model,
)
from mvld.model.score_net import ScoreNet, ScoreNetConfig  # noqa: E402
from mvld.model.sde import VPSDE  # noqa: E402
from mvld.receiver.ingest import Ingest, NodeBacklog, camera_layout  # noqa: E402
from mvld.receiver.observability import ReceiverMetrics  # noqa: E402
from mvld.receiver.results import FrameSetResult  # noqa: E402
from mvld.receiver.service import ReceiverConfig, ReceiverService  # noqa: E402
from mvld.sim.faults import SyntheticCamera  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOC = (REPO / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
GOLDEN = sorted((REPO / "tests" / "golden").glob("v*_*.msgpack"))


def spatial_tiny_model(seed: int = 5) -> MVLDModel:
    """3 views, 16x16 images, a 2x4x4 spatial latent (32 values): sh is not just [D]."""
    torch.manual_seed(seed)
    autoencoder = Autoencoder(
        AutoencoderConfig(image_size=16, latent_dim=32, channels=(8, 16), latent_channels=2)
    ).eval()
    score_net = ScoreNet(
        ScoreNetConfig(num_views=3, latent_dim=32, widths=(32, 16), time_dim=16)
    ).eval()
    stats = LatentStats(torch.randn(3, 32) * 0.1, torch.rand(3, 32) + 0.5)
    return MVLDModel(
        PreprocessConfig(height=16, width=16),
        autoencoder,
        score_net,
        VPSDE(),
        stats,
        encoder_fingerprint(autoencoder.encoder),
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The spatial model saved, exported (encoder) and its model.json, read as a client would."""
    root = tmp_path_factory.mktemp("doc_client_model")
    checkpoint = save_mvld_model(root / "model", spatial_tiny_model())
    export_model(
        checkpoint, root / "onnx", ExportOptions(exporter="torchscript", parts=("encoder",))
    )
    descriptor = json.loads((root / "onnx" / "model.json").read_text(encoding="utf-8"))
    return {
        "checkpoint": checkpoint,
        "onnx": root / "onnx",
        "descriptor": descriptor,
        "model_json": root / "onnx" / "model.json",
        "model": load_mvld_model(checkpoint),
    }


@pytest.fixture
def curve_files(tmp_path: Path) -> dict[str, Any]:
    """Receiver and node key files (pyzmq's writer), node1 on the receiver's allow-list."""
    for folder in ("receiver", "node", "allowed"):
        (tmp_path / folder).mkdir()
    server_public, server_secret = zmq.auth.create_certificates(tmp_path / "receiver", "receiver")
    node_public, node_secret = zmq.auth.create_certificates(tmp_path / "node", "node1")
    for secret in (server_secret, node_secret):
        Path(secret).chmod(0o600)  # section 11: pyzmq writes secret files with the umask
    (tmp_path / "allowed" / "node1.key").write_bytes(Path(node_public).read_bytes())
    receiver_public, receiver_secret = zmq.auth.load_certificate(server_secret)
    public, secret = zmq.auth.load_certificate(node_secret)
    return {
        "receiver_secret_file": Path(server_secret),
        "receiver_public_file": Path(server_public),
        "allow": tmp_path / "allowed",
        "node_secret_file": Path(node_secret),
        "node": (public, secret, receiver_public),
        "receiver": (receiver_public, receiver_secret),
    }


def hex_block(heading: str) -> bytes:
    """The hex pairs at the start of each line of the first code block after ``heading``."""
    block = DOC.split(heading, 1)[1].split("```", 2)[1]
    data = bytearray()
    for line in block.splitlines():
        for token in line.split():
            if not re.fullmatch(r"[0-9a-f]{2}", token):
                break
            data.append(int(token, 16))
    return bytes(data)


def doc_views(
    descriptor: dict[str, Any],
    latents: dict[str, np.ndarray],
    dt: str = "int8",
    now: float | None = None,
) -> list[dict[str, Any]]:
    """One view per descriptor camera: ok with the given latent, else failed (timeout)."""
    now = time.time() if now is None else now
    views = []
    for cam in descriptor["cameras"]:
        if cam in latents:
            views.append(
                {
                    "cam": cam,
                    "st": "ok",
                    "why": "none",
                    "tc": now,
                    "lat": doc_latent_map(latents[cam], dt),
                }
            )
        else:
            views.append({"cam": cam, "st": "failed", "why": "timeout", "tc": None, "lat": None})
    return views


def _collecting_service(
    model: MVLDModel, curve: dict[str, Any] | None, **options: Any
) -> tuple[ReceiverService, list[FrameSetResult]]:
    collected: list[FrameSetResult] = []
    keys = (
        {}
        if curve is None
        else {"keys": str(curve["receiver_secret_file"]), "allow": str(curve["allow"])}
    )
    config = ReceiverConfig(
        bind=("tcp://127.0.0.1:0",), gpu=-1, max_age_ms=60_000.0, **keys, **options
    )
    service = ReceiverService(config, model=model, extra_hooks=[("collect", collected.append)])
    return service, collected


# --- the document's examples and golden files ------------------------------------------------


def test_doc_hex_examples_are_what_the_project_encodes() -> None:
    v2 = hex_block("## 9. Annotated example")
    v1 = hex_block("### 9.1 The same frame set in version 1")
    assert (len(v2), len(v1)) == (158, 146)
    fingerprint = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    example = FrameSetMessage(
        "n1",
        5,
        1_700_000_000.5,
        fingerprint,
        (
            ViewRecord(
                "c0",
                "ok",
                "none",
                1_700_000_000.25,
                QuantizedLatent(np.array([2, -4], np.int8), 0.5),
            ),
            ViewRecord("c1", "failed", "timeout", None),
        ),
    )
    assert v2 == encode_frameset(example)
    example_v1 = FrameSetMessage(
        "n1",
        5,
        1_700_000_000.5,
        "fp1",
        (
            ViewRecord("c0", "ok", "none", 1_700_000_000.25, np.array([1.0, -2.0], np.float16)),
            ViewRecord("c1", "failed", "timeout", None),
        ),
        version=1,
    )
    assert v1 == encode_frameset(example_v1)
    for data in (v1, v2):
        decoded = doc_decode(data)
        assert decoded["views"][0]["lat"].tolist() == [1.0, -2.0]
        assert decoded_by_project(data) == [1.0, -2.0]
    assert doc_decode(v2)["enc"] == bytes.fromhex(fingerprint)[:8]


def decoded_by_project(data: bytes) -> list[float]:
    return decode_frameset(data).views[0].latent.tolist()


@pytest.mark.parametrize("path", GOLDEN, ids=[p.name for p in GOLDEN])
def test_doc_client_reads_and_rewrites_golden_files(path: Path) -> None:
    data = path.read_bytes()
    top = doc_decode(data)
    raw = msgpack.unpackb(data, raw=False)  # only to take q and s over unchanged
    views = [
        {**v, "lat": raw_v["lat"]} for v, raw_v in zip(top["views"], raw["views"], strict=True)
    ]
    assert doc_encode(top["node"], top["seq"], top["t"], top["enc"], views, top["v"]) == data
    project = decode_frameset(data)
    for view, mine in zip(project.views, top["views"], strict=True):
        assert (view.latent is None) == (mine["lat"] is None)
        if view.latent is not None:
            assert view.latent.tobytes() == mine["lat"].tobytes()  # the same float32 values


def test_doc_client_messages_decode_in_the_project() -> None:
    latent = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    for dt in ("int8", "float16", "float32"):
        views = [
            {
                "cam": "left",
                "st": "ok",
                "why": "none",
                "tc": 1_700_000_000.0,
                "lat": doc_latent_map(latent, dt),
            },
            {"cam": "right", "st": "withheld", "why": "policy", "tc": 1_700_000_000.5},
            {"cam": "rear", "st": "failed", "why": "end_of_stream", "tc": None},
        ]
        data = doc_encode("jetson-3", 2**64 - 1, 12.0, b"\x01" * 8, views)
        msg = decode_frameset(data)
        assert (msg.version, msg.node_id, msg.seq, msg.send_time, msg.encoder_fingerprint) == (
            2,
            "jetson-3",
            2**64 - 1,
            12.0,
            "01" * 8,
        )
        assert [(v.camera_id, v.status.value, v.reason.value) for v in msg.views] == [
            ("left", "ok", "none"), ("right", "withheld", "policy"),
            ("rear", "failed", "end_of_stream")]  # fmt: skip
        assert np.array_equal(msg.views[0].latent, doc_decode(data)["views"][0]["lat"])
        tolerance = {"int8": 1 / 127 / 2, "float16": 1e-3, "float32": 0.0}[dt]
        assert np.abs(msg.views[0].latent - latent).max() <= tolerance + 1e-7
        # and the project's own int8 quantization is the documented one, byte for byte
        if dt == "int8":
            mine = quantize_latent(latent, "int8")
            q, scale = doc_quantize(latent)
            assert mine.values.tobytes() == q.tobytes() and mine.scale == scale


# --- issue 18: the doc client and the project agree case by case -----------------------------


def _cases(descriptor: dict[str, Any], fingerprint: str) -> dict[str, tuple[list[bytes], str]]:
    """Name -> (messages in order, the verdict on the last one), one per issue item."""
    rng = np.random.default_rng(7)
    now = time.time()
    shape = tuple(descriptor["latent"]["shape"])
    latents = {cam: rng.standard_normal(shape).astype(np.float32) for cam in ("cam0", "cam2")}
    enc = bytes.fromhex(descriptor["wire_fingerprint"])

    def v2(
        seq: int = 0, views: list | None = None, t: float | None = None, **top: Any
    ) -> dict[str, Any]:
        return {
            "v": 2,
            "node": "doc-node",
            "seq": seq,
            "t": now if t is None else t,
            "enc": enc,
            "views": views or doc_views(descriptor, latents, now=now),
            **top,
        }

    def packed(message: dict[str, Any], **options: Any) -> bytes:
        return msgpack.packb(message, use_bin_type=True, **options)

    def twice(message: dict[str, Any], path: tuple[Any, ...], key: str, value: Any) -> bytes:
        """``message`` with ``key`` written a second time in the map at ``path``."""
        packer = msgpack.Packer(use_bin_type=True)

        def walk(obj: Any, rest: tuple[Any, ...] | None) -> bytes:
            if isinstance(obj, dict):
                items = list(obj.items())
                if rest == ():
                    items.append((key, value))
                body = b"".join(
                    packer.pack(k) + walk(v, rest[1:] if rest and rest[0] == k else None)
                    for k, v in items
                )
                return packer.pack_map_header(len(items)) + body
            if isinstance(obj, list):
                return packer.pack_array_header(len(obj)) + b"".join(
                    walk(v, rest[1:] if rest and rest[0] == i else None) for i, v in enumerate(obj)
                )
            return packer.pack(obj)

        return walk(message, path)

    def with_latent(**changes: Any) -> dict[str, Any]:
        message = v2()
        lat = {**message["views"][0]["lat"], **changes}
        message["views"][0]["lat"] = {k: v for k, v in lat.items() if v is not None}
        message["views"][2]["lat"] = dict(message["views"][0]["lat"])
        return message

    def shaped(new_shape: tuple[int, ...], version: int = 2) -> bytes:
        message = v2(
            views=[
                {
                    **view,
                    "lat": None
                    if view["lat"] is None
                    else doc_latent_map(
                        latents[view["cam"]].reshape(new_shape),
                        "float32" if version == 1 else "int8",
                    ),
                }
                for view in doc_views(descriptor, latents, now=now)
            ]
        )
        if version == 1:
            message = {**message, "v": 1, "enc": fingerprint}
        return packed(message)

    float32_tc = packed(v2()).replace(
        b"\xa2tc" + struct.pack(">Bd", 0xCB, now), b"\xa2tc" + struct.pack(">Bf", 0xCA, now), 1
    )
    float_with_s = v2(views=doc_views(descriptor, latents, "float16", now))
    for view in float_with_s["views"]:
        if view["lat"] is not None:
            view["lat"]["s"] = 0.5
    elements = int(descriptor["latent"]["elements"])
    uint8 = with_latent(dt="uint8", s=None, b=bytes(elements))
    absent = v2(views=[v for v in doc_views(descriptor, latents, now=now) if v["cam"] != "cam2"])
    project_made = encode_frameset(
        FrameSetMessage(
            "doc-node",
            0,
            now,
            fingerprint,
            tuple(
                ViewRecord(
                    cam, "ok", "none", now, quantize_latent(latents.get(cam, latents["cam0"]))
                )
                for cam in descriptor["cameras"]
            ),
        )
    )
    return {
        "valid": ([packed(v2())], "delivered"),
        "project-encoded": ([project_made], "delivered"),
        "absent-camera": ([packed(absent)], "delivered"),  # item 6: absent, still delivered
        # item 1: duplicate keys at every level
        "dup-seq": ([twice(v2(seq=1), (), "seq", 2)], "malformed"),
        "dup-node": ([twice(v2(), (), "node", "intruder")], "malformed"),
        "dup-cam": ([twice(v2(), ("views", 0), "cam", "cam1")], "malformed"),
        "dup-b": ([twice(v2(), ("views", 0, "lat"), "b", bytes(elements))], "malformed"),
        "dup-s": ([twice(v2(), ("views", 0, "lat"), "s", 9.0)], "malformed"),
        # item 2: the fingerprint, from the descriptor
        "other-encoder": ([packed(v2(enc=b"\x00" * 8))], "fingerprint"),
        "enc-as-hex-str": ([packed(v2(enc=descriptor["wire_fingerprint"]))], "malformed"),
        "enc-full-32-bytes": ([packed(v2(enc=bytes.fromhex(fingerprint)))], "malformed"),
        "v1-full-fingerprint": ([shaped((elements,), version=1)], "delivered"),
        "unknown-camera": (
            [
                packed(
                    v2(
                        views=[
                            {
                                "cam": "cam9",
                                "st": "failed",
                                "why": "timeout",
                                "tc": None,
                                "lat": None,
                            }
                        ]
                    )
                )
            ],
            "unknown_camera",
        ),
        # item 3: integer latents only with their scale, shapes exactly the model's
        "int8-without-s": ([packed(with_latent(s=None))], "malformed"),
        "int8-s-zero": ([packed(with_latent(s=0.0))], "malformed"),
        "int8-s-int": ([packed(with_latent(s=1))], "malformed"),
        "uint8": ([packed(uint8)], "malformed"),
        "v1-int8": ([packed({**with_latent(s=None), "v": 1, "enc": fingerprint})], "malformed"),
        "float-with-s": ([packed(float_with_s)], "malformed"),
        "shape-flat-in-v2": ([shaped((elements,))], "latent_shape"),
        "shape-1xN": ([shaped((1, elements))], "latent_shape"),
        "shape-same-count": ([shaped((shape[0] * shape[1], shape[2]))], "latent_shape"),
        "v1-shape-grid": ([shaped(shape, version=1)], "latent_shape"),
        # item 4: float 64 times, and the clock window
        "t-float32": ([packed(v2(), use_single_float=True)], "malformed"),
        "tc-float32": ([float32_tc], "malformed"),
        "t-int": ([packed(v2(t=int(now)))], "malformed"),
        "t-zero": ([packed(v2(t=0.0))], "out_of_window"),
        "t-1e15": ([packed(v2(t=1e15))], "out_of_window"),
        "tc-zero": ([packed(v2(views=doc_views(descriptor, latents, now=0.0)))], "out_of_window"),
        "v1-int-t": (
            [
                packed(
                    {
                        **v2(views=doc_views(descriptor, {}, now=now)),
                        "v": 1,
                        "enc": fingerprint,
                        "t": int(now),
                    }
                )
            ],
            "delivered",
        ),
        # item 5: a repeated seq is a duplicate; a smaller one a restart
        "repeated-seq": ([packed(v2(seq=4)), packed(v2(seq=4))], "duplicate"),
        "restart": ([packed(v2(seq=4)), packed(v2(seq=1))], "delivered"),
    }


def _doc_verdict(messages: list[bytes], descriptor: dict[str, Any]) -> str:
    last_seq: dict[str, int] = {}
    verdict = ""
    for data in messages:
        try:
            in_window = doc_admit(doc_decode(data), descriptor, time.time(), last_seq)
        except DocRejection as rejected:
            verdict = rejected.reason
        else:
            verdict = "delivered" if in_window else "out_of_window"
    return verdict


def _project_verdict(messages: list[bytes], model: MVLDModel) -> str:
    metrics = ReceiverMetrics()
    backlog = NodeBacklog(metrics, per_node=8)
    layout = camera_layout(
        (),
        model.num_views,
        model.autoencoder.config.latent_dim,
        model.autoencoder.config.latent_shape,
    )
    with LatentSubscriber("tcp://127.0.0.1:0", latest_only=False) as subscriber:
        ingest = Ingest(subscriber, layout, model.fingerprint, backlog, metrics)
        verdict = ""
        for data in messages:
            drops, windows = metrics.drops(), metrics.clock_window.value()
            if ingest.handle(data, None, time.time()):
                verdict = (
                    "delivered" if metrics.clock_window.value() == windows else "out_of_window"
                )
            else:
                [verdict] = [r for r, n in metrics.drops().items() if n != drops.get(r, 0)]
    return verdict


CASE_NAMES = sorted(
    _cases(
        {
            "latent": {"shape": [2, 4, 4], "elements": 32},
            "wire_fingerprint": "00" * 8,
            "cameras": ["cam0", "cam1", "cam2"],
        },
        "00" * 32,
    )
)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_doc_client_and_project_reach_the_same_verdict(exported: dict[str, Any], case: str) -> None:
    descriptor = exported["descriptor"]
    model = exported["model"]
    messages, expected = _cases(descriptor, model.fingerprint)[case]
    assert _doc_verdict(messages, descriptor) == expected
    assert _project_verdict(messages, model) == expected


def _verdict_over_sockets(
    messages: list[bytes], model: MVLDModel, clock: Callable[[], float] = time.time
) -> str:
    """The doc client's XPUB sends each message to the real ingest loop over tcp (CONFLATE on,
    as the receiver runs), one at a time; the verdict on the last one, from the counters."""
    metrics = ReceiverMetrics()
    backlog = NodeBacklog(metrics, per_node=8)
    layout = camera_layout(
        (),
        model.num_views,
        model.autoencoder.config.latent_dim,
        model.autoencoder.config.latent_shape,
    )
    stop = threading.Event()
    ctx = zmq.Context()
    verdict = ""
    with LatentSubscriber("tcp://127.0.0.1:0", fingerprint=model.fingerprint) as subscriber:
        ingest = Ingest(subscriber, layout, model.fingerprint, backlog, metrics, clock=clock)
        thread = threading.Thread(target=ingest.run, args=(stop, 5), daemon=True)
        thread.start()
        try:
            pub, _ = doc_publisher(ctx, subscriber.endpoints[0], None)
            for count, data in enumerate(messages, 1):
                drops, windows = metrics.drops(), metrics.clock_window.value()
                pub.send(data, zmq.NOBLOCK)
                wait_until(lambda n=count: metrics.received.value() == n, 5, "the message")
                wait_until(
                    lambda n=count: (
                        metrics.accepted.value()
                        + sum(metrics.drops().values())
                        - metrics.drops().get("duplicate", 0)
                        >= n
                    ),
                    5,
                    "its verdict",
                )
                changed = [r for r, n in metrics.drops().items() if n != drops.get(r, 0)]
                if changed:
                    [verdict] = changed
                else:
                    verdict = (
                        "delivered" if metrics.clock_window.value() == windows else "out_of_window"
                    )
            pub.close()
        finally:
            stop.set()
            thread.join(5)
            ctx.term()
    return verdict


@pytest.mark.parametrize("case", CASE_NAMES)
def test_every_case_reaches_the_same_verdict_over_real_sockets(
    exported: dict[str, Any], case: str
) -> None:
    messages, expected = _cases(exported["descriptor"], exported["model"].fingerprint)[case]
    assert _verdict_over_sockets(messages, exported["model"]) == expected


@pytest.mark.parametrize(
    ("offset_s", "expected"),
    [(59.0, "delivered"), (-59.0, "delivered"), (61.0, "out_of_window"), (-61.0, "out_of_window")],
)
def test_the_clock_window_is_judged_by_the_receivers_clock(
    exported: dict[str, Any], offset_s: float, expected: str
) -> None:
    """Section 8 item 6, with the receiver's clock injected: 60 s either way of it."""
    descriptor, model = exported["descriptor"], exported["model"]
    sent_at = 1_700_000_000.0
    latent = np.ones(descriptor["latent"]["shape"], np.float32)
    data = doc_encode(
        "node1",
        0,
        sent_at,
        bytes.fromhex(descriptor["wire_fingerprint"]),
        doc_views(descriptor, {"cam0": latent}, now=sent_at),
    )
    assert doc_admit(doc_decode(data), descriptor, sent_at + offset_s, {}) == (
        expected == "delivered"
    )
    assert _verdict_over_sockets([data], model, clock=lambda: sent_at + offset_s) == expected


def test_a_plain_msgpack_decoder_would_be_fooled_by_duplicates(exported: dict[str, Any]) -> None:
    """Why section 2 forbids duplicates: msgpack-python keeps the last value silently."""
    descriptor = exported["descriptor"]
    model = exported["model"]
    [data], _ = _cases(descriptor, model.fingerprint)["dup-seq"]
    assert msgpack.unpackb(data, raw=False)["seq"] == 2
    with pytest.raises(ProtocolError, match="duplicate key 'seq'"):
        decode_frameset(data)


# --- item 2: the model descriptor -------------------------------------------------------------


def test_export_descriptor_states_what_the_receiver_and_the_edge_use(
    exported: dict[str, Any],
) -> None:
    descriptor = exported["descriptor"]
    model = exported["model"]
    layout = camera_layout(
        (),
        model.num_views,
        model.autoencoder.config.latent_dim,
        model.autoencoder.config.latent_shape,
    )
    assert descriptor["encoder_fingerprint"] == model.fingerprint
    assert descriptor["wire_fingerprint"] == model.fingerprint[:16]
    assert descriptor["cameras"] == list(layout.camera_ids) and descriptor["num_views"] == 3
    assert descriptor["latent"]["shape"] == list(layout.latent_shape) == [2, 4, 4]
    assert descriptor["latent"]["v1_shape"] == [layout.latent_dim] == [32]
    assert descriptor["latent"]["default_dtype"] == EdgeConfig.latent_dtype == "int8"
    assert descriptor["preprocess"] == model.preprocess.to_dict()
    assert descriptor["image"] == {"height": 16, "width": 16, "channels": 3, "dtype": "uint8"}
    onnx = exported["onnx"] / "encoder.onnx"
    assert onnx_metadata(read_onnx(onnx))["mvld.encoder_fingerprint"] == model.fingerprint
    with OnnxRuntimeEncoder(exported["onnx"]) as encoder:  # what the edge sends
        assert encoder.fingerprint == model.fingerprint
        assert encoder.latent_shape == (2, 4, 4)
    assert (
        descriptor["graphs"]["encoder"]["file_sha256"]
        == hashlib.sha256(onnx.read_bytes()).hexdigest()
        != model.fingerprint
    )  # section 3: not a file hash


def test_a_third_party_recomputes_the_encoder_fingerprint_from_the_weights_file(
    exported: dict[str, Any],
) -> None:
    weights = exported["checkpoint"].with_suffix(".safetensors")
    assert doc_encoder_fingerprint(weights) == exported["descriptor"]["encoder_fingerprint"]
    shipped = REPO / "common" / "assets" / "default_model"
    stored = json.loads((shipped / "last.json").read_text(encoding="utf-8"))
    assert doc_encoder_fingerprint(shipped / "last.safetensors") == stored["encoder_fingerprint"]


def test_the_receiver_logs_its_model_and_wire_fingerprint_at_start_up(
    exported: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Section 3.1: the start-up log line gives the values model.json gives."""
    descriptor = exported["descriptor"]
    service, _ = _collecting_service(exported["model"], None)
    with caplog.at_level(logging.INFO, logger="mvld.receiver.service"), service:
        pass
    [line] = [r.getMessage() for r in caplog.records if "encoder fingerprint" in r.getMessage()]
    assert (
        line.startswith("model ")
        and (
            f"encoder fingerprint {descriptor['encoder_fingerprint']} (protocol v2 enc = its first "
            f"8 bytes, {descriptor['wire_fingerprint']}); latent shape "
            f"{descriptor['latent']['shape']}"
        )
        in line
    )


# --- both directions over CURVE: the real receiver and the real edge ------------------------


def test_doc_client_to_the_real_receiver_over_curve(
    exported: dict[str, Any], curve_files: dict[str, Any]
) -> None:
    descriptor = exported["descriptor"]
    model = exported["model"]
    latent = (
        np.random.default_rng(1).standard_normal(descriptor["latent"]["shape"]).astype(np.float32)
    )
    service, collected = _collecting_service(model, curve_files)
    views = [
        view for view in doc_views(descriptor, {"cam0": latent}) if view["cam"] != "cam2"
    ]  # cam2 absent (section 8)
    data = doc_encode("node1", 0, time.time(), bytes.fromhex(descriptor["wire_fingerprint"]), views)
    ctx = zmq.Context()
    with service:
        pub, announced = doc_publisher(ctx, service.endpoints[0], curve_files["node"])
        try:
            assert announced == {
                "X-MVLD-Enc": descriptor["wire_fingerprint"],
                "X-MVLD-Cameras": descriptor["cameras"],
            }, "section 10.2"
            pub.send(data, zmq.NOBLOCK)  # once: the subscription was awaited (section 10)
            wait_until(lambda: collected, 15, "the doc client's frame set")
        finally:
            pub.close()
            ctx.term()
    [result] = collected
    assert (result.node_id, result.seq) == ("node1", 0)
    assert [(v.status, v.reason, v.provenance.value) for v in result.views] == [
        ("ok", "none", "observed"),
        ("failed", "timeout", "imputed"),
        ("absent", "absent", "imputed"),
    ]
    q, scale = doc_quantize(latent)
    assert np.array_equal(
        result.view("cam0").latent, (q.astype(np.float64) * scale).astype(np.float32).reshape(-1)
    )
    assert result.client_key == curve_files["node"][0].decode()
    assert result.clock_ok and service.metrics.drops() == {}


class _DocFeed:
    """A camera for the real edge: a synthetic 64x48 scene at 30 FPS."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.camera = SyntheticCamera(height=48, width=64, seed=len(uri))
        self.pacer, self.index = Pacer(30.0), 0

    def read(self, timeout_s: float = 1.0) -> Frame | None:
        if not self.pacer.wait(self.index, timeout_s):
            return None
        frame = Frame(self.camera.read(), self.uri, time.time(), self.index)
        self.index += 1
        return frame

    def close(self) -> None:
        pass

    def __enter__(self) -> _DocFeed:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


if "docfeed" not in registered_schemes():
    register_source("docfeed", _DocFeed)


@pytest.mark.parametrize("latent_dtype", ["int8", "float16"])
def test_the_real_edge_to_the_doc_receiver_over_curve(
    exported: dict[str, Any], curve_files: dict[str, Any], latent_dtype: str
) -> None:
    descriptor = exported["descriptor"]
    receiver_public, receiver_secret = curve_files["receiver"]
    node_public = curve_files["node"][0]
    ctx = zmq.Context()
    auth, sock, endpoint = doc_receiver(ctx, receiver_public, receiver_secret, {node_public})
    config = EdgeConfig(
        cameras=("docfeed://0", "docfeed://1", "docfeed://2"),
        connect=(endpoint,),
        model=exported["onnx"],
        node_id="edge-real",
        backend="onnxruntime",
        fps=30.0,
        max_framesets=45,
        capture=CaptureConfig(read_timeout_s=0.1),
        key_secret=curve_files["node_secret_file"],
        server_key=curve_files["receiver_public_file"],
        latent_dtype=latent_dtype,
    )
    node = EdgeNode(config)
    thread = threading.Thread(target=node.run, daemon=True)
    received: list[bytes] = []
    try:
        thread.start()
        deadline = time.monotonic() + 20
        while thread.is_alive() or sock.poll(0):  # a SUB is serviced while the edge runs
            if sock.poll(50):
                received.append(sock.recv())
            assert time.monotonic() < deadline
    finally:
        thread.join(10)
        sock.close()
        auth.stop()
        ctx.term()
    assert len(received) == node.summary.sent >= 30
    last_seq: dict[str, int] = {}
    ok_views = 0
    for data in received:
        top = doc_decode(data)
        assert doc_admit(top, descriptor, time.time(), last_seq), "within the clock window"
        assert top["v"] == 2 and top["node"] == "edge-real"
        assert [v["cam"] for v in top["views"]] == descriptor["cameras"]
        raw_views = msgpack.unpackb(data, raw=False)["views"]
        for view, raw in zip(top["views"], raw_views, strict=True):
            if view["lat"] is not None:
                ok_views += 1
                assert raw["lat"]["dt"] == latent_dtype
                assert raw["lat"]["sh"] == descriptor["latent"]["shape"]
                assert ("s" in raw["lat"]) == (latent_dtype == "int8")
    assert ok_views >= 30, "the cameras stream once their health warm-up is over"


# --- issue 17 item 6: the real edge says why the real receiver refuses it -------------------


@pytest.mark.parametrize(
    ("refusal", "state", "hint"),
    [
        ("unlisted-key", "refused(auth)", "not in the receiver's --allow folder"),
        ("other-model", "refused(fingerprint)", "expects encoder fingerprint"),
        ("other-cameras", "refused(cameras)", "accepts the cameras left,right,rear"),
    ],
)
def test_the_real_edge_says_why_the_real_receiver_refuses_it(
    exported: dict[str, Any],
    curve_files: dict[str, Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    refusal: str,
    state: str,
    hint: str,
) -> None:
    """A key missing from the allow-list is an authentication error on the edge's status line
    (not "receiver none"); a receiver of another model is named as refusing the fingerprint."""
    from mvld.common.keys import generate_keypair

    model, curve, keys, options = exported["model"], None, {}, {}
    if refusal == "unlisted-key":
        curve = curve_files
        _, secret = generate_keypair(tmp_path / "stranger", "stranger")
        keys = {"key_secret": secret, "server_key": curve_files["receiver_public_file"]}
    elif refusal == "other-model":
        model = spatial_tiny_model(seed=6)
        assert model.fingerprint != exported["model"].fingerprint
    else:
        options = {"cameras": ("left", "right", "rear")}
    service, collected = _collecting_service(model, curve, **options)
    with service, caplog.at_level(logging.INFO):
        config = EdgeConfig(
            cameras=("docfeed://0", "docfeed://1", "docfeed://2"),
            connect=(service.endpoints[0],),
            model=exported["onnx"],
            node_id="edge-refused",
            backend="onnxruntime",
            fps=30.0,
            max_framesets=30,
            status_every_s=0.2,
            capture=CaptureConfig(read_timeout_s=0.1),
            **keys,
        )
        EdgeNode(config).run()
        received = service.metrics.received.value()
        drops = service.metrics.drops()
    status = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("edge edge-refused:")
    ]
    assert status and f"receiver {state}" in status[-1], status
    assert not any("receiver none" in line for line in status[1:]), status
    [warning] = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.name == "mvld.common.transport"
        and "CurveZMQ client key" not in r.getMessage()
    ]
    assert hint in warning
    assert not collected
    if refusal == "unlisted-key":
        assert received == 0, "nothing reaches a receiver that refused the handshake"
    else:
        reason = "fingerprint" if refusal == "other-model" else "unknown_camera"
        assert received > 0 and drops == {reason: received}


# --- item 6: multipart ------------------------------------------------------------------------


@pytest.mark.parametrize("latest_only", [True, False])
def test_a_doc_client_multipart_message_follows_section_10_1(
    exported: dict[str, Any], latest_only: bool
) -> None:
    descriptor = exported["descriptor"]
    model = exported["model"]
    rng = np.random.default_rng(2)
    latents = {"cam0": rng.standard_normal(descriptor["latent"]["shape"]).astype(np.float32)}
    enc = bytes.fromhex(descriptor["wire_fingerprint"])
    first = doc_encode("node1", 0, time.time(), enc, doc_views(descriptor, latents))
    second = doc_encode("node1", 1, time.time(), enc, doc_views(descriptor, latents))
    metrics = ReceiverMetrics()
    backlog = NodeBacklog(metrics)
    layout = camera_layout((), 3, 32, (2, 4, 4))
    stop = threading.Event()
    ctx = zmq.Context()
    with LatentSubscriber("tcp://127.0.0.1:0", latest_only=latest_only) as subscriber:
        ingest = Ingest(subscriber, layout, model.fingerprint, backlog, metrics)
        thread = threading.Thread(target=ingest.run, args=(stop, 10), daemon=True)
        thread.start()
        try:
            pub, _ = doc_publisher(ctx, subscriber.endpoints[0], None)
            pub.send_multipart([b"", first])
            wait_until(lambda: metrics.received.value() == 1, 5, "the multipart message")
            pub.send_multipart([second, b""])
            wait_until(lambda: metrics.received.value() == 2, 5, "the second multipart message")
            pub.close()
        finally:
            stop.set()
            thread.join(5)
            ctx.term()
    delivered = [item.message.seq for item in backlog.take(10)]
    if latest_only:  # CONFLATE keeps the last part: [b"", first] -> first; [second, b""] -> b""
        assert delivered == [0] and metrics.drops() == {"malformed": 1}
    else:
        assert delivered == [] and metrics.drops() == {"malformed": 2}


# --- item 7: the section 12 client, exactly as printed --------------------------------------


def test_the_minimal_client_of_section_12_delivers_its_first_message(
    exported: dict[str, Any], curve_files: dict[str, Any]
) -> None:
    code = DOC.split("## 12. Minimal client", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "import time" in code
    model = exported["model"]
    public, secret, server = curve_files["node"]
    service, collected = _collecting_service(model, curve_files)
    namespace: dict[str, Any] = {
        "model_json_path": str(exported["model_json"]),
        "my_public_z85": public,
        "my_secret_z85": secret,
        "receiver_public_z85": server,
    }
    with service:
        namespace["receiver_endpoint"] = service.endpoints[0]
        try:
            exec(compile(code, "PROTOCOL.md section 12", "exec"), namespace)
            wait_until(lambda: collected, 15, "the minimal client's first message")
        finally:
            if "sock" in namespace:
                namespace["sock"].close()
            if "ctx" in namespace:
                namespace["ctx"].term()
    [result] = collected
    assert (result.node_id, result.seq) == ("node1", 0)
    assert [v.status for v in result.views] == ["ok", "failed", "failed"]
    assert service.metrics.drops() == {}


# --- item 8: key files ------------------------------------------------------------------------


def test_a_hash_inside_a_z85_key_is_key_text_not_a_comment(tmp_path: Path) -> None:
    while True:  # about 4 in 10 Curve keys contain a # somewhere
        public, secret = zmq.curve_keypair()
        if b"#" in public and b"#" in secret:
            break
    text = (
        "#   ZeroMQ CURVE Secret Certificate\n"
        '#   public-key = "this line is a comment: never a key"\n'
        "metadata\ncurve\n"
        f'    public-key = "{public.decode()}"\n'
        f'    secret-key = "{secret.decode()}"\n'
    )
    path = tmp_path / "node1.key_secret"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    assert doc_read_key_file(path) == (public.decode(), secret.decode())
    assert load_secret_key(path) == (public, secret)
    assert load_public_key(path) == public
    hashed_comment = "#" + public.decode().split("#", 1)[1]
    assert hashed_comment in text, "a naive 'strip after #' parser would cut the key here"


def test_the_doc_key_file_format_reads_keys_written_by_the_project(tmp_path: Path) -> None:
    from mvld.common.keys import generate_keypair

    public_file, secret_file = generate_keypair(tmp_path, "node7")
    assert doc_read_key_file(public_file) == (load_public_key(public_file).decode(), None)
    public, secret = load_secret_key(secret_file)
    assert doc_read_key_file(secret_file) == (public.decode(), secret.decode())


# --- the reference publisher to the doc receiver (the original direction test) ---------------


def test_project_publisher_to_doc_receiver_over_curve() -> None:
    server_public, server_secret = zmq.curve_keypair()
    node_public, node_secret = zmq.curve_keypair()
    ctx = zmq.Context()
    auth, sock, endpoint = doc_receiver(ctx, server_public, server_secret, {node_public})
    latent = np.arange(15, dtype=np.float32).reshape(3, 5) - 7
    expected = FrameSetMessage(
        "edge-7",
        123_456,
        time.time(),
        "ab" * 32,
        (
            ViewRecord("c0", "ok", "none", time.time(), quantize_latent(latent)),
            ViewRecord("c1", "obstructed", "dirty", time.time()),
            ViewRecord("c2", "failed", "disconnected", None),
        ),
    )
    try:
        with LatentPublisher(
            endpoint, curve=CurveClientKeys(node_public, node_secret, server_public)
        ) as pub:
            deadline = time.monotonic() + 5
            while not pub.has_subscriber:  # the SUB attaches the node while it is polled
                assert not sock.poll(5) and time.monotonic() < deadline
            assert pub.send(encode_frameset(expected))
            assert sock.poll(2000)
            top = doc_decode(sock.recv())
    finally:
        sock.close()
        auth.stop()
        ctx.term()
    assert (top["v"], top["node"], top["seq"], top["enc"]) == (
        2,
        "edge-7",
        123_456,
        bytes.fromhex("ab" * 8),
    )
    assert [(v["cam"], v["st"], v["why"]) for v in top["views"]] == [
        ("c0", "ok", "none"),
        ("c1", "obstructed", "dirty"),
        ("c2", "failed", "disconnected"),
    ]
    q, scale = doc_quantize(latent)
    assert np.array_equal(top["views"][0]["lat"], (q * np.float64(scale)).astype(np.float32))


@pytest.mark.parametrize(
    ("item", "statement"),
    [
        ("2: enc is a hash of the weights", "sha256 digest over the encoder's *weights*"),
        ("2: enc is no file hash", "It is **not** a hash of a file"),
        ("2: the descriptor", "`mvld-export onnx` writes **`model.json`** beside `encoder.onnx`"),
        ("2: camera ids", "`cam0` … `cam{V−1}`, one per model view in view order"),
        ("3: shapes exactly", "MUST equal the model's latent shape"),
        ("4: float 64 times", "**Version 2: msgpack float 64 (`0xcb`) only**"),
        ("4: the clock window", "more than **60 s** away"),
        ("5: a repeated seq", "**dropped, counted as `duplicate`**"),
        ("6: multipart", "### 10.1 Multipart messages"),
        ("6: absent", "`absent` is **not** a wire status"),
        ("8: # in Z85 keys", "parser MUST NOT strip text after a `#` inside a line"),
        ("17.6: the receiver's model", "`ZMQ_METADATA` to `X-MVLD-Enc:<wire fingerprint>`"),
        ("17.6: a refused handshake", "`ZMQ_EVENT_HANDSHAKE_FAILED_AUTH` with the ZAP status code"),
        ("1: duplicate keys", "a map MUST NOT hold the same key twice, at any level"),
    ],
)
def test_the_document_states_each_rule(item: str, statement: str) -> None:
    """The rules a client needs in words (issue 18); the behaviour is tested above."""
    assert statement in DOC, item
