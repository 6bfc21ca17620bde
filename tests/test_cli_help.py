"""Every console script exists and answers ``--help``; the umbrella's subcommands work."""

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mvld import __version__
from mvld.cli import main as mvld_main

SCRIPTS = ["mvld", "mvld-edge", "mvld-receiver", "mvld-export", "mvld-train", "mvld-eval",
           "mvld-data"]


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
