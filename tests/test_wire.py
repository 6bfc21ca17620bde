"""Wire protocol v1 and v2: round trips, golden bytes, every invariant and field rejection,
duplicate keys, float widths, int8 quantization and bounded memory.

Golden files live in tests/golden/. They pin the exact encoding: a change of key names, key
order, float width or latent layout breaks ``test_golden_bytes_are_stable``. The ``v1_*`` files
are frozen (version 1 stays decodable byte for byte); after a deliberate format change (which
also bumps PROTOCOL_VERSION and docs/PROTOCOL.md) write the new version's files with

    MVLD_WRITE_GOLDEN=1 pytest tests/test_wire.py -k golden

(it never rewrites files of an older version) and commit them together with the change.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from mvld.common.errors import ConfigError, ProtocolError
from mvld.common.wire import (
    FINGERPRINT_BYTES,
    LATENT_DTYPES,
    PROTOCOL_VERSION,
    REASONS_BY_STATUS,
    SUPPORTED_VERSIONS,
    FrameSetMessage,
    QuantizedLatent,
    ReasonCode,
    ViewRecord,
    ViewStatus,
    WireLimits,
    decode_frameset,
    encode_frameset,
    quantize_latent,
    wire_fingerprint,
)

GOLDEN_DIR = Path(__file__).parent / "golden"
FP = hashlib.sha256(b"mvld test encoder").hexdigest()  # a full encoder fingerprint (64 hex)


def latent(shape: tuple[int, ...], dtype: str = "float32", offset: float = 0.0):
    """A deterministic latent whose values differ per element (so byte order errors show);
    ``int8`` gives its quantized form."""
    count = math.prod(shape)
    values = (np.arange(count, dtype=np.float64) * 0.25 - 3.0 + offset).reshape(shape)
    if dtype == "int8":
        return quantize_latent(values.astype(np.float32), "int8")
    return values.astype(dtype)


def as_float32(value: Any) -> np.ndarray:
    """What the decoder hands out for a latent given to the encoder."""
    if isinstance(value, QuantizedLatent):
        return value.dequantize()
    return np.asarray(value).astype(np.float32)


def mixed_message(
    dtype: str = "float32", shape: tuple[int, ...] = (2, 3), version: int = PROTOCOL_VERSION
) -> FrameSetMessage:
    """One view of every status."""
    return FrameSetMessage(
        node_id="node-1",
        seq=41,
        send_time=1_700_000_000.125,
        encoder_fingerprint="sha256:0f1e2d3c" if version == 1 else FP,
        views=(
            ViewRecord(
                "cam0", ViewStatus.OK, ReasonCode.NONE, 1_700_000_000.0, latent(shape, dtype)
            ),
            ViewRecord("cam1", ViewStatus.FAILED, ReasonCode.TIMEOUT, None),
            ViewRecord("cam2", ViewStatus.OBSTRUCTED, ReasonCode.OCCLUDED, 1_700_000_000.0),
            ViewRecord("cam3", ViewStatus.WITHHELD, ReasonCode.POLICY, 1_700_000_000.0),
            ViewRecord("cam4", "ok", "none", 1_700_000_000.0, latent(shape, dtype, offset=1.0)),
        ),
        version=version,
    )


GOLDEN_MESSAGES: dict[str, Callable[[], FrameSetMessage]] = {
    "v1_mixed_float32.msgpack": lambda: mixed_message("float32", (2, 3), version=1),
    "v1_mixed_float16.msgpack": lambda: mixed_message("float16", (4,), version=1),
    "v1_all_failed.msgpack": lambda: FrameSetMessage(
        "edge-ß", 0, 12.5, "fp", (ViewRecord("c", "failed", "disconnected", None),), version=1
    ),
    "v2_mixed_int8.msgpack": lambda: mixed_message("int8", (2, 2, 2)),
    "v2_mixed_float16.msgpack": lambda: mixed_message("float16", (4,)),
    "v2_mixed_float32.msgpack": lambda: mixed_message("float32", (2, 3)),
    "v2_all_failed.msgpack": lambda: FrameSetMessage(
        "edge-ß", 0, 12.5, FP, (ViewRecord("c", "failed", "disconnected", None),)
    ),
}


def assert_same_message(left: FrameSetMessage, right: FrameSetMessage) -> None:
    """Field-by-field equality; latents as the decoder returns them (float32), bit-exactly."""
    assert (left.version, left.node_id, left.seq, left.send_time, left.encoder_fingerprint) == (
        right.version,
        right.node_id,
        right.seq,
        right.send_time,
        right.encoder_fingerprint,
    )
    assert len(left.views) == len(right.views)
    for a, b in zip(left.views, right.views, strict=True):
        assert (a.camera_id, a.status, a.reason, a.capture_time) == (
            b.camera_id,
            b.status,
            b.reason,
            b.capture_time,
        )
        assert (a.latent is None) == (b.latent is None)
        if a.latent is not None:
            want, got = as_float32(a.latent), as_float32(b.latent)
            assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
            assert got.tobytes() == want.tobytes()


def wire_dict(msg: FrameSetMessage | None = None) -> dict[str, Any]:
    """The plain msgpack structure of a valid message, for targeted corruption."""
    return msgpack.unpackb(encode_frameset(msg or mixed_message()), raw=False)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class Pairs(list):
    """A msgpack map written from (key, value) pairs, so a key can appear twice."""


def pack_pairs(obj: Any) -> bytes:
    """Like ``pack`` but ``Pairs`` become maps with their pairs in order, duplicates kept."""
    packer = msgpack.Packer(use_bin_type=True)
    if isinstance(obj, Pairs):
        return packer.pack_map_header(len(obj)) + b"".join(
            pack_pairs(k) + pack_pairs(v) for k, v in obj
        )
    if isinstance(obj, dict):
        return pack_pairs(Pairs(obj.items()))
    if isinstance(obj, list):
        return packer.pack_array_header(len(obj)) + b"".join(pack_pairs(v) for v in obj)
    return packer.pack(obj)


def with_duplicate(raw: dict[str, Any], path: tuple[Any, ...], key: str, value: Any) -> bytes:
    """``raw`` packed with ``key`` written a second time (``value``) in the map at ``path``."""

    def convert(obj: Any, rest: tuple[Any, ...]) -> Any:
        if isinstance(obj, dict):
            pairs = Pairs(
                (k, convert(v, rest[1:] if rest and rest[0] == k else ("-",)))
                for k, v in obj.items()
            )
            if not rest:
                pairs.append((key, value))
            return pairs
        if isinstance(obj, list):
            return [
                convert(v, rest[1:] if rest and rest[0] == i else ("-",)) for i, v in enumerate(obj)
            ]
        return obj

    return pack_pairs(convert(raw, path))


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(LATENT_DTYPES))
@pytest.mark.parametrize("shape", [(1,), (160,), (4, 8, 8), (1, 2, 3, 4)])
@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_round_trip_is_exact(dtype: str, shape: tuple[int, ...], version: int) -> None:
    if version == 1 and dtype == "int8":
        pytest.skip("version 1 has no int8 with scale")
    msg = mixed_message(dtype, shape, version)
    decoded = decode_frameset(encode_frameset(msg))
    assert decoded.version == version
    assert_same_message(msg, decoded)


def test_decoded_latents_are_read_only_native_float32_and_independent_of_input() -> None:
    for dtype in sorted(LATENT_DTYPES):
        data = bytearray(encode_frameset(mixed_message(dtype)))
        decoded = decode_frameset(bytes(data))
        array = decoded.views[0].latent
        assert array is not None
        assert array.dtype == np.float32 and array.dtype.isnative and not array.flags.writeable
        with pytest.raises(ValueError):
            array[0, 0] = 1.0


def test_big_endian_latent_is_sent_little_endian() -> None:
    little = latent((2, 3))
    big = little.astype(">f4")
    make = lambda lat: FrameSetMessage(  # noqa: E731
        "n", 1, 1.0, FP, (ViewRecord("c", "ok", "none", 1.0, lat),)
    )
    assert encode_frameset(make(big)) == encode_frameset(make(little))
    raw = wire_dict(make(big))["views"][0]["lat"]["b"]
    assert raw == little.astype("<f4").tobytes()


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_extreme_but_valid_values_round_trip(version: int) -> None:
    msg = FrameSetMessage(
        node_id="n" * 128,
        seq=2**64 - 1,
        send_time=0.0,
        encoder_fingerprint="é" * 64 if version == 1 else "f" * 64,  # v1: 128 UTF-8 bytes
        views=tuple(ViewRecord(f"c{i}", "withheld", "policy", 0.0) for i in range(64)),
        version=version,
    )
    assert_same_message(msg, decode_frameset(encode_frameset(msg)))


def test_version_1_accepts_integer_and_float32_times_from_foreign_clients() -> None:
    raw = wire_dict(mixed_message(version=1))
    raw["t"] = 1_700_000_000
    raw["views"][0]["tc"] = 5
    decoded = decode_frameset(pack(raw))
    assert decoded.send_time == 1_700_000_000.0 and type(decoded.send_time) is float
    assert decoded.views[0].capture_time == 5.0
    single = decode_frameset(
        msgpack.packb(wire_dict(mixed_message(version=1)), use_single_float=True)
    )
    assert single.send_time == 1_700_000_000.0  # float 32: 128 s resolution, v1 allowed it


@pytest.mark.parametrize(
    ("path", "value"), [(("t",), 1_700_000_000), (("views", 0, "tc"), 1_700_000_000)]
)
def test_version_2_refuses_integer_times(path: tuple[Any, ...], value: int) -> None:
    raw = wire_dict()
    _set(path, value)(raw)
    with pytest.raises(ProtocolError, match=r"float 64"):
        decode_frameset(pack(raw))


def test_version_2_refuses_float32_times() -> None:
    """float 32 has 128 s resolution at today's POSIX times (issue 18, item 4)."""
    assert np.float32(1_700_000_000.0) == np.float32(1_700_000_063.0)
    data = msgpack.packb(wire_dict(), use_single_float=True)
    assert b"\xca" in data
    with pytest.raises(ProtocolError, match=r"^t: must be a msgpack float 64.*float 32"):
        decode_frameset(data)
    raw = wire_dict()
    raw["t"] = 1_700_000_000.5  # a float 64 t, float 32 tc only
    packed = msgpack.Packer(use_bin_type=True)
    tc_only = pack(raw).replace(
        packed.pack("tc") + packed.pack(1_700_000_000.0),
        packed.pack("tc") + struct.pack(">Bf", 0xCA, 1.7e9),
        1,
    )
    assert tc_only != pack(raw)
    with pytest.raises(ProtocolError, match=r"views\[0\]\.tc: must be a msgpack float 64"):
        decode_frameset(tc_only)


def test_v2_carries_the_first_8_bytes_of_the_fingerprint_as_bin() -> None:
    raw = wire_dict()
    assert raw["enc"] == bytes.fromhex(FP)[:FINGERPRINT_BYTES]
    decoded = decode_frameset(encode_frameset(mixed_message()))
    assert decoded.encoder_fingerprint == FP[:16] == wire_fingerprint(FP)
    assert wire_fingerprint(FP, 1) == FP
    assert wire_fingerprint(FP.upper()) == FP[:16]


@pytest.mark.parametrize(
    "fingerprint", ["sha256:0f1e2d3c4b5a69788796", "0f1e2d3c4b5a697", "", "g" * 64]
)
def test_v2_needs_a_hex_fingerprint_of_at_least_8_bytes(fingerprint: str) -> None:
    with pytest.raises(ProtocolError, match="encoder_fingerprint"):
        FrameSetMessage("n", 0, 1.0, fingerprint, _views())


def test_v2_sizes_of_three_512_value_views() -> None:
    """The numbers in PROTOCOL.md section 4.3 (node "edge", seq 123456, views cam0..cam2)."""
    sizes = {}
    for dtype in ("int8", "float16", "float32"):
        views = tuple(
            ViewRecord(
                f"cam{i}", "ok", "none", 1_700_000_000.25, latent((8, 8, 8), dtype, offset=i)
            )
            for i in range(3)
        )
        sizes[dtype] = len(
            encode_frameset(FrameSetMessage("edge", 123_456, 1_700_000_000.5, FP, views))
        )
    assert sizes == {"int8": 1810, "float16": 3322, "float32": 6394}
    assert {k: v - 3 * 512 * LATENT_DTYPES[k].itemsize for k, v in sizes.items()} == {
        "int8": 274,
        "float16": 250,
        "float32": 250,
    }


def test_every_status_has_a_reason_vocabulary() -> None:
    assert set(REASONS_BY_STATUS) == set(ViewStatus)
    used = set().union(*REASONS_BY_STATUS.values())
    assert used == set(ReasonCode)


# --- golden files ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN_MESSAGES))
def test_golden_bytes_are_stable(name: str) -> None:
    path = GOLDEN_DIR / name
    encoded = encode_frameset(GOLDEN_MESSAGES[name]())
    if os.environ.get("MVLD_WRITE_GOLDEN") == "1" and name.startswith(f"v{PROTOCOL_VERSION}_"):
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_bytes(encoded)
    assert path.read_bytes() == encoded, f"encoding of {name} changed; see module docstring"


@pytest.mark.parametrize("name", sorted(GOLDEN_MESSAGES))
def test_golden_files_decode_to_their_messages(name: str) -> None:
    decoded = decode_frameset((GOLDEN_DIR / name).read_bytes())
    assert_same_message(GOLDEN_MESSAGES[name](), decoded)


# --- construction invariants -------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: ViewRecord("c", "ok", "none", 1.0, None), "latent"),
        (lambda: ViewRecord("c", "failed", "timeout", 1.0, latent((2,))), "latent"),
        (lambda: ViewRecord("c", "ok", "none", None, latent((2,))), "capture_time"),
        (lambda: ViewRecord("c", "failed", "policy", 1.0), "reason"),
        (lambda: ViewRecord("c", "broken", "none", 1.0), "broken"),
        (lambda: ViewRecord("", "failed", "timeout", 1.0), "camera_id"),
        (lambda: ViewRecord("c", "ok", "none", 1.0, latent((2,), "float64")), "dtype"),
        (lambda: ViewRecord("c", "ok", "none", 1.0, np.ones(2, np.int8)), "need their scale"),
        (lambda: ViewRecord("c", "ok", "none", 1.0, np.ones(2, np.uint8)), "need their scale"),
        (lambda: QuantizedLatent(np.ones(2, np.int8), 0.0), "scale"),
        (lambda: QuantizedLatent(np.ones(2, np.int8), math.nan), "scale"),
        (lambda: QuantizedLatent(np.ones(2, np.int8), True), "scale"),
        (lambda: QuantizedLatent(np.ones(2, np.int16), 1.0), "int8"),
        (lambda: ViewRecord("c", "ok", "none", 1.0, np.zeros((0, 3), np.float32)), "shape"),
        (lambda: ViewRecord("c", "ok", "none", 1.0, np.array([np.nan], np.float32)), "NaN"),
        (lambda: ViewRecord("c", "ok", "none", math.inf, latent((2,))), "capture_time"),
        (lambda: FrameSetMessage("n", -1, 1.0, FP, _views()), "seq"),
        (lambda: FrameSetMessage("n", True, 1.0, FP, _views()), "seq"),
        (lambda: FrameSetMessage("n", 0, math.nan, FP, _views()), "send_time"),
        (lambda: FrameSetMessage("n", 0, 1.0, FP, ()), "at least one"),
        (lambda: FrameSetMessage("n", 0, 1.0, FP, None), "views"),  # type: ignore[arg-type]
        (lambda: FrameSetMessage("n", 0, 1.0, FP, _views() * 2), "unique"),
        (lambda: FrameSetMessage("n", 0, 1.0, FP, _views(), version=3), "version"),
        (lambda: FrameSetMessage("n", 0, 1.0, FP, _views(), version=0), "version"),
        (lambda: FrameSetMessage("n", 0, 1.0, "", _views()), "encoder_fingerprint"),
        (lambda: FrameSetMessage("n", 0, 1.0, "", _views(), version=1), "encoder_fingerprint"),
        (
            lambda: FrameSetMessage(
                "n",
                0,
                1.0,
                "f",
                (ViewRecord("a", "ok", "none", 1.0, latent((2,), "int8")),),
                version=1,
            ),
            "version 1 has no scale",
        ),
        (
            lambda: FrameSetMessage(
                "n",
                0,
                1.0,
                FP,
                (
                    ViewRecord("a", "ok", "none", 1.0, latent((2,), "int8")),
                    ViewRecord("b", "ok", "none", 1.0, latent((2,), "float16")),
                ),
            ),
            "share dtype and shape",
        ),
        (
            lambda: FrameSetMessage(
                "n",
                0,
                1.0,
                FP,
                (
                    ViewRecord("a", "ok", "none", 1.0, latent((2,), "float32")),
                    ViewRecord("b", "ok", "none", 1.0, latent((2,), "float16")),
                ),
            ),
            "share dtype and shape",
        ),
    ],
)
def test_invalid_messages_cannot_be_built(make: Callable[[], object], field: str) -> None:
    with pytest.raises(ProtocolError, match=field):
        make()


def _views() -> tuple[ViewRecord, ...]:
    return (ViewRecord("c", "ok", "none", 1.0, latent((2,))),)


def test_limits_must_be_positive_ints() -> None:
    with pytest.raises(ConfigError, match="max_views"):
        WireLimits(max_views=0)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_encode_refuses_what_the_receiver_limits_would_drop(dtype: str) -> None:
    msg = mixed_message(dtype, (10, 10))
    with pytest.raises(ProtocolError, match="elements"):
        encode_frameset(msg, WireLimits(max_latent_elements=50))
    with pytest.raises(ProtocolError, match="dims"):
        encode_frameset(msg, WireLimits(max_latent_dims=1))
    with pytest.raises(ProtocolError, match="max_message_bytes"):
        encode_frameset(msg, WireLimits(max_message_bytes=200))
    with pytest.raises(ProtocolError, match="views"):
        encode_frameset(msg, WireLimits(max_views=2))


# --- int8 quantization ---------------------------------------------------------------------


def test_int8_quantization_is_symmetric_per_view_and_bounded() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 8, 8)) * 3).astype(np.float32)
    q = quantize_latent(x, "int8")
    assert isinstance(q, QuantizedLatent) and q.values.dtype == np.int8 and q.shape == x.shape
    assert q.scale == pytest.approx(float(np.abs(x).max()) / 127)
    assert int(np.abs(q.values).max()) == 127 and q.values.min() >= -127
    assert np.abs(q.dequantize() - x).max() <= q.scale / 2 + 1e-6
    lat = wire_dict(FrameSetMessage("n", 0, 1.0, FP, (ViewRecord("c", "ok", "none", 1.0, q),)))[
        "views"
    ][0]["lat"]
    assert list(lat) == ["dt", "sh", "s", "b"] and lat["dt"] == "int8" and lat["sh"] == [8, 8, 8]
    assert lat["s"] == q.scale and lat["b"] == q.values.tobytes() and len(lat["b"]) == 512
    decoded = decode_frameset(
        pack({**wire_dict(), "views": [{**wire_dict()["views"][0], "lat": lat}]})
    )
    expected = (q.values.astype(np.float64) * q.scale).astype(np.float32)
    assert decoded.views[0].latent.tobytes() == expected.tobytes()


def test_int8_quantization_edge_cases() -> None:
    zeros = quantize_latent(np.zeros(4, np.float32), "int8")
    assert zeros.scale == 1.0 and not zeros.values.any()
    assert quantize_latent(np.ones(3, np.float64), "float16").dtype == np.float16
    with pytest.raises(ProtocolError, match="NaN"):
        quantize_latent(np.array([1.0, np.nan], np.float32), "int8")
    with pytest.raises(ProtocolError, match="range of float16"):
        quantize_latent(np.array([1e6], np.float32), "float16")
    with pytest.raises(ProtocolError, match="float array"):
        quantize_latent(np.arange(3), "int8")
    with pytest.raises(ConfigError, match="latent dtype"):
        quantize_latent(np.ones(3, np.float32), "uint8")


def test_decoded_int8_may_use_minus_128_and_a_float32_scale() -> None:
    raw = wire_dict(mixed_message("int8", (2,)))
    raw["views"][0]["lat"]["b"] = np.array([-128, 127], np.int8).tobytes()
    raw["views"][4]["lat"]["b"] = np.array([-128, 127], np.int8).tobytes()
    raw["views"][0]["lat"]["s"] = 0.5
    raw["views"][4]["lat"]["s"] = 0.5
    float64_scale = pack("s") + struct.pack(">Bd", 0xCB, 0.5)
    float32_scale = pack("s") + struct.pack(">Bf", 0xCA, 0.5)
    data = pack(raw).replace(float64_scale, float32_scale)
    assert data.count(float32_scale) == 2
    decoded = decode_frameset(data)
    assert decoded.views[0].latent.tolist() == [-64.0, 63.5]


# --- duplicate keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "key", "value", "where"),
    [
        ((), "seq", 99, r"^message: duplicate key 'seq'"),
        ((), "node", "intruder", r"^message: duplicate key 'node'"),
        ((), "v", 9, r"^message: duplicate key 'v'"),
        (("views", 0), "st", "failed", r"^message: views\[0\]: duplicate key 'st'"),
        (("views", 1), "cam", "cam9", r"^message: views\[1\]: duplicate key 'cam'"),
        (("views", 0, "lat"), "b", b"\0" * 24, r"^message: views\[0\]\.lat: duplicate key 'b'"),
        (("views", 0, "lat"), "dt", "float16", r"views\[0\]\.lat: duplicate key 'dt'"),
    ],
)
@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_duplicate_keys_are_rejected_at_every_level(
    path: tuple[Any, ...], key: str, value: Any, where: str, version: int
) -> None:
    """msgpack-python lets the last value win; the protocol does not (issue 18, item 1)."""
    raw = wire_dict(mixed_message(version=version))
    data = with_duplicate(raw, path, key, value)
    assert msgpack.unpackb(data, raw=False) != raw  # a plain decoder silently takes the last
    with pytest.raises(ProtocolError, match=where):
        decode_frameset(data)
    assert decode_frameset(pack(raw)).seq == 41  # without the second key it is valid


# --- field-by-field rejection on decode ----------------------------------------------------


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        target: Any = raw
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        target: Any = raw
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


LAT = ("views", 0, "lat")
FIELD_CORRUPTIONS = [  # on a version 2 message of float32 latents
    (_set(("v",), 3), "version"),
    (_set(("v",), 0), "version"),
    (_set(("v",), True), "version"),
    (_set(("v",), 1.0), "version"),
    (_set(("v",), "1"), "version"),
    (_delete(("v",)), "missing"),
    (_set(("extra",), 1), "unknown key"),
    (_set(("node",), ""), "node"),
    (_set(("node",), 7), "node"),
    (_set(("node",), b"node"), "node"),
    (_set(("seq",), -1), "seq"),
    (_set(("seq",), True), "seq"),
    (_set(("seq",), 1.5), "seq"),
    (_set(("seq",), "3"), "seq"),
    (_set(("t",), math.nan), "t"),
    (_set(("t",), math.inf), "t"),
    (_set(("t",), -1.0), "t"),
    (_set(("t",), False), "t"),
    (_set(("t",), None), "t"),
    (_set(("enc",), None), "enc"),
    (_set(("enc",), FP), r"^enc: expected bin of 8 bytes, got str"),  # the v1 form
    (_set(("enc",), bytes.fromhex(FP)[:7]), r"^enc: expected bin of 8 bytes, got 7 bytes"),
    (_set(("enc",), bytes.fromhex(FP)), r"^enc: expected bin of 8 bytes, got 32 bytes"),
    (_set(("t",), 1_700_000_000), r"^t: must be a msgpack float 64"),
    (_set(("views",), []), "views"),
    (_set(("views",), {}), "views"),
    (_set(("views",), "cam0"), "views"),
    (_set(("views", 1), [1, 2]), r"views\[1\]"),
    (_set(("views", 1, "st"), "broken"), r"views\[1\].st"),
    (_set(("views", 1, "st"), 3), r"views\[1\].st"),
    (_set(("views", 1, "why"), "because"), r"views\[1\].why"),
    (_set(("views", 1, "why"), "policy"), r"views\[1\].reason"),
    (_set(("views", 1, "cam"), "cam0"), "unique"),
    (_set(("views", 1, "extra"), None), "unknown key"),
    (_delete(("views", 1, "lat")), "missing"),
    (_set(("views", 0, "tc"), None), "capture_time"),
    (_set(("views", 0, "tc"), math.nan), r"views\[0\].tc"),
    (_set(("views", 0, "tc"), "now"), r"views\[0\].tc"),
    (_set(("views", 0, "tc"), 5), r"views\[0\].tc: must be a msgpack float 64"),
    (_set(("views", 0, "lat"), None), r"views\[0\].latent"),
    (_set(("views", 1, "lat"), {"dt": "float32", "sh": [1], "b": b"\0" * 4}), "latent"),
    (_set((*LAT, "dt"), "float64"), "lat.dt"),
    (_set((*LAT, "dt"), "<f4"), "lat.dt"),
    (_set((*LAT, "dt"), "uint8"), r"lat\.dt: 'uint8' not in .*need their scale"),
    (_set((*LAT, "dt"), "int8"), r"lat: missing key\(s\) \['s'\]"),  # no scale: refused
    (_set((*LAT, "s"), 0.5), r"lat: unknown key\(s\) \['s'\]"),  # a float latent has none
    (_set((*LAT, "sh"), []), "lat.sh"),
    (_set((*LAT, "sh"), [0]), "lat.sh"),
    (_set((*LAT, "sh"), [-6]), "lat.sh"),
    (_set((*LAT, "sh"), [True, 6]), "lat.sh"),
    (_set((*LAT, "sh"), [6.0]), "lat.sh"),
    (_set((*LAT, "sh"), 6), "lat.sh"),
    (_set((*LAT, "sh"), [1, 1, 1, 1, 6]), "lat.sh"),
    (_set((*LAT, "sh"), [2**40, 2**40]), "lat.sh"),
    (_set((*LAT, "sh"), [3, 3]), "lat.b"),
    (_set((*LAT, "b"), "text"), "lat.b"),
    (_set((*LAT, "b"), b"\0" * 23), "lat.b"),
    (_set((*LAT, "b"), np.full(6, np.nan, "<f4").tobytes()), "NaN"),
    (_set((*LAT, "x"), 1), "unknown key"),
    (_set(("views", 4, "lat", "sh"), [3, 2]), "share dtype and shape"),
]


@pytest.mark.parametrize(("mutate", "field"), FIELD_CORRUPTIONS)
def test_each_bad_field_is_rejected_by_name(mutate: Callable[..., None], field: str) -> None:
    raw = wire_dict()
    mutate(raw)
    with pytest.raises(ProtocolError, match=field):
        decode_frameset(pack(raw))


INT8_CORRUPTIONS = [  # on a version 2 message of int8 latents
    (_delete((*LAT, "s")), r"lat: missing key\(s\) \['s'\]"),
    (_set((*LAT, "s"), 0.0), r"lat\.s: must be finite and > 0"),
    (_set((*LAT, "s"), -0.5), r"lat\.s: must be finite and > 0"),
    (_set((*LAT, "s"), math.nan), r"lat\.s: must be finite and > 0"),
    (_set((*LAT, "s"), math.inf), r"lat\.s: must be finite and > 0"),
    (_set((*LAT, "s"), 1), r"lat\.s: expected a float, got int"),
    (_set((*LAT, "s"), True), r"lat\.s: expected a float, got bool"),
    (_set((*LAT, "s"), None), r"lat\.s: expected a float"),
    (_set((*LAT, "s"), "0.1"), r"lat\.s: expected a float"),
    (_set((*LAT, "s"), 1e308), "infinite"),  # q * s overflows float32
    (_set((*LAT, "zp"), 0), r"lat: unknown key\(s\) \['zp'\]"),  # symmetric: no zero point
    (_set((*LAT, "b"), b"\0" * 9), r"lat\.b: 9 bytes"),
    (_set((*LAT, "sh"), [4, 2]), "share dtype and shape"),
]


@pytest.mark.parametrize(("mutate", "field"), INT8_CORRUPTIONS)
def test_each_bad_int8_field_is_rejected_by_name(mutate: Callable[..., None], field: str) -> None:
    raw = wire_dict(mixed_message("int8", (2, 2, 2)))
    mutate(raw)
    with pytest.raises(ProtocolError, match=field):
        decode_frameset(pack(raw))


V1_CORRUPTIONS = [  # on a version 1 message of float32 latents
    (_set(("enc",), bytes.fromhex(FP)[:8]), r"^enc: expected a str, got bytes"),
    (_set((*LAT, "dt"), "int8"), r"lat\.dt: 'int8' not in .*need their scale"),
    (_set((*LAT, "dt"), "uint8"), r"lat\.dt: 'uint8' not in .*need their scale"),
    (_set((*LAT, "s"), 0.5), r"lat: unknown key\(s\) \['s'\]"),
    (_set(("views", 0, "tc"), "now"), r"views\[0\].tc"),
    (_set(("v",), 3), "version"),
]


@pytest.mark.parametrize(("mutate", "field"), V1_CORRUPTIONS)
def test_each_bad_v1_field_is_rejected_by_name(mutate: Callable[..., None], field: str) -> None:
    raw = wire_dict(mixed_message(version=1))
    mutate(raw)
    with pytest.raises(ProtocolError, match=field):
        decode_frameset(pack(raw))


def test_v1_integer_latents_without_scale_are_refused() -> None:
    """v1 accepted int8/uint8 with no scale and handed out 0..255 as values (issue 18, 3)."""
    raw = wire_dict(mixed_message("float32", (6,), version=1))
    for index in (0, 4):
        raw["views"][index]["lat"] = {"dt": "uint8", "sh": [6], "b": bytes(range(200, 206))}
    with pytest.raises(ProtocolError, match="need their scale"):
        decode_frameset(pack(raw))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        pack([1, 2, 3]),
        pack({1: "int key"}),
        pack({"v": 1}) + b"\x00",  # trailing bytes
        encode_frameset(mixed_message()) + b"\xc0",
        encode_frameset(mixed_message())[:-1],
        encode_frameset(mixed_message(version=1)) + b"\xc0",
        b"\x81\xa1k\xc1",  # 0xc1 is never used
        b"\x81\xa1k\xa2\xff\xfe",  # not UTF-8
        b"\x81\x01\x02",  # int key
        pack(msgpack.ExtType(5, b"x")),
        pack({"v": msgpack.ExtType(1, b"")}),
        pack({"t": msgpack.Timestamp(1, 0)}),
        b"\x91" * 100_000 + b"\xc0",  # deep nesting
        b"\xdd\xff\xff\xff\xff",  # array32 header claiming 4 G entries
        b"\xdf\xff\xff\xff\xff",  # map32 header claiming 4 G entries
        b"\xdb\xff\xff\xff\xff",  # str32 header claiming 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin32 header claiming 4 GiB
        "not bytes",
    ],
)
def test_malformed_input_raises_only_protocol_error(data: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_frameset(data)


def test_oversized_message_is_rejected_before_parsing() -> None:
    data = encode_frameset(mixed_message("float32", (64, 64)))
    with pytest.raises(ProtocolError, match="max_message_bytes"):
        decode_frameset(data, WireLimits(max_message_bytes=len(data) - 1))
    decode_frameset(data, WireLimits(max_message_bytes=len(data)))


def test_tighter_limits_apply_on_decode() -> None:
    data = encode_frameset(mixed_message("float32", (10, 10)))
    for limits, field in [
        (WireLimits(max_latent_elements=99), "message"),  # bin longer than 99 float32
        (WireLimits(max_latent_dims=1), "lat.sh"),
        (WireLimits(max_views=4), "message"),
        (WireLimits(max_str_bytes=4), "message"),
    ]:
        with pytest.raises(ProtocolError, match=field):
            decode_frameset(data, limits)
    small_bin = encode_frameset(mixed_message("int8", (10, 10)))
    with pytest.raises(ProtocolError, match=r"lat\.sh"):
        decode_frameset(small_bin, WireLimits(max_latent_elements=99))


def test_golden_file_names_match_their_versions() -> None:
    assert PROTOCOL_VERSION == max(SUPPORTED_VERSIONS) == 2
    for name, make in GOLDEN_MESSAGES.items():
        assert name.startswith(f"v{make().version}_")
        assert decode_frameset((GOLDEN_DIR / name).read_bytes()).version == make().version
    assert {name[:3] for name in GOLDEN_MESSAGES} == {f"v{v}_" for v in SUPPORTED_VERSIONS}


# --- bounded memory ------------------------------------------------------------------------


def _peak_bytes(data: bytes) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            decode_frameset(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "data",
    [
        pack(
            {
                **wire_dict(),
                "views": [
                    {
                        **wire_dict()["views"][0],
                        "lat": {
                            "dt": "float32",
                            "sh": [2**31, 2**31, 2**31, 2**31],
                            "b": b"\0" * 8,
                        },
                    }
                ],
            }
        ),
        pack(
            {
                **wire_dict(),
                "views": [
                    {
                        **wire_dict()["views"][0],
                        "lat": {"dt": "float32", "sh": [2**16], "b": b"\0" * 8},
                    }
                ],
            }
        ),
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xc6\xff\xff\xff\xff" + b"\0" * 100,
        b"\x91" * 100_000 + b"\xc0",
    ],
    ids=["huge-shape", "shape-vs-small-bin", "array32", "map32", "bin32", "deep-nesting"],
)
def test_rejection_allocates_no_more_than_the_input(data: bytes) -> None:
    assert _peak_bytes(data) < len(data) + 256 * 1024


def test_largest_allowed_message_decodes_within_a_few_times_its_size() -> None:
    limits = WireLimits()
    views = tuple(
        ViewRecord(f"c{i}", "ok", "none", 1.0, latent((limits.max_latent_elements,)))
        for i in range(3)
    )
    data = encode_frameset(FrameSetMessage("n", 0, 1.0, FP, views))
    assert len(data) <= limits.max_message_bytes
    tracemalloc.start()
    try:
        decode_frameset(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(data)
