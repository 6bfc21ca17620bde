"""Receiver configuration: validated once, before any socket or model is touched."""

import pytest

from mvld.common.errors import ConfigError
from mvld.receiver.cli import build_parser, config_from_args
from mvld.receiver.service import ReceiverConfig


def test_threads_flag_reaches_the_config() -> None:
    args = build_parser().parse_args(["--gpu", "-1", "--threads", "1"])
    assert config_from_args(args).threads == 1
    assert config_from_args(build_parser().parse_args([])).threads is None


@pytest.mark.parametrize("field, value, flag", [("threads", 0, "--threads"),
                                                ("steps", 0, "--steps"),
                                                ("max_batch", -1, "--max-batch")])
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
