"""Downstream task hooks: the receiver's plug-in interface.

A hook is any callable ``hook(result: FrameSetResult) -> None``, optionally with ``close()``.
It is made by a *factory* — usually the hook class itself — called with the options of
``--task NAME:key=value,...`` as keyword arguments whose values are strings (the hook
converts them and raises ``ConfigError`` for bad ones, at start-up).

NAME is one of: a built-in task (``save``, ``classify``, ``jsonl``, ``publish``), a name
registered by an installed package in the entry-point group ``mvld.tasks``, or a dotted path
``package.module:Name``. Names are unique: a package registering a name that is already
taken is an error, and an unknown name lists the valid ones (docs/ARCHITECTURE.md section 4).

Hooks run in order on the receiver's worker thread, so a hook sees what earlier ones put in
``result.annotations`` (``--task classify --task jsonl`` logs the labels). A hook that raises
is logged (rate-limited) and counted in ``mvld_receiver_hook_errors_total{task}``, and the
receiver goes on with the next hook and frame set.
"""

from __future__ import annotations

import importlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from mvld.common.errors import ConfigError, MVLDError
from mvld.receiver.observability import RateLimitedLogger, ReceiverMetrics
from mvld.receiver.results import FrameSetResult

__all__ = [
    "BUILTIN_TASKS",
    "ENTRY_POINT_GROUP",
    "Hook",
    "HookRunner",
    "TaskSpec",
    "available_tasks",
    "build_hooks",
    "load_factory",
    "parse_task",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mvld.tasks"

BUILTIN_TASKS: dict[str, str] = {
    "save": "mvld.receiver.tasks.save:SaveFrameSets",
    "classify": "mvld.receiver.tasks.classify:ClassifyViews",
    "jsonl": "mvld.receiver.tasks.jsonl:JsonLinesLog",
    "publish": "mvld.receiver.tasks.publish:PublishResults",
}
"""Built-in task name -> dotted path of its factory."""

_OPTION_START = re.compile(r"\s*[A-Za-z_]\w*\s*=")


@runtime_checkable
class Hook(Protocol):
    """The contract of a downstream task: called once per completed frame set."""

    def __call__(self, result: FrameSetResult) -> None: ...


@dataclass(frozen=True)
class TaskSpec:
    """A parsed ``--task NAME[:key=value,...]``."""

    name: str
    options: dict[str, str] = field(default_factory=dict)


def parse_task(text: str) -> TaskSpec:
    """Parse ``NAME[:key=value,...]``; NAME may be a dotted path ``pkg.mod:Name``.

    Options start at the first ``:`` followed by ``key=``, so values may hold colons
    (``publish:bind=tcp://*:5600``). Values may not hold commas.
    """
    text = text.strip()
    name, options_text = text, ""
    for match in re.finditer(":", text):
        if _OPTION_START.match(text, match.end()):
            name, options_text = text[: match.start()], text[match.end() :]
            break
    if not name or "=" in name:
        raise ConfigError(f"--task {text!r}: expected NAME[:key=value,...]")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in options_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ConfigError(f"--task {text!r}: option {item!r} is not key=value")
        if key.strip() in options:
            raise ConfigError(f"--task {text!r}: option {key.strip()!r} given twice")
        options[key.strip()] = value.strip()
    return TaskSpec(name, options)


def _entry_point_tasks() -> dict[str, Any]:
    """Installed ``mvld.tasks`` entry points by name; a duplicate name is a ConfigError."""
    found: dict[str, Any] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in BUILTIN_TASKS or point.name in found:
            raise ConfigError(
                f"task name {point.name!r} is registered twice "
                f"(entry point {point.value}); task names must be unique"
            )
        found[point.name] = point
    return found


def available_tasks() -> list[str]:
    """Every task name ``--task`` accepts (dotted paths aside), sorted."""
    return sorted([*BUILTIN_TASKS, *_entry_point_tasks()])


def _import_dotted(path: str) -> Callable[..., Any]:
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load task {path!r}: {exc}") from exc
    if not callable(target):
        raise ConfigError(f"task {path!r} is not callable")
    return target


def load_factory(name: str) -> Callable[..., Any]:
    """The factory of a built-in, entry-point or dotted-path task; unknown names list the rest."""
    installed = _entry_point_tasks()  # first, so a clash with a built-in name always shows
    if name in BUILTIN_TASKS:
        return _import_dotted(BUILTIN_TASKS[name])
    if name in installed:
        try:
            factory = installed[name].load()
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"cannot load task {name!r} ({installed[name].value}): {exc}"
            ) from exc
        if not callable(factory):
            raise ConfigError(f"task {name!r} ({installed[name].value}) is not callable")
        return factory
    if ":" in name:
        return _import_dotted(name)
    valid = ", ".join(sorted([*BUILTIN_TASKS, *installed]))
    raise ConfigError(f"unknown task {name!r}; valid: {valid} (or a dotted path module:Name)")


def build_hook(spec: TaskSpec) -> Hook:
    """Instantiate one task; its option errors surface as ConfigError naming the task."""
    factory = load_factory(spec.name)
    try:
        hook = factory(**spec.options)
    except MVLDError:
        raise
    except TypeError as exc:
        raise ConfigError(f"task {spec.name!r}: bad options {spec.options}: {exc}") from exc
    except Exception as exc:  # a third-party task's start-up failure: a clean error, not a crash
        raise ConfigError(
            f"task {spec.name!r} failed to start: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(hook):
        raise ConfigError(f"task {spec.name!r} made a {type(hook).__name__}, not a callable")
    return hook


class HookRunner:
    """Runs every hook on each result; errors are counted and logged, never propagated."""

    def __init__(
        self,
        hooks: Sequence[tuple[str, Hook]],
        metrics: ReceiverMetrics,
        *,
        warn_interval_s: float = 5.0,
    ) -> None:
        names = [name for name, _ in hooks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"task(s) {duplicates} given more than once")
        self.hooks = list(hooks)
        self.metrics = metrics
        self.warnings = RateLimitedLogger(log, warn_interval_s)

    @property
    def names(self) -> list[str]:
        """Task names in call order."""
        return [name for name, _ in self.hooks]

    def __call__(self, result: FrameSetResult) -> None:
        """Hand ``result`` to each hook in order."""
        for name, hook in self.hooks:
            start = time.perf_counter()
            try:
                hook(result)
            except Exception as exc:  # a task's bug must not stop the receiver
                self.metrics.hook_errors.inc(task=name)
                self.warnings.warning(
                    name,
                    "task %s raised %s: %s",
                    name,
                    type(exc).__name__,
                    exc,
                    extra={"task": name},
                )
            self.metrics.hook_seconds.observe(time.perf_counter() - start, task=name)

    def close(self) -> None:
        """Close every hook that has ``close()``; a failing close is logged, not raised."""
        for name, hook in self.hooks:
            close = getattr(hook, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception:  # closing the rest matters more than one task's error
                log.exception("task %s failed to close", name)


def build_hooks(
    texts: Sequence[str], metrics: ReceiverMetrics, extra: Sequence[tuple[str, Hook]] = ()
) -> HookRunner:
    """Parse and build every ``--task`` (then ``extra``, in-process hooks); on an error, hooks
    already built are closed."""
    specs = [parse_task(text) for text in texts]
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"--task {duplicates} given more than once")
    built: list[tuple[str, Hook]] = []
    try:
        for spec in specs:
            built.append((spec.name, build_hook(spec)))
    except BaseException:
        HookRunner(built, metrics).close()
        raise
    return HookRunner([*built, *extra], metrics)
