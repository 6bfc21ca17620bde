"""Every ``mvld.edge`` module imports with torch blocked: a Jetson node has no torch."""

import subprocess
import sys

from conftest import source_modules

_BLOCK_TORCH = """
import importlib, importlib.abc, sys

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test (import of {name})")
        return None

sys.meta_path.insert(0, BlockTorch())
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {exc!r}")
assert "torch" not in sys.modules
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_edge_modules_import_without_torch() -> None:
    edge_modules = [
        m for m in source_modules()
        if (m == "mvld.edge" or m.startswith("mvld.edge.")) and not m.endswith(".__main__")
    ]
    assert "mvld.edge.cli" in edge_modules
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH, *edge_modules], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_blocker_really_blocks_torch() -> None:
    """Guard against a blocker that blocks nothing (the test above would then pass vacuously)."""
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH, "torch"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "torch is blocked" in result.stdout
