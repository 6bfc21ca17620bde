"""Scale-out of the receiver on Ray: the impute -> decode -> tasks stage runs in Ray actors.

The ZeroMQ ingest stays the front door. The driver process (``mvld-receiver --workers N`` or
``--ray ADDRESS``) owns the socket, the ingest thread and one :class:`NodeBacklog`, exactly as
the single-process receiver does; each Ray actor (:class:`StageWorker`) runs one
:class:`ImputeStage` on one GPU (or one CPU slot), on this machine or any machine of the
cluster, and the tasks run there too (``save`` writes on the worker's machine).

Each edge node is owned by one worker, chosen by consistent hashing of its node id
(:class:`NodeRing`), so a node's frame sets are imputed in order by one stage, which is what
per-node state (a tracker, a video writer) needs. One dispatch thread per worker takes
micro-batches of *its* nodes from the shared backlog and keeps at most one batch in flight;
a node with a batch in flight is taken by nobody else, so order holds while ownership moves.
Why one shared backlog rather than one per worker: a node's sequence state (duplicates,
gaps) and the bounds (``--max-nodes``, ``--backlog``) stay in one place, and when a worker is
lost its nodes' queued frame sets need no moving: the new owner simply takes them.

A worker that dies (or stops answering) is noticed by the failed call, or by a heartbeat while
it is idle; its in-flight batch is counted as dropped (``reason="worker_lost"``), it leaves the
ring and its nodes go to the others (a fair share each). Adding a worker moves about 1/N of
the nodes. docs/CLUSTER.md has the semantics, metrics and capacity arithmetic.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mvld.common.clock import MONOTONIC, Clock
from mvld.common.default_model import DEFAULT_MODEL
from mvld.common.errors import ConfigError, MVLDError
from mvld.common.logs import setup_logging
from mvld.common.metrics import Counter, Gauge, Histogram, MetricsRegistry, MetricsServer
from mvld.model.checkpoint import load_mvld_model
from mvld.receiver.batcher import MicroBatcher
from mvld.receiver.config import ReceiverConfig
from mvld.receiver.imputation import Provenance
from mvld.receiver.ingest import PendingFrameSet, camera_layout
from mvld.receiver.observability import ReceiverMetrics
from mvld.receiver.service import format_status, open_front_door
from mvld.receiver.stage import ImputeStage

__all__ = [
    "OBJECT_STORE_BYTES",
    "BatchReport",
    "ClusterError",
    "ClusterMetrics",
    "ClusterReceiverService",
    "NodeRing",
    "StageWorker",
    "format_cluster_status",
    "import_ray",
]

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 200 * 1024**2
"""Object store of a local Ray: batches of frame sets are kilobytes, results stay in actors."""

LATENCY_WINDOW = 2048  # recent latencies kept for the status line (as the stage keeps)


class ClusterError(MVLDError):
    """The Ray cluster cannot run the stage: a worker failed to start, or none is left."""


def import_ray() -> Any:
    """``ray``, imported with usage statistics off; ConfigError naming the extra if missing."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "--workers and --ray run the receiver's stage on Ray, which is not "
            "installed: pip install 'mvld[cluster]'"
        ) from exc
    return ray


def _ring_point(text: str) -> int:
    """A stable 64-bit hash (Python's ``hash`` of a str changes between processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class NodeRing:
    """Consistent hashing of node ids over worker names, with ``replicas`` points per worker.

    A node belongs to the first worker point at or after its own point on the ring, so adding
    a worker moves only the nodes that now fall before its points (about 1/N of them, all to
    the new worker) and removing one moves only its own nodes. Thread-safe.
    """

    def __init__(self, workers: Iterable[str] = (), *, replicas: int = 160) -> None:
        if replicas < 1:
            raise ConfigError(f"a ring needs >= 1 point per worker, got {replicas}")
        self.replicas = replicas
        self._points: list[int] = []
        self._owners: list[str] = []
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()
        for worker in workers:
            self.add(worker)

    @property
    def workers(self) -> tuple[str, ...]:
        """The workers on the ring, sorted."""
        with self._lock:
            return tuple(sorted(set(self._owners)))

    def __len__(self) -> int:
        return len(self.workers)

    def __contains__(self, worker: object) -> bool:
        with self._lock:
            return worker in self._owners

    def add(self, worker: str) -> None:
        """Put ``worker`` on the ring; ValueError if it is already there."""
        with self._lock:
            if worker in self._owners:
                raise ValueError(f"worker {worker!r} is already on the ring")
            for replica in range(self.replicas):
                point = _ring_point(f"{worker}#{replica}")
                index = bisect.bisect_left(self._points, point)
                self._points.insert(index, point)
                self._owners.insert(index, worker)
            self._cache.clear()

    def remove(self, worker: str) -> None:
        """Take ``worker`` off the ring; ValueError if it is not there."""
        with self._lock:
            if worker not in self._owners:
                raise ValueError(f"worker {worker!r} is not on the ring")
            kept = [(p, o) for p, o in zip(self._points, self._owners, strict=True) if o != worker]
            self._points = [p for p, _ in kept]
            self._owners = [o for _, o in kept]
            self._cache.clear()

    def owner(self, node_id: str) -> str:
        """The worker that owns ``node_id``; ClusterError when the ring is empty."""
        with self._lock:
            found = self._cache.get(node_id)
            if found is not None:
                return found
            if not self._points:
                raise ClusterError("no worker is left to own any node")
            index = bisect.bisect_left(self._points, _ring_point(node_id)) % len(self._points)
            found = self._owners[index]
            if len(self._cache) < 65536:  # bounded: node ids come from the network
                self._cache[node_id] = found
            return found


@dataclass(frozen=True)
class BatchReport:
    """What a worker sends back for one batch: no images, only what the driver counts.

    ``metric_ops`` are the stage's metric updates in order, ``(attribute, method, value,
    labels)`` of :class:`ReceiverMetrics`, replayed into the driver's registry so the totals
    are the very numbers the single-process receiver would report.
    """

    worker: str
    delivered: tuple[tuple[str, int], ...]  # (node_id, seq) handed to the tasks, in order
    seconds: float  # the stage's time for the batch, inside the actor
    metric_ops: tuple[tuple[str, str, float, dict[str, str]], ...]


class _RecordedMetric:
    """A stage metric that also records each update, for :class:`BatchReport.metric_ops`."""

    def __init__(
        self,
        attribute: str,
        metric: Counter | Histogram,
        tape: list[tuple[str, str, float, dict[str, str]]],
    ) -> None:
        self._attribute, self._metric, self._tape = attribute, metric, tape

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if not isinstance(self._metric, Counter):
            raise TypeError(f"metric {self._attribute} is a histogram: it has no inc()")
        self._metric.inc(amount, **labels)
        self._tape.append((self._attribute, "inc", float(amount), labels))

    def observe(self, value: float, **labels: str) -> None:
        if not isinstance(self._metric, Histogram):
            raise TypeError(f"metric {self._attribute} is a counter: it has no observe()")
        self._metric.observe(value, **labels)
        self._tape.append((self._attribute, "observe", float(value), labels))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metric, name)


class StageWorker:
    """One :class:`ImputeStage` inside a Ray actor (wrapped with ``ray.remote`` at start-up).

    Built in the actor from the config: the model is loaded from ``config.model`` (or the
    packaged one) on the worker's machine, the tasks run here, and torch uses ``threads``
    CPU threads, the actor's share.
    """

    def __init__(
        self,
        config: ReceiverConfig,
        name: str,
        use_cuda: bool,
        threads: int,
        log_level: int = logging.INFO,
    ) -> None:
        setup_logging(False, log_level)
        torch.set_num_threads(threads)
        self.name = name
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")  # Ray's GPU
        self._tape: list[tuple[str, str, float, dict[str, str]]] = []
        metrics = ReceiverMetrics()
        for attribute, metric in list(vars(metrics).items()):
            if isinstance(metric, (Counter, Histogram)) and not isinstance(metric, Gauge):
                setattr(metrics, attribute, _RecordedMetric(attribute, metric, self._tape))
        self.stage = ImputeStage(config, self.device, metrics)

    def describe(self) -> dict[str, Any]:
        """Where this worker runs and what it loaded (also the start-up readiness check)."""
        return {
            "worker": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
            "fingerprint": self.stage.model.fingerprint,
            "tasks": self.stage.hooks.names,
            "threads": torch.get_num_threads(),
        }

    def ping(self) -> str:
        """The heartbeat while idle."""
        return self.name

    def handle(self, items: list[PendingFrameSet]) -> BatchReport:
        """Impute, decode and hand one batch to the tasks; report what happened."""
        start = time.perf_counter()
        results = self.stage.handle(items)
        seconds = time.perf_counter() - start
        ops, self._tape[:] = tuple(self._tape), []
        return BatchReport(self.name, tuple((r.node_id, r.seq) for r in results), seconds, ops)

    def close(self) -> None:
        """Close the tasks (flushes files they write)."""
        self.stage.close()


class ClusterMetrics:
    """Per-worker metrics, in the same registry as the totals (label ``worker``)."""

    def __init__(self, registry: MetricsRegistry) -> None:
        add = registry
        self.workers = add.gauge("mvld_receiver_workers", "Ray workers running the stage now")
        self.completed = add.counter(
            "mvld_receiver_worker_framesets_completed_total",
            "Frame sets completed, by Ray worker",
            ["worker"],
        )
        self.batches = add.counter(
            "mvld_receiver_worker_batches_total", "Batches a Ray worker completed", ["worker"]
        )
        self.batch_seconds = add.histogram(
            "mvld_receiver_worker_batch_seconds",
            "Seconds from handing a batch to a Ray worker to its report (transfer included)",
            ["worker"],
        )
        self.dropped = add.counter(
            "mvld_receiver_worker_dropped_total",
            "Frame sets dropped at a Ray worker, by reason",
            ["worker", "reason"],
        )
        self.lost = add.counter(
            "mvld_receiver_workers_lost_total",
            "Ray workers that died or stopped answering",
            ["worker"],
        )
        self.backlog = add.gauge(
            "mvld_receiver_worker_backlog",
            "Frame sets waiting for a Ray worker (at the last status line)",
            ["worker"],
        )
        self.nodes = add.gauge(
            "mvld_receiver_worker_nodes",
            "Recently seen edge nodes a Ray worker owns (at the last status line)",
            ["worker"],
        )


@dataclass(eq=False)
class _Worker:
    """The driver's view of one actor."""

    name: str
    actor: Any
    info: dict[str, Any] = field(default_factory=dict)
    alive: bool = True
    last_contact: float = 0.0  # the service clock at the last answer
    thread: threading.Thread | None = None


class _WorkerQueue:
    """The shared backlog as one worker's :class:`MicroBatcher` sees it: only the nodes it owns
    and that have no batch in flight; taking marks them in flight, atomically."""

    def __init__(self, service: ClusterReceiverService, worker: str) -> None:
        self._service, self._worker = service, worker

    def _accept(self, node_id: str) -> bool:
        service = self._service
        if node_id in service._in_flight:
            return False
        try:
            return service.ring.owner(node_id) == self._worker
        except ClusterError:  # the last worker was just lost
            return False

    def __len__(self) -> int:
        return self._service.backlog.pending(self._accept)

    def wait(self, timeout_s: float) -> bool:
        return self._service.backlog.wait(timeout_s, self._accept)

    def take(self, max_items: int) -> list[PendingFrameSet]:
        service = self._service
        with service._lock:
            if self._worker not in service.ring:
                return []
            items = service.backlog.take(max_items, accept=self._accept)
            service._in_flight.update(item.message.node_id for item in items)
        return items


class ClusterReceiverService:
    """The receiver with its stage in Ray actors; the same surface as ``ReceiverService``.

    ``heartbeat_s``: an idle worker is pinged this often, so a dead one is noticed without
    traffic; ``call_timeout_s``: a worker that does not answer a batch or ping in this time is
    treated as lost (killed, its batch counted); ``clock``: heartbeat time (tests).
    """

    def __init__(
        self,
        config: ReceiverConfig,
        *,
        heartbeat_s: float = 0.5,
        call_timeout_s: float = 60.0,
        start_timeout_s: float = 180.0,
        clock: Clock = MONOTONIC,
    ) -> None:
        if config.workers == 0 and config.ray_address is None:
            raise ConfigError("the cluster receiver needs --workers N or --ray ADDRESS")
        self.ray = import_ray()
        self.config = config
        self.heartbeat_s, self.call_timeout_s, self.clock = heartbeat_s, call_timeout_s, clock
        self.metrics = ReceiverMetrics()
        self.cluster_metrics = ClusterMetrics(self.metrics.registry)
        # the driver needs the encoder fingerprint and camera layout to validate messages
        self.model = load_mvld_model(config.model, "cpu")
        self.model_source = str(config.model or DEFAULT_MODEL)
        self.layout = camera_layout(
            config.cameras,
            self.model.num_views,
            self.model.autoencoder.config.latent_dim,
            self.model.autoencoder.config.latent_shape,
        )
        self.ring = NodeRing()
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._workers: dict[str, _Worker] = {}
        self.recent_latency: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._hook_errors = 0
        self._node_seen: dict[str, tuple[str, int, float]] = {}  # node -> worker, seq, time
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._metrics_server: MetricsServer | None = None
        self._started_ray = False
        self._next_index = 0
        try:
            self._connect()
            self._start_workers(start_timeout_s)
            self._open_sockets()
        except BaseException:
            self._shut_down_workers()
            if self._started_ray:
                self.ray.shutdown()
            raise

    # -- start-up --------------------------------------------------------------------------

    def _cpus_per_worker(self) -> int:
        return self.config.threads or 1

    def _connect(self) -> None:
        """Join ``--ray ADDRESS``, or start a local Ray sized for ``--workers``; reuse one
        this process already runs (tests, notebooks)."""
        ray, config = self.ray, self.config
        if ray.is_initialized():
            log.info("using the Ray runtime this process already started")
            return
        if config.ray_address is not None:
            try:
                ray.init(address=config.ray_address, log_to_driver=True)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ConfigError(
                    f"--ray {config.ray_address}: cannot join the cluster: {exc}"
                ) from exc
        else:
            # Ray starts workers at niceness 15 so they never starve its own daemons; here the
            # workers are the receiver's main work and lost most of a busy CPU to other
            # processes (docs/CLUSTER.md), so a local Ray starts them at the driver's niceness.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(
                num_cpus=config.workers * self._cpus_per_worker(),
                include_dashboard=False,
                log_to_driver=True,
                object_store_memory=OBJECT_STORE_BYTES,
            )
        self._started_ray = True

    def _placement(self) -> tuple[int, bool]:
        """How many workers, and whether each gets a GPU, from the cluster's resources."""
        resources = self.ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        config = self.config
        use_cuda = config.gpu >= 0 and gpus > 0
        if config.gpu >= 0 and not gpus:
            log.warning(
                "device: CPU FALLBACK: the Ray cluster has no GPU; the workers impute on "
                "the CPU (--gpu -1 says so and silences this)"
            )
        count = config.workers or (gpus if use_cuda else 0)
        if count == 0:
            raise ConfigError(
                f"--ray {config.ray_address}: the cluster has no GPU for a worker "
                "each; give --workers N for CPU workers"
            )
        if use_cuda and count > gpus:
            raise ConfigError(
                f"--workers {count} needs {count} GPUs (one each); the Ray cluster has {gpus}"
            )
        needed = count * self._cpus_per_worker()
        if needed > cpus:
            raise ConfigError(
                f"--workers {count} needs {needed} CPUs in Ray "
                f"({self._cpus_per_worker()} each, --threads); the cluster has "
                f"{cpus}"
            )
        return count, use_cuda

    def _start_workers(self, timeout_s: float) -> None:
        count, use_cuda = self._placement()
        workers = [self._spawn(use_cuda) for _ in range(count)]
        self._await_ready(workers, timeout_s)
        for worker in workers:
            self._join_ring(worker)

    def _spawn(self, use_cuda: bool) -> _Worker:
        name = f"worker-{self._next_index}"
        self._next_index += 1
        remote = self.ray.remote(StageWorker).options(
            num_cpus=self._cpus_per_worker(),
            num_gpus=1 if use_cuda else 0,
            max_restarts=0,
            max_concurrency=1,
        )
        actor = remote.remote(
            self.config,
            name,
            use_cuda,
            self._cpus_per_worker(),
            logging.getLogger().getEffectiveLevel(),
        )
        worker = _Worker(name, actor)
        self._workers[name] = worker
        return worker

    def _await_ready(self, workers: list[_Worker], timeout_s: float) -> None:
        ray = self.ray
        refs = [worker.actor.describe.remote() for worker in workers]
        try:
            infos = ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise ClusterError(
                f"the Ray workers did not start within {timeout_s:.0f} s (is the "
                "cluster short of the CPUs/GPUs they ask for?)"
            ) from exc
        except ray.exceptions.RayError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise ClusterError(
                f"a Ray worker failed to start: {lines[-1] if lines else exc}"
            ) from exc
        for worker, info in zip(workers, infos, strict=True):
            worker.info, worker.last_contact = info, self.clock.now()
            log.info(
                "%s ready on %s (pid %d), %s, %d torch thread(s), tasks: %s",
                worker.name,
                info["host"],
                info["pid"],
                info["device"],
                info["threads"],
                ", ".join(info["tasks"]) or "none",
            )

    def _join_ring(self, worker: _Worker) -> None:
        with self._lock:
            self.ring.add(worker.name)
        self.cluster_metrics.workers.set(len(self.ring))

    def _open_sockets(self) -> None:
        """The front door, as in the single-process receiver: socket, backlog, ingest."""
        config = self.config
        self.subscriber, self.backlog, self.ingest = open_front_door(
            config, self.model.fingerprint, self.layout, self.metrics
        )
        if config.metrics_port is not None:
            try:
                self._metrics_server = MetricsServer(
                    self.metrics.registry, config.metrics_port, config.metrics_host
                )
            except ConfigError:
                self.subscriber.close()
                raise

    # -- running ---------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """The bound endpoints (with the real port when bound to port 0 or ``*``)."""
        return self.subscriber.endpoints

    @property
    def workers(self) -> tuple[str, ...]:
        """The workers running the stage now (lost ones excluded)."""
        return self.ring.workers

    def start(self) -> None:
        """Start the ingest thread and one dispatch thread per worker."""
        if self._threads:
            return
        self._threads = [
            threading.Thread(
                target=self.ingest.run, args=(self._stop,), name="receiver-ingest", daemon=True
            )
        ]
        self._threads[0].start()
        for worker in list(self._workers.values()):
            self._start_dispatch(worker)
        log.info(
            "receiving on %s; model %s (%d views x %d dims), cameras %s; %d Ray worker(s): %s",
            ", ".join(self.endpoints),
            self.model_source,
            self.layout.num_views,
            self.layout.latent_dim,
            ",".join(self.layout.camera_ids),
            len(self.ring),
            ", ".join(self.ring.workers),
        )

    def _start_dispatch(self, worker: _Worker) -> None:
        worker.thread = threading.Thread(
            target=self._dispatch, args=(worker,), name=f"receiver-{worker.name}", daemon=True
        )
        worker.thread.start()

    def add_worker(self, timeout_s: float = 180.0) -> str:
        """Start one more worker and give it its share of the nodes; return its name.

        Nodes that move keep their order: a node with a batch in flight at its old owner is
        taken by the new one only after that batch came back.
        """
        use_cuda = any(
            w.info.get("device", "cpu").startswith("cuda") for w in self._workers.values()
        )
        worker = self._spawn(use_cuda)
        try:
            self._await_ready([worker], timeout_s)
        except ClusterError:
            self._workers.pop(worker.name)
            self.ray.kill(worker.actor)
            raise
        self._join_ring(worker)
        if self._threads:
            self._start_dispatch(worker)
        log.info("%s joined: it takes over about 1/%d of the nodes", worker.name, len(self.ring))
        return worker.name

    def _dispatch(self, worker: _Worker) -> None:
        """One worker's loop: a batch of its nodes, one call in flight, its report counted."""
        config = self.config
        batcher = MicroBatcher(
            _WorkerQueue(self, worker.name),
            max_batch=config.max_batch,
            max_wait_s=config.max_wait_ms / 1000,
        )
        while worker.alive and not self._stop.is_set():
            items = batcher.next_items(self._stop)
            if items:
                self._run_batch(worker, items)
            elif self.clock.now() - worker.last_contact >= self.heartbeat_s:
                self._heartbeat(worker)

    def _call(self, worker: _Worker, ref: Any) -> Any:
        """``ray.get`` with the call timeout; a lost worker raises ``_WorkerLostError``."""
        ray = self.ray
        try:
            answer = ray.get(ref, timeout=self.call_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise _WorkerLostError(f"no answer within {self.call_timeout_s:g} s") from exc
        except ray.exceptions.RayTaskError:
            raise  # the actor is alive; the method raised
        except ray.exceptions.RayError as exc:  # died, unavailable, its node gone
            raise _WorkerLostError(type(exc).__name__) from exc
        worker.last_contact = self.clock.now()
        return answer

    def _heartbeat(self, worker: _Worker) -> None:
        try:
            self._call(worker, worker.actor.ping.remote())
        except _WorkerLostError as lost:
            self._lose(worker, [], str(lost))
        except self.ray.exceptions.RayTaskError:
            log.exception("%s: heartbeat raised", worker.name)

    def _run_batch(self, worker: _Worker, items: list[PendingFrameSet]) -> None:
        nodes = {item.message.node_id for item in items}
        start = time.perf_counter()
        try:
            report = self._call(worker, worker.actor.handle.remote(items))
        except _WorkerLostError as lost:
            self._lose(worker, items, str(lost))
        except self.ray.exceptions.RayTaskError:  # a bug outside the stage's own guard
            self.metrics.drop("internal_error", len(items))
            self.cluster_metrics.dropped.inc(
                len(items), worker=worker.name, reason="internal_error"
            )
            log.exception("%s raised for a batch of %d; dropped", worker.name, len(items))
        else:
            self.cluster_metrics.batch_seconds.observe(
                time.perf_counter() - start, worker=worker.name
            )
            self._count(report)
        finally:
            with self._lock:
                self._in_flight.difference_update(nodes)

    def _count(self, report: BatchReport) -> None:
        """Replay the stage's metric updates into the totals and the worker's series."""
        metrics, name = self.metrics, report.worker
        for attribute, method, value, labels in report.metric_ops:
            if attribute == "dropped":  # through drop(), which also feeds the status line
                metrics.drop(labels["reason"], int(value))
                self.cluster_metrics.dropped.inc(value, worker=name, reason=labels["reason"])
                continue
            getattr(getattr(metrics, attribute), method)(value, **labels)
            if attribute == "completed":
                self.cluster_metrics.completed.inc(value, worker=name)
            elif attribute == "latency":
                self.recent_latency.append(value)
            elif attribute == "hook_errors":
                self._hook_errors += int(value)
        self.cluster_metrics.batches.inc(worker=name)
        now = self.clock.now()
        with self._lock:
            for node_id, seq in report.delivered:
                self._node_seen[node_id] = (name, seq, now)

    def _lose(self, worker: _Worker, items: list[PendingFrameSet], why: str) -> None:
        """Count the in-flight batch, take the worker off the ring: its nodes move on."""
        with self._lock:
            if not worker.alive:
                return
            worker.alive = False
            self.ring.remove(worker.name)
            left = self.ring.workers
        if items:
            self.metrics.drop("worker_lost", len(items))
            self.cluster_metrics.dropped.inc(len(items), worker=worker.name, reason="worker_lost")
        self.cluster_metrics.lost.inc(worker=worker.name)
        self.cluster_metrics.workers.set(len(left))
        try:
            self.ray.kill(worker.actor)  # one that stopped answering must not come back
        except Exception:  # already gone
            log.debug("%s: kill after loss failed", worker.name, exc_info=True)
        if left:
            log.warning(
                "%s lost (%s): %d in-flight frame set(s) dropped (worker_lost); its "
                "nodes move to %s",
                worker.name,
                why,
                len(items),
                ", ".join(left),
                extra={"reason": "worker_lost"},
            )
        else:
            log.error(
                "%s lost (%s): %d in-flight frame set(s) dropped (worker_lost); NO worker is left",
                worker.name,
                why,
                len(items),
                extra={"reason": "worker_lost"},
            )

    # -- reporting -------------------------------------------------------------------------

    def node_workers(self) -> dict[str, tuple[str, int]]:
        """Per node: the worker that completed its latest frame set, and that frame set's seq."""
        with self._lock:
            return {node: (worker, seq) for node, (worker, seq, _) in self._node_seen.items()}

    def status(self, elapsed_s: float, completed_before: float) -> dict[str, Any]:
        """The single-process status numbers (totals) plus ``workers``: per-worker counts."""
        metrics = self.metrics
        completed = metrics.completed.value()
        recent = np.array(self.recent_latency)
        now = self.clock.now()
        with self._lock:
            for node in [n for n, (_, _, seen) in self._node_seen.items() if now - seen > 60]:
                del self._node_seen[node]
            seen_nodes = list(self._node_seen)
        owners = [self.ring.owner(node) for node in seen_nodes] if len(self.ring) else []
        workers = {}
        for name, worker in list(self._workers.items()):
            owned = sum(owner == name for owner in owners)

            def owned_by(node: str, owner: str = name) -> bool:
                return self.ring.owner(node) == owner

            queued = self.backlog.pending(owned_by) if worker.alive else 0
            self.cluster_metrics.nodes.set(owned, worker=name)
            self.cluster_metrics.backlog.set(queued, worker=name)
            workers[name] = {
                "alive": worker.alive,
                "host": worker.info.get("host"),
                "device": worker.info.get("device"),
                "completed": int(self.cluster_metrics.completed.value(worker=name)),
                "nodes": owned,
                "backlog": queued,
            }
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
            "hook_errors": self._hook_errors,
            "workers": workers,
        }

    def run(self, stop: threading.Event) -> None:
        """Start, log the status line every ``status_every_s`` until ``stop``, then close.

        ClusterError when no worker is left: a receiver that cannot impute should stop (and be
        restarted by its supervisor) rather than drop everything quietly.
        """
        self.start()
        last_time, last_completed = time.monotonic(), self.metrics.completed.value()
        try:
            while not stop.wait(self.config.status_every_s):
                now = time.monotonic()
                status = self.status(now - last_time, last_completed)
                log.info("%s", format_cluster_status(status), extra={"status": status})
                last_time, last_completed = now, self.metrics.completed.value()
                if not len(self.ring):
                    raise ClusterError(
                        "every Ray worker is lost; stopping (see the warnings above)"
                    )
        finally:
            self.close()

    def _shut_down_workers(self) -> None:
        ray = self.ray
        for worker in self._workers.values():
            if worker.alive:
                try:  # let the tasks flush and close their files
                    ray.get(worker.actor.close.remote(), timeout=10.0)
                except Exception:
                    log.warning("%s did not close cleanly", worker.name, exc_info=True)
                worker.alive = False
            try:
                ray.kill(worker.actor)
            except Exception:
                log.debug("%s: already gone", worker.name, exc_info=True)

    def close(self) -> None:
        """Stop the threads, close the workers' tasks, the socket, the metrics endpoint and a
        Ray runtime this service started (idempotent)."""
        self._stop.set()
        for thread in [*self._threads, *(w.thread for w in self._workers.values() if w.thread)]:
            thread.join(timeout=self.call_timeout_s + 5)
        self._threads = []
        for worker in self._workers.values():
            worker.thread = None
        self._shut_down_workers()
        self.subscriber.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self._started_ray:
            self.ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> ClusterReceiverService:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _WorkerLostError(Exception):
    """A worker died, vanished with its machine, or stopped answering."""


def format_cluster_status(status: dict[str, Any]) -> str:
    """The single-process status line plus one clause per worker."""
    parts = []
    for name, worker in status["workers"].items():
        if worker["alive"]:
            parts.append(
                f"{name} {worker['completed']} completed, {worker['nodes']} nodes, "
                f"{worker['backlog']} queued"
            )
        else:
            parts.append(f"{name} LOST after {worker['completed']} completed")
    return f"{format_status(status)}; workers: {'; '.join(parts) or 'none'}"
