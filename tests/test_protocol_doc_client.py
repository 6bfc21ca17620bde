"""A client written only from docs/PROTOCOL.md, checked against the project in both directions.

The first half ("doc client") uses nothing but msgpack, pyzmq and numpy and follows the
document: field names and types, dtype table, byte order, the socket table and CurveZMQ
roles. The second half pits it against ``mvld.common.wire`` / ``mvld.common.transport``
over real tcp://127.0.0.1 sockets with CURVE, and checks the document's hex example.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

# ---- doc client: msgpack + pyzmq + numpy only ------------------------------------------------

DOC_DTYPES = {"float32": "<f4", "float16": "<f2", "uint8": "u1", "int8": "i1"}
DOC_REASONS = {
    "ok": {"none"},
    "failed": {
        "timeout", "disconnected", "read_error", "end_of_stream", "stale",
        "frozen", "black", "uniform", "noise", "unknown",
    },
    "obstructed": {"occluded", "defocused", "dirty", "redirected", "unknown"},
    "withheld": {"policy"},
}  # fmt: skip


def doc_encode(node: str, seq: int, t: float, enc: str, views: list[dict[str, Any]]) -> bytes:
    """Sections 3-4: views are dicts with cam, st, why, tc and an optional numpy latent."""
    wire_views = []
    for view in views:
        latent = view.get("latent")
        lat = None
        if latent is not None:
            name = latent.dtype.name
            lat = {
                "dt": name,
                "sh": list(latent.shape),
                "b": latent.astype(DOC_DTYPES[name]).tobytes(),
            }
        wire_views.append(
            {"cam": view["cam"], "st": view["st"], "why": view["why"], "tc": view["tc"], "lat": lat}
        )
    message = {"v": 1, "node": node, "seq": seq, "t": t, "enc": enc, "views": wire_views}
    return msgpack.packb(message, use_bin_type=True)


def _exact_keys(obj: Any, keys: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != keys:
        raise ValueError(f"expected a map with keys {sorted(keys)}")
    return obj


def _doc_time(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("time must be a number")
    if not np.isfinite(value) or value < 0:
        raise ValueError("time must be finite and >= 0")
    return float(value)


def _doc_latent(lat: Any) -> np.ndarray:
    lat = _exact_keys(lat, {"dt", "sh", "b"})
    shape = lat["sh"]
    if lat["dt"] not in DOC_DTYPES or not isinstance(shape, list) or not 1 <= len(shape) <= 4:
        raise ValueError("bad dt or sh")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError("bad sh")
    count = int(np.prod(shape, dtype=object))
    dtype = np.dtype(DOC_DTYPES[lat["dt"]])
    if count > 65536 or not isinstance(lat["b"], bytes) or len(lat["b"]) != count * dtype.itemsize:
        raise ValueError("bad b")
    return np.frombuffer(lat["b"], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def doc_decode(data: bytes) -> dict[str, Any]:
    """Sections 2-6 with the default limits; returns plain dicts, latents as numpy arrays."""
    if len(data) > 1 << 20:
        raise ValueError("too large")
    top = msgpack.unpackb(
        data, raw=False, max_str_len=128, max_bin_len=8 * 65536, max_array_len=64, max_map_len=8
    )
    top = _exact_keys(top, {"v", "node", "seq", "t", "enc", "views"})
    if type(top["v"]) is not int or top["v"] != 1:
        raise ValueError("unsupported version")
    if type(top["seq"]) is not int or not 0 <= top["seq"] < 2**64:
        raise ValueError("bad seq")
    _doc_time(top["t"])
    views = top["views"]
    if not isinstance(views, list) or not views:
        raise ValueError("bad views")
    for view in views:
        _exact_keys(view, {"cam", "st", "why", "tc", "lat"})
        if view["why"] not in DOC_REASONS.get(view["st"], set()):
            raise ValueError("bad status/reason")
        if (view["lat"] is not None) != (view["st"] == "ok"):
            raise ValueError("latent iff ok")
        view["tc"] = None if view["tc"] is None else _doc_time(view["tc"])
        view["lat"] = None if view["lat"] is None else _doc_latent(view["lat"])
    return top


def doc_publisher(
    ctx: zmq.Context, endpoint: str, public: bytes, secret: bytes, server: bytes
) -> zmq.Socket:
    """Section 10-11: PUB, connect, CURVE client."""
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server
    sock.connect(endpoint)
    return sock


def doc_receiver(
    ctx: zmq.Context, public: bytes, secret: bytes, allowed: set[bytes]
) -> tuple[ThreadAuthenticator, zmq.Socket, str]:
    """Section 10-11: SUB, bind, subscribe to everything, CURVE server with a ZAP allow-list."""

    class AllowList:
        def callback(self, domain: str, key: bytes) -> bool:
            return key in allowed

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=AllowList())
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return auth, sock, f"tcp://127.0.0.1:{port}"


# ---- checks against the project --------------------------------------------------------------

from mvld.common.errors import ProtocolError  # noqa: E402  (kept below the doc client on purpose)
from mvld.common.transport import (  # noqa: E402
    CurveClientKeys,
    CurveServerKeys,
    LatentPublisher,
    LatentSubscriber,
)
from mvld.common.wire import (  # noqa: E402
    FrameSetMessage,
    ViewRecord,
    decode_frameset,
    encode_frameset,
)

REPO = Path(__file__).resolve().parent.parent
GOLDEN = sorted((REPO / "tests" / "golden").glob("v1_*.msgpack"))


def reference_message() -> FrameSetMessage:
    views = (
        ViewRecord(
            "c0", "ok", "none", 1_700_000_000.25, np.arange(15, dtype=np.float32).reshape(3, 5)
        ),
        ViewRecord("c1", "obstructed", "dirty", 1_700_000_000.25),
        ViewRecord("c2", "ok", "none", 1_700_000_000.0, -np.ones((3, 5), dtype=np.float32)),
        ViewRecord("c3", "failed", "disconnected", None),
    )
    return FrameSetMessage("edge-7", 123_456, 1_700_000_001.0, "sha256:abc", views)


def hex_example_from_doc() -> bytes:
    """The annotated hex dump of section 9, hex pairs at the start of each line."""
    text = (REPO / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    block = text.split("## 9.", 1)[1].split("```", 2)[1]
    data = bytearray()
    for line in block.splitlines():
        for token in line.split():
            if not re.fullmatch(r"[0-9a-f]{2}", token):
                break
            data.append(int(token, 16))
    return bytes(data)


def wait_for(condition: Any, service: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        service()
        assert time.monotonic() < deadline, "timed out"


def test_doc_hex_example_is_what_the_project_encodes() -> None:
    example = FrameSetMessage(
        "n1",
        5,
        1_700_000_000.5,
        "fp1",
        (
            ViewRecord("c0", "ok", "none", 1_700_000_000.25, np.array([1.0, -2.0], np.float16)),
            ViewRecord("c1", "failed", "timeout", None),
        ),
    )
    data = hex_example_from_doc()
    assert len(data) == 146
    assert data == encode_frameset(example)
    decoded = doc_decode(data)
    assert decoded["views"][0]["lat"].tolist() == [1.0, -2.0]


@pytest.mark.parametrize("path", GOLDEN, ids=[p.name for p in GOLDEN])
def test_doc_client_reads_and_rewrites_golden_files(path: Path) -> None:
    data = path.read_bytes()
    top = doc_decode(data)
    views = [
        {"cam": v["cam"], "st": v["st"], "why": v["why"], "tc": v["tc"], "latent": v["lat"]}
        for v in top["views"]
    ]
    assert doc_encode(top["node"], top["seq"], top["t"], top["enc"], views) == data


def test_doc_client_messages_decode_in_the_project() -> None:
    latent = np.linspace(-1, 1, 24, dtype=np.float16).reshape(2, 3, 4)
    views = [
        {"cam": "left", "st": "ok", "why": "none", "tc": 1_700_000_000, "latent": latent},
        {"cam": "right", "st": "withheld", "why": "policy", "tc": 1_700_000_000.5},
        {"cam": "rear", "st": "failed", "why": "end_of_stream", "tc": None},
    ]
    msg = decode_frameset(doc_encode("jetson-3", 2**64 - 1, 12.0, "fp", views))
    assert (msg.node_id, msg.seq, msg.send_time, msg.encoder_fingerprint) == (
        "jetson-3",
        2**64 - 1,
        12.0,
        "fp",
    )
    assert [(v.camera_id, v.status.value, v.reason.value) for v in msg.views] == [
        ("left", "ok", "none"), ("right", "withheld", "policy"), ("rear", "failed", "end_of_stream")
    ]  # fmt: skip
    assert msg.views[0].capture_time == 1_700_000_000.0
    assert np.array_equal(msg.views[0].latent, latent)


def test_doc_client_to_project_receiver_over_curve(tmp_path: Path) -> None:
    for folder in ("receiver", "node", "allowed"):
        (tmp_path / folder).mkdir()
    server_public, server_secret = zmq.auth.create_certificates(tmp_path / "receiver", "receiver")
    client_public, client_secret = zmq.auth.create_certificates(tmp_path / "node", "node1")
    Path(server_secret).chmod(0o600)  # section 11: pyzmq writes secret files with the umask
    (tmp_path / "allowed" / "node1.key").write_bytes(Path(client_public).read_bytes())
    node_public, node_secret = zmq.auth.load_certificate(client_secret)
    receiver_public = zmq.auth.load_certificate(server_public)[0]
    server = CurveServerKeys.from_files(server_secret, tmp_path / "allowed")
    expected = reference_message()
    data = doc_encode(
        expected.node_id, expected.seq, expected.send_time, expected.encoder_fingerprint,
        [
            {"cam": v.camera_id, "st": v.status.value, "why": v.reason.value, "tc": v.capture_time,
             "latent": v.latent}
            for v in expected.views
        ],
    )  # fmt: skip
    ctx = zmq.Context()
    with LatentSubscriber("tcp://127.0.0.1:*", curve=server, latest_only=False) as receiver:
        pub = doc_publisher(ctx, receiver.endpoints[0], node_public, node_secret, receiver_public)
        try:
            received = None
            deadline = time.monotonic() + 5.0
            while received is None:  # PUB drops until the subscription arrives (section 10)
                pub.send(data, zmq.NOBLOCK)
                received = receiver.recv_message(20)
                assert time.monotonic() < deadline
        finally:
            pub.close()
            ctx.term()
    assert received.data == data == encode_frameset(expected)
    assert received.client_key == node_public.decode()
    msg = decode_frameset(received.data)
    assert [v.camera_id for v in msg.views] == ["c0", "c1", "c2", "c3"]
    assert np.array_equal(msg.views[2].latent, expected.views[2].latent)


def test_project_publisher_to_doc_receiver_over_curve() -> None:
    server_public, server_secret = zmq.curve_keypair()
    node_public, node_secret = zmq.curve_keypair()
    ctx = zmq.Context()
    auth, sock, endpoint = doc_receiver(ctx, server_public, server_secret, {node_public})
    expected = reference_message()
    try:
        with LatentPublisher(
            endpoint, curve=CurveClientKeys(node_public, node_secret, server_public)
        ) as pub:
            wait_for(lambda: pub.has_subscriber, lambda: sock.poll(5))
            assert pub.send(encode_frameset(expected))
            assert sock.poll(2000)
            top = doc_decode(sock.recv())
    finally:
        sock.close()
        auth.stop()
        ctx.term()
    assert (top["node"], top["seq"], top["t"], top["enc"]) == (
        "edge-7",
        123_456,
        1_700_000_001.0,
        "sha256:abc",
    )
    for view, want in zip(top["views"], expected.views, strict=True):
        assert (view["cam"], view["st"], view["why"], view["tc"]) == (
            want.camera_id, want.status.value, want.reason.value, want.capture_time
        )  # fmt: skip
        if want.latent is None:
            assert view["lat"] is None
        else:
            assert view["lat"].dtype == want.latent.dtype
            assert np.array_equal(view["lat"], want.latent)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(extra=1),  # section 7: unknown keys are rejected
        lambda m: m.update(v=2),
        lambda m: m["views"][0].update(why="policy"),  # section 4.1 pairing
        lambda m: m["views"][0]["lat"].update(b=b"\0" * 3),  # section 4.2 length
        lambda m: m["views"][0]["lat"].update(dt="float64"),
        lambda m: m["views"][1].update(lat=m["views"][0]["lat"]),  # latent iff ok
    ],
)
def test_doc_rules_reject_what_the_project_rejects(mutate: Any) -> None:
    message = msgpack.unpackb(encode_frameset(reference_message()), raw=False)
    mutate(message)
    data = msgpack.packb(message, use_bin_type=True)
    with pytest.raises(ValueError):
        doc_decode(data)
    with pytest.raises(ProtocolError):
        decode_frameset(data)
