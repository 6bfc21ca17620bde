"""Command-line options generated from config dataclasses, with TOML files and --print-config.

A config dataclass is the one place an option is defined: the field's name is its TOML key,
the field's default its default, and ``field(metadata=option("what it does"))`` makes it a
``--flag`` with that help line and its default (or "required") shown. The effective options
are, lowest first: the defaults, a TOML file (``--config FILE.toml``), the flags given.
``--print-config`` writes them as TOML that ``--config`` reads back. A key of the file that is
no option is a one-line error naming it, so a typo never silently falls back to a default.

Also here: the flags every command spells alike (logging, ``--gpu``; see the section at the
end). Torch-free: ``mvld-edge`` uses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser as a package, tomli
    import tomli as tomllib

from mvld.common.errors import ConfigError

_METADATA_KEY = "mvld.option"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Option:
    """How a config field appears on the command line (see :func:`option`)."""

    help: str
    flag: str | None = None  # default: --field-name
    required: bool = False
    default_text: str | None = None  # shown instead of the default (one computed at run time)
    metavar: str | None = None
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    split: bool = True  # a list option's flag value is comma-separated; else one item per flag


def option(help: str, **how: Any) -> dict[str, Option]:
    """Field metadata that makes a config field a command-line option and a TOML key."""
    return {_METADATA_KEY: Option(help, **how)}


# Options both services have: one definition, so edge and receiver spell and explain them
# alike. Functions, because a dataclass takes ownership of the field object it is given.
def metrics_port_field() -> Any:
    """``metrics_port``: the Prometheus endpoint's port, off by default."""
    return field(
        default=None,
        metadata=option(
            "serve Prometheus metrics on this port", default_text="off", metavar="PORT"
        ),
    )


def metrics_host_field() -> Any:
    """``metrics_host``: where the metrics endpoint listens, this machine only by default."""
    return field(
        default="127.0.0.1",
        metadata=option(
            "address the metrics endpoint listens on (0.0.0.0: every interface)", metavar="ADDRESS"
        ),
    )


def status_every_field() -> Any:
    """``status_every_s``: the cadence of the one-line status log."""
    return field(
        default=10.0,
        metadata=option("seconds between status lines", flag="--status-every", metavar="S"),
    )


@dataclass(frozen=True)
class Section:
    """A config dataclass whose options go to one table of the TOML file (None: top level)."""

    cls: type
    table: str | None = None
    title: str | None = None  # the --help group
    defaults: Mapping[str, Any] = field(default_factory=dict)  # overrides, computed at run time


@dataclass(frozen=True)
class _Field:
    section: Section
    name: str
    option: Option
    kind: type  # str, int, float, bool or Path (the element type of a list)
    is_list: bool
    default: Any  # dataclasses.MISSING when there is none

    @property
    def flag(self) -> str:
        return self.option.flag or "--" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return f"config:{self.section.table or ''}:{self.name}"

    @property
    def key(self) -> str:
        """Where the option sits in a TOML file, for messages."""
        return f"[{self.section.table}] {self.name}" if self.section.table else self.name


Values = dict[type, dict[str, Any]]  # section class -> field name -> effective value


def _kind_of(annotation: Any) -> tuple[type, bool]:
    """``int | None`` -> (int, False); ``tuple[str, ...]`` -> (str, True)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], True
    if annotation not in (str, int, float, bool, Path):
        raise TypeError(f"no command-line form for a {annotation!r} field")
    return annotation, False


def _fields(section: Section) -> list[_Field]:
    hints = typing.get_type_hints(section.cls)
    found = []
    for item in dataclasses.fields(section.cls):
        how = item.metadata.get(_METADATA_KEY)
        if how is None:
            continue
        kind, is_list = _kind_of(hints[item.name])
        if item.name in section.defaults:
            default = section.defaults[item.name]
        elif item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = dataclasses.MISSING
        found.append(_Field(section, item.name, how, kind, is_list, default))
    return found


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class ConfigOptions:
    """The options of one command: its sections' fields as flags and as TOML keys."""

    def __init__(self, sections: Sequence[Section]) -> None:
        self.sections = list(sections)
        self.fields = [f for section in self.sections for f in _fields(section)]
        seen: dict[tuple[str | None, str], _Field] = {}
        for item in self.fields:
            where = (item.section.table, item.name)
            if where in seen or item.flag in {f.flag for f in seen.values()}:
                raise ValueError(f"option {item.key} / {item.flag} is defined twice")
            seen[where] = item

    # -- the command line ------------------------------------------------------------------

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add ``--config``, ``--print-config`` and one flag per option (grouped by section)."""
        parser.add_argument(
            "--config",
            metavar="FILE.toml",
            type=Path,
            help="read options from a TOML file; flags given override it",
        )
        parser.add_argument(
            "--print-config",
            action="store_true",
            help="print the effective options as TOML (a file --config reads) and exit",
        )
        groups: dict[int, Any] = {}
        for item in self.fields:
            index = self.sections.index(item.section)
            if index not in groups:
                title = item.section.title
                groups[index] = parser.add_argument_group(title) if title else parser
            self._add_flag(groups[index], item)

    @staticmethod
    def _add_flag(group: Any, item: _Field) -> None:
        how = item.option
        if how.required:
            note = "required"
        elif how.default_text is not None:
            note = f"default: {how.default_text}"
        elif item.default is dataclasses.MISSING or item.default is None:
            raise ValueError(f"option {item.flag}: say what its absence means (default_text)")
        else:
            note = f"default: {_shown(item.default)}"
        text = f"{how.help} ({note})".replace("%", "%%")
        common: dict[str, Any] = {"dest": item.dest, "default": argparse.SUPPRESS, "help": text}
        if item.kind is bool and not item.is_list:
            group.add_argument(item.flag, action=argparse.BooleanOptionalAction, **common)
            return
        choices = how.choices() if callable(how.choices) else how.choices
        metavar = how.metavar or (None if choices else item.name.upper())
        if item.is_list:
            group.add_argument(item.flag, action="append", metavar=metavar, **common)
        else:
            converter = {int: int, float: float}.get(item.kind, str)
            group.add_argument(
                item.flag,
                type=converter,
                metavar=metavar,
                choices=list(choices) if choices else None,
                **common,
            )

    # -- defaults < file < flags -------------------------------------------------------------

    def values(self, args: argparse.Namespace) -> Values:
        """The effective options: defaults, then ``args.config``'s file, then the flags given.

        Options without a default that were not given are left out (the caller fills them);
        a required one missing, an unknown file key or a value of the wrong type is a
        :class:`ConfigError` naming it.
        """
        values: Values = {section.cls: {} for section in self.sections}
        for item in self.fields:
            if item.default is not dataclasses.MISSING:
                values[item.section.cls][item.name] = item.default
        config_file = getattr(args, "config", None)
        if config_file is not None:
            for item, value in self._read_file(Path(config_file)):
                values[item.section.cls][item.name] = value
        for cls, flags in self.given(args).items():
            values[cls] |= flags
        for item in self.fields:
            if item.option.required and values[item.section.cls].get(item.name) in (None, ()):
                raise ConfigError(f"{item.flag} is required (or {item.key} in a --config file)")
        return values

    def given(self, args: argparse.Namespace) -> Values:
        """Only the options set by flags, converted (for callers that merge files themselves)."""
        values: Values = {section.cls: {} for section in self.sections}
        given = vars(args)
        for item in self.fields:
            if item.dest in given:
                values[item.section.cls][item.name] = self._from_flag(item, given[item.dest])
        return values

    def _read_file(self, path: Path) -> list[tuple[_Field, Any]]:
        try:
            document = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(
                f"cannot read the config file {path}: {exc.strerror or exc}"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        tables = {s.table for s in self.sections if s.table is not None}
        by_key = {(f.section.table, f.name): f for f in self.fields}
        found = []
        for key, value in document.items():
            if key in tables and isinstance(value, dict):
                entries = [(key, name, item) for name, item in value.items()]
            else:
                entries = [(None, key, value)]
            for table, name, item_value in entries:
                item = by_key.get((table, name))
                if item is None:
                    found_in = f" in [{table}]" if table else ""
                    valid = sorted(f.name for f in self.fields if f.section.table == table)
                    if table is None:
                        valid += [f"[{t}]" for t in sorted(tables)]
                    raise ConfigError(
                        f"{path}: unknown option {name!r}{found_in}; valid: {', '.join(valid)}"
                    )
                found.append((item, self._from_toml(path, item, item_value)))
        return found

    @staticmethod
    def _from_toml(path: Path, item: _Field, value: Any) -> Any:
        if item.is_list:
            if isinstance(value, str) and item.option.split:
                value = [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(value, list):
                raise ConfigError(f"{path}: {item.key} must be a list, got {value!r}")
            return tuple(_element(path, item, v) for v in value)
        return _element(path, item, value)

    @staticmethod
    def _from_flag(item: _Field, value: Any) -> Any:
        if item.kind is bool and not item.is_list:
            return bool(value)
        if not item.is_list:
            return Path(value) if item.kind is Path else value
        parts = [p.strip() for v in value for p in (v.split(",") if item.option.split else [v])]
        try:
            return tuple(item.kind(p) for p in parts if p)
        except ValueError:
            raise ConfigError(
                f"{item.flag} expects {item.kind.__name__} values, got {','.join(value)!r}"
            ) from None

    # -- --print-config ----------------------------------------------------------------------

    def to_toml(self, values: Values) -> str:
        """``values`` as a TOML file that :meth:`values` reads back to the same options."""
        lines: list[str] = []
        tables = [None, *dict.fromkeys(s.table for s in self.sections if s.table is not None)]
        for table in tables:
            if table is not None:
                lines += ["", f"[{table}]"]
            for item in (f for f in self.fields if f.section.table == table):
                lines.append(f"# {item.option.help}")
                value = values[item.section.cls].get(item.name)
                if value is None:
                    unset = item.option.default_text
                    lines.append(f"# {item.name}: not set" + (f", {unset}" if unset else ""))
                else:
                    lines.append(f"{item.name} = {_toml_value(value)}")
        return "\n".join(lines).lstrip("\n") + "\n"


def _element(path: Path, item: _Field, value: Any) -> Any:
    kind = item.kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is Path and isinstance(value, str):
        return Path(value)
    wanted = str if kind is Path else kind
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, wanted):
        name = {
            str: "a string",
            int: "an integer",
            float: "a number",
            bool: "true or false",
            Path: "a path (a string)",
        }[kind]
        raise ConfigError(f"{path}: {item.key} must be {name}, got {value!r}")
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


# -- flags spelled alike in every command -------------------------------------------------------
#
# Logging: ``--log-level LEVEL``, ``-v`` / ``--verbose`` (DEBUG), ``-q`` / ``--quiet`` (errors
# only) and, on the services, ``--log-json``. Device: ``--gpu N`` picks CUDA device N on every
# command that can use a GPU (N = -1: the CPU, where the CPU is an option); the torch commands
# (``mvld-train``, ``mvld-eval``) also take ``--device cpu|cuda|cuda:N``, of which ``--gpu N``
# is a short form.


def add_logging_flags(
    parser: argparse.ArgumentParser,
    json_lines: bool = True,
    default: str = "INFO",
    quiet_also: str = "",
) -> None:
    """``--log-level``, ``-v`` / ``--verbose``, ``-q`` / ``--quiet`` and ``--log-json``.

    ``quiet_also`` says what else ``-q`` silences on this command (e.g. a progress bar).
    """
    group = parser.add_argument_group("logging")
    group.add_argument(
        "--log-level",
        default=default,
        choices=LOG_LEVELS,
        help=f"least severe messages logged (default: {default})",
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, the same as --log-level DEBUG"
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="errors only, the same as --log-level ERROR (wins over -v)"
        + (f"; also {quiet_also}" if quiet_also else ""),
    )
    if json_lines:
        group.add_argument(
            "--log-json", action="store_true", help="log one JSON object per line (with fields)"
        )


def log_level_of(args: argparse.Namespace) -> str:
    """The level the logging flags ask for."""
    if getattr(args, "quiet", False):
        return "ERROR"
    return "DEBUG" if args.verbose else args.log_level


def setup_logging_of(args: argparse.Namespace, text_format: str) -> None:
    """Logging as the logging flags ask: their level, and JSON lines with ``--log-json``.

    ``text_format`` is the command's own text layout otherwise (short jobs leave out times).
    """
    import logging

    from mvld.common.logs import JsonLogFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLogFormatter() if getattr(args, "log_json", False) else logging.Formatter(text_format)
    )
    logging.basicConfig(level=log_level_of(args), handlers=[handler], force=True)


def add_gpu_flag(parser: argparse.ArgumentParser) -> None:
    """``--gpu N`` on a command whose ``--device`` takes a torch device (see :func:`device_of`)."""
    parser.add_argument(
        "--gpu",
        type=int,
        metavar="N",
        default=None,
        help="CUDA device N, the same as --device cuda:N; -1: --device cpu (default: --device)",
    )


def device_of(gpu: int | None, device: str | None, default: str = "cpu") -> str:
    """The torch device ``--gpu`` names (``cuda:N``, or ``cpu`` for -1), else ``--device``."""
    if gpu is None:
        return device or default
    if device is not None:
        raise ConfigError(f"give --device {device} or --gpu {gpu}, not both")
    return "cpu" if gpu < 0 else f"cuda:{gpu}"
