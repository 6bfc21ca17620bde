"""MVLD wire protocol, version 1: one msgpack map per frame set of one edge node.

This module is the single definition of the message an edge node sends and a receiver
accepts (DESIGN.md section 3, specified byte for byte in ``docs/PROTOCOL.md``). Only plain
msgpack types travel (map, array, str, int, float, bin, nil); a latent is raw little-endian
bytes plus a dtype string and a shape array. Decoding is strict and bounded: the size of
the input and every msgpack container are limited *before* anything is allocated, every
field is type-checked, and every rejection raises :class:`~mvld.common.errors.ProtocolError`
with the offending field in its message — never any other exception.

No torch here: the edge imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack
import numpy as np

from mvld.common.errors import ConfigError, ProtocolError

__all__ = [
    "LATENT_DTYPES",
    "PROTOCOL_VERSION",
    "REASONS_BY_STATUS",
    "FrameSetMessage",
    "ReasonCode",
    "ViewRecord",
    "ViewStatus",
    "WireLimits",
    "check_limits",
    "decode_frameset",
    "encode_frameset",
]

PROTOCOL_VERSION = 1
"""Major version written in key ``v``; a receiver rejects every other value."""

LATENT_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "uint8": np.dtype("u1"),
    "int8": np.dtype("i1"),
}
"""Wire dtype string -> little-endian numpy dtype of the latent bytes."""

_WIRE_NAME_BY_DTYPE: dict[np.dtype, str] = {
    dtype.newbyteorder(order): name for name, dtype in LATENT_DTYPES.items() for order in "<>="
}  # dtype.name is slow; a dict lookup of either byte order is not

_MAX_SEQ = 2**64 - 1
_MAX_MAP_ENTRIES = 8  # the largest map of the format (the top level) has 6 keys


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


def _check_time(value: Any, field: str) -> float:
    """Return a finite, non-negative POSIX time in seconds as float (ints are accepted)."""
    if type(value) not in (int, float):
        raise _protocol_error(field, f"expected a float, got {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise _protocol_error(field, f"must be finite and >= 0, got {value!r}")
    return seconds


def _check_text(value: Any, field: str) -> str:
    if type(value) is not str:
        raise _protocol_error(field, f"expected a str, got {type(value).__name__}")
    if not value:
        raise _protocol_error(field, "must not be empty")
    return value


def _check_latent(latent: Any, field: str) -> None:
    """A latent is a non-empty numpy array of a wire dtype with finite values."""
    if not isinstance(latent, np.ndarray):
        raise _protocol_error(field, f"expected a numpy array, got {type(latent).__name__}")
    if latent.dtype not in _WIRE_NAME_BY_DTYPE:
        raise _protocol_error(
            field, f"dtype {latent.dtype} not in allowed dtypes {sorted(LATENT_DTYPES)}"
        )
    if latent.ndim == 0 or latent.size == 0:
        raise _protocol_error(field, f"shape {latent.shape} must have >= 1 dims, all >= 1")
    if latent.dtype.kind == "f" and not np.isfinite(latent).all():
        raise _protocol_error(field, "contains NaN or infinite values")


@dataclass(frozen=True, eq=False)
class ViewRecord:
    """One camera of a frame set: its status and, iff the status is ``ok``, its latent."""

    camera_id: str
    status: ViewStatus
    reason: ReasonCode
    capture_time: float | None  # POSIX seconds of the frame; None only when no frame exists
    latent: np.ndarray | None = None

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
    """Everything one edge node reports for one synchronised frame set."""

    node_id: str
    seq: int  # frame-set sequence number of this node, 0 <= seq < 2**64
    send_time: float  # POSIX seconds when the edge encoded this message
    encoder_fingerprint: str  # identifies the exported encoder that made the latents
    views: tuple[ViewRecord, ...]
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if type(self.version) is not int or self.version != PROTOCOL_VERSION:
            raise _protocol_error(
                "version",
                f"unsupported protocol version {self.version!r} "
                f"(this implementation speaks {PROTOCOL_VERSION})",
            )
        _check_text(self.node_id, "node_id")
        _check_text(self.encoder_fingerprint, "encoder_fingerprint")
        if type(self.seq) is not int or not 0 <= self.seq <= _MAX_SEQ:
            raise _protocol_error("seq", f"must be an int in [0, 2**64), got {self.seq!r}")
        object.__setattr__(self, "send_time", _check_time(self.send_time, "send_time"))
        if not isinstance(self.views, (tuple, list)):
            raise _protocol_error(
                "views", f"expected a tuple of ViewRecord, got {type(self.views)}"
            )
        views = tuple(self.views)
        object.__setattr__(self, "views", views)
        _check_views(views)


def _check_views(views: tuple[ViewRecord, ...]) -> None:
    """At least one view, unique camera ids, one dtype and shape for every latent."""
    if not views:
        raise _protocol_error("views", "a frame set reports at least one camera")
    for index, view in enumerate(views):
        if not isinstance(view, ViewRecord):
            raise _protocol_error(f"views[{index}]", f"expected ViewRecord, got {type(view)}")
    camera_ids = [view.camera_id for view in views]
    if len(set(camera_ids)) != len(camera_ids):
        raise _protocol_error("views", f"camera ids must be unique, got {camera_ids}")
    layouts = {
        (_WIRE_NAME_BY_DTYPE[v.latent.dtype], v.latent.shape) for v in views if v.latent is not None
    }
    if len(layouts) > 1:
        raise _protocol_error("views", f"latents must share dtype and shape, got {layouts}")


def check_limits(msg: FrameSetMessage, limits: WireLimits) -> None:
    """Raise ProtocolError if ``msg`` would exceed ``limits`` (the encoded size aside)."""
    if len(msg.views) > limits.max_views:
        raise _protocol_error("views", f"{len(msg.views)} views exceed {limits.max_views}")
    texts = {"node": msg.node_id, "enc": msg.encoder_fingerprint}
    texts.update({f"views[{i}].cam": v.camera_id for i, v in enumerate(msg.views)})
    for field, text in texts.items():
        if len(text.encode("utf-8")) > limits.max_str_bytes:
            raise _protocol_error(field, f"longer than {limits.max_str_bytes} UTF-8 bytes")
    for index, view in enumerate(msg.views):
        if view.latent is None:
            continue
        if view.latent.ndim > limits.max_latent_dims:
            raise _protocol_error(
                f"views[{index}].lat.sh", f"more than {limits.max_latent_dims} dims"
            )
        if view.latent.size > limits.max_latent_elements:
            raise _protocol_error(
                f"views[{index}].lat.sh",
                f"{view.latent.size} elements exceed {limits.max_latent_elements}",
            )


def _latent_to_wire(latent: np.ndarray) -> dict[str, Any]:
    name = _WIRE_NAME_BY_DTYPE[latent.dtype]
    data = np.ascontiguousarray(latent, dtype=LATENT_DTYPES[name]).tobytes()
    return {"dt": name, "sh": list(latent.shape), "b": data}


def _view_to_wire(view: ViewRecord) -> dict[str, Any]:
    return {
        "cam": view.camera_id,
        "st": view.status.value,
        "why": view.reason.value,
        "tc": view.capture_time,
        "lat": None if view.latent is None else _latent_to_wire(view.latent),
    }


def encode_frameset(msg: FrameSetMessage, limits: WireLimits | None = None) -> bytes:
    """Serialise ``msg`` to one msgpack map; refuse what a receiver with ``limits`` would drop."""
    limits = limits or WireLimits()
    check_limits(msg, limits)
    wire = {
        "v": msg.version,
        "node": msg.node_id,
        "seq": msg.seq,
        "t": msg.send_time,
        "enc": msg.encoder_fingerprint,
        "views": [_view_to_wire(view) for view in msg.views],
    }
    data = msgpack.packb(wire, use_bin_type=True)
    if len(data) > limits.max_message_bytes:
        raise _protocol_error(
            "message", f"{len(data)} bytes exceed max_message_bytes={limits.max_message_bytes}"
        )
    return data


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} is not allowed in MVLD messages")


def _unpack(data: bytes, limits: WireLimits) -> Any:
    """msgpack-decode ``data`` with every container bounded so no allocation can run away."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _protocol_error("message", f"expected bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > limits.max_message_bytes:
        raise _protocol_error(
            "message", f"{size} bytes exceed max_message_bytes={limits.max_message_bytes}"
        )
    max_itemsize = max(dtype.itemsize for dtype in LATENT_DTYPES.values())
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            max_str_len=limits.max_str_bytes,
            max_bin_len=limits.max_latent_elements * max_itemsize,
            max_array_len=max(limits.max_views, limits.max_latent_dims),
            max_map_len=_MAX_MAP_ENTRIES,
            max_ext_len=0,
        )
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise _protocol_error("message", f"not a valid bounded msgpack value ({exc})") from exc


def _fields(obj: Any, field: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """Check ``obj`` is a map with exactly ``keys`` (unknown keys are rejected in version 1)."""
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


def _latent_from_wire(obj: Any, field: str, limits: WireLimits) -> np.ndarray:
    """Check dtype, shape and byte count against limits, then view the bytes as an array."""
    lat = _fields(obj, field, ("dt", "sh", "b"))
    dtype_name = lat["dt"]
    if type(dtype_name) is not str or dtype_name not in LATENT_DTYPES:
        raise _protocol_error(f"{field}.dt", f"{dtype_name!r} not in {sorted(LATENT_DTYPES)}")
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
    latent = np.frombuffer(payload, dtype=wire_dtype).reshape(shape)
    latent = latent.astype(wire_dtype.newbyteorder("="), copy=False)
    latent.flags.writeable = False
    return latent  # ViewRecord rejects NaN and infinities


def _view_from_wire(obj: Any, index: int, limits: WireLimits) -> ViewRecord:
    field = f"views[{index}]"
    view = _fields(obj, field, ("cam", "st", "why", "tc", "lat"))
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
    capture_time = None if capture is None else _check_time(capture, f"{field}.tc")
    latent = None if view["lat"] is None else _latent_from_wire(view["lat"], f"{field}.lat", limits)
    try:
        return ViewRecord(camera_id, status, reason, capture_time, latent)
    except ProtocolError as exc:
        raise ProtocolError(f"{field}.{exc}") from exc


def decode_frameset(data: bytes, limits: WireLimits | None = None) -> FrameSetMessage:
    """Parse and validate one message; raise ProtocolError (naming the field) on any defect."""
    limits = limits or WireLimits()
    top = _fields(_unpack(data, limits), "message", ("v", "node", "seq", "t", "enc", "views"))
    version = top["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise _protocol_error(
            "v", f"unsupported protocol version {version!r} (expected {PROTOCOL_VERSION})"
        )
    node_id = _wire_str(top, "node", "")
    fingerprint = _wire_str(top, "enc", "")
    seq = top["seq"]
    if type(seq) is not int or not 0 <= seq <= _MAX_SEQ:
        raise _protocol_error("seq", f"must be an int in [0, 2**64), got {seq!r}")
    send_time = _check_time(top["t"], "t")
    raw_views = top["views"]
    if type(raw_views) is not list or not 1 <= len(raw_views) <= limits.max_views:
        raise _protocol_error("views", f"expected an array of 1..{limits.max_views} views")
    views = tuple(_view_from_wire(obj, i, limits) for i, obj in enumerate(raw_views))
    try:
        return FrameSetMessage(node_id, seq, send_time, fingerprint, views, version)
    except ProtocolError as exc:
        raise ProtocolError(f"message: {exc}") from exc
