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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mvld.common.config_flags import (
    metrics_host_field,
    metrics_port_field,
    option,
    status_every_field,
)
from mvld.common.default_model import DEFAULT_MODEL
from mvld.common.errors import ConfigError
from mvld.common.metrics import MetricsServer
from mvld.common.transport import CurveServerKeys, LatentSubscriber
from mvld.common.wire import wire_fingerprint
from mvld.model.checkpoint import MVLDModel, load_mvld_model
from mvld.receiver.batcher import Batch, MicroBatcher
from mvld.receiver.decoder import LatentDecoder
from mvld.receiver.hooks import Hook, HookRunner, build_hooks
from mvld.receiver.imputation import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    IMPUTERS,
    Imputer,
    Provenance,
    log_model_verdict,
)
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
from mvld.receiver.ridge_imputer import RidgeImputer
from mvld.receiver.sampler import sampler_info, sampler_names

__all__ = ["ReceiverConfig", "ReceiverService", "format_status", "is_local_endpoint",
           "select_device"]

log = logging.getLogger(__name__)


LOOPBACK_BIND = "tcp://127.0.0.1:5555"  # the default without CurveZMQ
PUBLIC_BIND = "tcp://*:5555"  # the default with --keys/--allow


@dataclass(frozen=True)
class ReceiverConfig:
    """Everything ``mvld-receiver`` is configured with, validated once."""

    bind: tuple[str, ...] = field(default=(), metadata=option(
        "ZeroMQ endpoint to bind; repeatable or comma-separated. Without --keys the default "
        "lets only this machine connect; another address must be bound explicitly, and is "
        "warned about while CurveZMQ is off", metavar="ENDPOINT",
        default_text=f"{LOOPBACK_BIND}; {PUBLIC_BIND} with --keys"))
    model: str | None = field(default=None, metadata=option(
        "model checkpoint (P, P.json or a run folder)", default_text="the packaged model",
        metavar="PATH"))
    gpu: int = field(default=0, metadata=option(
        "CUDA device index; -1 = CPU (no CUDA: the CPU, with a warning)", metavar="N"))
    keys: str | None = field(default=None, metadata=option(
        "CurveZMQ secret key of this receiver (with --allow)",
        default_text="off, no CurveZMQ", metavar="RECEIVER.key_secret"))
    allow: str | None = field(default=None, metadata=option(
        "folder of allowed edge public keys (*.key) (with --keys)",
        default_text="off, no CurveZMQ", metavar="DIR"))
    tasks: tuple[str, ...] = field(default=(), metadata=option(
        "downstream task, repeatable: save, classify, jsonl, publish, an installed mvld.tasks "
        "entry point or a dotted path module:Name", flag="--task", split=False,
        metavar="NAME[:key=value,...]"))
    sampler: str = field(default=DEFAULT_SAMPLER, metadata=option(
        "imputation sampler (docs/SAMPLERS.md)", choices=sampler_names))
    steps: int = field(default=DEFAULT_STEPS, metadata=option("sampler steps", metavar="N"))
    imputer: str = field(default="diffusion", metadata=option(
        "how missing views are filled: diffusion (the score network with --sampler) or ridge "
        "(deterministic regression on the observed views, fitted by mvld-train all and saved "
        "beside the checkpoint; see the model verdict logged at start-up)", choices=IMPUTERS))
    samples: int = field(default=1, metadata=option(
        "samples per frame set; more than 1 gives per-view uncertainty", metavar="K"))
    posterior_mean: bool = field(default=False, metadata=option(
        "deliver the mean of the --samples K samples for imputed views instead of the first "
        "sample: higher PSNR/SSIM, blurrier images (docs/RECEIVER.md, Posterior means)"))
    deliver_unconditioned: bool = field(default=False, metadata=option(
        "hand frame sets with no observed view (every view generated from nothing) to the "
        "tasks; off: they are withheld and counted, except for tasks that ask for them"))
    max_batch: int = field(default=64, metadata=option(
        "frame sets per imputation call at most", metavar="N"))
    max_wait_ms: float = field(default=10.0, metadata=option(
        "longest wait to fill a batch", metavar="MS"))
    backlog_per_node: int = field(default=4, metadata=option(
        "frame sets kept per node, newest first", flag="--backlog", metavar="N"))
    max_age_ms: float = field(default=1000.0, metadata=option(
        "older frame sets are dropped and counted", metavar="MS"))
    max_nodes: int = field(default=256, metadata=option(
        "edge nodes tracked at once", metavar="N"))
    cameras: tuple[str, ...] = field(default=(), metadata=option(
        "comma-separated camera id of each model view", default_text="cam0,cam1,...",
        metavar="ID,..."))
    metrics_port: int | None = metrics_port_field()
    metrics_host: str = metrics_host_field()
    status_every_s: float = status_every_field()
    threads: int | None = field(default=None, metadata=option(
        "torch CPU threads (on a busy CPU 1 is often faster)", default_text="all cores",
        metavar="N"))
    max_rate: float = field(default=120.0, metadata=option(
        "frame sets per second accepted from one node (its CurveZMQ key, else its node id); "
        "faster ones are dropped and counted; 0 = no limit", metavar="PER_S"))
    clock_window_s: float = field(default=CLOCK_WINDOW_S, metadata=option(
        "frame sets whose send or capture times are more than S seconds off this machine's "
        "clock are counted and kept out of the latency figures", flag="--clock-window",
        metavar="S"))

    def __post_init__(self) -> None:
        if (self.keys is None) != (self.allow is None):
            raise ConfigError("--keys and --allow go together (CurveZMQ needs both)")
        if not self.bind:  # safe by default: unauthenticated means this machine only
            default = PUBLIC_BIND if self.keys is not None else LOOPBACK_BIND
            object.__setattr__(self, "bind", (default,))
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
        if self.imputer == "ridge" and self.samples != 1:
            raise ConfigError("--imputer ridge is deterministic: --samples must be 1")
        if self.posterior_mean and self.samples < 2:
            raise ConfigError("--posterior-mean averages samples: give --samples K with K >= 2")


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
        self.model_source = str(config.model or DEFAULT_MODEL) if model is None else "in memory"
        if model is None:
            model = load_mvld_model(config.model, self.device)
            log_model_verdict(config.model or DEFAULT_MODEL)
        else:
            model.autoencoder.to(self.device)
            model.score_net.to(self.device)
        self.model = model
        self.layout = camera_layout(config.cameras, self.model.num_views,
                                    self.model.autoencoder.config.latent_dim,
                                    self.model.autoencoder.config.latent_shape)
        self.imputer = self._build_imputer(in_memory=self.model_source == "in memory")
        self.decoder = LatentDecoder.from_model(self.model)
        self.hooks = build_hooks(config.tasks, self.metrics, extra_hooks)
        self._unconditioned_hooks = self._hooks_taking_unconditioned()
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
        else:
            for endpoint in config.bind:
                if not is_local_endpoint(endpoint):
                    log.warning("binding %s without CurveZMQ: anyone who can reach it can send "
                                "frame sets; use --keys/--allow (docs/SECURITY.md)", endpoint)
        self.subscriber = LatentSubscriber(config.bind, curve=curve,
                                           fingerprint=self.model.fingerprint,
                                           camera_ids=self.layout.camera_ids)
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
                self._metrics_server = MetricsServer(self.metrics.registry, config.metrics_port,
                                                     config.metrics_host)
            except ConfigError:
                self.subscriber.close()
                raise

    @property
    def endpoints(self) -> list[str]:
        """The bound endpoints (with the real port when bound to port 0 or ``*``)."""
        return self.subscriber.endpoints

    def _build_imputer(self, *, in_memory: bool) -> Imputer | RidgeImputer:
        config = self.config
        if config.imputer != "ridge":
            return Imputer.from_model(self.model, sampler=config.sampler, steps=config.steps)
        if in_memory and config.model is None:  # the packaged model's weights would not fit
            raise ConfigError("--imputer ridge with a model given in memory needs --model: the "
                              "checkpoint whose folder holds its ridge weights")
        return RidgeImputer.beside(config.model or DEFAULT_MODEL, self.model)

    def _hooks_taking_unconditioned(self) -> HookRunner:
        """The tasks that get frame sets with no observed view: all with the flag, else those
        whose hook sets ``accepts_unconditioned = True``."""
        if self.config.deliver_unconditioned:
            return self.hooks
        return HookRunner([(name, hook) for name, hook in self.hooks.hooks
                           if getattr(hook, "accepts_unconditioned", False)], self.metrics)

    def _withhold(self, count: int) -> None:
        if count:
            self.metrics.withheld.inc(count, reason="no_observed_view")

    def process(self, items: list[PendingFrameSet]) -> list[FrameSetResult]:
        """Impute and decode one micro-batch into complete frame sets."""
        batch = Batch.stack(items, self.device)
        imputation = self.imputer(batch.latents, batch.present, samples=self.config.samples,
                                  seed=self._batches)
        self._batches += 1
        chosen = imputation.posterior_mean() if self.config.posterior_mean else imputation.latents
        start = time.perf_counter()
        images = self.decoder(chosen)  # [B, V, H, W, 3]
        self.metrics.decode_seconds.observe(time.perf_counter() - start)
        done = time.time()
        latents = chosen.float().cpu().numpy()
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
        taken = len(items)
        if not self._unconditioned_hooks.hooks:  # no task wants them: not even imputed
            items = [item for item in items if item.present.any()]
            self._withhold(taken - len(items))
            if not items:
                return taken
        try:
            results = self.process(items)
        except Exception:  # a receiver bug must not kill the worker; count what it cost
            self.metrics.drop("internal_error", len(items))
            log.exception("imputation or decoding failed for a batch of %d; dropped", len(items))
            return 0
        for result in results:
            if result.observed_views:
                self.hooks(result)
            else:
                self._unconditioned_hooks(result)
        return taken

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
        log.info("receiving on %s; model %d views x %d dims, cameras %s; %s; tasks: %s",
                 ", ".join(self.endpoints), self.layout.num_views, self.layout.latent_dim,
                 ",".join(self.layout.camera_ids), self._imputer_text(),
                 ", ".join(self.hooks.names) or "none")
        fingerprint, short = self.model.fingerprint, wire_fingerprint(self.model.fingerprint)
        log.info("model %s: encoder fingerprint %s (protocol v2 enc = its first 8 bytes, %s); "
                 "latent shape %s; protocol versions 1 and 2", self.model_source, fingerprint,
                 short, list(self.layout.latent_shape),
                 extra={"model": {"source": self.model_source,
                                  "encoder_fingerprint": fingerprint, "wire_fingerprint": short,
                                  "latent_shape": list(self.layout.latent_shape),
                                  "cameras": list(self.layout.camera_ids)}})

    def _imputer_text(self) -> str:
        """How missing views are filled, for the start-up line."""
        config = self.config
        if config.imputer == "ridge":
            text = "imputer ridge (deterministic)"
        else:
            text = f"sampler {config.sampler}, {config.steps} steps"
            if config.samples > 1:
                text += f", {config.samples} samples" + (", posterior mean"
                                                          if config.posterior_mean else "")
        if not config.deliver_unconditioned:
            text += "; frame sets with no observed view withheld"
        return text

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
            "withheld": int(metrics.withheld.value(reason="no_observed_view")),
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
        self._unconditioned_hooks = self.hooks
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
            f"drops: {drops}, withheld (no observed view) {status['withheld']}, "
            f"sequence gaps {status['seq_gaps']}, backlog {status['backlog']}, "
            f"{latency}, hook errors {status['hook_errors']}")
