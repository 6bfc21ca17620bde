"""Exit codes and the signal policy every command's ``main`` shares: one line, no traceback.

A person who presses Ctrl-C, a supervisor that sends SIGTERM, a missing optional dependency
or an output path that cannot be written must each end a command with one line on stderr and
a documented status, never a Python traceback:

=====  ==================================================================================
0      success (and the normal stop of ``mvld-edge`` / ``mvld-receiver`` on SIGINT/SIGTERM)
1      ``mvld-data`` / ``mvld-export``: bad input or data (``mvld-data check``: INVALID)
2      bad flags, a missing extra; elsewhere bad config, model, data folder or output path
3, 4   ``mvld-export``: TensorRT unavailable, a parity check failed
130    interrupted by SIGINT (Ctrl-C) (128 + 2)
143    stopped by SIGTERM (128 + 15)
=====  ==================================================================================

:func:`command` wraps a ``main(argv) -> int``. Long jobs that must leave a consistent state
behind (training saves a resumable checkpoint) use :func:`deferred_stop_signals` to finish the
current unit of work first.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Protocol

from mvld.common.errors import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

# Top-level modules that only an extra of pyproject.toml brings in, and the extras that do.
PROVIDED_BY = {
    "torch": ("receiver", "train"),
    "safetensors": ("receiver", "train"),
    "tqdm": ("receiver", "train"),
    "onnxruntime": ("edge",),
    "pybullet": ("sim",),
    "onnx": ("export", "trt"),
    "onnxscript": ("export",),
    "matplotlib": ("eval",),
    "PIL": ("eval",),
    "cuda": ("trt",),
}
OPTIONAL_MODULES = frozenset(PROVIDED_BY)


class Main(Protocol):
    """A command's ``main(argv=None) -> int``: the argument list (None: the process's), the
    exit status back."""

    def __call__(self, argv: list[str] | None = None) -> int: ...


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so ``except Exception``
    clean-up code does not swallow it."""


STOP_EXCEPTIONS = (KeyboardInterrupt, Terminated)


def exit_code_of(stop: BaseException) -> int:
    """130 for SIGINT (KeyboardInterrupt), 143 for SIGTERM (:class:`Terminated`)."""
    return EXIT_SIGTERM if isinstance(stop, Terminated) else EXIT_SIGINT


def stop_exception(signum: int) -> BaseException:
    """The exception that stands for ``signum`` (SIGINT or SIGTERM)."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


_IMPORT_MACHINERY = frozenset(
    {"<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>"}
)
_RETRY_S = 0.02  # how often a stop held back by an import looks again


def _importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside an ``import`` (importlib's frames are on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename in _IMPORT_MACHINERY:
            return True
        frame = frame.f_back
    return False


class _RaiseWhenSafe:
    """Signal handler that raises the stop exception, but never inside an import.

    An exception raised while a C extension initialises (torch's pybind11 modules call back
    into Python) does not unwind: the interpreter aborts with "terminate called after throwing
    an instance of 'pybind11::error_already_set'". So a stop that arrives during an import is
    held, and SIGALRM looks again every ``_RETRY_S`` until the import is done.
    """

    def __init__(self) -> None:
        self.pending: int | None = None

    def on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.pending = signum
        self.on_alarm(signal.SIGALRM, frame)

    def on_alarm(self, _signum: int, frame: FrameType | None) -> None:
        if self.pending is None:
            return
        if _importing(frame):
            signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
            return
        signum, self.pending = self.pending, None
        raise stop_exception(signum)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Inside: SIGINT raises KeyboardInterrupt and SIGTERM :class:`Terminated`, once no import
    is running, so ``finally`` blocks (children stopped, files closed) run for both. Only the
    main thread can own signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _RaiseWhenSafe()
    previous = {
        signum: signal.signal(signum, handler.on_stop) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, handler.on_alarm)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, old in previous.items():
            signal.signal(signum, old)


def stop_event_on_signals() -> threading.Event:
    """An event that SIGINT and SIGTERM set: the normal stop of a service (exit 0).

    Installed before a service's heavy imports. A handler that raises instead can lose the
    signal: an exception raised inside importlib's own callbacks is only printed ("Exception
    ignored in ..."), and the service would run on. Only the main thread can own signals.
    """
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
    return stop


class StopRequest:
    """What :func:`deferred_stop_signals` saw: the first stop signal, or None."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        """``SIGINT`` / ``SIGTERM`` (empty while none arrived)."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def raise_it(self) -> None:
        """Raise the stop exception of the signal that arrived (no-op if none did)."""
        if self.signum is not None:
            raise stop_exception(self.signum)


@contextlib.contextmanager
def deferred_stop_signals() -> Iterator[StopRequest]:
    """Inside: the first SIGINT/SIGTERM only sets the yielded request, so the caller can finish
    its step and save; a second one raises at once (a person who presses Ctrl-C twice wants
    out now). Outside the main thread nothing changes."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def note(signum: int, _frame: FrameType | None) -> None:
        if request.signum is not None:
            raise stop_exception(signum)
        request.signum = signum

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def missing_extra(exc: ModuleNotFoundError, extras: str) -> str | None:
    """The one-line advice for a missing optional module, or None if it is not one of ours.

    Names the command's extras, plus the one that provides the module if they do not.
    """
    module = (exc.name or "").split(".")[0]
    if module not in PROVIDED_BY:
        return None
    wanted = [extra for extra in extras.split(",") if extra]
    if not set(PROVIDED_BY[module]) & set(wanted):
        wanted.append(PROVIDED_BY[module][0])
    return f'{module} is not installed; this command needs pip install "mvld[{",".join(wanted)}]"'


def output_folder(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` (and parents) for writing; ConfigError naming the problem otherwise.

    Called before a long job starts, so a typo costs a one-line error, not a traceback after
    the work is done.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what} {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".mvld-write-test-{os.getpid()}"  # one per process (torchrun)
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write the {what} {folder}: {exc.strerror or exc}") from None
    return folder


def command(prog: str, extras: str) -> Callable[[Main], Main]:
    """Decorate a command's ``main``: stop signals and missing extras end in one line.

    ``extras`` is what the command needs installed, e.g. ``"train"`` or ``"edge,sim"``; the
    heavy imports must happen inside ``main`` (after parsing, so ``--help`` works without them).
    """

    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def guarded(argv: list[str] | None = None) -> int:
            try:
                with stop_signals_raise():
                    return main(argv)
            except STOP_EXCEPTIONS as stop:
                how = "stopped (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
                sys.stderr.write(f"\n{prog}: {how}\n")
                return exit_code_of(stop)
            except ModuleNotFoundError as exc:
                advice = missing_extra(exc, extras)
                if advice is None:
                    raise
                sys.stderr.write(f"{prog}: {advice}\n")
                return EXIT_USAGE
            except BrokenPipeError:  # `... | head` closed the pipe: the reader has enough
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes
                return 0

        return guarded

    return decorate
