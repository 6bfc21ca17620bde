"""Wire protocol v1: round trips, golden bytes, every invariant and field rejection, bounded memory.

Golden files live in tests/golden/. They pin the exact encoding: a change of key names, key
order, float width or latent layout breaks ``test_golden_bytes_are_stable``. After a deliberate
format change (which also bumps PROTOCOL_VERSION and docs/PROTOCOL.md), regenerate them with

    MVLD_WRITE_GOLDEN=1 pytest tests/test_wire.py -k golden

and commit the new files together with the change.
"""

from __future__ import annotations

import math
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from mvld.common.errors import ConfigError, ProtocolError
from mvld.common.wire import (
    LATENT_DTYPES,
    PROTOCOL_VERSION,
    REASONS_BY_STATUS,
    FrameSetMessage,
    ReasonCode,
    ViewRecord,
    ViewStatus,
    WireLimits,
    decode_frameset,
    encode_frameset,
)

GOLDEN_DIR = Path(__file__).parent / "golden"


def latent(shape: tuple[int, ...], dtype: str = "float32", offset: float = 0.0) -> np.ndarray:
    """A deterministic latent whose values differ per element (so byte order errors show)."""
    count = math.prod(shape)
    values = (np.arange(count, dtype=np.float64) * 0.25 - 3.0 + offset).reshape(shape)
    if np.dtype(dtype).kind in "ui":
        values = np.arange(count).reshape(shape) % 100
    return values.astype(dtype)


def mixed_message(dtype: str = "float32", shape: tuple[int, ...] = (2, 3)) -> FrameSetMessage:
    """One view of every status."""
    return FrameSetMessage(
        node_id="node-1",
        seq=41,
        send_time=1_700_000_000.125,
        encoder_fingerprint="sha256:0f1e2d3c",
        views=(
            ViewRecord(
                "cam0", ViewStatus.OK, ReasonCode.NONE, 1_700_000_000.0, latent(shape, dtype)
            ),
            ViewRecord("cam1", ViewStatus.FAILED, ReasonCode.TIMEOUT, None),
            ViewRecord("cam2", ViewStatus.OBSTRUCTED, ReasonCode.OCCLUDED, 1_700_000_000.0),
            ViewRecord("cam3", ViewStatus.WITHHELD, ReasonCode.POLICY, 1_700_000_000.0),
            ViewRecord("cam4", "ok", "none", 1_700_000_000.0, latent(shape, dtype, offset=1.0)),
        ),
    )


GOLDEN_MESSAGES: dict[str, Callable[[], FrameSetMessage]] = {
    "v1_mixed_float32.msgpack": lambda: mixed_message("float32", (2, 3)),
    "v1_mixed_float16.msgpack": lambda: mixed_message("float16", (4,)),
    "v1_all_failed.msgpack": lambda: FrameSetMessage(
        "edge-ß", 0, 12.5, "fp", (ViewRecord("c", "failed", "disconnected", None),)
    ),
}


def assert_same_message(left: FrameSetMessage, right: FrameSetMessage) -> None:
    """Field-by-field equality, latents compared bit-exactly."""
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
            assert a.latent.dtype == b.latent.dtype and a.latent.shape == b.latent.shape
            assert a.latent.tobytes() == b.latent.tobytes()


def wire_dict(msg: FrameSetMessage | None = None) -> dict[str, Any]:
    """The plain msgpack structure of a valid message, for targeted corruption."""
    return msgpack.unpackb(encode_frameset(msg or mixed_message()), raw=False)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(LATENT_DTYPES))
@pytest.mark.parametrize("shape", [(1,), (160,), (4, 8, 8), (1, 2, 3, 4)])
def test_round_trip_is_exact(dtype: str, shape: tuple[int, ...]) -> None:
    msg = mixed_message(dtype, shape)
    decoded = decode_frameset(encode_frameset(msg))
    assert_same_message(msg, decoded)


def test_decoded_latents_are_read_only_native_and_independent_of_input() -> None:
    data = bytearray(encode_frameset(mixed_message()))
    decoded = decode_frameset(bytes(data))
    array = decoded.views[0].latent
    assert array is not None
    assert array.dtype.isnative and not array.flags.writeable
    with pytest.raises(ValueError):
        array[0, 0] = 1.0


def test_big_endian_latent_is_sent_little_endian() -> None:
    little = latent((2, 3))
    big = little.astype(">f4")
    make = lambda lat: FrameSetMessage(  # noqa: E731
        "n", 1, 1.0, "f", (ViewRecord("c", "ok", "none", 1.0, lat),)
    )
    assert encode_frameset(make(big)) == encode_frameset(make(little))
    raw = wire_dict(make(big))["views"][0]["lat"]["b"]
    assert raw == little.astype("<f4").tobytes()


def test_extreme_but_valid_values_round_trip() -> None:
    msg = FrameSetMessage(
        node_id="n" * 128,
        seq=2**64 - 1,
        send_time=0.0,
        encoder_fingerprint="é" * 64,  # 128 UTF-8 bytes: exactly the default limit
        views=tuple(ViewRecord(f"c{i}", "withheld", "policy", 0.0) for i in range(64)),
    )
    assert_same_message(msg, decode_frameset(encode_frameset(msg)))


def test_integer_timestamps_from_foreign_clients_are_accepted() -> None:
    raw = wire_dict()
    raw["t"] = 1_700_000_000
    raw["views"][0]["tc"] = 5
    decoded = decode_frameset(pack(raw))
    assert decoded.send_time == 1_700_000_000.0 and type(decoded.send_time) is float
    assert decoded.views[0].capture_time == 5.0


def test_every_status_has_a_reason_vocabulary() -> None:
    assert set(REASONS_BY_STATUS) == set(ViewStatus)
    used = set().union(*REASONS_BY_STATUS.values())
    assert used == set(ReasonCode)


# --- golden files ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN_MESSAGES))
def test_golden_bytes_are_stable(name: str) -> None:
    path = GOLDEN_DIR / name
    encoded = encode_frameset(GOLDEN_MESSAGES[name]())
    if os.environ.get("MVLD_WRITE_GOLDEN") == "1":
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
        (lambda: ViewRecord("c", "ok", "none", 1.0, np.zeros((0, 3), np.float32)), "shape"),
        (lambda: ViewRecord("c", "ok", "none", 1.0, np.array([np.nan], np.float32)), "NaN"),
        (lambda: ViewRecord("c", "ok", "none", math.inf, latent((2,))), "capture_time"),
        (lambda: FrameSetMessage("n", -1, 1.0, "f", _views()), "seq"),
        (lambda: FrameSetMessage("n", True, 1.0, "f", _views()), "seq"),
        (lambda: FrameSetMessage("n", 0, math.nan, "f", _views()), "send_time"),
        (lambda: FrameSetMessage("n", 0, 1.0, "f", ()), "at least one"),
        (lambda: FrameSetMessage("n", 0, 1.0, "f", None), "views"),  # type: ignore[arg-type]
        (lambda: FrameSetMessage("n", 0, 1.0, "f", _views() * 2), "unique"),
        (lambda: FrameSetMessage("n", 0, 1.0, "f", _views(), version=2), "version"),
        (lambda: FrameSetMessage("n", 0, 1.0, "", _views()), "encoder_fingerprint"),
        (
            lambda: FrameSetMessage(
                "n",
                0,
                1.0,
                "f",
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


def test_encode_refuses_what_the_receiver_limits_would_drop() -> None:
    msg = mixed_message("float32", (10, 10))
    with pytest.raises(ProtocolError, match="elements"):
        encode_frameset(msg, WireLimits(max_latent_elements=50))
    with pytest.raises(ProtocolError, match="max_message_bytes"):
        encode_frameset(msg, WireLimits(max_message_bytes=200))
    with pytest.raises(ProtocolError, match="views"):
        encode_frameset(msg, WireLimits(max_views=2))


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
FIELD_CORRUPTIONS = [
    (_set(("v",), 2), "version"),
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
    (_set(("views", 0, "lat"), None), r"views\[0\].latent"),
    (_set(("views", 1, "lat"), {"dt": "float32", "sh": [1], "b": b"\0" * 4}), "latent"),
    (_set((*LAT, "dt"), "float64"), "lat.dt"),
    (_set((*LAT, "dt"), "<f4"), "lat.dt"),
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
    small_bin = encode_frameset(mixed_message("uint8", (10, 10)))
    with pytest.raises(ProtocolError, match=r"lat\.sh"):
        decode_frameset(small_bin, WireLimits(max_latent_elements=99))


def test_version_constant_matches_golden_files() -> None:
    for name in GOLDEN_MESSAGES:
        assert name.startswith(f"v{PROTOCOL_VERSION}_")


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
    data = encode_frameset(FrameSetMessage("n", 0, 1.0, "f", views))
    assert len(data) <= limits.max_message_bytes
    tracemalloc.start()
    try:
        decode_frameset(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(data)
