"""Shared pytest fixtures and paths."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Source folder of each import package, as mapped in setup.py.
STAGE_FOLDERS = {
    "mvld": "mvld",
    "mvld.common": "common",
    "mvld.edge": "edge",
    "mvld.receiver": "receiver",
    "mvld.export": "export",
    "mvld.train": "train",
}


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
