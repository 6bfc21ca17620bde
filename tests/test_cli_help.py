"""Every console script exists and answers ``--help``; the umbrella's subcommands work."""

import argparse
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mvld import __version__
from mvld.cli import main as mvld_main
from mvld.receiver.hooks import parse_task

if sys.version_info >= (3, 11):
    import tomllib as toml_parser
else:
    import tomli as toml_parser

SCRIPTS = [
    "mvld",
    "mvld-edge",
    "mvld-receiver",
    "mvld-export",
    "mvld-train",
    "mvld-eval",
    "mvld-data",
]


def _script_path(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"console script {name} is not installed beside {sys.executable}"
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_answers_help(script: str) -> None:
    result = subprocess.run([_script_path(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert mvld_main(["version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_keys_writes_an_owner_only_secret(tmp_path: Path) -> None:
    assert mvld_main(["keys", "node1", "--dir", str(tmp_path)]) == 0
    secret = tmp_path / "node1.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert (tmp_path / "node1.key").is_file()
    assert mvld_main(["keys", "node1", "--dir", str(tmp_path)]) == 2, "must not overwrite"


def test_unknown_subcommand_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        mvld_main(["no-such-command"])
    assert exc.value.code == 2


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    "script, example", [("mvld-edge", "edge-3cam.toml"), ("mvld-receiver", "receiver.toml")]
)
def test_sample_configs_load_and_print_config_reads_back(
    script: str, example: str, tmp_path: Path
) -> None:
    """The shipped sample configs load; --print-config writes a file --config accepts."""
    printed = _print_config(script, "--config", str(EXAMPLES / example))
    values = toml_parser.loads(printed)
    if script == "mvld-edge":
        assert values["cameras"] == ["csi://0", "csi://1", "v4l2:///dev/video2"]
        assert values["policy"]["max_views"] == 2 and values["capture"]["watchdog_s"] == 3.0
    else:
        assert values["bind"] == ["tcp://*:5555"] and values["keys"]
        for task in values["tasks"]:
            parse_task(task)
    (tmp_path / "again.toml").write_text(printed)
    assert _print_config(script, "--config", str(tmp_path / "again.toml")) == printed


def _print_config(script: str, *args: str) -> str:
    result = subprocess.run(
        [_script_path(script), *args, "--print-config"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("script", ["mvld-edge", "mvld-receiver"])
def test_services_spell_shared_flags_alike(script: str) -> None:
    result = subprocess.run([_script_path(script), "--help"], capture_output=True, text=True)
    text = " ".join(result.stdout.split())
    for flag in (
        "--config FILE.toml",
        "--print-config",
        "--log-level",
        "-v, --verbose",
        "--log-json",
        "--keys",
        "--metrics-port PORT",
        "--metrics-host ADDRESS",
        "--gpu N",
        "--model PATH",
        "--status-every S",
        "--threads N",
    ):
        assert flag in text, f"{script}: {flag}"
    assert "(default: '')" not in text and "issue " not in text and "{" + "'" not in text


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every console script's parser and, under "SCRIPT SUB", each of its subcommands'."""
    from mvld.cli import build_parser as mvld_parser
    from mvld.data_cli import build_parser as data_parser
    from mvld.edge.cli import build_parser as edge_parser
    from mvld.export.cli import build_parser as export_parser
    from mvld.receiver.cli import build_parser as receiver_parser
    from mvld.train.cli import build_parser as train_parser
    from mvld.train.eval_cli import build_parser as eval_parser

    found = {}
    for script, build in [
        ("mvld", mvld_parser),
        ("mvld-edge", edge_parser),
        ("mvld-receiver", receiver_parser),
        ("mvld-export", export_parser),
        ("mvld-train", train_parser),
        ("mvld-eval", eval_parser),
        ("mvld-data", data_parser),
    ]:
        parser = build()
        found[script] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found |= {f"{script} {name}": sub for name, sub in action.choices.items()}
    return found


PARSERS = _parsers()
LEAVES = [
    name
    for name, parser in PARSERS.items()
    if not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
]
GPU_COMMANDS = [
    "mvld-edge",
    "mvld-receiver",
    "mvld-export trt",
    "mvld-train ae",
    "mvld-train score",
    "mvld-train classifier",
    "mvld-train all",
    "mvld-eval",
]


def _help(name: str) -> str:
    return " ".join(PARSERS[name].format_help().split())


def test_every_command_is_covered() -> None:
    assert {name.split()[0] for name in PARSERS} == set(SCRIPTS)
    assert set(GPU_COMMANDS) <= set(LEAVES) and "mvld-export onnx" in LEAVES


@pytest.mark.parametrize("name", [n for n in LEAVES if n != "mvld version"])
def test_every_command_spells_the_logging_flags_alike(name: str) -> None:
    text = _help(name)
    for flag in ("--log-level {DEBUG,INFO,WARNING,ERROR}", "-v, --verbose", "-q, --quiet"):
        assert flag in text, f"{name}: {flag}"


@pytest.mark.parametrize("name", GPU_COMMANDS)
def test_every_command_that_can_use_a_gpu_takes_gpu_n(name: str) -> None:
    text = _help(name)
    assert "--gpu N" in text, name
    if name.startswith(("mvld-train", "mvld-eval")):
        assert "--device DEVICE" in text and "cuda:N" in text, name


@pytest.mark.parametrize("name", list(PARSERS))
def test_help_texts_cite_no_issue_and_print_no_python_values(name: str) -> None:
    text = _help(name)
    assert not re.search(r"\bissue \d", text), name
    assert "{'" not in text and "('" not in text and "(default: '')" not in text, name


@pytest.mark.parametrize("stage", ["ae", "score", "classifier", "all"])
def test_every_training_option_says_what_it_does(stage: str) -> None:
    parser = PARSERS[f"mvld-train {stage}"]
    for action in parser._actions:
        assert action.help and not action.help.startswith("("), f"{stage}: {action.dest}"
    assert re.search(r"--data DIR .* \(required\)", _help(f"mvld-train {stage}"))


def test_gpu_n_is_the_torch_device_cuda_n_and_not_both(capsys: pytest.CaptureFixture[str]) -> None:
    from mvld.train.cli import main as train_main

    assert train_main(["ae", "--data", "d", "--gpu", "1", "--print-config"]) == 0
    assert toml_parser.loads(capsys.readouterr().out)["device"] == "cuda:1"
    assert train_main(["score", "--data", "d", "--ae", "a", "--gpu", "-1", "--print-config"]) == 0
    assert toml_parser.loads(capsys.readouterr().out)["device"] == "cpu"
    assert train_main(["ae", "--data", "d", "--gpu", "0", "--device", "cpu"]) == 2
    assert "not both" in capsys.readouterr().err


def test_train_print_config_reads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mvld.train.cli import main as train_main

    assert (
        train_main(
            [
                "score",
                "--data",
                "d",
                "--ae",
                "a",
                "--widths",
                "32,16",
                "--no-progress",
                "--print-config",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    (tmp_path / "score.toml").write_text(printed)
    assert train_main(["score", "--config", str(tmp_path / "score.toml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    assert toml_parser.loads(printed)["widths"] == [32, 16]
