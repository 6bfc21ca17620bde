"""The wheel holds every module of the source tree, and each one imports from it.

A hand-written package list silently drops new subpackages from the wheel; this test
builds the real wheel, installs it into an empty folder and imports every module from
there (not from the checkout), so a missing file or folder fails here.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT, STAGE_FOLDERS, source_modules


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a copy of the sources: an in-tree build/ folder can hold stale modules.
    source = tmp_path_factory.mktemp("source") / "mvld"
    shutil.copytree(
        REPO_ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "runs",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".hypothesis",
        ),
    )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    wheels = list(out.glob("mvld-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _wheel_path(module: str) -> str:
    parts = module.split(".")
    is_package = any(
        (REPO_ROOT / folder / "/".join(parts[len(pkg.split(".")) :]) / "__init__.py").is_file()
        for pkg, folder in STAGE_FOLDERS.items()
        if module == pkg or module.startswith(pkg + ".")
    )
    return "/".join(parts) + ("/__init__.py" if is_package else ".py")


def test_wheel_holds_every_source_module(built_wheel: Path) -> None:
    names = set(zipfile.ZipFile(built_wheel).namelist())
    missing = [m for m in source_modules() if _wheel_path(m) not in names]
    assert not missing, f"modules missing from the wheel: {missing}"


def test_every_module_imports_from_the_installed_wheel(built_wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    with zipfile.ZipFile(built_wheel) as wheel:
        wheel.extractall(target)
    script = (
        "import importlib, sys\n"
        "import mvld\n"
        f"assert mvld.__file__.startswith({str(target)!r}), mvld.__file__\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        module = importlib.import_module(name)\n"
        f"        assert module.__file__.startswith({str(target)!r}), module.__file__\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {exc!r}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    importable = [m for m in source_modules() if not m.endswith(".__main__")]
    result = subprocess.run(
        [sys.executable, "-c", script, *importable],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_wheel_declares_every_console_script(built_wheel: Path) -> None:
    with zipfile.ZipFile(built_wheel) as wheel:
        entry_points = next(
            wheel.read(n).decode() for n in wheel.namelist() if n.endswith("entry_points.txt")
        )
    for script in (
        "mvld",
        "mvld-edge",
        "mvld-receiver",
        "mvld-export",
        "mvld-train",
        "mvld-eval",
        "mvld-data",
    ):
        assert f"\n{script} = " in "\n" + entry_points, script


def test_wheel_holds_every_shipped_asset(built_wheel: Path) -> None:
    """The default model files under each ``assets/`` folder travel in the wheel."""
    names = set(zipfile.ZipFile(built_wheel).namelist())
    assets = [
        "/".join([*package.split("."), *path.relative_to(REPO_ROOT / folder).parts])
        for package, folder in STAGE_FOLDERS.items()
        for path in (REPO_ROOT / folder).glob("assets/**/*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert "mvld/common/assets/default_model/encoder.onnx" in assets
    missing = [a for a in assets if a not in names]
    assert not missing, f"assets missing from the wheel: {missing}"
