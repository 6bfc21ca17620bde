"""Map the top-level stage folders onto the ``mvld`` import package.

The user's design card puts each stage in its own top-level folder (``edge/``,
``receiver/``, ...) while Python code imports them as ``mvld.edge`` and so on.
Subpackages are discovered with ``find_packages`` so a new folder can never be
silently left out of the wheel (a hand-written list would drop it).
"""

from setuptools import find_packages, setup

STAGE_FOLDERS = {
    "mvld": "mvld",
    "mvld.common": "common",
    "mvld.edge": "edge",
    "mvld.receiver": "receiver",
    "mvld.export": "export",
    "mvld.train": "train",
}


def _packages() -> list[str]:
    found = []
    for package, folder in STAGE_FOLDERS.items():
        found.append(package)
        found += [f"{package}.{sub}" for sub in find_packages(folder)]
    return found


setup(
    packages=_packages(),
    package_dir=STAGE_FOLDERS,
    package_data={package: ["*.json", "assets/*", "assets/**/*"] for package in STAGE_FOLDERS},
    include_package_data=True,
)
