"""Shared pytest fixtures and paths."""

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _stage_folders() -> dict[str, str]:
    """Source folder of each import package, read from setup.py (the one place it is written)."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "STAGE_FOLDERS" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise RuntimeError("setup.py defines no STAGE_FOLDERS")


STAGE_FOLDERS = _stage_folders()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder."""
    return REPO_ROOT


def source_modules() -> list[str]:
    """Dotted names of every Python module in the source tree, by the setup.py mapping."""
    modules = []
    for package, folder in STAGE_FOLDERS.items():
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            relative = path.relative_to(REPO_ROOT / folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            modules.append(".".join([package, *parts]))
    return modules


@pytest.fixture
def one_torch_thread():
    """Small tensors: one torch thread avoids contention on shared CPUs (and keeps timings
    stable). Test modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
