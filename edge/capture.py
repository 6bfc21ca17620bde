"""Capture: one reader thread per camera keeps that camera's newest frame.

What camera users report most (docs/ARCHITECTURE.md section 5) shapes this module: after an
unplug the stream never comes back without a restart; a read blocks forever or spins a core;
GStreamer sends no event on a disconnect. So:

- every open and read runs under a **watchdog**: one shared thread checks, a few times a
  second, how long each camera's current call has been running; a call stuck longer than
  ``watchdog_s`` is abandoned (Python cannot kill a thread stuck in a driver: that thread is
  left behind, told to close its source and exit whenever the driver lets it go) and a fresh
  reader thread opens the source anew;
- a failed source (cannot open, read error, no frame for ``stall_s``) is closed and reopened
  with **exponential back-off** (``backoff_initial_s`` doubling up to ``backoff_max_s``); the
  wait is an ``Event.wait``, so a dead camera costs no CPU, and every camera has its own
  thread, so one camera's trouble never stalls the others;
- a replugged camera resumes by itself: the reopen attempts go on for as long as the node runs.

The newest frame replaces the previous one (frames nobody took are counted as dropped);
:mod:`mvld.edge.framesets` samples the readers at the node's frame rate. A source with no pace
of its own (``reads_on_demand``: a file read with ``--no-realtime``) is read one frame per
frame taken instead: the reader decodes the next frame only once the node took the previous
one (decoding flat out and dropping cost 3.2x the CPU at 30 FPS). Such a waiting frame is as
good as one decoded now, so it is reported fresh and, when taken, stamped with that time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from mvld.common.clock import MONOTONIC, Clock
from mvld.common.config_flags import option
from mvld.common.errors import ConfigError, MVLDError
from mvld.edge.sources import (
    EndOfStream,
    Frame,
    FrameSource,
    SourceError,
    open_source,
    prepare_scheme,
    registered_schemes,
    scheme_of,
)
from mvld.edge.sources.base import reads_on_demand
from mvld.edge.sources.camera import redact

log = logging.getLogger(__name__)
ResultT = TypeVar("ResultT")

# Reader states (for status lines and metrics).
OPENING = "opening"
STREAMING = "streaming"
WAITING = "waiting"  # back-off before the next open attempt
ENDED = "ended"  # a finite stream ended (or a file cannot be opened) and is not reopened
STOPPED = "stopped"

# Source failure reasons, in the health monitor's and the wire's vocabulary.
TIMEOUT = "timeout"
DISCONNECTED = "disconnected"
READ_ERROR = "read_error"
END_OF_STREAM = "end_of_stream"


@dataclass(frozen=True)
class CaptureConfig:
    """Timings of the readers, the watchdog and the reopen back-off."""

    read_timeout_s: float = field(
        default=0.5,
        metadata=option(
            "longest wait of one camera read for a frame", flag="--read-timeout", metavar="S"
        ),
    )
    watchdog_s: float = field(
        default=3.0,
        metadata=option(
            "seconds after which a stuck camera open or read is abandoned",
            flag="--watchdog",
            metavar="S",
        ),
    )
    stall_s: float = field(
        default=5.0,
        metadata=option(
            "a camera whose reads return no frame for this long is reopened",
            flag="--stall",
            metavar="S",
        ),
    )
    backoff_initial_s: float = field(
        default=0.5,
        metadata=option(
            "first wait before reopening a failed camera", flag="--backoff-initial", metavar="S"
        ),
    )
    backoff_max_s: float = field(
        default=10.0,
        metadata=option(
            "longest wait between reopen attempts (the wait doubles per failure)",
            flag="--backoff-max",
            metavar="S",
        ),
    )
    reopen_ended: bool = field(
        default=False,
        metadata=option(
            "reopen a file camera that ended, or cannot be opened, instead of giving it up"
        ),
    )
    max_stuck_threads: int = field(
        default=4,
        metadata=option(
            "abandoned calls still stuck in a camera's driver before its reopening waits",
            metavar="N",
        ),
    )

    def __post_init__(self) -> None:
        for name in (
            "read_timeout_s",
            "watchdog_s",
            "stall_s",
            "backoff_initial_s",
            "backoff_max_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"capture {name} must be positive, got {getattr(self, name)}")
        if self.max_stuck_threads < 1:
            raise ConfigError(
                f"capture max_stuck_threads must be at least 1, got {self.max_stuck_threads}"
            )
        if self.watchdog_s <= self.read_timeout_s:
            raise ConfigError(
                f"capture watchdog_s ({self.watchdog_s}) must exceed "
                f"read_timeout_s ({self.read_timeout_s})"
            )

    def backoff(self, failures: int) -> float:
        """The wait before the next open after ``failures`` consecutive failures."""
        if failures <= 0:
            return 0.0
        return min(self.backoff_max_s, self.backoff_initial_s * 2.0 ** (failures - 1))


@dataclass(frozen=True)
class CameraSnapshot:
    """What a reader knows about its camera right now."""

    camera_id: str
    frame: Frame | None  # newest frame (None before the first one)
    received: float | None  # the reader's clock (Clock.now) when ``frame`` arrived
    state: str  # opening | streaming | waiting | ended | stopped
    reason: str | None  # the last failure (timeout, disconnected, ...); None once frames flow
    frames: int  # frames captured since start
    dropped: int  # frames replaced by a newer one before anybody took them
    reopens: int  # open attempts after the first
    abandoned: int  # calls the watchdog gave up on
    retry_in_s: float | None  # seconds until the next open attempt, while waiting


@dataclass
class _Call:
    generation: int
    what: str  # "open" | "read"
    started: float  # the reader's clock


class CameraReader:
    """One camera: a reader thread, its newest frame, its failures and reopen schedule."""

    def __init__(
        self,
        camera_id: str,
        opener: Callable[[], FrameSource],
        config: CaptureConfig | None = None,
        description: str = "",
        finite: bool = False,
        clock: Clock = MONOTONIC,
    ) -> None:
        self.camera_id = camera_id
        self.clock = clock  # back-off, stall and frame ages; a test may pass a fake one
        # A finite source (a file) that cannot be opened will not appear by waiting: without
        # reopen_ended it is given up like one that ended, so a node of files can stop.
        self.finite = finite
        self.description = description or camera_id
        self.config = config or CaptureConfig()
        self._opener = opener
        self._lock = threading.Lock()
        self._taken_changed = threading.Condition(self._lock)  # on-demand reads wait on it
        self._on_demand = False  # the open source reads one frame per frame taken
        self._stop = threading.Event()
        self._generation = 0
        self._threads: list[threading.Thread] = []
        self._call: _Call | None = None
        self._frame: Frame | None = None
        self._received: float | None = None
        self._taken = True
        self._state = OPENING
        self._reason: str | None = None
        self._failures = 0  # consecutive, reset by a frame
        self._retry_at: float | None = None
        self._stall_since = clock.now()  # last frame, or the last open
        self._frames = self._dropped = self._reopens = self._abandoned = self._opens = 0

    # -- control ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the reader thread."""
        with self._lock:
            self._generation += 1
            self._spawn(self._generation)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Ask every reader thread to close its source and exit; wait up to ``timeout_s``."""
        self._stop.set()
        with self._lock:
            self._generation += 1
            self._state = STOPPED
            self._taken_changed.notify_all()
            threads = list(self._threads)
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning(
                    "camera %s: reader thread still stuck in the driver at shutdown", self.camera_id
                )

    def _spawn(self, generation: int) -> None:
        """Start the reader thread of ``generation`` (call with the lock held)."""
        self._threads = [t for t in self._threads if t.is_alive()]
        thread = threading.Thread(
            target=self._run,
            args=(generation,),
            daemon=True,
            name=f"capture-{self.camera_id}-{generation}",
        )
        self._threads.append(thread)
        thread.start()

    # -- what the frame-set layer reads --------------------------------------------------------

    def snapshot(self, take: bool = False) -> CameraSnapshot:
        """The camera's state and newest frame; ``take`` marks that frame as used."""
        now = self.clock.now()
        with self._lock:
            frame, received = self._frame, self._received
            if (
                frame is not None
                and self._on_demand
                and not self._taken
                and self._state == STREAMING
            ):  # waiting for its taker: fresh
                frame, received = replace(frame, timestamp=time.time()), now
            if take and frame is not None:
                self._frame, self._received, self._taken = frame, received, True
                self._taken_changed.notify_all()
            retry = None if self._retry_at is None else max(0.0, self._retry_at - now)
            return CameraSnapshot(
                self.camera_id,
                frame,
                received,
                self._state,
                self._reason,
                self._frames,
                self._dropped,
                self._reopens,
                self._abandoned,
                retry,
            )

    # -- watchdog ----------------------------------------------------------------------------

    def check_watchdog(self, now: float) -> bool:
        """Abandon the current call if it has run longer than ``watchdog_s``; True if so."""
        with self._lock:
            call = self._call
            if (
                call is None
                or call.generation != self._generation
                or self._stop.is_set()
                or now - call.started <= self.config.watchdog_s
            ):
                return False
            self._generation += 1
            self._call = None
            self._abandoned += 1
            self._record_failure(TIMEOUT)
            self._spawn(self._generation)
        log.warning(
            "camera %s: %s stuck for %.1f s, abandoned; reopening",
            self.description,
            call.what,
            now - call.started,
        )
        return True

    # -- the reader thread -------------------------------------------------------------------

    def _current(self, generation: int) -> bool:
        return generation == self._generation and not self._stop.is_set()

    def _guarded(self, generation: int, what: str, call: Callable[[], ResultT]) -> ResultT:
        """Run ``call`` with its start time visible to the watchdog."""
        with self._lock:
            self._call = _Call(generation, what, self.clock.now())
        try:
            return call()
        finally:
            with self._lock:
                if self._call is not None and self._call.generation == generation:
                    self._call = None

    def _record_failure(self, reason: str) -> None:
        """Count a failure and schedule the next open (call with the lock held)."""
        self._failures += 1
        self._reason = reason
        delay = self.config.backoff(self._failures)
        self._retry_at = self.clock.now() + delay
        self._state = WAITING

    def _fail(self, generation: int, reason: str, error: BaseException | str) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._record_failure(reason)
            delay = self.config.backoff(self._failures)
        log.warning(
            "camera %s: %s (%s); reopening in %.1f s", self.description, reason, error, delay
        )

    def _give_up(self, generation: int, error: BaseException) -> None:
        """A file that cannot be opened: ended, with reason ``disconnected``; never retried."""
        with self._lock:
            if generation != self._generation:
                return
            self._generation += 1
            self._state, self._reason, self._retry_at = ENDED, DISCONNECTED, None
        log.error(
            "camera %s: cannot be opened (%s); a file is not retried without --loop",
            self.description,
            error,
        )

    def _run(self, generation: int) -> None:
        source: FrameSource | None = None
        try:
            while self._current(generation):
                if source is None:
                    source = self._open(generation)
                    continue
                if self._on_demand and not self._wait_until_taken(generation):
                    continue
                if not self._read(generation, source):
                    _close_quietly(source, self.description)
                    source = None
        finally:
            if source is not None:
                _close_quietly(source, self.description)

    def _open(self, generation: int) -> FrameSource | None:
        """Wait out the back-off (no CPU), then open the source; None on failure."""
        with self._lock:
            delay = 0.0 if self._retry_at is None else self._retry_at - self.clock.now()
        if delay > 0 and self.clock.wait(self._stop, delay):
            return None
        with self._lock:
            stuck = sum(t.is_alive() for t in self._threads) - 1  # all but this thread
        if stuck >= self.config.max_stuck_threads:  # a driver that hangs every time
            self._fail(generation, TIMEOUT, f"{stuck} abandoned calls still stuck in the driver")
            return None
        with self._lock:
            if generation != self._generation:
                return None
            self._state = OPENING
            self._retry_at = None
            if self._opens:
                self._reopens += 1
            self._opens += 1
        try:
            source = self._guarded(generation, "open", self._opener)
        except (SourceError, ConfigError, OSError) as exc:
            if self.finite and not self.config.reopen_ended:
                self._give_up(generation, exc)
            else:
                self._fail(generation, DISCONNECTED, exc)
            return None
        except Exception as exc:  # a driver may raise anything: never die silently
            log.exception("camera %s: unexpected error while opening", self.description)
            self._fail(generation, DISCONNECTED, exc)
            return None
        if not self._current(generation):
            _close_quietly(source, self.description)
            return None
        with self._lock:
            self._state = STREAMING
            self._stall_since = self.clock.now()
            self._on_demand = reads_on_demand(source)
        return source

    def _wait_until_taken(self, generation: int) -> bool:
        """On-demand sources: sleep (no CPU) until the newest frame was taken; False on stop.

        The wait is no stall: the stall clock starts again when it ends."""
        with self._lock:
            while not self._taken and self._current(generation):
                self._taken_changed.wait(self.config.read_timeout_s)
            self._stall_since = self.clock.now()
        return self._current(generation)

    def _read(self, generation: int, source: FrameSource) -> bool:
        """Read one frame; False when the source must be closed (and maybe reopened)."""
        try:
            frame = self._guarded(
                generation, "read", lambda: source.read(self.config.read_timeout_s)
            )
        except EndOfStream as exc:
            if self.config.reopen_ended:
                self._fail(generation, END_OF_STREAM, exc)
                return False
            with self._lock:
                if generation == self._generation:
                    self._generation += 1  # this camera is done
                    self._state, self._reason, self._retry_at = ENDED, END_OF_STREAM, None
            log.info("camera %s: %s", self.description, exc)
            return False
        except MVLDError as exc:  # SourceError and its kin: a read error
            self._fail(generation, READ_ERROR, exc)
            return False
        except Exception as exc:  # a driver may raise anything: never die silently
            log.exception("camera %s: unexpected error from the source", self.description)
            self._fail(generation, READ_ERROR, exc)
            return False
        now = self.clock.now()
        if frame is None:
            if now - self._stall_since > self.config.stall_s:
                self._fail(generation, TIMEOUT, f"no frame for {self.config.stall_s:.1f} s")
                return False
            return True
        self._publish(generation, frame, now)
        return True

    def _publish(self, generation: int, frame: Frame, now: float) -> None:
        with self._lock:
            if generation != self._generation:
                return  # an abandoned thread's late frame
            if not self._taken:
                self._dropped += 1
            if self._reason is not None:
                log.info("camera %s: frames again (was %s)", self.description, self._reason)
            self._frame, self._received, self._taken = frame, now, False
            self._frames += 1
            self._failures, self._reason, self._state = 0, None, STREAMING
            self._stall_since = now


def _close_quietly(source: FrameSource, description: str) -> None:
    """Close a source that failed; its own close error must not kill the reader."""
    try:
        source.close()
    except Exception as exc:  # closing a broken driver may raise anything
        log.debug("camera %s: error while closing: %r", description, exc)


class Capture:
    """The readers of all cameras of a node and the watchdog thread that guards them."""

    def __init__(self, readers: Sequence[CameraReader], poll_s: float | None = None) -> None:
        if not readers:
            raise ConfigError("capture needs at least one camera")
        ids = [r.camera_id for r in readers]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"camera ids must be unique, got {ids}")
        self.readers = list(readers)
        self.clock = readers[0].clock
        if any(r.clock is not self.clock for r in readers):
            raise ConfigError("the cameras of one capture must share one clock")
        watchdog = min(r.config.watchdog_s for r in readers)
        self.poll_s = poll_s or min(0.1, watchdog / 4)
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="capture-watchdog", daemon=True)

    @classmethod
    def from_uris(
        cls,
        uris: Sequence[str],
        config: CaptureConfig | None = None,
        camera_ids: Sequence[str] | None = None,
        scheme_options: Mapping[str, Mapping[str, object]] | None = None,
        clock: Clock = MONOTONIC,
    ) -> Capture:
        """One reader per URI, opening ``open_source(uri, **scheme_options[scheme])``.

        Unknown schemes, and schemes whose extra is not installed, are refused here, at
        start-up, rather than retried forever; a lazily loaded scheme is loaded here.
        """
        ids = list(camera_ids) if camera_ids else [f"cam{i}" for i in range(len(uris))]
        known = registered_schemes()
        readers = []
        for cid, uri in zip(ids, uris, strict=True):
            scheme = scheme_of(uri)
            if scheme not in known:
                raise ConfigError(
                    f"{redact(uri)}: unknown source scheme {scheme!r}; valid: {', '.join(known)}"
                )
            prepare_scheme(scheme)
            options = dict((scheme_options or {}).get(scheme, {}))
            readers.append(
                CameraReader(
                    cid,
                    _opener(uri, options),
                    config,
                    f"{cid} ({redact(uri)})",
                    finite=scheme == "file",
                    clock=clock,
                )
            )
        return cls(readers)

    def start(self) -> Capture:
        """Start every reader and the watchdog."""
        for reader in self.readers:
            reader.start()
        self._watchdog.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):  # polls in real time, whatever the clock
            now = self.clock.now()
            for reader in self.readers:
                reader.check_watchdog(now)

    def snapshots(self, take: bool = False) -> list[CameraSnapshot]:
        """Every camera's snapshot, in camera order."""
        return [reader.snapshot(take) for reader in self.readers]

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the watchdog and every reader (stuck driver threads are left behind)."""
        self._stop.set()
        for reader in self.readers:
            reader.stop(timeout_s / len(self.readers))
        if self._watchdog.is_alive():
            self._watchdog.join(timeout_s)

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _opener(uri: str, options: dict[str, object]) -> Callable[[], FrameSource]:
    """A callable opening ``uri`` with ``options``."""

    def open_it() -> FrameSource:
        return open_source(uri, **options)

    return open_it
