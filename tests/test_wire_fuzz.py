"""Property-based fuzzing of the wire decoder: whatever arrives, only ProtocolError comes out.

Each property runs 2,000 examples in the default test run, drawn from a version 2 message
(int8 latents with their scale) and a version 1 message. A decode either returns a message
that passes every invariant (and re-encodes to an equivalent message) or raises ProtocolError;
any other exception fails the test. Memory is watched with tracemalloc: rejecting an input
never allocates much more than the input itself.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvld.common.errors import ProtocolError
from mvld.common.wire import (
    FrameSetMessage,
    ViewRecord,
    WireLimits,
    decode_frameset,
    encode_frameset,
    quantize_latent,
)

FUZZ = settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SMALL_LIMITS = WireLimits(max_message_bytes=4096, max_latent_elements=256, max_views=8)


def _valid_message(version: int) -> FrameSetMessage:
    dtype = "int8" if version == 2 else "float32"
    views = (
        ViewRecord(
            "cam0",
            "ok",
            "none",
            10.0,
            quantize_latent(np.linspace(-1, 1, 12, dtype=np.float32), dtype),
        ),
        ViewRecord(
            "cam1",
            "ok",
            "none",
            10.5,
            quantize_latent(np.linspace(1, 2, 12, dtype=np.float32), dtype),
        ),
        ViewRecord("cam2", "obstructed", "dirty", 10.0),
        ViewRecord("cam3", "failed", "read_error", None),
    )
    return FrameSetMessage("edge", 3, 11.0, "0f1e2d3c4b5a6978" * 4, views, version)


VALID = encode_frameset(_valid_message(2))
VALID_V1 = encode_frameset(_valid_message(1))
VALIDS = st.sampled_from([VALID, VALID_V1])


def decode_or_reject(data: Any, limits: WireLimits = SMALL_LIMITS) -> FrameSetMessage | None:
    """Decode ``data``; on success check the result is a valid, re-encodable message."""
    try:
        msg = decode_frameset(data, limits)
    except ProtocolError:
        return None
    assert isinstance(msg, FrameSetMessage)
    decode_frameset(encode_frameset(msg, limits), limits)
    return msg


def peak_allocation(data: Any) -> int:
    """Peak bytes traced while decoding ``data`` (then the result is checked as above)."""
    tracemalloc.start()
    try:
        decode_frameset(data, SMALL_LIMITS)
    except ProtocolError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    decode_or_reject(data)
    return peak


# msgpack values of every plain type, nested a little
plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=12,
)

FIELD_PATHS = [
    ("v",),
    ("node",),
    ("seq",),
    ("t",),
    ("enc",),
    ("views",),
    ("views", 0),
    ("views", 0, "cam"),
    ("views", 0, "st"),
    ("views", 0, "why"),
    ("views", 0, "tc"),
    ("views", 0, "lat"),
    ("views", 0, "lat", "dt"),
    ("views", 0, "lat", "sh"),
    ("views", 0, "lat", "b"),
    ("views", 0, "lat", "s"),
    ("views", 2, "lat"),
    ("views", 3, "tc"),
    ("new_key",),
]


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    decode_or_reject(data)


@FUZZ
@given(VALIDS, st.integers(min_value=0, max_value=len(VALID_V1) - 1))
def test_every_truncation_is_rejected(valid: bytes, cut: int) -> None:
    assert decode_or_reject(valid[: cut % len(valid)]) is None


@FUZZ
@given(
    VALIDS, st.lists(st.tuples(st.integers(0, len(VALID_V1) - 1), st.integers(0, 255)), max_size=6)
)
def test_byte_flips_of_a_valid_message(valid: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(valid)
    for index, value in flips:
        data[index % len(data)] = value
    assert peak_allocation(bytes(data)) < 4 * len(data) + 64 * 1024


@FUZZ
@given(VALIDS, st.sampled_from(FIELD_PATHS), plain_values)
def test_wrong_type_in_any_field(valid: bytes, path: tuple[Any, ...], value: Any) -> None:
    raw = msgpack.unpackb(valid, raw=False)
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    decode_or_reject(msgpack.packb(raw, use_bin_type=True))


@FUZZ
@given(
    st.lists(st.integers(min_value=-(2**63), max_value=2**64 - 1), min_size=0, max_size=6),
    st.sampled_from(["float32", "float16", "uint8", "int8", "float64", ""]),
    st.integers(min_value=0, max_value=64),
)
def test_declared_shapes_never_drive_allocation(shape: list[int], dtype: str, nbytes: int) -> None:
    raw = msgpack.unpackb(VALID, raw=False)
    raw["views"] = [raw["views"][0]]
    raw["views"][0]["lat"] = {"dt": dtype, "sh": shape, "b": b"\x01" * nbytes}
    if dtype == "int8":
        raw["views"][0]["lat"]["s"] = 0.25
    data = msgpack.packb(raw, use_bin_type=True)
    assert peak_allocation(data) < 4 * len(data) + 64 * 1024


@FUZZ
@given(st.integers(min_value=1, max_value=20_000), st.sampled_from([b"\x91", b"\x81\xa1k"]))
def test_deep_nesting(depth: int, opener: bytes) -> None:
    assert decode_or_reject(opener * depth + b"\xc0") is None


@FUZZ
@given(st.integers(min_value=1, max_value=4096), st.binary(min_size=1, max_size=8))
def test_oversized_messages(extra: int, filler: bytes) -> None:
    data = VALID + filler * (SMALL_LIMITS.max_message_bytes // len(filler) + extra)
    assert len(data) > SMALL_LIMITS.max_message_bytes
    assert peak_allocation(data) < 64 * 1024
