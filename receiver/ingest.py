"""Ingest: receive wire messages, validate them against the model, queue them per node.

The subscriber loop (docs/ARCHITECTURE.md section 1: authenticate -> decode+validate -> assemble
by node) turns each wire message into a :class:`PendingFrameSet` in the model's camera order, or
drops it with a counted reason (``ReceiverMetrics.drop``) and a rate-limited warning; nothing a
sender does can raise out of the loop. Accepted frame sets wait in a :class:`NodeBacklog`: a few
per node, newest first, with a maximum age, and a bounded number of nodes, so memory stays
bounded however fast the nodes send, and stale frame sets are dropped (and counted) when
imputation cannot keep up instead of the receiver drifting into "slow motion".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mvld.common.errors import ConfigError, ProtocolError
from mvld.common.transport import LatentSubscriber
from mvld.common.wire import (
    FrameSetMessage,
    QuantizedLatent,
    ViewRecord,
    WireLimits,
    decode_frameset,
    wire_fingerprint,
)
from mvld.receiver.observability import RateLimitedLogger, ReceiverMetrics
from mvld.receiver.rate_limit import RateLimiter

__all__ = [
    "CLOCK_WINDOW_S",
    "CameraLayout",
    "Ingest",
    "NodeBacklog",
    "PendingFrameSet",
    "RejectionError",
]

log = logging.getLogger(__name__)

_MAX_BOUND_KEYS = 4096  # node id -> Curve key bindings kept (memory stays bounded)

CLOCK_WINDOW_S = 60.0
"""Default sanity window: ``t`` and every ``tc`` within this many seconds of the receiver's
clock at receipt, else the frame set is counted and kept out of the latency figures."""


@dataclass(frozen=True)
class CameraLayout:
    """The model's views: camera id of each view index, and the latent size and shape per view.

    ``latent_shape`` is the model's ``AutoencoderConfig.latent_shape`` (``(D,)`` by default);
    a version 2 latent must have exactly this ``sh``, a version 1 latent exactly ``[D]``
    (what version 1 edges send).
    """

    camera_ids: tuple[str, ...]
    latent_dim: int
    latent_shape: tuple[int, ...] = ()  # () means (latent_dim,)

    def __post_init__(self) -> None:
        if not self.camera_ids or len(set(self.camera_ids)) != len(self.camera_ids):
            raise ConfigError(f"camera ids must be unique and non-empty: {self.camera_ids}")
        shape = tuple(int(d) for d in self.latent_shape) or (self.latent_dim,)
        if int(np.prod(shape)) != self.latent_dim:
            raise ConfigError(f"latent shape {list(shape)} does not hold {self.latent_dim} values")
        object.__setattr__(self, "latent_shape", shape)

    @classmethod
    def default(
        cls, num_views: int, latent_dim: int, latent_shape: tuple[int, ...] = ()
    ) -> CameraLayout:
        """``cam0 .. cam{V-1}``, the edge's default camera names."""
        return cls(tuple(f"cam{i}" for i in range(num_views)), latent_dim, latent_shape)

    def wire_shape(self, version: int) -> tuple[int, ...]:
        """The ``sh`` a message of ``version`` must carry."""
        return (self.latent_dim,) if version == 1 else self.latent_shape

    @property
    def num_views(self) -> int:
        """V."""
        return len(self.camera_ids)


@dataclass(eq=False)
class PendingFrameSet:
    """An accepted frame set waiting for imputation, in the model's view order."""

    message: FrameSetMessage
    receive_time: float  # time.time() when taken off the socket
    client_key: str | None
    latents: np.ndarray  # float32 [V, D]; zeros where no latent was sent
    present: np.ndarray  # bool [V]
    records: tuple[ViewRecord | None, ...]  # [V] the edge's report per view, None if absent
    clock_ok: bool = True  # t and every tc within the clock window (else no latency figure)


class RejectionError(Exception):
    """A message that is dropped; ``reason`` is the drop-counter label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def assemble(
    message: FrameSetMessage, layout: CameraLayout, receive_time: float, client_key: str | None
) -> PendingFrameSet:
    """Place each camera at its view index; RejectionError for unknown cameras or shapes."""
    index = {camera: i for i, camera in enumerate(layout.camera_ids)}
    shape = layout.wire_shape(message.version)
    latents = np.zeros((layout.num_views, layout.latent_dim), np.float32)
    present = np.zeros(layout.num_views, bool)
    records: list[ViewRecord | None] = [None] * layout.num_views
    for view in message.views:
        slot = index.get(view.camera_id)
        if slot is None:
            raise RejectionError(
                "unknown_camera",
                f"camera {view.camera_id!r} is not one of the model's {list(layout.camera_ids)}",
            )
        records[slot] = view
        if view.latent is None:
            continue
        if view.latent.shape != shape:
            raise RejectionError(
                "latent_shape",
                f"camera {view.camera_id!r}: latent shape "
                f"{list(view.latent.shape)}, the model's is "
                f"{list(shape)} (version {message.version})",
            )
        latent = view.latent
        if isinstance(latent, QuantizedLatent):  # decoding gives float32; a built message may not
            latent = latent.dequantize()
        latents[slot] = latent.reshape(-1)
        present[slot] = True
    return PendingFrameSet(message, receive_time, client_key, latents, present, tuple(records))


@dataclass
class _Node:
    queue: deque[PendingFrameSet]
    last_seq: int
    last_seen: float  # time.monotonic()


class NodeBacklog:
    """Per-node newest-first queues of bounded length, age and node count (thread-safe)."""

    def __init__(
        self,
        metrics: ReceiverMetrics,
        *,
        per_node: int = 4,
        max_nodes: int = 256,
        max_age_s: float = 1.0,
        node_idle_s: float = 60.0,
    ) -> None:
        if per_node < 1 or max_nodes < 1 or max_age_s <= 0:
            raise ConfigError("backlog bounds must be positive")
        self.metrics = metrics
        self.per_node, self.max_nodes = per_node, max_nodes
        self.max_age_s, self.node_idle_s = max_age_s, node_idle_s
        self._nodes: dict[str, _Node] = {}
        self._size = 0
        self._ready = threading.Condition()
        self._next_node = 0  # round-robin start, so no node starves the others

    def __len__(self) -> int:
        with self._ready:
            return self._size

    def put(self, item: PendingFrameSet) -> bool:
        """Queue ``item``; a full node queue loses its oldest entry ("superseded").

        The node's previous ``seq`` again is a replay or a resend: dropped ("duplicate"),
        so one frame set is never delivered twice.
        """
        node_id, seq = item.message.node_id, item.message.seq
        with self._ready:
            node = self._nodes.get(node_id) or self._add_node(node_id, seq)
            if node is None:
                self.metrics.drop("too_many_nodes")
                return False
            if seq == node.last_seq:
                self.metrics.drop("duplicate")
                return False
            if seq > node.last_seq + 1:
                self.metrics.seq_gaps.inc(seq - node.last_seq - 1)
            elif seq <= node.last_seq:
                log.info(
                    "node %s went back from seq %d to %d (restarted?)", node_id, node.last_seq, seq
                )
            node.last_seq, node.last_seen = seq, time.monotonic()
            if len(node.queue) == self.per_node:
                node.queue.popleft()
                self._size -= 1
                self.metrics.drop("superseded")
            node.queue.append(item)
            self._size += 1
            self._publish_sizes()
            self._ready.notify_all()  # cluster dispatchers each wait for their own nodes
        return True

    def _add_node(self, node_id: str, seq: int) -> _Node | None:
        """Track a new node, first forgetting idle ones; None if the node limit is reached."""
        if len(self._nodes) >= self.max_nodes:
            now = time.monotonic()
            for name in [
                n
                for n, s in self._nodes.items()
                if not s.queue and now - s.last_seen > self.node_idle_s
            ]:
                del self._nodes[name]
        if len(self._nodes) >= self.max_nodes:
            return None
        node = _Node(deque(), seq - 1, time.monotonic())
        self._nodes[node_id] = node
        return node

    def _publish_sizes(self) -> None:
        self.metrics.backlog.set(self._size)
        self.metrics.nodes.set(len(self._nodes))

    def pending(self, accept: Callable[[str], bool] | None = None) -> int:
        """Frame sets queued for the nodes ``accept(node_id)`` is true for (all without one)."""
        with self._ready:
            return self._pending(accept)

    def _pending(self, accept: Callable[[str], bool] | None) -> int:
        if accept is None:
            return self._size
        return sum(len(node.queue) for name, node in self._nodes.items() if accept(name))

    def wait(self, timeout_s: float, accept: Callable[[str], bool] | None = None) -> bool:
        """Block until something is queued (for the nodes ``accept`` is true for, if given) or
        ``timeout_s`` passes; True if there is."""
        with self._ready:
            return self._ready.wait_for(lambda: self._pending(accept) > 0, timeout_s)

    def take(
        self, max_items: int, now: float | None = None, accept: Callable[[str], bool] | None = None
    ) -> list[PendingFrameSet]:
        """Up to ``max_items`` chosen newest first per node, nodes in turn; too-old ones dropped.

        With ``accept``, only nodes it is true for are taken from (a cluster worker's nodes).
        """
        now = time.time() if now is None else now
        taken: list[PendingFrameSet] = []
        with self._ready:
            self._drop_stale(now)
            names = [name for name in self._nodes if accept is None or accept(name)]
            start = self._next_node % max(len(names), 1)
            order = names[start:] + names[:start]
            available = sum(len(self._nodes[name].queue) for name in order)
            while len(taken) < max_items and available:
                for name in order:
                    queue = self._nodes[name].queue
                    if queue and len(taken) < max_items:
                        taken.append(queue.pop())
                        self._size -= 1
                        available -= 1
            self._next_node += 1
            self._publish_sizes()
        taken.sort(key=lambda item: item.receive_time)  # chosen newest first, handed on in order
        return taken

    def _drop_stale(self, now: float) -> None:
        for node in self._nodes.values():
            while node.queue and now - node.queue[0].receive_time > self.max_age_s:
                node.queue.popleft()
                self._size -= 1
                self.metrics.drop("stale")


class Ingest:
    """The subscriber loop: receive, decode, check fingerprint and layout, queue per node."""

    def __init__(
        self,
        subscriber: LatentSubscriber,
        layout: CameraLayout,
        fingerprint: str,
        backlog: NodeBacklog,
        metrics: ReceiverMetrics,
        *,
        limits: WireLimits | None = None,
        warn_interval_s: float = 5.0,
        rate_limiter: RateLimiter | None = None,
        clock_window_s: float = CLOCK_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not clock_window_s > 0:
            raise ConfigError(f"the clock window must be > 0 s, got {clock_window_s}")
        self.subscriber, self.layout, self.fingerprint = subscriber, layout, fingerprint
        # what each protocol version carries of the model's fingerprint (v2: 8 bytes)
        self._expected = {version: wire_fingerprint(fingerprint, version) for version in (1, 2)}
        self.clock_window_s = clock_window_s
        self.clock = clock  # the receiver's POSIX clock: receive times, the clock window
        self.backlog, self.metrics = backlog, metrics
        self.rate_limiter = rate_limiter
        self.limits = limits or WireLimits()
        self.warnings = RateLimitedLogger(log, warn_interval_s)
        self._node_keys: dict[str, str] = {}  # node id -> the Curve key that first used it

    def check(
        self, data: bytes, client_key: str | None, receive_time: float, parts: int = 1
    ) -> PendingFrameSet:
        """Decode and validate one message; raise RejectionError with the drop reason."""
        if parts != 1:
            raise RejectionError(
                "malformed", f"a multipart message ({parts} parts); MVLD messages are single-part"
            )
        try:
            message = decode_frameset(data, self.limits)
        except ProtocolError as exc:
            raise RejectionError("malformed", str(exc)) from exc
        expected = self._expected[message.version]
        if message.encoder_fingerprint != expected:
            raise RejectionError(
                "fingerprint",
                f"node {message.node_id!r}: encoder fingerprint "
                f"{message.encoder_fingerprint[:16]}... is not the "
                f"model's {expected[:16]}... (v{message.version})",
            )
        if client_key is None and not self._within_rate(f"node:{message.node_id}"):
            raise RejectionError(
                "rate", f"node {message.node_id!r} sends faster than the per-node rate limit"
            )
        if client_key is not None:
            bound = self._node_keys.get(message.node_id)
            if bound is None and len(self._node_keys) < _MAX_BOUND_KEYS:
                self._node_keys[message.node_id] = client_key
            elif bound is not None and bound != client_key:
                raise RejectionError(
                    "node_key", f"node id {message.node_id!r} is bound to another CurveZMQ key"
                )
        item = assemble(message, self.layout, receive_time, client_key)
        item.clock_ok = self._within_clock_window(message, receive_time)
        return item

    def _within_clock_window(self, message: FrameSetMessage, receive_time: float) -> bool:
        """``t`` and every ``tc`` near the receiver's clock; else counted and logged."""
        times = [
            message.send_time,
            *(v.capture_time for v in message.views if v.capture_time is not None),
        ]
        worst = max(abs(t - receive_time) for t in times)
        if worst <= self.clock_window_s:
            return True
        self.metrics.clock_window.inc()
        self.warnings.warning(
            "clock_window",
            "node %r: a time is %.3g s off the receiver's "
            "clock (window %g s): frame set kept out of the latency figures",
            message.node_id,
            worst,
            self.clock_window_s,
            extra={"reason": "clock_window"},
        )
        return False

    def handle(
        self, data: bytes, client_key: str | None, receive_time: float, parts: int = 1
    ) -> bool:
        """Check and queue one message; count and log a drop. Never raises for any input."""
        self.metrics.received.inc()
        try:
            if client_key is not None and not self._within_rate(f"key:{client_key}"):
                raise RejectionError(
                    "rate",
                    f"CurveZMQ key {client_key[:8]}... sends faster than the per-node rate limit",
                )
            item = self.check(data, client_key, receive_time, parts)
        except RejectionError as rejected:
            self.metrics.drop(rejected.reason)
            self.warnings.warning(
                rejected.reason,
                "dropped a message (%s): %s",
                rejected.reason,
                rejected,
                extra={"reason": rejected.reason},
            )
            return False
        except Exception:  # a receiver bug must not stop ingest; the traceback is logged
            self.metrics.drop("internal_error")
            log.exception("internal error while checking a message; dropped")
            return False
        self.metrics.accepted.inc()
        return self.backlog.put(item)

    def _within_rate(self, sender: str) -> bool:
        """Authenticated links are limited per key before decoding, others per node id."""
        return self.rate_limiter is None or self.rate_limiter.allow(sender)

    def poll(self, timeout_ms: int) -> bool:
        """Receive and handle at most one message; False if none arrived in ``timeout_ms``."""
        received = self.subscriber.recv_message(timeout_ms)
        if received is None:
            return False
        self.handle(received.data, received.client_key, self.clock(), received.parts)
        return True

    def run(self, stop: threading.Event, poll_ms: int = 100) -> None:
        """Receive until ``stop`` is set."""
        while not stop.is_set():
            self.poll(poll_ms)


def camera_layout(
    camera_ids: Sequence[str] | None,
    num_views: int,
    latent_dim: int,
    latent_shape: tuple[int, ...] = (),
) -> CameraLayout:
    """The layout for ``--cameras`` (or the default names); its length must match the model."""
    if not camera_ids:
        return CameraLayout.default(num_views, latent_dim, latent_shape)
    if len(camera_ids) != num_views:
        raise ConfigError(
            f"--cameras names {len(camera_ids)} cameras; the model has {num_views} views"
        )
    return CameraLayout(tuple(camera_ids), latent_dim, latent_shape)
