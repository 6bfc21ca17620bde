"""The edge node pipeline: capture -> frame sets -> health -> policy -> encode -> wire -> send.

One loop at ``fps`` (docs/ARCHITECTURE.md sections 1 and 5):

1. the assembler samples every camera's newest frame (:mod:`mvld.edge.framesets`);
2. each camera's :class:`~mvld.edge.health.HealthMonitor` judges its new frame, or hears
   the capture layer's failure (``disconnected``, ``stale``, ...);
3. the transmit policy splits the usable views into sent and withheld; it needs only the
   latent's size, known before encoding, so withheld views are never encoded (the budget
   mode exists to save the edge's work as well as bandwidth);
4. the views to send are encoded in ONE batched call;
5. the frame set becomes a wire message carrying the encoder fingerprint and every
   camera's status, and goes to the publisher, which never blocks (no receiver, a slow one:
   the message is dropped and counted).

Stages hand typed dataclasses to each other. ``run`` stops on ``stop`` (set by SIGINT or
SIGTERM in the CLI) or after ``max_framesets``, and closes everything it opened.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mvld.common.config_flags import (
    metrics_host_field,
    metrics_port_field,
    option,
    status_every_field,
)
from mvld.common.default_model import DEFAULT_MODEL
from mvld.common.errors import ConfigError
from mvld.common.metrics import MetricsRegistry, MetricsServer
from mvld.common.transport import CurveClientKeys, LatentPublisher
from mvld.common.wire import (
    DEFAULT_LATENT_DTYPE,
    LATENT_DTYPES,
    FrameSetMessage,
    ReasonCode,
    ViewRecord,
    ViewStatus,
    encode_frameset,
    latent_nbytes,
    quantize_latent,
)
from mvld.edge.capture import (
    ENDED,
    OPENING,
    STREAMING,
    CameraSnapshot,
    Capture,
    CaptureConfig,
)
from mvld.edge.encoder import (
    EncoderBackend,
    EncoderError,
    open_encoder,
    registered_backends,
)
from mvld.edge.framesets import CapturedView, FrameSet, FrameSetAssembler, Ticker
from mvld.edge.health import FAILED, OBSTRUCTED, OK, CameraHealth, HealthConfig, HealthMonitor
from mvld.edge.policy import TransmitPolicy, TransmitPolicyConfig
from mvld.edge.sources import Frame

log = logging.getLogger(__name__)

LOCKSTEP_POLL_S = 0.002  # --lockstep: how often the loop looks for every camera's next frame
LOCKSTEP_DRAIN_S = 1.0  # --lockstep: time the last messages get to leave before sockets close


def default_model_path() -> Path:
    """The shipped default model's export folder; ConfigError when it is not installed."""
    folder = DEFAULT_MODEL
    if not (folder / "encoder.onnx").is_file():
        raise ConfigError(
            f"no default model installed ({folder / 'encoder.onnx'} is missing): pass "
            "--model PATH (an mvld-export folder, an encoder .onnx or a TensorRT .engine)"
        )
    return folder


@dataclass(frozen=True)
class EdgeConfig:
    """Everything the node needs, resolved and validated (the CLI builds it)."""

    cameras: tuple[str, ...] = field(
        metadata=option(
            "comma-separated source URIs, in camera order (camera ids cam0, cam1, ...): 0, "
            "v4l2:///dev/video0, csi://0, rtsp://..., file://PATH or a path, sim://N",
            flag="--cams",
            required=True,
            metavar="URI,...",
        )
    )
    connect: tuple[str, ...] = field(
        metadata=option(
            "receiver endpoint, e.g. tcp://HOST:5555; repeatable or comma-separated for several "
            "receivers",
            required=True,
            metavar="ENDPOINT",
        )
    )
    model: Path = field(
        metadata=option(
            "mvld-export folder, encoder .onnx, TensorRT .engine or checkpoint",
            default_text="the shipped default model",
            metavar="PATH",
        )
    )
    node_id: str = field(
        default="edge",
        metadata=option(
            "this node's id on the wire", default_text="this machine's host name", metavar="ID"
        ),
    )
    backend: str = field(
        default="auto",
        metadata=option(
            "encoder backend: auto takes a TensorRT engine when one is built, else ONNX Runtime "
            "(torch for a checkpoint)",
            choices=lambda: ["auto", *registered_backends()],
        ),
    )
    threads: int = field(default=1, metadata=option("encoder threads", metavar="N"))
    gpu: int = field(default=0, metadata=option("GPU index for TensorRT / CUDA", metavar="N"))
    fps: float = field(default=30.0, metadata=option("frame sets per second"))
    max_age_s: float = field(
        default=0.25,
        metadata=option(
            "seconds after which a camera's newest frame is stale", flag="--max-age", metavar="S"
        ),
    )
    policy: TransmitPolicyConfig = field(default_factory=TransmitPolicyConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    camera_health: Mapping[str, HealthConfig] = field(default_factory=dict)  # per camera id
    key_secret: Path | None = field(
        default=None,
        metadata=option(
            "this node's NODE.key_secret (CurveZMQ; with --server-key)",
            flag="--keys",
            default_text="off, no CurveZMQ",
            metavar="NODE.key_secret",
        ),
    )
    server_key: Path | None = field(
        default=None,
        metadata=option(
            "the receiver's public RECEIVER.key (CurveZMQ; with --keys)",
            default_text="off, no CurveZMQ",
            metavar="RECEIVER.key",
        ),
    )
    send_hwm: int = field(
        default=2,
        metadata=option(
            "messages queued per receiver while it is slow or away; older ones are dropped",
            metavar="N",
        ),
    )
    metrics_port: int | None = metrics_port_field()
    metrics_host: str = metrics_host_field()
    status_every_s: float = status_every_field()
    max_framesets: int | None = field(
        default=None,
        metadata=option(
            "stop after N frame sets",
            flag="--frames",
            default_text="run until stopped",
            metavar="N",
        ),
    )
    source_options: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    latent_dtype: str = field(
        default=DEFAULT_LATENT_DTYPE,
        metadata=option(
            "latent precision on the wire: int8 (1 byte per value plus a per-view scale), "
            "float16 or float32",
            choices=sorted(LATENT_DTYPES),
        ),
    )
    withhold: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "cameras never sent, by id or number (cam1 or 1): reported withheld/policy, so the "
            "receiver imputes them (e.g. a replayed dataset with a camera missing)",
            default_text="none",
            metavar="CAM,...",
        ),
    )
    lockstep: bool = field(
        default=False,
        metadata=option(
            "replaying files: the first frame set waits for a receiver and each one waits for "
            "every camera's next frame, so frame set i holds frame i of every file (with "
            "--no-realtime, at most --fps)"
        ),
    )

    def __post_init__(self) -> None:
        if not self.cameras:
            raise ConfigError("at least one camera is needed (--cams)")
        if not self.connect:
            raise ConfigError("a receiver endpoint is needed (--connect tcp://HOST:PORT)")
        if (self.key_secret is None) != (self.server_key is None):
            raise ConfigError("CurveZMQ needs both --keys NODE.key_secret and --server-key")
        if self.fps <= 0 or self.max_age_s <= 0 or self.status_every_s <= 0:
            raise ConfigError("--fps, --max-age and --status-every must be positive")
        if self.max_framesets is not None and self.max_framesets < 1:
            raise ConfigError(f"--frames must be at least 1, got {self.max_framesets}")
        if self.latent_dtype not in LATENT_DTYPES:
            raise ConfigError(
                f"--latent-dtype must be one of {sorted(LATENT_DTYPES)}, got {self.latent_dtype!r}"
            )
        unknown = [cam for cam in self.withhold if _camera_id_of(cam, self.camera_ids) is None]
        if unknown:
            raise ConfigError(
                f"--withhold: unknown camera {', '.join(unknown)}; this node has "
                f"{', '.join(self.camera_ids)} (or their numbers 0-"
                f"{len(self.camera_ids) - 1})"
            )
        if len(self.withheld_ids) == len(self.camera_ids):
            raise ConfigError("--withhold names every camera; at least one must be sent")

    @property
    def withheld_ids(self) -> frozenset[str]:
        """Camera ids ``--withhold`` names (validated)."""
        return frozenset(_camera_id_of(cam, self.camera_ids) or cam for cam in self.withhold)

    @property
    def camera_ids(self) -> tuple[str, ...]:
        """Wire camera ids: ``cam0``, ``cam1``, ... (URIs may be long or hold passwords)."""
        return tuple(f"cam{i}" for i in range(len(self.cameras)))


def _camera_id_of(name: str, camera_ids: tuple[str, ...]) -> str | None:
    """``cam1`` or ``1`` -> ``cam1`` when the node has that camera, else None."""
    if name in camera_ids:
        return name
    if name.isdigit() and int(name) < len(camera_ids):
        return camera_ids[int(name)]
    return None


@dataclass(frozen=True)
class JudgedView:
    """A captured view with its health verdict."""

    view: CapturedView
    health: CameraHealth


@dataclass(frozen=True)
class EncodedFrameSet:
    """A judged frame set after the policy and the encoder."""

    frame_set: FrameSet
    views: tuple[JudgedView, ...]
    sent: tuple[int, ...]  # indices of encoded views
    withheld: tuple[int, ...]  # indices of usable views the policy kept back
    latents: np.ndarray  # [len(sent), D] float32
    encode_s: float  # wall time of the one batched encoder call
    encoded: int  # views that went into that call (the others reused their latent)


@dataclass
class RunSummary:
    """What ``run`` did, for the CLI's last line and for tests."""

    framesets: int = 0
    sent: int = 0
    dropped: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0


class EdgeMetrics:
    """The node's Prometheus metrics (names documented in docs/EDGE.md)."""

    def __init__(self, registry: MetricsRegistry, camera_ids: tuple[str, ...]) -> None:
        self.camera_ids = camera_ids
        r = registry
        self.framesets = r.counter("mvld_edge_framesets_total", "Frame sets assembled")
        self.sent = r.counter("mvld_edge_framesets_sent_total", "Frame sets queued for sending")
        self.dropped = r.counter(
            "mvld_edge_framesets_dropped_total",
            "Frame sets not sent: no receiver subscribed or queue full",
        )
        self.bytes_sent = r.counter("mvld_edge_bytes_sent_total", "Wire bytes queued for sending")
        self.encode_errors = r.counter("mvld_edge_encode_errors_total", "Failed encoder calls")
        self.ticks_skipped = r.counter(
            "mvld_edge_ticks_skipped_total", "Frame-set ticks skipped because the loop fell behind"
        )
        self.captured = r.counter(
            "mvld_edge_frames_captured_total", "Frames read from the camera", ["camera"]
        )
        self.frames_dropped = r.counter(
            "mvld_edge_frames_dropped_total",
            "Frames replaced by a newer one before any frame set took them",
            ["camera"],
        )
        self.reopens = r.counter(
            "mvld_edge_source_reopens_total",
            "Attempts to reopen a failed camera source",
            ["camera"],
        )
        self.abandoned = r.counter(
            "mvld_edge_watchdog_abandoned_total",
            "Stuck opens or reads the watchdog gave up on",
            ["camera"],
        )
        self.state = r.gauge(
            "mvld_edge_camera_state",
            "1 for the camera's current health state, else 0",
            ["camera", "state"],
        )
        self.views = r.counter(
            "mvld_edge_views_total",
            "Views reported, by wire status and reason",
            ["camera", "status", "reason"],
        )
        self.streaming = r.gauge(
            "mvld_edge_source_streaming",
            "1 while the camera's source is open and delivering",
            ["camera"],
        )
        self.receiver = r.gauge("mvld_edge_receiver_connected", "1 while a receiver is subscribed")
        self.encode_seconds = r.histogram(
            "mvld_edge_encode_seconds", "Wall time of one batched encoder call"
        )
        self.latency = r.histogram(
            "mvld_edge_capture_to_send_seconds",
            "From a sent view's capture time to its message being queued",
        )
        self._seen: dict[str, tuple[int, int, int, int]] = {}
        self.last_skipped = 0

    def record(
        self, encoded: EncodedFrameSet, message: FrameSetMessage, size: int, sent: bool, now: float
    ) -> None:
        """Count one frame set."""
        self.framesets.inc()
        (self.sent if sent else self.dropped).inc()
        if sent:
            self.bytes_sent.inc(size)
        if encoded.encoded:
            self.encode_seconds.observe(encoded.encode_s)
        for record in message.views:
            self.views.inc(
                camera=record.camera_id, status=record.status.value, reason=record.reason.value
            )
            if sent and record.latent is not None and record.capture_time is not None:
                self.latency.observe(max(0.0, now - record.capture_time))

    def record_health(self, views: tuple[JudgedView, ...]) -> None:
        """Every camera's health state, the moment it is judged (as the wire will say)."""
        for judged in views:
            camera = judged.view.camera_id
            for state in (OK, FAILED, OBSTRUCTED):
                self.state.set(float(judged.health.state == state), camera=camera, state=state)

    def observe_capture(
        self, snapshots: list[CameraSnapshot], skipped: int, receiver: bool
    ) -> None:
        """Bring the capture counters up to the readers' totals."""
        for snap in snapshots:
            seen = self._seen.get(snap.camera_id, (0, 0, 0, 0))
            now = (snap.frames, snap.dropped, snap.reopens, snap.abandoned)
            for counter, new, old in zip(
                (self.captured, self.frames_dropped, self.reopens, self.abandoned),
                now,
                seen,
                strict=True,
            ):
                if new > old:
                    counter.inc(new - old, camera=snap.camera_id)
            self._seen[snap.camera_id] = now
            self.streaming.set(
                float(snap.state == STREAMING and snap.reason is None), camera=snap.camera_id
            )
        if skipped > self.last_skipped:
            self.ticks_skipped.inc(skipped - self.last_skipped)
            self.last_skipped = skipped
        self.receiver.set(float(receiver))


class EdgeNode:
    """Owns the capture threads, monitors, encoder, policy, publisher and metrics of a node."""

    def __init__(self, config: EdgeConfig, *, encoder: EncoderBackend | None = None) -> None:
        self.config = config
        self.encoder = encoder or open_encoder(
            config.model, config.backend, threads=config.threads, gpu=config.gpu
        )
        self._owns_encoder = encoder is None
        self.registry = MetricsRegistry()
        self.metrics = EdgeMetrics(self.registry, config.camera_ids)
        self.monitors = [
            HealthMonitor(config.camera_health.get(cid, config.health), cid)
            for cid in config.camera_ids
        ]
        # The last verdict per camera: the status line, the metrics and the wire say the same.
        self.last_health: dict[str, CameraHealth] = {}
        self._scenes: dict[str, int | None] = {}
        self._relearn: set[str] = set()
        self._relearn_lock = threading.Lock()
        self.policy = TransmitPolicy(config.policy)
        self.bytes_per_view = latent_nbytes(self.encoder.latent_dim, config.latent_dtype)
        # camera id -> (the last frame encoded, its latent)
        self._latent_cache: dict[str, tuple[Frame | None, np.ndarray]] = {}
        self.capture = Capture.from_uris(
            config.cameras, config.capture, config.camera_ids, config.source_options
        )
        self.assembler = FrameSetAssembler(self.capture, config.max_age_s)
        curve = None
        if config.key_secret is not None and config.server_key is not None:
            curve = CurveClientKeys.from_files(config.key_secret, config.server_key)
        self.publisher = LatentPublisher(
            list(config.connect),
            curve=curve,
            send_hwm=config.send_hwm,
            fingerprint=self.encoder.fingerprint,
            camera_ids=config.camera_ids,
        )
        self.server: MetricsServer | None = None
        self.summary = RunSummary()
        self._lockstep_started = False  # a receiver subscribed once (--lockstep)
        self._lockstep_taken: dict[str, int] = {}  # camera id -> frames count last taken

    # -- stages ----------------------------------------------------------------------------

    def relearn(self, cameras: tuple[str, ...] | None = None) -> None:
        """Ask for a fresh reference of ``cameras`` (all by default) at the next frame set.

        Thread-safe (a signal handler or another thread may call it); the loop applies it.
        """
        with self._relearn_lock:
            self._relearn.update(cameras if cameras is not None else self.config.camera_ids)

    def judge(self, frame_set: FrameSet) -> tuple[JudgedView, ...]:
        """Health verdict per camera: new frames are judged, source problems reported."""
        with self._relearn_lock:
            relearn, self._relearn = self._relearn, set()
        judged = []
        for view, monitor in zip(frame_set.views, self.monitors, strict=True):
            if view.frame is not None and view.new:
                # A source that changes scenes on purpose (sim://) numbers them: a new scene
                # is not a re-aimed camera.
                scene = view.frame.scene
                if scene is not None and self._scenes.get(view.camera_id, scene) != scene:
                    relearn.add(view.camera_id)
                self._scenes[view.camera_id] = scene
            if view.camera_id in relearn:
                monitor.relearn()
            if view.problem is None and view.new:
                frame = view.require_frame()
                health = monitor.update(frame.image, frame.timestamp)
            elif view.problem is None:
                health = monitor.health()  # the same frame as last time: verdict unchanged
            elif view.ever_delivered:
                health = monitor.report_source_error(view.problem, frame_set.time)
            else:  # still starting up: nothing to judge, the monitor stays untouched
                health = CameraHealth(FAILED, view.problem, frame_set.time, 1.0)
            judged.append(JudgedView(view, health))
            self.last_health[view.camera_id] = health
        views = tuple(judged)
        self.metrics.record_health(views)
        return views

    def encode(self, frame_set: FrameSet, views: tuple[JudgedView, ...]) -> EncodedFrameSet:
        """Policy split of the usable views, then one batched encoder call for the sent ones.

        A camera slower than the node's rate shows the same frame in several frame sets: its
        latent is reused, so only frames not encoded before go into the call.
        """
        usable = [i for i, judged in enumerate(views) if judged.health.usable]
        forced = self.config.withheld_ids
        sent, withheld = self.policy.select(
            [i for i in usable if views[i].view.camera_id not in forced], self.bytes_per_view
        )
        withheld = sorted(withheld + [i for i in usable if views[i].view.camera_id in forced])
        cache = self._latent_cache
        fresh = [
            i
            for i in sent
            if cache.get(views[i].view.camera_id, (None,))[0] is not views[i].view.frame
        ]
        images = [views[i].view.require_frame().image for i in fresh]
        started = time.perf_counter()
        new_latents = self.encoder.encode(images)
        encode_s = time.perf_counter() - started
        for index, latent in zip(fresh, new_latents, strict=True):
            cache[views[index].view.camera_id] = (views[index].view.frame, latent)
        latents = np.zeros((len(sent), self.encoder.latent_dim), np.float32)
        for row, index in enumerate(sent):
            latents[row] = cache[views[index].view.camera_id][1]
        return EncodedFrameSet(
            frame_set, views, tuple(sent), tuple(withheld), latents, encode_s, len(fresh)
        )

    def message(self, encoded: EncodedFrameSet) -> FrameSetMessage:
        """The wire message of an encoded frame set."""
        latent_of = dict(zip(encoded.sent, encoded.latents, strict=True))
        withheld = set(encoded.withheld)
        records = []
        for index, judged in enumerate(encoded.views):
            view, health = judged.view, judged.health
            if index in latent_of:
                latent = quantize_latent(
                    latent_of[index].reshape(self.encoder.latent_shape), self.config.latent_dtype
                )
                records.append(
                    ViewRecord(
                        view.camera_id, ViewStatus.OK, ReasonCode.NONE, view.capture_time, latent
                    )
                )
            elif index in withheld:
                records.append(
                    ViewRecord(
                        view.camera_id, ViewStatus.WITHHELD, ReasonCode.POLICY, view.capture_time
                    )
                )
            else:
                records.append(
                    ViewRecord(
                        view.camera_id,
                        ViewStatus(health.state),
                        ReasonCode(health.reason or "unknown"),
                        view.capture_time,
                    )
                )
        return FrameSetMessage(
            self.config.node_id,
            encoded.frame_set.seq,
            time.time(),
            self.encoder.fingerprint,
            tuple(records),
        )

    def step(self) -> FrameSetMessage | None:
        """One frame set through every stage; the message (None if encoding failed)."""
        frame_set = self.assembler.assemble()
        views = self.judge(frame_set)
        try:
            encoded = self.encode(frame_set, views)
        except EncoderError as exc:
            log.error("frame set %d: encoder failed: %s", frame_set.seq, exc)
            self.metrics.encode_errors.inc()
            return None
        message = self.message(encoded)
        data = encode_frameset(message)
        sent = self.publisher.send(data)
        self.summary.framesets += 1
        if sent:
            self.summary.sent += 1
            self.summary.bytes_sent += len(data)
        else:
            self.summary.dropped += 1
        self.metrics.record(encoded, message, len(data), sent, time.time())
        return message

    # -- running ---------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> RunSummary:
        """Stream until ``stop`` is set or ``max_framesets`` were made; then close all."""
        stop = stop or threading.Event()
        config = self.config
        if config.metrics_port is not None:
            self.server = MetricsServer(self.registry, config.metrics_port, config.metrics_host)
        self.capture.start()
        ticker = Ticker(config.fps)
        started = time.monotonic()
        next_status = started + config.status_every_s
        last_status = (started, 0)
        log.info(
            "edge node %s: %d camera(s) at %.1f fps -> %s (encoder %s, fingerprint %s..., "
            "%s latents)",
            config.node_id,
            len(config.cameras),
            config.fps,
            ", ".join(config.connect),
            self.encoder.name,
            self.encoder.fingerprint[:12],
            config.latent_dtype,
        )
        try:
            while ticker.wait(stop):
                if config.lockstep and not self._wait_for_lockstep(stop):
                    break
                message = self.step()
                self.metrics.observe_capture(
                    self.capture.snapshots(), ticker.skipped, self.publisher.has_subscriber
                )
                now = time.monotonic()
                if now >= next_status:
                    log.info("%s", self.status_line(now, last_status))
                    last_status = (now, self.summary.framesets)
                    next_status = now + config.status_every_s
                if (
                    config.max_framesets is not None
                    and self.summary.framesets >= config.max_framesets
                ):
                    if config.lockstep:  # sockets close with LINGER 0: let the queue drain
                        stop.wait(LOCKSTEP_DRAIN_S)
                    break
                if message is not None and self._all_ended(message):
                    log.info(
                        "every source has ended or cannot be opened (files without "
                        "--loop): stopping"
                    )
                    break
        finally:
            self.summary.seconds = time.monotonic() - started
            self.close()
        return self.summary

    def _wait_for_lockstep(self, stop: threading.Event) -> bool:
        """``--lockstep``: wait for a receiver (first frame set only), then until every camera
        has a frame no frame set took yet or cannot deliver one (ended, failed); False on stop.

        A camera that delivers nothing within the watchdog's time is not waited for longer: the
        frame set goes out with that camera's problem, and the delay is logged.
        """
        if not self._lockstep_started:
            log.info("--lockstep: waiting for a receiver to subscribe")
            while not self.publisher.has_subscriber:
                if stop.wait(LOCKSTEP_POLL_S * 10):
                    return False
            self._lockstep_started = True
        deadline = time.monotonic() + self.config.capture.watchdog_s
        while True:
            snapshots = self.capture.snapshots()
            waiting = [
                s.camera_id
                for s in snapshots
                if s.state in (OPENING, STREAMING)
                and s.frames <= self._lockstep_taken.get(s.camera_id, 0)
            ]
            if not waiting:
                break
            if time.monotonic() > deadline:
                log.warning(
                    "--lockstep: no next frame from %s within %.1f s; sending without",
                    ", ".join(waiting),
                    self.config.capture.watchdog_s,
                )
                break
            if stop.wait(LOCKSTEP_POLL_S):
                return False
        self._lockstep_taken = {s.camera_id: s.frames for s in snapshots}
        return True

    def _all_ended(self, message: FrameSetMessage) -> bool:
        """Every reader is done (a file ended or cannot be opened) and the message says so."""
        return all(s.state == ENDED for s in self.capture.snapshots()) and all(
            v.status is ViewStatus.FAILED for v in message.views
        )

    def status_line(self, now: float, last: tuple[float, int]) -> str:
        """One line: frame-set rate, every camera's state and health, sends and drops.

        The health is the last verdict the wire and ``mvld_edge_camera_state`` carry.
        """
        rate = (self.summary.framesets - last[1]) / max(now - last[0], 1e-9)
        cameras = []
        for snapshot, monitor in zip(self.capture.snapshots(), self.monitors, strict=True):
            health = self.last_health.get(snapshot.camera_id) or monitor.health()
            text = f"{snapshot.camera_id}={health.state}"
            if health.reason:
                text += f"({health.reason})"
            if snapshot.state != STREAMING:
                retry = snapshot.retry_in_s
                text += f"[{snapshot.state}" + (f" {retry:.1f}s]" if retry else "]")
            cameras.append(text)
        receiver = self.publisher.receiver_state()  # up, none or refused(auth|...)
        return (
            f"edge {self.config.node_id}: {rate:.1f} sets/s | {' '.join(cameras)} | "
            f"sent {self.summary.sent} dropped {self.summary.dropped} "
            f"skipped {self.metrics.last_skipped} | receiver {receiver}"
        )

    def close(self) -> None:
        """Stop capture, close the publisher, the metrics server and the encoder."""
        self.capture.stop()
        self.publisher.close()
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._owns_encoder:
            self.encoder.close()
        log.info(
            "edge node %s stopped: %d frame sets, %d sent, %d dropped",
            self.config.node_id,
            self.summary.framesets,
            self.summary.sent,
            self.summary.dropped,
        )
