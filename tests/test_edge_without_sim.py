"""An edge-only install has no pybullet: ``mvld-edge`` imports without it and names the extra.

The ``sim://`` source is loaded only when a ``sim://`` URI is used (tests/test_layering.py
style: a real interpreter with pybullet blocked at import).
"""

import subprocess
import sys

_WITHOUT_PYBULLET = """
import sys

sys.modules["pybullet"] = None  # as if not installed: importing it raises ModuleNotFoundError
from mvld.edge import cli

loaded = sorted(m for m in sys.modules if m.startswith("mvld.sim") or
                (m.startswith("pybullet") and sys.modules[m] is not None))
assert not loaded, loaded
print("imported")
sys.exit(cli.main(sys.argv[1:]))
"""


def _edge_without_pybullet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_PYBULLET, *args], capture_output=True, text=True, timeout=60
    )


def test_edge_cli_imports_without_pybullet_and_answers_help() -> None:
    result = _edge_without_pybullet("--help")
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout and "usage: mvld-edge" in result.stdout


def test_a_sim_camera_without_pybullet_is_a_one_line_error_naming_the_extra() -> None:
    result = _edge_without_pybullet(
        "--cams", "sim://0", "--connect", "tcp://127.0.0.1:9", "--frames", "1"
    )
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [
        'mvld-edge: error: sim:// needs pybullet, which is not installed: pip install "mvld[sim]"'
    ], result.stderr
    assert "Traceback" not in result.stderr
