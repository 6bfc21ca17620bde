"""What the receiver reports about itself: Prometheus metrics, rate-limited warnings, status.

Metric names are listed in ``docs/RECEIVER.md``. The registry and its HTTP endpoint come
from :mod:`mvld.common.metrics`; this module only declares the receiver's metrics and keeps
a plain copy of the drop counts for the periodic status line.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from mvld.common.metrics import MetricsRegistry

__all__ = ["DROP_REASONS", "WITHHOLD_REASONS", "RateLimitedLogger", "ReceiverMetrics"]

DROP_REASONS = (
    "malformed",  # the wire decoder rejected the message (ProtocolError)
    "fingerprint",  # latents made by another encoder than the model's
    "unknown_camera",  # a camera id the model has no view for
    "latent_shape",  # latent shape differs from the model's (exactly; PROTOCOL.md 8)
    "duplicate",  # the same seq as the node's previous frame set (a replay or a resend)
    "node_key",  # a node id already bound to another CurveZMQ key
    "too_many_nodes",  # more active nodes than the receiver tracks
    "rate",  # the sender exceeded the per-node rate limit (--max-rate)
    "superseded",  # pushed out of a full per-node backlog by a newer frame set
    "stale",  # older than the maximum age when its turn came
    "internal_error",  # a bug on the receiver side; logged with its traceback
    "worker_lost",  # in flight on a Ray worker that died or stopped answering (--workers)
)
"""Every value of the ``reason`` label of ``mvld_receiver_dropped_total``."""

WITHHOLD_REASONS = (
    "no_observed_view",  # every view missing: the frame set would be generated from nothing
)
"""Every value of the ``reason`` label of ``mvld_receiver_framesets_withheld_total``."""

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


class ReceiverMetrics:
    """The receiver's metrics in one registry (``registry.render()`` is the scrape)."""

    def __init__(self, registry: MetricsRegistry | None = None) -> None:
        self.registry = registry or MetricsRegistry()
        add = self.registry
        self.received = add.counter(
            "mvld_receiver_messages_total", "Wire messages taken off the socket"
        )
        self.accepted = add.counter(
            "mvld_receiver_framesets_accepted_total", "Frame sets that passed decoding and checks"
        )
        self.dropped = add.counter(
            "mvld_receiver_dropped_total", "Messages or frame sets dropped, by reason", ["reason"]
        )
        self.completed = add.counter(
            "mvld_receiver_framesets_completed_total",
            "Frame sets imputed, decoded and handed to the tasks",
        )
        self.withheld = add.counter(
            "mvld_receiver_framesets_withheld_total",
            "Frame sets kept from the tasks, by reason (a frame set "
            "with no observed view unless --deliver-unconditioned)",
            ["reason"],
        )
        self.views = add.counter(
            "mvld_receiver_views_total",
            "Views of completed frame sets, by provenance",
            ["provenance"],
        )
        self.seq_gaps = add.counter(
            "mvld_receiver_seq_gaps_total",
            "Frame sets missing from nodes' sequence numbers "
            "(conflated or lost before the receiver)",
        )
        self.clock_window = add.counter(
            "mvld_receiver_clock_window_total",
            "Accepted frame sets whose t or a tc lies outside the "
            "clock window; kept out of the latency figures",
        )
        self.batch_size = add.histogram(
            "mvld_receiver_batch_size", "Frame sets per imputation call", buckets=BATCH_BUCKETS
        )
        self.impute_seconds = add.histogram(
            "mvld_receiver_impute_seconds", "Seconds per batched imputation call"
        )
        self.decode_seconds = add.histogram(
            "mvld_receiver_decode_seconds", "Seconds per batched decoder call"
        )
        self.latency = add.histogram(
            "mvld_receiver_latency_seconds",
            "Capture (edge clock) to decoded frame set (receiver clock)",
            buckets=LATENCY_BUCKETS,
        )
        self.hook_errors = add.counter(
            "mvld_receiver_hook_errors_total", "Exceptions raised by task hooks", ["task"]
        )
        self.hook_seconds = add.histogram(
            "mvld_receiver_hook_seconds", "Seconds per hook call", ["task"]
        )
        self.backlog = add.gauge("mvld_receiver_backlog", "Frame sets waiting for imputation")
        self.nodes = add.gauge("mvld_receiver_nodes", "Edge nodes with a backlog entry")
        self._drops: dict[str, int] = {}
        self._lock = threading.Lock()

    def drop(self, reason: str, count: int = 1) -> None:
        """Count ``count`` dropped messages or frame sets for ``reason`` (one of DROP_REASONS)."""
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; add it to DROP_REASONS")
        self.dropped.inc(count, reason=reason)
        with self._lock:
            self._drops[reason] = self._drops.get(reason, 0) + count

    def drops(self) -> dict[str, int]:
        """A copy of the drop counts by reason."""
        with self._lock:
            return dict(self._drops)


class RateLimitedLogger:
    """Log a warning per key at most once per ``interval_s``, saying how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(
        self, key: str, message: str, *args: object, extra: dict[str, Any] | None = None
    ) -> None:
        """Log ``message % args`` unless ``key`` was logged less than ``interval_s`` ago."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -float("inf")) < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += " (%d similar suppressed)"
            args = (*args, suppressed)
        self.logger.warning(message, *args, extra={**(extra or {}), "suppressed": suppressed})
