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
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mvld.common.errors import ConfigError
from mvld.common.metrics import MetricsServer
from mvld.common.transport import CurveServerKeys, LatentSubscriber
from mvld.common.wire import wire_fingerprint
from mvld.model.checkpoint import MVLDModel, load_mvld_model
from mvld.receiver.batcher import Batch, MicroBatcher
from mvld.receiver.decoder import LatentDecoder
from mvld.receiver.hooks import Hook, HookRunner, build_hooks
from mvld.receiver.imputation import DEFAULT_SAMPLER, DEFAULT_STEPS, Imputer, Provenance
from mvld.receiver.ingest import (
    CLOCK_WINDOW_S,
    Ingest,
    NodeBacklog,
    PendingFrameSet,
    camera_layout,
)
from mvld.receiver.observability import ReceiverMetrics
from mvld.receiver.rate_limit import RateLimiter
from mvld.receiver.results import FrameSetResult
from mvld.receiver.sampler import sampler_info

__all__ = ["ReceiverConfig", "ReceiverService", "format_status", "select_device"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceiverConfig:
    """Everything ``mvld-receiver`` is configured with, validated once."""

    bind: tuple[str, ...] = ("tcp://*:5555",)
    model: str | None = None  # None: the packaged default model
    gpu: int = 0  # CUDA device index; -1 = CPU
    keys: str | None = None  # the receiver's Curve secret key file
    allow: str | None = None  # folder of allowed edge public keys (*.key)
    tasks: tuple[str, ...] = ()
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    samples: int = 1  # K samples per frame set; K > 1 gives per-view uncertainty
    max_batch: int = 64
    max_wait_ms: float = 10.0
    backlog_per_node: int = 4
    max_age_ms: float = 1000.0
    max_nodes: int = 256
    cameras: tuple[str, ...] = ()  # camera id of each model view; default cam0..cam{V-1}
    metrics_port: int | None = None
    status_every_s: float = 10.0
    threads: int | None = None  # torch CPU threads; None: torch's default (all cores)
    max_rate: float = 120.0  # frame sets per second per node (token bucket); 0 = no limit
    clock_window_s: float = CLOCK_WINDOW_S  # edge times further off are kept out of latency

    def __post_init__(self) -> None:
        if (self.keys is None) != (self.allow is None):
            raise ConfigError("--keys and --allow go together (CurveZMQ needs both)")
        positive = {"--steps": self.steps, "--samples": self.samples,
                    "--max-batch": self.max_batch, "--backlog": self.backlog_per_node,
                    "--max-age-ms": self.max_age_ms, "--max-nodes": self.max_nodes,
                    "--status-every": self.status_every_s}
        if self.threads is not None:
            positive["--threads"] = self.threads
        if self.max_rate < 0:
            raise ConfigError(f"--max-rate must be >= 0 (0 = no limit), got {self.max_rate}")
        for flag, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{flag} must be > 0, got {value}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if not self.clock_window_s > 0:
            raise ConfigError(f"--clock-window must be > 0, got {self.clock_window_s}")
        sampler_info(self.sampler).check_steps(self.steps)


def select_device(gpu: int) -> torch.device:
    """``cuda:N`` when asked for and available; otherwise the CPU, said clearly in the log."""
    if gpu < 0:
        log.info("device: CPU (--gpu %d)", gpu)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning("device: CPU FALLBACK: --gpu %d asked for CUDA, but CUDA is not available "
                    "in this torch build or machine; imputation runs on the CPU", gpu)
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if gpu >= count:
        raise ConfigError(f"--gpu {gpu}: this machine has {count} CUDA device(s)")
    log.info("device: cuda:%d (%s)", gpu, torch.cuda.get_device_name(gpu))
    return torch.device("cuda", gpu)


class ReceiverService:
    """Owns the sockets, the model on its device, the hooks and the worker threads."""

    def __init__(self, config: ReceiverConfig, *, model: MVLDModel | None = None,
                 extra_hooks: Sequence[tuple[str, Hook]] = ()) -> None:
        self.config = config
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.metrics = ReceiverMetrics()
        self.device = select_device(config.gpu)
        if model is None:
            model = load_mvld_model(config.model, self.device)
        else:
            model.autoencoder.to(self.device)
            model.score_net.to(self.device)
        self.model = model
        self.layout = camera_layout(config.cameras, self.model.num_views,
                                    self.model.autoencoder.config.latent_dim,
                                    self.model.autoencoder.config.latent_shape)
        self.imputer = Imputer.from_model(self.model, sampler=config.sampler, steps=config.steps)
        self.decoder = LatentDecoder.from_model(self.model)
        self.hooks = build_hooks(config.tasks, self.metrics, extra_hooks)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._metrics_server: MetricsServer | None = None
        self._batches = 0
        self._recent_latency: deque[float] = deque(maxlen=2048)  # for the status line
        try:
            self._open_sockets()
        except BaseException:
            self.hooks.close()
            raise

    def _open_sockets(self) -> None:
        config = self.config
        curve = None
        if config.keys is not None and config.allow is not None:
            curve = CurveServerKeys.from_files(config.keys, config.allow)
            log.info("CurveZMQ on: %d allowed edge key(s)", len(curve.allowed_clients))
        self.subscriber = LatentSubscriber(config.bind, curve=curve)
        self.backlog = NodeBacklog(self.metrics, per_node=config.backlog_per_node,
                                   max_nodes=config.max_nodes,
                                   max_age_s=config.max_age_ms / 1000.0)
        limiter = RateLimiter(config.max_rate) if config.max_rate > 0 else None
        self.ingest = Ingest(self.subscriber, self.layout, self.model.fingerprint, self.backlog,
                             self.metrics, rate_limiter=limiter,
                             clock_window_s=config.clock_window_s)
        self.batcher = MicroBatcher(self.backlog, max_batch=config.max_batch,
                                    max_wait_s=config.max_wait_ms / 1000.0)
        if config.metrics_port is not None:
            try:
                self._metrics_server = MetricsServer(self.metrics.registry, config.metrics_port)
            except ConfigError:
                self.subscriber.close()
                raise

    @property
    def endpoints(self) -> list[str]:
        """The bound endpoints (with the real port when bound to port 0 or ``*``)."""
        return self.subscriber.endpoints

    def process(self, items: list[PendingFrameSet]) -> list[FrameSetResult]:
        """Impute and decode one micro-batch into complete frame sets."""
        batch = Batch.stack(items, self.device)
        imputation = self.imputer(batch.latents, batch.present, samples=self.config.samples,
                                  seed=self._batches)
        self._batches += 1
        start = time.perf_counter()
        images = self.decoder(imputation.latents)  # [B, V, H, W, 3]
        self.metrics.decode_seconds.observe(time.perf_counter() - start)
        done = time.time()
        latents = imputation.latents.float().cpu().numpy()
        uncertainty = None if imputation.uncertainty is None else imputation.uncertainty.numpy()
        results = [FrameSetResult.complete(item, self.layout, latents[b], images[b],
                                           imputation.provenance[b],
                                           None if uncertainty is None else uncertainty[b], done)
                   for b, item in enumerate(items)]
        self._count(results, imputation.seconds)
        return results

    def _count(self, results: list[FrameSetResult], impute_seconds: float) -> None:
        metrics = self.metrics
        metrics.batch_size.observe(len(results))
        metrics.impute_seconds.observe(impute_seconds)
        for result in results:
            metrics.completed.inc()
            if result.clock_ok:  # an edge clock far off would poison the figures
                metrics.latency.observe(result.latency)
                self._recent_latency.append(result.latency)
            for provenance in Provenance:
                count = sum(v.provenance is provenance for v in result.views)
                if count:
                    metrics.views.inc(count, provenance=provenance.value)

    def step(self) -> int:
        """Process one micro-batch if one arrives soon; return its size (0 if none)."""
        items = self.batcher.next_items(self._stop)
        if not items:
            return 0
        try:
            results = self.process(items)
        except Exception:  # a receiver bug must not kill the worker; count what it cost
            self.metrics.drop("internal_error", len(items))
            log.exception("imputation or decoding failed for a batch of %d; dropped", len(items))
            return 0
        for result in results:
            self.hooks(result)
        return len(items)

    def _work(self) -> None:
        while not self._stop.is_set():
            self.step()

    def start(self) -> None:
        """Start the ingest and worker threads."""
        if self._threads:
            return
        self._threads = [threading.Thread(target=self.ingest.run, args=(self._stop,),
                                          name="receiver-ingest", daemon=True),
                         threading.Thread(target=self._work, name="receiver-worker",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("receiving on %s; model %d views x %d dims, cameras %s; sampler %s, %d steps; "
                 "tasks: %s", ", ".join(self.endpoints), self.layout.num_views,
                 self.layout.latent_dim, ",".join(self.layout.camera_ids), self.config.sampler,
                 self.config.steps, ", ".join(self.hooks.names) or "none")
        fingerprint, short = self.model.fingerprint, wire_fingerprint(self.model.fingerprint)
        log.info("encoder fingerprint %s (protocol v2 enc = its first 8 bytes, %s); latent "
                 "shape %s; protocol versions 1 and 2", fingerprint, short,
                 list(self.layout.latent_shape),
                 extra={"model": {"encoder_fingerprint": fingerprint, "wire_fingerprint": short,
                                  "latent_shape": list(self.layout.latent_shape),
                                  "cameras": list(self.layout.camera_ids)}})

    def status(self, elapsed_s: float, completed_before: float) -> dict[str, Any]:
        """Numbers of the status line: rate since the last one, totals, drops, latency."""
        metrics = self.metrics
        completed = metrics.completed.value()
        recent = np.array(self._recent_latency)
        return {
            "framesets_per_s": round((completed - completed_before) / max(elapsed_s, 1e-9), 2),
            "completed": int(completed),
            "imputed_views": int(sum(metrics.views.value(provenance=p.value) for p in Provenance
                                     if p is not Provenance.OBSERVED)),
            "received": int(metrics.received.value()),
            "drops": metrics.drops(),
            "seq_gaps": int(metrics.seq_gaps.value()),
            "backlog": len(self.backlog),
            "latency_p50_ms": round(float(np.percentile(recent, 50)) * 1e3, 1)
            if len(recent) else None,
            "latency_p99_ms": round(float(np.percentile(recent, 99)) * 1e3, 1)
            if len(recent) else None,
            "hook_errors": int(sum(metrics.hook_errors.value(task=name)
                                   for name in self.hooks.names)),
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
        self.hooks.close()
        self.hooks = HookRunner([], self.metrics)
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
    return (f"status: {status['framesets_per_s']:.1f} frame sets/s, {status['completed']} "
            f"completed, {status['imputed_views']} views imputed, {status['received']} received, "
            f"drops: {drops}, sequence gaps {status['seq_gaps']}, backlog {status['backlog']}, "
            f"{latency}, hook errors {status['hook_errors']}")
