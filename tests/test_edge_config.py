"""``mvld-edge`` options come from the config dataclasses: help and default per flag, a TOML
file under the flags, ``--print-config`` that the file reader reads back."""

import argparse
import contextlib
import io
from pathlib import Path

import pytest

from mvld.common.errors import ConfigError
from mvld.edge.cli import build_parser, config_from_args, main

BASE = ["--cams", "sim://0,sim://1,sim://2", "--connect", "tcp://127.0.0.1:5555"]


def _config(*argv: str):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_every_option_has_a_help_line_with_its_default_or_required() -> None:
    options = [
        a for a in build_parser()._actions if a.option_strings and a.dest.startswith("config:")
    ]
    assert len(options) >= 30
    for action in options:
        text = action.help or ""
        assert len(text) > 15, action.option_strings
        assert "(default: " in text or "(required)" in text, text
        assert "(default: )" not in text and "(default: '')" not in text, text
    required = {a.option_strings[0] for a in options if "(required)" in (a.help or "")}
    assert required == {"--cams", "--connect"}


def test_a_config_file_sets_options_and_flags_given_override_it(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        'cameras = ["sim://0", "sim://1"]\nconnect = "tcp://10.0.0.9:5555"\n'
        'fps = 10\nhealth = ["cam1=off"]\n[policy]\nmax_views = 1\n'
        'rule = "priority"\npriority = [1]\n[capture]\nbackoff_max_s = 2.5\n'
        "[file]\nrealtime = false\n"
    )
    config = _config("--config", str(path), "--fps", "20")
    assert config.cameras == ("sim://0", "sim://1") and config.connect == ("tcp://10.0.0.9:5555",)
    assert config.fps == 20.0, "the flag wins over the file"
    assert config.policy.max_views == 1 and config.policy.priority == (1,)
    assert config.capture.backoff_max_s == 2.5
    assert config.source_options["file"]["realtime"] is False
    assert config.camera_health["cam1"] != config.camera_health["cam0"], "cam1=off applied"
    assert _config("--config", str(path), "--realtime").source_options["file"]["realtime"]


def test_flags_reach_every_section() -> None:
    config = _config(
        *BASE,
        "--connect",
        "tcp://10.0.0.2:5555",
        "--max-views",
        "2",
        "--withhold-rule",
        "priority",
        "--priority",
        "0,2",
        "--watchdog",
        "1.5",
        "--no-realtime",
        "--loop",
        "--frames",
        "5",
        "--metrics-port",
        "9101",
    )
    assert config.connect == ("tcp://127.0.0.1:5555", "tcp://10.0.0.2:5555")
    assert (config.policy.max_views, config.policy.rule, config.policy.priority) == (
        2,
        "priority",
        (0, 2),
    )
    assert config.capture.watchdog_s == 1.5 and config.max_framesets == 5
    assert config.source_options["file"] == {"loop": True, "realtime": False}
    assert config.metrics_port == 9101 and config.metrics_host == "127.0.0.1"


@pytest.mark.parametrize(
    "text, message",
    [
        ("fsp = 30\n", "unknown option 'fsp'; valid: backend, cameras"),
        ("[policy]\nmax_view = 2\n", "unknown option 'max_view' in [policy]; valid: budget_bytes"),
        ('fps = "fast"\n', "fps must be a number, got 'fast'"),
        ("[capture]\nreopen_ended = 1\n", "[capture] reopen_ended must be true or false, got 1"),
        ("cameras = [\n", "not valid TOML"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        _config(*BASE, "--config", str(path))
    assert "\n" not in str(error.value)


def test_missing_required_options_and_bad_list_values_are_named() -> None:
    with pytest.raises(ConfigError, match=r"--cams is required \(or cameras in a --config"):
        _config("--connect", "tcp://h:1")
    with pytest.raises(ConfigError, match="--priority expects int values"):
        _config(*BASE, "--priority", "first")
    with pytest.raises(ConfigError, match="cannot read the config file"):
        _config(*BASE, "--config", "/no/such/file.toml")


def test_print_config_is_a_file_that_reads_back_to_the_same_config(tmp_path: Path) -> None:
    argv = [
        *BASE,
        "--node-id",
        "n1",
        "--max-views",
        "2",
        "--priority",
        "2",
        "--health",
        "cam2=off",
        "--no-realtime",
        "--keys",
        "n.key_secret",
        "--server-key",
        "r.key",
    ]
    printed = _print_config(argv)
    assert 'node_id = "n1"' in printed and "[policy]" in printed and "max_views = 2" in printed
    path = tmp_path / "printed.toml"
    path.write_text(printed)
    assert _print_config(["--config", str(path)]) == printed
    assert _config("--config", str(path)) == _config(*argv)


def _print_config(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--print-config"]) == 0
    return out.getvalue()


def test_logging_flags_are_spelled_as_in_every_service() -> None:
    args = build_parser().parse_args([*BASE, "-v"])
    assert isinstance(args, argparse.Namespace) and args.verbose
    assert build_parser().parse_args([*BASE, "--log-level", "WARNING"]).log_level == "WARNING"
