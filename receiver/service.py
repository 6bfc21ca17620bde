"""The receiver service: ingest -> micro-batch -> impute -> decode -> task hooks, with metrics.

Threads: the *ingest* thread receives and validates messages into the per-node backlog; the
*worker* thread takes micro-batches, runs one imputation and one decoder call per batch and
hands each completed frame set to the hooks in order; the caller's thread prints the periodic
status line. The metrics HTTP endpoint (``--metrics-port``) is a daemon thread of
:mod:`mvld.common.metrics`. Nothing a sender or a hook does stops the service.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mvld.common.errors import ConfigError
from mvld.common.metrics import MetricsServer
from mvld.common.transport import CurveServerKeys, LatentSubscriber
from mvld.common.wire import wire_fingerprint
from mvld.model.checkpoint import MVLDModel
from mvld.receiver.batcher import MicroBatcher
from mvld.receiver.config import ReceiverConfig
from mvld.receiver.hooks import Hook, HookRunner
from mvld.receiver.imputation import (
    Imputer,
    Provenance,
)
from mvld.receiver.ingest import (
    CameraLayout,
    Ingest,
    NodeBacklog,
    PendingFrameSet,
)
from mvld.receiver.observability import ReceiverMetrics
from mvld.receiver.precision import choose_threads
from mvld.receiver.rate_limit import RateLimiter
from mvld.receiver.results import FrameSetResult
from mvld.receiver.ridge_imputer import RidgeImputer
from mvld.receiver.stage import ImputeStage

__all__ = [
    "ReceiverConfig",
    "ReceiverService",
    "format_status",
    "is_local_endpoint",
    "select_device",
]

log = logging.getLogger(__name__)


def is_local_endpoint(endpoint: str) -> bool:
    """True for an endpoint only this machine can reach: loopback TCP, ``ipc://``, ``inproc://``."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = address.rpartition(":")[0].strip("[]").lower()
    return host in ("localhost", "lo", "::1") or host.startswith("127.")


def select_device(gpu: int) -> torch.device:
    """``cuda:N`` when asked for and available; otherwise the CPU, said clearly in the log."""
    if gpu < 0:
        log.info("device: CPU (--gpu %d)", gpu)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning(
            "device: CPU FALLBACK: --gpu %d asked for CUDA, but CUDA is not available "
            "in this torch build or machine; imputation runs on the CPU",
            gpu,
        )
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if gpu >= count:
        raise ConfigError(f"--gpu {gpu}: this machine has {count} CUDA device(s)")
    log.info("device: cuda:%d (%s)", gpu, torch.cuda.get_device_name(gpu))
    return torch.device("cuda", gpu)


def open_front_door(
    config: ReceiverConfig, fingerprint: str, layout: CameraLayout, metrics: ReceiverMetrics
) -> tuple[LatentSubscriber, NodeBacklog, Ingest]:
    """The socket (CurveZMQ when keys are given, a warning for an open public bind), the
    per-node backlog and the ingest that fills it: shared by both receivers."""
    curve = None
    if config.keys is not None and config.allow is not None:
        curve = CurveServerKeys.from_files(config.keys, config.allow)
        log.info("CurveZMQ on: %d allowed edge key(s)", len(curve.allowed_clients))
    else:
        for endpoint in config.bind:
            if not is_local_endpoint(endpoint):
                log.warning(
                    "binding %s without CurveZMQ: anyone who can reach it can send "
                    "frame sets; use --keys/--allow (docs/SECURITY.md)",
                    endpoint,
                )
    subscriber = LatentSubscriber(
        config.bind, curve=curve, fingerprint=fingerprint, camera_ids=layout.camera_ids
    )
    backlog = NodeBacklog(
        metrics,
        per_node=config.backlog,
        max_nodes=config.max_nodes,
        max_age_s=config.max_age_ms / 1000.0,
    )
    limiter = RateLimiter(config.max_rate) if config.max_rate > 0 else None
    ingest = Ingest(
        subscriber,
        layout,
        fingerprint,
        backlog,
        metrics,
        rate_limiter=limiter,
        clock_window_s=config.clock_window_s,
    )
    return subscriber, backlog, ingest


class ReceiverService:
    """Owns the sockets, the ingest and worker threads and one :class:`ImputeStage`."""

    def __init__(
        self,
        config: ReceiverConfig,
        *,
        model: MVLDModel | None = None,
        extra_hooks: Sequence[tuple[str, Hook]] = (),
    ) -> None:
        self.config = config
        threads = choose_threads(config.threads)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        log.info(
            "torch threads: %d (%s)",
            threads,
            "--threads" if config.threads is not None else "usable cores minus the load average",
        )
        self.metrics = ReceiverMetrics()
        self.device = select_device(config.gpu)
        self.stage = ImputeStage(
            config, self.device, self.metrics, model=model, extra_hooks=extra_hooks
        )
        self.model, self.layout = self.stage.model, self.stage.layout
        self.model_source = self.stage.model_source
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._metrics_server: MetricsServer | None = None
        try:
            self._open_sockets()
        except BaseException:
            self.stage.close()
            raise

    @property
    def imputer(self) -> Imputer | RidgeImputer:
        """The stage's imputer (diffusion or ridge)."""
        return self.stage.imputer

    @property
    def hooks(self) -> HookRunner:
        """The stage's task hooks."""
        return self.stage.hooks

    def _open_sockets(self) -> None:
        config = self.config
        self.subscriber, self.backlog, self.ingest = open_front_door(
            config, self.model.fingerprint, self.layout, self.metrics
        )
        self.batcher = MicroBatcher(
            self.backlog,
            max_batch=config.max_batch,
            max_wait_s=config.max_wait_ms / 1000.0,
            latency_budget_s=config.latency_budget_ms / 1000.0
            if config.latency_budget_ms > 0
            else None,
        )
        if config.metrics_port is not None:
            try:
                self._metrics_server = MetricsServer(
                    self.metrics.registry, config.metrics_port, config.metrics_host
                )
            except ConfigError:
                self.subscriber.close()
                raise

    @property
    def endpoints(self) -> list[str]:
        """The bound endpoints (with the real port when bound to port 0 or ``*``)."""
        return self.subscriber.endpoints

    def process(self, items: list[PendingFrameSet]) -> list[FrameSetResult]:
        """Impute and decode one micro-batch into complete frame sets (the stage's)."""
        return self.stage.process(items)

    def step(self) -> int:
        """Process one micro-batch if one arrives soon; return its size (0 if none)."""
        items = self.batcher.next_items(self._stop)
        if items:
            start = self.batcher.clock.now()
            self.stage.handle(items)
            self.batcher.observe(len(items), self.batcher.clock.now() - start)
        return len(items)

    def _work(self) -> None:
        while not self._stop.is_set():
            self.step()

    def start(self) -> None:
        """Start the ingest and worker threads."""
        if self._threads:
            return
        self._threads = [
            threading.Thread(
                target=self.ingest.run, args=(self._stop,), name="receiver-ingest", daemon=True
            ),
            threading.Thread(target=self._work, name="receiver-worker", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info(
            "receiving on %s; model %d views x %d dims, cameras %s; %s; tasks: %s",
            ", ".join(self.endpoints),
            self.layout.num_views,
            self.layout.latent_dim,
            ",".join(self.layout.camera_ids),
            self._imputer_text(),
            ", ".join(self.hooks.names) or "none",
        )
        fingerprint, short = self.model.fingerprint, wire_fingerprint(self.model.fingerprint)
        log.info(
            "model %s: encoder fingerprint %s (protocol v2 enc = its first 8 bytes, %s); "
            "latent shape %s; protocol versions 1 and 2",
            self.model_source,
            fingerprint,
            short,
            list(self.layout.latent_shape),
            extra={
                "model": {
                    "source": self.model_source,
                    "encoder_fingerprint": fingerprint,
                    "wire_fingerprint": short,
                    "latent_shape": list(self.layout.latent_shape),
                    "cameras": list(self.layout.camera_ids),
                }
            },
        )

    def _imputer_text(self) -> str:
        """How missing views are filled, for the start-up line."""
        config = self.config
        if config.imputer == "ridge":
            text = "imputer ridge (deterministic)"
        else:
            text = f"sampler {config.sampler}, {config.steps} steps"
            if config.samples > 1:
                text += f", {config.samples} samples" + (
                    ", posterior mean" if config.posterior_mean else ""
                )
        if getattr(self.stage.imputer, "uses_memory", False):
            text += "; camera memory " + ("on" if config.camera_memory else "off")
        if not config.deliver_unconditioned:
            text += "; frame sets with no observed view withheld"
        return text

    def status(self, elapsed_s: float, completed_before: float) -> dict[str, Any]:
        """Numbers of the status line: rate since the last one, totals, drops, latency."""
        metrics = self.metrics
        completed = metrics.completed.value()
        recent = np.array(self.stage.recent_latency)
        return {
            "framesets_per_s": round((completed - completed_before) / max(elapsed_s, 1e-9), 2),
            "completed": int(completed),
            "imputed_views": int(
                sum(
                    metrics.views.value(provenance=p.value)
                    for p in Provenance
                    if p is not Provenance.OBSERVED
                )
            ),
            "received": int(metrics.received.value()),
            "drops": metrics.drops(),
            "withheld": int(metrics.withheld.value(reason="no_observed_view")),
            "seq_gaps": int(metrics.seq_gaps.value()),
            "backlog": len(self.backlog),
            "latency_p50_ms": round(float(np.percentile(recent, 50)) * 1e3, 1)
            if len(recent)
            else None,
            "latency_p99_ms": round(float(np.percentile(recent, 99)) * 1e3, 1)
            if len(recent)
            else None,
            "hook_errors": self.stage.hook_errors(),
        }

    def run(self, stop: threading.Event) -> None:
        """Start, print the status line every ``status_every_s`` until ``stop``, then close."""
        self.start()
        last_time, last_completed = time.monotonic(), self.metrics.completed.value()
        try:
            while not stop.wait(self.config.status_every_s):
                now = time.monotonic()
                status = self.status(now - last_time, last_completed)
                log.info("%s", format_status(status), extra={"status": status})
                last_time, last_completed = now, self.metrics.completed.value()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the threads, close hooks, sockets and the metrics endpoint (idempotent)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10.0)
        self._threads = []
        self.stage.close()
        self.subscriber.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None

    def __enter__(self) -> ReceiverService:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def format_status(status: dict[str, Any]) -> str:
    """The status line for humans."""
    drops = ", ".join(f"{k}={v}" for k, v in sorted(status["drops"].items())) or "none"
    p50, p99 = status["latency_p50_ms"], status["latency_p99_ms"]
    latency = "latency n/a" if p50 is None else f"latency p50 {p50:.1f} ms p99 {p99:.1f} ms"
    return (
        f"status: {status['framesets_per_s']:.1f} frame sets/s, {status['completed']} "
        f"completed, {status['imputed_views']} views imputed, {status['received']} received, "
        f"drops: {drops}, withheld (no observed view) {status['withheld']}, "
        f"sequence gaps {status['seq_gaps']}, backlog {status['backlog']}, "
        f"{latency}, hook errors {status['hook_errors']}"
    )
