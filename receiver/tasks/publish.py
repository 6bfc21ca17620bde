"""``--task publish[:bind=tcp://*:5556][,images=1][,hwm=16]``: results to other programs.

A ZeroMQ PUB socket (binds; subscribers connect and subscribe to everything). One result
is one single-part message holding one msgpack map, plain types only, like the wire
protocol (docs/RECEIVER.md, "Result stream")::

    {"v": 1, "node": str, "seq": int, "capture_time": float, "send_time": float,
     "receive_time": float, "done_time": float, "latency_s": float,
     "annotations": map,
     "views": [{"cam": str, "status": str, "reason": str, "provenance": str,
                "uncertainty": float | nil, "capture_time": float | nil,
                "latent": {"dt": "float32", "sh": [D], "b": bin},
                "image": {"dt": "uint8", "sh": [H, W, 3], "b": bin} | nil}, ...]}

Images are RGB. PUB drops for slow subscribers at the high-water mark and never blocks the
receiver.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import zmq

from mvld.common.errors import ConfigError
from mvld.receiver.results import FrameSetResult
from mvld.receiver.tasks.options import parse_bool, parse_positive

__all__ = ["RESULT_VERSION", "PublishResults", "encode_result"]

RESULT_VERSION = 1


def _array(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    return {
        "dt": array.dtype.name,
        "sh": list(array.shape),
        "b": array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(),
    }


def encode_result(result: FrameSetResult, images: bool = True) -> bytes:
    """The msgpack bytes of one result message."""
    summary = result.summary()
    views = summary.pop("views")
    for entry, view in zip(views, result.views, strict=True):
        entry["latent"] = _array(view.latent.astype(np.float32, copy=False))
        entry["image"] = _array(view.image) if images else None
    return msgpack.packb({"v": RESULT_VERSION, **summary, "views": views}, use_bin_type=True)


class PublishResults:
    """Publish every result on a bound PUB socket."""

    def __init__(self, bind: str = "tcp://*:5556", images: str = "1", hwm: str = "16") -> None:
        self.images = parse_bool("publish", "images", images)
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.SNDHWM, int(parse_positive("publish", "hwm", hwm)))
            self._socket.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise ConfigError(f"task publish: cannot bind {bind}: {exc}") from exc
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def __call__(self, result: FrameSetResult) -> None:
        try:
            self._socket.send(encode_result(result, self.images), zmq.NOBLOCK)
        except zmq.Again:
            return  # PUB only raises this on a full queue in rare cases; dropping is intended

    def close(self) -> None:
        """Close the socket and its context."""
        if not self._socket.closed:
            self._socket.close()
        if not self._context.closed:
            self._context.term()
