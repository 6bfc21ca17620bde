"""Receiver configuration: validated once, before any socket or model is touched; safe
defaults (loopback without keys); a clean stop at any moment of start-up."""

import contextlib
import io
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from receiver_fixtures import make_tiny_model

from mvld.common.errors import ConfigError
from mvld.receiver.cli import build_parser, config_from_args, main
from mvld.receiver.service import ReceiverConfig, ReceiverService, is_local_endpoint


def test_threads_flag_reaches_the_config() -> None:
    args = build_parser().parse_args(["--gpu", "-1", "--threads", "1"])
    assert config_from_args(args).threads == 1
    assert config_from_args(build_parser().parse_args([])).threads is None


@pytest.mark.parametrize(
    "field, value, flag",
    [("threads", 0, "--threads"), ("steps", 0, "--steps"), ("max_batch", -1, "--max-batch")],
)
def test_non_positive_values_are_refused(field: str, value: int, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        ReceiverConfig(**{field: value})


def test_keys_without_allow_list_is_refused() -> None:
    with pytest.raises(ConfigError, match="--keys and --allow go together"):
        ReceiverConfig(keys="receiver.key_secret")


def test_clock_window_flag_reaches_the_config_and_must_be_positive() -> None:
    assert config_from_args(build_parser().parse_args([])).clock_window_s == 60.0
    args = build_parser().parse_args(["--clock-window", "5"])
    assert config_from_args(args).clock_window_s == 5.0
    with pytest.raises(ConfigError, match="--clock-window"):
        ReceiverConfig(clock_window_s=0.0)


def test_without_keys_the_default_bind_is_loopback_and_with_keys_every_interface() -> None:
    assert ReceiverConfig().bind == ("tcp://127.0.0.1:5555",)
    assert ReceiverConfig(keys="r.key_secret", allow="allowed").bind == ("tcp://*:5555",)
    assert ReceiverConfig(bind=("tcp://*:6000",)).bind == ("tcp://*:6000",), "explicit wins"
    args = build_parser().parse_args(
        ["--bind", "tcp://*:1,tcp://127.0.0.1:2", "--bind", "ipc:///tmp/r"]
    )
    assert config_from_args(args).bind == ("tcp://*:1", "tcp://127.0.0.1:2", "ipc:///tmp/r")


@pytest.mark.parametrize(
    "endpoint, local",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://localhost:1", True),
        ("tcp://[::1]:1", True),
        ("ipc:///tmp/mvld", True),
        ("inproc://x", True),
        ("tcp://*:5555", False),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://10.1.2.3:5555", False),
        ("tcp://eth0:5555", False),
    ],
)
def test_which_endpoints_only_this_machine_can_reach(endpoint: str, local: bool) -> None:
    assert is_local_endpoint(endpoint) is local


def test_metrics_listen_on_loopback_unless_told_otherwise() -> None:
    assert ReceiverConfig().metrics_host == "127.0.0.1"
    args = build_parser().parse_args(["--metrics-port", "9100", "--metrics-host", "0.0.0.0"])
    assert config_from_args(args).metrics_host == "0.0.0.0"


def test_an_unauthenticated_public_bind_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    model = make_tiny_model()
    for bind, warned in (("tcp://127.0.0.1:0", False), ("tcp://*:0", True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mvld.receiver.service"):
            ReceiverService(ReceiverConfig(bind=(bind,), gpu=-1), model=model).close()
        warnings = [r.getMessage() for r in caplog.records if "without CurveZMQ" in r.getMessage()]
        assert bool(warnings) is warned, (bind, warnings)
    assert "tcp://*:0" in warnings[0] and "--keys/--allow" in warnings[0]


def test_help_gives_every_option_a_line_and_its_default() -> None:
    text = " ".join(build_parser().format_help().split())
    for shown in (
        "--steps N sampler steps (default: 20)",
        "--backlog N frame sets kept per "
        "node, newest first; deep enough for one node to fill a batch within the "
        "latency budget (default: --max-rate x budget, 4 to --max-batch)",
        "--max-batch N frame sets per imputation call at most (default: 64)",
        "(default: tcp://127.0.0.1:5555; tcp://*:5555 with --keys)",
        "-v, --verbose",
        "--log-level",
    ):
        assert shown in text, shown
    assert "(default: '')" not in text and "issue" not in text


def test_print_config_reads_back_and_flags_override_the_file(tmp_path: Path) -> None:
    first = tmp_path / "first.toml"
    printed = _stdout_of(["--gpu", "-1", "--task", "save:dir=x,format=png", "--print-config"])
    first.write_text(printed)
    again = _stdout_of(["--config", str(first), "--print-config"])
    assert again == printed
    config = config_from_args(build_parser().parse_args(["--config", str(first), "--steps", "8"]))
    assert config.tasks == ("save:dir=x,format=png",) and config.gpu == -1 and config.steps == 8


@pytest.mark.parametrize(
    "text, message",
    [
        ('bnd = "tcp://*:1"\n', "unknown option 'bnd'; valid: allow, backlog_per_node, bind"),
        ("steps = 2.5\n", "steps must be an integer, got 2.5"),
        ("steps = \n", "not valid TOML"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_args(build_parser().parse_args(["--config", str(path)]))


def _stdout_of(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def _sigterm_caught(pid: int) -> bool:
    """The process has its own SIGTERM handler (bit 15 of SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_sigterm_at_any_moment_of_start_up_exits_0() -> None:
    """A supervisor may stop the receiver while it is still importing torch or loading the
    model: that is its normal stop, status 0 (docs/RECEIVER.md). Three receivers at once get
    SIGTERM 0.1, 0.5 and 1 s after their start. Before Python runs the console script (the
    interpreter's own start, ~0.07 s) the system's default applies, so each signal waits for
    the script's handler at least."""
    script = shutil.which("mvld-receiver", path=str(Path(sys.executable).parent))
    assert script
    delays = [0.1, 0.5, 1.0]
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [script, "--gpu", "-1", "--bind", "tcp://127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in delays
    ]
    try:
        for process, delay_s in zip(processes, delays, strict=True):
            while not _sigterm_caught(process.pid):
                assert process.poll() is None and time.monotonic() - started < 30, "no handler"
                time.sleep(0.005)
            time.sleep(max(0.0, started + delay_s - time.monotonic()))
            process.send_signal(signal.SIGTERM)
        outputs = [process.communicate(timeout=120)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, output, delay_s in zip(processes, outputs, delays, strict=True):
        assert process.returncode == 0, (delay_s, output)
        assert "Traceback" not in output and "Exception ignored" not in output, output
