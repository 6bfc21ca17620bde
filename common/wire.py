"""MVLD wire protocol: one msgpack map per frame set of one edge node (versions 1 and 2).

This module is the single definition of the message an edge node sends and a receiver
accepts (specified byte for byte in ``docs/PROTOCOL.md``). Only plain
msgpack types travel (map, array, str, int, float, bin, nil); a latent is raw little-endian
bytes plus a dtype string, a shape array and, for ``int8``, its scale. Version 2 (written by
default) carries the encoder fingerprint as 8 bytes, requires float 64 times and knows
symmetric ``int8`` latents; version 1 is still decoded. Decoding is strict and bounded: the
input is parsed by a small msgpack reader of our own, because msgpack-python can neither
report duplicate map keys nor say whether a float was 32 or 64 bits wide; the size of the
input and every container are checked *before* anything is allocated, every field is
type-checked, and every rejection raises :class:`~mvld.common.errors.ProtocolError` with the
offending field in its message — never any other exception. Decoded latents are always
read-only float32 arrays (float16 widened, int8 dequantized).

No torch here: the edge imports this module.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import Enum
from string import hexdigits
from typing import Any, Literal

import msgpack
import numpy as np

from mvld.common.errors import ConfigError, ProtocolError

__all__ = [
    "DEFAULT_LATENT_DTYPE",
    "FINGERPRINT_BYTES",
    "LATENT_DTYPES",
    "PROTOCOL_VERSION",
    "REASONS_BY_STATUS",
    "SUPPORTED_VERSIONS",
    "V1_LATENT_DTYPES",
    "FrameSetMessage",
    "Latent",
    "QuantizedLatent",
    "ReasonCode",
    "ViewRecord",
    "ViewStatus",
    "WireLimits",
    "check_limits",
    "decode_frameset",
    "encode_frameset",
    "latent_nbytes",
    "quantize_latent",
    "wire_fingerprint",
]

PROTOCOL_VERSION = 2
"""Major version the encoder writes by default (key ``v``)."""

SUPPORTED_VERSIONS = (1, 2)
"""Versions the decoder accepts; every other ``v`` is rejected."""

FINGERPRINT_BYTES = 8
"""Version 2 ``enc``: the first 8 bytes of the sha256 digest that is the encoder fingerprint."""

LATENT_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
}
"""Version 2 wire dtype string -> numpy dtype of the latent bytes (``int8`` carries ``s``)."""

V1_LATENT_DTYPES = ("float32", "float16")
"""Version 1 has no scale field, so its integer dtypes had no meaning and are refused."""

DEFAULT_LATENT_DTYPE = "int8"
"""What the edge sends unless told otherwise (``mvld-edge --latent-dtype``)."""

_BYTE_ORDERS: tuple[Literal["<", ">", "="], ...] = ("<", ">", "=")
_FLOAT_WIRE_NAMES: dict[np.dtype, str] = {
    LATENT_DTYPES[name].newbyteorder(order): name
    for name in V1_LATENT_DTYPES
    for order in _BYTE_ORDERS
}  # dtype.name is slow; a dict lookup of either byte order is not

_MAX_SEQ = 2**64 - 1
_MAX_MAP_ENTRIES = 8  # the largest map of the format (the top level) has 6 keys
_MAX_DEPTH = 5  # top map > views array > view map > latent map > sh array
_INT8_LIMIT = 127  # symmetric quantization uses -127..127 (the decoder also accepts -128)
_TOP_KEYS = ("v", "node", "seq", "t", "enc", "views")
_VIEW_KEYS = ("cam", "st", "why", "tc", "lat")


class ViewStatus(str, Enum):
    """What happened to one camera in one frame set."""

    OK = "ok"  # the view was captured, judged usable and its latent is attached
    FAILED = "failed"  # no usable frame: the camera or its stream is broken
    OBSTRUCTED = "obstructed"  # frames arrive but the scene is hidden or degraded
    WITHHELD = "withheld"  # usable, but not sent by the transmit policy (bandwidth budget)


class ReasonCode(str, Enum):
    """Why a view has its status: a closed vocabulary, paired with statuses in REASONS_BY_STATUS."""

    NONE = "none"
    TIMEOUT = "timeout"
    DISCONNECTED = "disconnected"
    READ_ERROR = "read_error"
    END_OF_STREAM = "end_of_stream"
    STALE = "stale"
    FROZEN = "frozen"
    BLACK = "black"
    UNIFORM = "uniform"
    NOISE = "noise"
    OCCLUDED = "occluded"
    DEFOCUSED = "defocused"
    DIRTY = "dirty"
    REDIRECTED = "redirected"
    POLICY = "policy"
    UNKNOWN = "unknown"


REASONS_BY_STATUS: dict[ViewStatus, frozenset[ReasonCode]] = {
    ViewStatus.OK: frozenset({ReasonCode.NONE}),
    ViewStatus.FAILED: frozenset(
        {
            ReasonCode.TIMEOUT,
            ReasonCode.DISCONNECTED,
            ReasonCode.READ_ERROR,
            ReasonCode.END_OF_STREAM,
            ReasonCode.STALE,
            ReasonCode.FROZEN,
            ReasonCode.BLACK,
            ReasonCode.UNIFORM,
            ReasonCode.NOISE,
            ReasonCode.UNKNOWN,
        }
    ),
    ViewStatus.OBSTRUCTED: frozenset(
        {
            ReasonCode.OCCLUDED,
            ReasonCode.DEFOCUSED,
            ReasonCode.DIRTY,
            ReasonCode.REDIRECTED,
            ReasonCode.UNKNOWN,
        }
    ),
    ViewStatus.WITHHELD: frozenset({ReasonCode.POLICY}),
}
"""The reason codes each status may carry; any other pairing is rejected."""


@dataclass(frozen=True)
class WireLimits:
    """Receiver-side bounds, checked before any allocation; senders must stay within them."""

    max_message_bytes: int = 1 << 20
    max_views: int = 64
    max_latent_elements: int = 1 << 16
    max_latent_dims: int = 4
    max_str_bytes: int = 128

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if type(value) is not int or value < 1:
                raise ConfigError(f"WireLimits.{name} must be a positive int, got {value!r}")


def _protocol_error(field: str, problem: str) -> ProtocolError:
    return ProtocolError(f"{field}: {problem}")


# ---------------------------------------------------------------- latents


@dataclass(frozen=True, eq=False)
class QuantizedLatent:
    """A symmetric int8 latent: element = ``values * scale`` (per view, no zero point).

    Built by :func:`quantize_latent` on the edge; the decoder hands the receiver the
    dequantized float32 array instead, so nothing downstream ever sees raw integers.
    """

    values: np.ndarray  # int8, the latent's shape
    scale: float  # finite, > 0

    def __post_init__(self) -> None:
        if not isinstance(self.values, np.ndarray) or self.values.dtype != np.int8:
            raise _protocol_error("latent", "a quantized latent holds an int8 numpy array")
        if self.values.ndim == 0 or self.values.size == 0:
            raise _protocol_error("latent", f"shape {self.values.shape} must have >= 1 dims")
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)):
            raise _protocol_error("latent.scale", f"expected a float, got {type(scale).__name__}")
        if not math.isfinite(scale) or not scale > 0:
            raise _protocol_error("latent.scale", f"must be finite and > 0, got {scale!r}")
        object.__setattr__(self, "scale", float(scale))

    @property
    def shape(self) -> tuple[int, ...]:
        """The latent's shape (the ``sh`` on the wire)."""
        return tuple(self.values.shape)

    def dequantize(self) -> np.ndarray:
        """float32 elements ``q * s``, computed in float64 and rounded once (PROTOCOL.md 4.2)."""
        with np.errstate(over="ignore"):  # a huge scale gives inf, which callers refuse
            return (self.values.astype(np.float64) * self.scale).astype(np.float32)


Latent = np.ndarray | QuantizedLatent
"""What a view carries when encoding: a float16/float32 array or an int8 latent and scale."""


def quantize_latent(latent: np.ndarray, dtype: str = DEFAULT_LATENT_DTYPE) -> Latent:
    """The wire form of a float latent in ``dtype``: a cast array, or int8 with its scale.

    int8 is symmetric per view: ``s = max|x| / 127`` (1.0 for an all-zero latent) and
    ``q = round(x / s)``, so the largest magnitude is kept exactly and every element is off
    by at most ``s / 2``.
    """
    if dtype not in LATENT_DTYPES:
        raise ConfigError(f"latent dtype must be one of {sorted(LATENT_DTYPES)}, got {dtype!r}")
    array = np.asarray(latent)
    if array.dtype.kind != "f":
        raise _protocol_error("latent", f"expected a float array, got {array.dtype}")
    if not np.isfinite(array).all():
        raise _protocol_error("latent", "contains NaN or infinite values")
    if dtype != "int8":
        with np.errstate(over="ignore"):  # out of float16 range: inf, refused below
            cast = np.ascontiguousarray(array, dtype=LATENT_DTYPES[dtype])
        if not np.isfinite(cast).all():
            raise _protocol_error("latent", f"values exceed the range of {dtype}")
        return cast
    wide = array.astype(np.float64)
    peak = float(np.max(np.abs(wide))) if wide.size else 0.0
    scale = peak / _INT8_LIMIT
    if not scale > 0:  # all zeros (or so small that the scale underflows)
        scale = 1.0
    values = np.clip(np.rint(wide / scale), -_INT8_LIMIT, _INT8_LIMIT).astype(np.int8)
    return QuantizedLatent(values, scale)


def _latent_layout(latent: Latent) -> tuple[str, tuple[int, ...]]:
    """(wire dtype name, shape) of an encodable latent."""
    if isinstance(latent, QuantizedLatent):
        return "int8", latent.shape
    return _FLOAT_WIRE_NAMES[latent.dtype], tuple(latent.shape)


def latent_nbytes(elements: int, dtype: str) -> int:
    """Payload bytes of one latent of ``elements`` values in wire ``dtype`` (budgets)."""
    return elements * LATENT_DTYPES[dtype].itemsize


# ---------------------------------------------------------------- checks


def _check_time(value: Any, field: str) -> float:
    """Return a finite, non-negative POSIX time in seconds as float (ints are accepted)."""
    if type(value) not in (int, float, _Float32):
        raise _protocol_error(field, f"expected a float, got {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise _protocol_error(field, f"must be finite and >= 0, got {value!r}")
    return seconds


def _check_wire_time(value: Any, field: str, version: int) -> float:
    """Version 1: int, float 32 or 64; version 2: float 64 only (float 32 is 128 s coarse)."""
    if version >= 2 and type(value) is not float:
        kind = "float 32" if type(value) is _Float32 else type(value).__name__
        raise _protocol_error(
            field,
            f"must be a msgpack float 64 in version {version}, got "
            f"{kind} (float 32 resolves today's times to 128 s)",
        )
    return _check_time(value, field)


def _check_text(value: Any, field: str) -> str:
    if type(value) is not str:
        raise _protocol_error(field, f"expected a str, got {type(value).__name__}")
    if not value:
        raise _protocol_error(field, "must not be empty")
    return value


def _check_fingerprint(value: Any, version: int) -> str:
    """v1: any non-empty str; v2: a hex digest, kept as its first 8 bytes (16 hex digits)."""
    _check_text(value, "encoder_fingerprint")
    if version == 1:
        return value
    digits = 2 * FINGERPRINT_BYTES
    if len(value) < digits or any(c not in hexdigits for c in value):
        raise _protocol_error(
            "encoder_fingerprint",
            f"version {version} needs a hex digest of >= {digits} digits, got {value!r}",
        )
    return value[:digits].lower()


def wire_fingerprint(fingerprint: str, version: int = PROTOCOL_VERSION) -> str:
    """How a message of ``version`` carries the full ``fingerprint`` (what receivers compare).

    Version 1 sends the string itself; version 2 the first 8 bytes of the sha256 digest,
    which :class:`FrameSetMessage` holds as 16 lowercase hex digits.
    """
    if version not in SUPPORTED_VERSIONS:
        raise _protocol_error("version", f"unsupported protocol version {version!r}")
    return _check_fingerprint(fingerprint, version)


def _check_latent(latent: Any, field: str) -> None:
    """An encodable latent: an int8 QuantizedLatent, or a float array with finite values."""
    if isinstance(latent, QuantizedLatent):
        return
    if not isinstance(latent, np.ndarray):
        raise _protocol_error(field, f"expected a numpy array, got {type(latent).__name__}")
    if latent.dtype not in _FLOAT_WIRE_NAMES:
        hint = (
            " (integer latents need their scale: quantize_latent(x, 'int8'))"
            if latent.dtype.kind in "iu"
            else ""
        )
        raise _protocol_error(
            field, f"dtype {latent.dtype} not in allowed dtypes {sorted(LATENT_DTYPES)}{hint}"
        )
    if latent.ndim == 0 or latent.size == 0:
        raise _protocol_error(field, f"shape {latent.shape} must have >= 1 dims, all >= 1")
    if not np.isfinite(latent).all():
        raise _protocol_error(field, "contains NaN or infinite values")


@dataclass(frozen=True, eq=False)
class ViewRecord:
    """One camera of a frame set: its status and, iff the status is ``ok``, its latent."""

    camera_id: str
    status: ViewStatus
    reason: ReasonCode
    capture_time: float | None  # POSIX seconds of the frame; None only when no frame exists
    latent: Latent | None = None  # decoded messages always hold a float32 array here

    def __post_init__(self) -> None:
        _check_text(self.camera_id, "camera_id")
        try:
            status = ViewStatus(self.status)
            reason = ReasonCode(self.reason)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"camera {self.camera_id!r}: {exc}") from exc
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "reason", reason)
        if reason not in REASONS_BY_STATUS[status]:
            allowed = sorted(r.value for r in REASONS_BY_STATUS[status])
            raise _protocol_error(
                "reason", f"{reason.value!r} not allowed with status {status.value!r} ({allowed})"
            )
        if self.capture_time is None:
            if status is ViewStatus.OK:
                raise _protocol_error("capture_time", "an ok view needs a capture time")
        else:
            object.__setattr__(self, "capture_time", _check_time(self.capture_time, "capture_time"))
        if (self.latent is not None) != (status is ViewStatus.OK):
            raise _protocol_error("latent", "a view has a latent if and only if its status is ok")
        if self.latent is not None:
            _check_latent(self.latent, "latent")


@dataclass(frozen=True, eq=False)
class FrameSetMessage:
    """Everything one edge node reports for one synchronised frame set.

    In version 2 ``encoder_fingerprint`` is given as the full hex digest and kept as the 16
    hex digits of the 8 bytes that travel; decoded messages hold exactly that.
    """

    node_id: str
    seq: int  # frame-set sequence number of this node, 0 <= seq < 2**64
    send_time: float  # POSIX seconds when the edge encoded this message
    encoder_fingerprint: str  # identifies the exported encoder that made the latents
    views: tuple[ViewRecord, ...]
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version not in SUPPORTED_VERSIONS:
            raise _protocol_error(
                "version",
                f"unsupported protocol version {self.version!r} "
                f"(this implementation speaks {list(SUPPORTED_VERSIONS)})",
            )
        _check_text(self.node_id, "node_id")
        object.__setattr__(
            self, "encoder_fingerprint", _check_fingerprint(self.encoder_fingerprint, self.version)
        )
        if type(self.seq) is not int or not 0 <= self.seq <= _MAX_SEQ:
            raise _protocol_error("seq", f"must be an int in [0, 2**64), got {self.seq!r}")
        object.__setattr__(self, "send_time", _check_time(self.send_time, "send_time"))
        if not isinstance(self.views, (tuple, list)):
            raise _protocol_error(
                "views", f"expected a tuple of ViewRecord, got {type(self.views)}"
            )
        views = tuple(self.views)
        object.__setattr__(self, "views", views)
        _check_views(views, self.version)


def _check_views(views: tuple[ViewRecord, ...], version: int) -> None:
    """At least one view, unique camera ids, one dtype and shape for every latent."""
    if not views:
        raise _protocol_error("views", "a frame set reports at least one camera")
    for index, view in enumerate(views):
        if not isinstance(view, ViewRecord):
            raise _protocol_error(f"views[{index}]", f"expected ViewRecord, got {type(view)}")
        if version == 1 and isinstance(view.latent, QuantizedLatent):
            raise _protocol_error(
                f"views[{index}].latent",
                "version 1 has no scale field: int8 latents need version 2",
            )
    camera_ids = [view.camera_id for view in views]
    if len(set(camera_ids)) != len(camera_ids):
        raise _protocol_error("views", f"camera ids must be unique, got {camera_ids}")
    layouts = {_latent_layout(v.latent) for v in views if v.latent is not None}
    if len(layouts) > 1:
        raise _protocol_error("views", f"latents must share dtype and shape, got {layouts}")


def check_limits(msg: FrameSetMessage, limits: WireLimits) -> None:
    """Raise ProtocolError if ``msg`` would exceed ``limits`` (the encoded size aside)."""
    if len(msg.views) > limits.max_views:
        raise _protocol_error("views", f"{len(msg.views)} views exceed {limits.max_views}")
    texts = {"node": msg.node_id}
    if msg.version == 1:
        texts["enc"] = msg.encoder_fingerprint
    texts.update({f"views[{i}].cam": v.camera_id for i, v in enumerate(msg.views)})
    for field, text in texts.items():
        if len(text.encode("utf-8")) > limits.max_str_bytes:
            raise _protocol_error(field, f"longer than {limits.max_str_bytes} UTF-8 bytes")
    for index, view in enumerate(msg.views):
        if view.latent is None:
            continue
        shape = _latent_layout(view.latent)[1]
        if len(shape) > limits.max_latent_dims:
            raise _protocol_error(
                f"views[{index}].lat.sh", f"more than {limits.max_latent_dims} dims"
            )
        if math.prod(shape) > limits.max_latent_elements:
            raise _protocol_error(
                f"views[{index}].lat.sh",
                f"{math.prod(shape)} elements exceed {limits.max_latent_elements}",
            )


# ---------------------------------------------------------------- encoding


def _latent_to_wire(latent: Latent) -> dict[str, Any]:
    name, shape = _latent_layout(latent)
    if isinstance(latent, QuantizedLatent):
        data = np.ascontiguousarray(latent.values).tobytes()
        return {"dt": name, "sh": list(shape), "s": latent.scale, "b": data}
    data = np.ascontiguousarray(latent, dtype=LATENT_DTYPES[name]).tobytes()
    return {"dt": name, "sh": list(shape), "b": data}


def _view_to_wire(view: ViewRecord) -> dict[str, Any]:
    return {
        "cam": view.camera_id,
        "st": view.status.value,
        "why": view.reason.value,
        "tc": view.capture_time,
        "lat": None if view.latent is None else _latent_to_wire(view.latent),
    }


def encode_frameset(msg: FrameSetMessage, limits: WireLimits | None = None) -> bytes:
    """Serialise ``msg`` (in its own version) to one msgpack map; refuse what a receiver
    with ``limits`` would drop."""
    limits = limits or WireLimits()
    check_limits(msg, limits)
    fingerprint: str | bytes = msg.encoder_fingerprint
    if msg.version >= 2:
        fingerprint = bytes.fromhex(msg.encoder_fingerprint)
    wire = {
        "v": msg.version,
        "node": msg.node_id,
        "seq": msg.seq,
        "t": msg.send_time,  # a Python float: msgpack writes float 64
        "enc": fingerprint,
        "views": [_view_to_wire(view) for view in msg.views],
    }
    data = msgpack.packb(wire, use_bin_type=True)
    if len(data) > limits.max_message_bytes:
        raise _protocol_error(
            "message", f"{len(data)} bytes exceed max_message_bytes={limits.max_message_bytes}"
        )
    return data


# ---------------------------------------------------------------- bounded msgpack reader


class _Float32(float):
    """A value that arrived as msgpack float 32 (version 2 refuses it for times)."""

    __slots__ = ()


_U8, _U16, _U32, _U64 = (struct.Struct(f) for f in (">B", ">H", ">I", ">Q"))
_I8, _I16, _I32, _I64 = (struct.Struct(f) for f in (">b", ">h", ">i", ">q"))
_F32, _F64 = struct.Struct(">f"), struct.Struct(">d")
_FIXED = {
    0xCC: _U8,
    0xCD: _U16,
    0xCE: _U32,
    0xCF: _U64,
    0xD0: _I8,
    0xD1: _I16,
    0xD2: _I32,
    0xD3: _I64,
}
_LENGTHS = {
    0xC4: _U8,
    0xC5: _U16,
    0xC6: _U32,
    0xD9: _U8,
    0xDA: _U16,
    0xDB: _U32,
    0xDC: _U16,
    0xDD: _U32,
    0xDE: _U16,
    0xDF: _U32,
}
_EXT_BYTES = frozenset({0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})


class _Reader:
    """Parse the msgpack subset MVLD uses; duplicate keys, ext types and excess are errors.

    Every length is checked against the limits and the bytes left before anything is
    sliced or allocated, and nesting stops at the format's depth, so no input makes it
    allocate more than a small multiple of its own size or recurse deeply.
    """

    def __init__(self, data: bytes, limits: WireLimits) -> None:
        self.data, self.pos, self.end = data, 0, len(data)
        self.max_str = limits.max_str_bytes
        self.max_bin = limits.max_latent_elements * max(d.itemsize for d in LATENT_DTYPES.values())
        self.max_array = max(limits.max_views, limits.max_latent_dims)

    def fail(self, where: str, problem: str) -> ProtocolError:
        return ProtocolError(f"message: {where + ': ' if where else ''}{problem}")

    def take(self, count: int, where: str) -> int:
        start = self.pos
        if count > self.end - start:
            raise self.fail(where, f"truncated ({count} bytes announced, {self.end - start} left)")
        self.pos = start + count
        return start

    def unpack(self, fmt: struct.Struct, where: str) -> Any:
        return fmt.unpack_from(self.data, self.take(fmt.size, where))[0]

    def value(self, depth: int, where: str) -> Any:
        if self.pos >= self.end:
            raise self.fail(where, "truncated")
        byte = self.data[self.pos]
        self.pos += 1
        if byte <= 0x7F:
            return byte
        if byte >= 0xE0:
            return byte - 0x100
        if byte <= 0x8F:
            return self.map(byte & 0x0F, depth, where)
        if byte <= 0x9F:
            return self.array(byte & 0x0F, depth, where)
        if byte <= 0xBF:
            return self.text(byte & 0x1F, where)
        if byte == 0xC0:
            return None
        if byte in (0xC2, 0xC3):
            return byte == 0xC3
        if byte == 0xCA:
            return _Float32(self.unpack(_F32, where))
        if byte == 0xCB:
            return self.unpack(_F64, where)
        if byte in _FIXED:
            return self.unpack(_FIXED[byte], where)
        if byte in _LENGTHS:
            count = self.unpack(_LENGTHS[byte], where)
            if byte <= 0xC6:
                return self.binary(count, where)
            if byte <= 0xDB:
                return self.text(count, where)
            if byte <= 0xDD:
                return self.array(count, depth, where)
            return self.map(count, depth, where)
        if byte in _EXT_BYTES:
            raise self.fail(where, "msgpack ext types are not allowed in MVLD messages")
        raise self.fail(where, f"byte 0x{byte:02x} is not a msgpack type")

    def text(self, count: int, where: str) -> str:
        if count > self.max_str:
            raise self.fail(where, f"str of {count} bytes exceeds {self.max_str}")
        start = self.take(count, where)
        try:
            return self.data[start : start + count].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(where, f"str is not valid UTF-8 ({exc.reason})") from exc

    def binary(self, count: int, where: str) -> bytes:
        if count > self.max_bin:
            raise self.fail(where, f"bin of {count} bytes exceeds {self.max_bin}")
        start = self.take(count, where)
        return self.data[start : start + count]

    def array(self, count: int, depth: int, where: str) -> list[Any]:
        if count > self.max_array:
            raise self.fail(where, f"array of {count} entries exceeds {self.max_array}")
        if depth >= _MAX_DEPTH:
            raise self.fail(where, "nested deeper than the format allows")
        return [self.value(depth + 1, f"{where}[{i}]") for i in range(count)]

    def map(self, count: int, depth: int, where: str) -> dict[str, Any]:
        if count > _MAX_MAP_ENTRIES:
            raise self.fail(where, f"map of {count} entries exceeds {_MAX_MAP_ENTRIES}")
        if depth >= _MAX_DEPTH:
            raise self.fail(where, "nested deeper than the format allows")
        out: dict[str, Any] = {}
        for _ in range(count):
            key = self.value(depth + 1, where)
            if type(key) is not str:
                raise self.fail(where, f"map keys must be str, got {type(key).__name__}")
            if key in out:
                raise self.fail(where, f"duplicate key {key!r}")
            out[key] = self.value(depth + 1, f"{where}.{key}" if where else key)
        return out


def _parse(data: Any, limits: WireLimits) -> Any:
    """The one top-level msgpack value of ``data``, bounded; trailing bytes are an error."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _protocol_error("message", f"expected bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > limits.max_message_bytes:
        raise _protocol_error(
            "message", f"{size} bytes exceed max_message_bytes={limits.max_message_bytes}"
        )
    reader = _Reader(data if isinstance(data, bytes) else bytes(data), limits)
    top = reader.value(0, "")
    if reader.pos != reader.end:
        raise _protocol_error(
            "message", f"{reader.end - reader.pos} trailing bytes after the top-level map"
        )
    return top


# ---------------------------------------------------------------- decoding


def _fields(obj: Any, field: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """Check ``obj`` is a map with exactly ``keys`` (unknown keys are rejected)."""
    if type(obj) is not dict:
        raise _protocol_error(field, f"expected a map, got {type(obj).__name__}")
    missing = [key for key in keys if key not in obj]
    if missing:
        raise _protocol_error(field, f"missing key(s) {missing}")
    unknown = sorted(set(obj) - set(keys))
    if unknown:
        raise _protocol_error(field, f"unknown key(s) {unknown}")
    return obj


def _wire_str(obj: dict[str, Any], key: str, field: str) -> str:
    return _check_text(obj[key], f"{field}.{key}" if field else key)


def _latent_from_wire(
    obj: Any, field: str, limits: WireLimits, version: int
) -> tuple[np.ndarray, tuple[str, tuple[int, ...]]]:
    """Check dtype, shape, byte count (and scale) before viewing the bytes; float32 out."""
    if type(obj) is not dict:
        raise _protocol_error(field, f"expected a map, got {type(obj).__name__}")
    dtype_name = obj.get("dt")
    allowed = V1_LATENT_DTYPES if version == 1 else tuple(LATENT_DTYPES)
    if type(dtype_name) is not str or dtype_name not in allowed:
        hint = ""
        if dtype_name in ("int8", "uint8"):
            hint = " (integer latents need their scale: int8 with s, version 2)"
        raise _protocol_error(f"{field}.dt", f"{dtype_name!r} not in {sorted(allowed)}{hint}")
    quantized = dtype_name == "int8"
    lat = _fields(obj, field, ("dt", "sh", "s", "b") if quantized else ("dt", "sh", "b"))
    shape = lat["sh"]
    if type(shape) is not list or not 1 <= len(shape) <= limits.max_latent_dims:
        raise _protocol_error(f"{field}.sh", f"expected 1..{limits.max_latent_dims} dims")
    if any(type(dim) is not int or dim < 1 for dim in shape):
        raise _protocol_error(f"{field}.sh", f"dims must be ints >= 1, got {shape!r}")
    count = 1
    for dim in shape:
        count *= dim
        if count > limits.max_latent_elements:
            raise _protocol_error(
                f"{field}.sh", f"shape {shape} exceeds {limits.max_latent_elements} elements"
            )
    payload = lat["b"]
    if type(payload) is not bytes:
        raise _protocol_error(f"{field}.b", f"expected bin, got {type(payload).__name__}")
    wire_dtype = LATENT_DTYPES[dtype_name]
    if len(payload) != count * wire_dtype.itemsize:
        raise _protocol_error(
            f"{field}.b",
            f"{len(payload)} bytes, shape {shape} of {dtype_name} needs "
            f"{count * wire_dtype.itemsize}",
        )
    raw = np.frombuffer(payload, dtype=wire_dtype).reshape(shape)
    if quantized:
        scale = lat["s"]
        if type(scale) not in (float, _Float32):
            raise _protocol_error(f"{field}.s", f"expected a float, got {type(scale).__name__}")
        if not math.isfinite(scale) or not scale > 0:
            raise _protocol_error(f"{field}.s", f"must be finite and > 0, got {scale!r}")
        latent = QuantizedLatent(raw, float(scale)).dequantize()
    else:
        latent = raw.astype(np.float32)  # widens float16, byte-swaps on big-endian hosts
    latent.flags.writeable = False
    return latent, (dtype_name, tuple(shape))  # ViewRecord rejects NaN and infinities


def _view_from_wire(
    obj: Any, index: int, limits: WireLimits, version: int
) -> tuple[ViewRecord, tuple[str, tuple[int, ...]] | None]:
    field = f"views[{index}]"
    view = _fields(obj, field, _VIEW_KEYS)
    camera_id = _wire_str(view, "cam", field)
    status_text = _wire_str(view, "st", field)
    reason_text = _wire_str(view, "why", field)
    try:
        status = ViewStatus(status_text)
    except ValueError as exc:
        raise _protocol_error(f"{field}.st", f"unknown status {status_text!r}") from exc
    try:
        reason = ReasonCode(reason_text)
    except ValueError as exc:
        raise _protocol_error(f"{field}.why", f"unknown reason code {reason_text!r}") from exc
    capture = view["tc"]
    capture_time = None if capture is None else _check_wire_time(capture, f"{field}.tc", version)
    latent, layout = None, None
    if view["lat"] is not None:
        latent, layout = _latent_from_wire(view["lat"], f"{field}.lat", limits, version)
    try:
        return ViewRecord(camera_id, status, reason, capture_time, latent), layout
    except ProtocolError as exc:
        raise ProtocolError(f"{field}.{exc}") from exc


def _wire_fingerprint_from(value: Any, version: int) -> str:
    if version == 1:
        return _check_text(value, "enc")
    if type(value) is not bytes or len(value) != FINGERPRINT_BYTES:
        kind = f"{len(value)} bytes" if type(value) is bytes else type(value).__name__
        raise _protocol_error("enc", f"expected bin of {FINGERPRINT_BYTES} bytes, got {kind}")
    return value.hex()


def decode_frameset(data: bytes, limits: WireLimits | None = None) -> FrameSetMessage:
    """Parse and validate one message of any supported version; raise ProtocolError
    (naming the field) on any defect."""
    limits = limits or WireLimits()
    top = _fields(_parse(data, limits), "message", _TOP_KEYS)
    version = top["v"]
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise _protocol_error(
            "v",
            f"unsupported protocol version {version!r} (expected one of "
            f"{list(SUPPORTED_VERSIONS)})",
        )
    node_id = _wire_str(top, "node", "")
    fingerprint = _wire_fingerprint_from(top["enc"], version)
    seq = top["seq"]
    if type(seq) is not int or not 0 <= seq <= _MAX_SEQ:
        raise _protocol_error("seq", f"must be an int in [0, 2**64), got {seq!r}")
    send_time = _check_wire_time(top["t"], "t", version)
    raw_views = top["views"]
    if type(raw_views) is not list or not 1 <= len(raw_views) <= limits.max_views:
        raise _protocol_error("views", f"expected an array of 1..{limits.max_views} views")
    decoded = [_view_from_wire(obj, i, limits, version) for i, obj in enumerate(raw_views)]
    layouts = {layout for _, layout in decoded if layout is not None}
    if len(layouts) > 1:
        raise _protocol_error("views", f"latents must share dtype and shape, got {layouts}")
    views = tuple(view for view, _ in decoded)
    try:
        return FrameSetMessage(node_id, seq, send_time, fingerprint, views, version)
    except ProtocolError as exc:
        raise ProtocolError(f"message: {exc}") from exc
