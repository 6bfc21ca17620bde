"""Map the top-level folders onto the ``mvld`` import package: the one place this is written.

The product's layout puts each stage in its own top-level folder (``edge/``, ``receiver/``,
...) while Python code imports them as ``mvld.edge`` and so on; ``app/`` (the umbrella
command, the demo) is the ``mvld`` package itself. Nothing imports from a plain checkout
without an install (``pip install -e .``): the folders are not import packages by their
names. ``tests/conftest.py`` reads ``STAGE_FOLDERS`` from this file.
Subpackages are discovered with ``find_packages`` so a new folder can never be
silently left out of the wheel (a hand-written list would drop it).
"""

from setuptools import find_namespace_packages, find_packages, setup

STAGE_FOLDERS = {
    "mvld": "app",
    "mvld.common": "common",
    "mvld.edge": "edge",
    "mvld.receiver": "receiver",
    "mvld.model": "model",
    "mvld.sim": "sim",
    "mvld.export": "export",
    "mvld.train": "train",
}


def _code_packages() -> list[str]:
    found = []
    for package, folder in STAGE_FOLDERS.items():
        found.append(package)
        found += [f"{package}.{sub}" for sub in find_packages(folder)]
    return found


def _data_packages() -> list[str]:
    """Folders named ``assets`` (shipped models) and everything below them."""
    found = []
    for package, folder in STAGE_FOLDERS.items():
        subs = find_namespace_packages(folder, include=["assets", "assets.*"])
        found += [f"{package}.{sub}" for sub in subs]
    return found


setup(
    packages=_code_packages() + _data_packages(),
    package_dir=STAGE_FOLDERS,
    package_data={package: ["*"] for package in _data_packages()},
)
