"""Conversion of ``--task`` option strings, with errors that name the task and option."""

from __future__ import annotations

from mvld.common.errors import ConfigError

__all__ = ["parse_bool", "parse_choice", "parse_positive"]

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(task: str, key: str, value: str | bool) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off``."""
    if isinstance(value, bool):
        return value
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"task {task}: {key}={value!r} is not a boolean (1/0, true/false)")


def parse_positive(task: str, key: str, value: str | float) -> float:
    """A positive number."""
    try:
        number = float(value)
    except ValueError as exc:
        raise ConfigError(f"task {task}: {key}={value!r} is not a number") from exc
    if not number > 0:
        raise ConfigError(f"task {task}: {key} must be > 0, got {value!r}")
    return number


def parse_choice(task: str, key: str, value: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ConfigError(f"task {task}: {key}={value!r}; valid: {', '.join(choices)}")
    return value
